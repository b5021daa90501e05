"""benchmarks/memory.py's estimate: it counts allocations (not views, not what was freed), and attention's score
matrix only where CUDA's flash kernel would not be used."""
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.memory import stage_peak


def test_counts_allocations_rounded_to_blocks_not_views_nor_freed_tensors():
    def stage():
        y = torch.ones(1000)             # 4000 bytes -> one 4096-byte block
        v = y.view(10, 100).t()          # a view: no new memory
        z = y * 2                        # 4096 more
        del y, v
        return z + 1                     # y is gone: still two blocks live, not three
    assert stage_peak(stage) == 2 * 4096


def test_attention_score_matrix_counted_only_without_flash():
    t, d = 1024, 64
    with FakeTensorMode():
        def attend(dtype):
            q = torch.empty(1, 1, t, d, dtype=dtype)
            return stage_peak(lambda: F.scaled_dot_product_attention(q, q, q))
        half, full = attend(torch.float16), attend(torch.float32)
    assert half < 1e6                            # output and log-sum-exp only
    assert full >= t * t * 4                     # the (T, T) float32 scores


def test_pixel_min_snr_runs_the_notebooks_own_model_and_loss():
    """benchmarks/pixel_min_snr.py executes notebook 04's definitions; with an infinite gamma its weighted loss is
    the notebook's L_simple, draw for draw, and with gamma = 5 it is smaller (every weight is at most 1)."""
    from benchmarks.pixel_min_snr import min_snr_loss, notebook_definitions

    nb = notebook_definitions()
    torch.manual_seed(0)
    model = nb["TinyUNet"]()
    betas = nb["cosine_betas"](nb["T"])
    x0 = torch.rand(8, 3, nb["IMAGE_SIZE"], nb["IMAGE_SIZE"]) * 2 - 1
    plain = nb["pixel_loss"](model, x0, betas, torch.Generator().manual_seed(1))
    unclipped = min_snr_loss(model, x0, betas, torch.Generator().manual_seed(1), gamma=float("inf"))
    weighted = min_snr_loss(model, x0, betas, torch.Generator().manual_seed(1))
    torch.testing.assert_close(unclipped, plain)
    assert weighted < plain
