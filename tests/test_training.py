"""Training: each stage runs at tiny sizes, checkpoints resume exactly, the result loads, and DDP ranks agree."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sd
from sd.training.data import ShapesDataset
from sd.diffusion import DiffusionScheduler, min_snr_weights
from sd.training import (STAGES, TrainOptions, batch_indices, contrastive_loss, diffusion_loss, drop_captions,
                         read_stage, train_stage)
from sd.training.vae import VAE, vae_loss
from sd.config import VAEConfig

IMAGE_SIZE = 16      # tiny preset: 16 x 16 images -> 8 x 8 latents (its VAE downsamples 2x)


def _opts(out, **kw):
    base = dict(out_dir=str(out), steps=3, batch_size=8, seed=0, progress=False, checkpoint_every=2, device="cpu")
    return TrainOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def dataset():
    return ShapesDataset(64, image_size=IMAGE_SIZE, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset):
    """All three stages, 3 steps each, at tiny sizes."""
    out = tmp_path_factory.mktemp("run")
    runs = {stage: train_stage(stage, _opts(out), "tiny", dataset, IMAGE_SIZE) for stage in STAGES}
    return out, runs


def test_every_stage_writes_checkpoint_and_loss_plot(trained):
    out, runs = trained
    for stage in STAGES:
        parts, meta = read_stage(out / f"{stage}.safetensors")
        assert meta["step"] == 3 and len(meta["losses"]) == 3
        assert all(torch.isfinite(torch.tensor(meta["losses"])))
        assert parts["optim"], "optimizer state is saved for resuming"
        assert (out / f"{stage}_loss.png").stat().st_size > 1000
    assert read_stage(out / "unet.safetensors")[0]["ema"], "the UNet keeps EMA weights"
    assert (out / "tokenizer" / "merges.txt").is_file()


def test_trained_model_loads_with_load_checkpoint_and_generates(trained):
    out, _ = trained
    model = sd.load_checkpoint(out / "model.safetensors", device="cpu")
    assert model.unet.config.sample_size == IMAGE_SIZE // model.encoder.config.downsample_factor
    assert model.tokenizer.decode(model.tokenizer.encode("a red circle")) == "a red circle"
    from sd.training.evaluation import generate
    images = generate(model, ["a red circle on a blue background"], num_inference_steps=2)
    assert images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(images).all()


def test_tokenizer_merges_are_learned_from_captions(trained):
    out, _ = trained
    tok = sd.CLIPTokenizer(out / "tokenizer")
    # frequent caption words become single tokens; a word never in a caption is split into pieces
    assert tok.tokenize("a red circle on a blue background") == \
        ["a</w>", "red</w>", "circle</w>", "on</w>", "a</w>", "blue</w>", "background</w>"]
    assert len(tok.tokenize("xylophone")) > 1


def test_resumed_run_matches_an_uninterrupted_one(tmp_path, trained, dataset):
    """UNet stage (optimizer, EMA, step-seeded data): 2 steps + resume to 4 == 4 steps at once."""
    out, _ = trained
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        for f in ("vae.safetensors", "text.safetensors"):
            (tmp_path / d / f).write_bytes((out / f).read_bytes())
        (tmp_path / d / "tokenizer").mkdir()
        for f in ("vocab.json", "merges.txt"):
            (tmp_path / d / "tokenizer" / f).write_bytes((out / "tokenizer" / f).read_bytes())
    train_stage("unet", _opts(tmp_path / "a", steps=4), "tiny", dataset, IMAGE_SIZE)
    train_stage("unet", _opts(tmp_path / "b", steps=2), "tiny", dataset, IMAGE_SIZE)
    train_stage("unet", _opts(tmp_path / "b", steps=4, resume=True), "tiny", dataset, IMAGE_SIZE)
    a, meta_a = read_stage(tmp_path / "a" / "unet.safetensors")
    b, meta_b = read_stage(tmp_path / "b" / "unet.safetensors")
    assert meta_b["step"] == 4 and meta_b["losses"] == pytest.approx(meta_a["losses"], rel=1e-5)
    for group in ("model", "ema"):
        for k in a[group]:
            torch.testing.assert_close(a[group][k], b[group][k], rtol=1e-5, atol=1e-6, msg=f"{group}.{k}")


def test_vae_loss_falls_when_fitting_a_few_images(dataset):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=4))
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    x, noise = dataset.pixels(slice(0, 8)), torch.zeros(8, 4, 8, 8)
    losses = []
    for _ in range(40):
        loss = vae_loss(*vae(x, noise)[:1], x, *vae(x, noise)[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_contrastive_loss_is_clips_symmetric_cross_entropy_and_prefers_matches():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    scale = torch.tensor(2.0)
    # one match per row: the loss is the mean of two cross-entropies with labels 0..B-1 (Radford et al. fig. 3)
    logits = scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    expected = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, scale, torch.eye(6, dtype=torch.bool)), expected)
    # aligned embeddings beat shuffled ones
    assert contrastive_loss(img, img, scale, torch.eye(6, dtype=torch.bool)) < \
        contrastive_loss(img, img.roll(1, 0), scale, torch.eye(6, dtype=torch.bool))


def test_diffusion_loss_is_zero_for_a_unet_that_knows_the_noise():
    scheduler = DiffusionScheduler()
    z0 = torch.randn(5, 4, 8, 8)

    def oracle(z_t, context, t):   # invert Ho et al. eq. 4 with the true z0
        ab = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (z_t - ab.sqrt() * z0) / (1 - ab).sqrt()

    loss = diffusion_loss(oracle, scheduler, z0, torch.zeros(5, 77, 8), torch.Generator().manual_seed(1))
    assert loss.item() < 1e-8
    wrong = diffusion_loss(lambda z, c, t: torch.zeros_like(z), scheduler, z0, torch.zeros(5, 77, 8),
                           torch.Generator().manual_seed(1))
    assert 0.8 < wrong.item() < 1.2      # predicting 0 costs E[eps^2] = 1


def test_min_snr_weights_match_diffusers_training_script():
    """diffusers' train_text_to_image.py --snr_gamma 5, epsilon-prediction: min(SNR, 5) / SNR from compute_snr."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.arange(1000)
    snr = compute_snr(reference, t)
    expected = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0] / snr
    ours = min_snr_weights(DiffusionScheduler().alphas_cumprod, 5.0)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-5, atol=1e-7)
    assert ours[-1] == 1 and ours[0] < 0.01          # noisy steps keep weight 1, nearly clean ones far less


def test_min_snr_weights_stay_finite_at_zero_terminal_snr_and_refuse_bad_input():
    ab = DiffusionScheduler().alphas_cumprod.clone()
    ab[-1] = 0.0                                          # a zero-terminal-SNR schedule ends at alpha_bar = 0
    ab[0] = 1.0                                           # and a schedule that starts clean
    w = min_snr_weights(ab)
    assert torch.isfinite(w).all() and w[-1] == 1 and w[0] == 0
    with pytest.raises(ValueError, match="gamma must be a positive number"):
        min_snr_weights(ab, gamma=0)
    with pytest.raises(ValueError, match=r"alphas_cumprod must lie in \[0, 1\]"):
        min_snr_weights(torch.tensor([0.5, float("nan")]))


def test_diffusion_loss_weighs_each_sample_by_its_timestep():
    scheduler = DiffusionScheduler()
    z0, context = torch.randn(6, 4, 8, 8), torch.zeros(6, 77, 8)
    weight = torch.rand(1000) + 0.1
    zero_unet = lambda z, c, t: torch.zeros_like(z)      # its error is the noise itself
    loss = diffusion_loss(zero_unet, scheduler, z0, context, torch.Generator().manual_seed(2), weight=weight)
    generator = torch.Generator().manual_seed(2)         # the same draws, in the same order: t, then the noise
    t = torch.randint(0, 1000, (6,), generator=generator)
    eps = torch.randn(z0.shape, generator=generator)
    expected = sum(weight[t[b]] * eps[b].pow(2).mean() for b in range(6)) / 6
    torch.testing.assert_close(loss, expected)
    ones = diffusion_loss(zero_unet, scheduler, z0, context, torch.Generator().manual_seed(2), weight=torch.ones(1000))
    plain = diffusion_loss(zero_unet, scheduler, z0, context, torch.Generator().manual_seed(2))
    torch.testing.assert_close(ones, plain)
    with pytest.raises(ValueError, match=r"one number per training timestep, shape \(1000,\), got \(999,\)"):
        diffusion_loss(zero_unet, scheduler, z0, context, torch.Generator().manual_seed(2), weight=torch.ones(999))


def test_caption_dropout_replaces_about_ten_percent_with_the_empty_caption():
    context, empty = torch.ones(4000, 3, 2), torch.zeros(1, 3, 2)
    out = drop_captions(context, empty, torch.Generator().manual_seed(0))
    dropped = (out == 0).all(dim=(1, 2))
    kept = (out == 1).all(dim=(1, 2))
    assert (dropped | kept).all()
    assert 0.08 < dropped.float().mean() < 0.12


def test_ranks_split_the_global_batch_and_epochs_reshuffle():
    whole = batch_indices(100, 8, step=3, seed=0)
    parts = [batch_indices(100, 8, step=3, seed=0, rank=r, world=2) for r in range(2)]
    assert sorted(torch.cat(parts).tolist()) == sorted(whole.tolist()) and len(whole) == 8
    epoch0 = torch.cat([batch_indices(100, 10, s, seed=0) for s in range(10)])
    assert sorted(epoch0.tolist()) == list(range(100))                 # an epoch visits every item once
    assert not torch.equal(epoch0[:10], batch_indices(100, 10, 10, seed=0))
    with pytest.raises(ValueError, match="divisible"):
        batch_indices(100, 7, 0, 0, rank=0, world=2)


def test_options_need_a_length():
    with pytest.raises(ValueError, match="steps, minutes"):
        TrainOptions()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_data_parallel_training_ends_with_identical_weights(tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU): DDP averages gradients, so both ranks hold the same weights."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "sd", "train", "vae", "--preset", "tiny", "--image-size", str(IMAGE_SIZE),
           "--dataset-size", "64", "--steps", "3", "--batch-size", "8", "--device", "cpu", "--threads", "1",
           "--out", str(tmp_path), "--save-all-ranks", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, meta0 = read_stage(tmp_path / "vae_rank0.safetensors")
    r1, meta1 = read_stage(tmp_path / "vae_rank1.safetensors")
    assert meta0["world_size"] == meta1["world_size"] == 2
    assert meta0["losses"] != meta1["losses"], "each rank trains on its own half of the batch"
    torch.manual_seed(0)
    initial = VAE(VAEConfig.from_dict(meta0["vae"])).state_dict()
    assert any(not torch.equal(initial[k], r0["model"][k]) for k in initial), "training changed the weights"
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
