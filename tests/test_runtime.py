"""The set-up cell's choice of number format and memory savers, for the GPUs learners meet on Colab."""
from types import SimpleNamespace

import pytest
import torch

import sd
from sd.attention import SelfAttention
from sd.cross_attention import CrossAttention
from sd.runtime import Runtime, detect_runtime, resolve_device, savers_for
from sd.runtime import device as device_module

GIB = 2**30


def fake_gpu(monkeypatch, name: str, major: int, minor: int, gib: float):
    props = SimpleNamespace(name=name, major=major, minor=minor, total_memory=int(gib * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_cpu_runs_in_float32_without_savers():
    runtime = detect_runtime("cpu")
    assert (runtime.device.type, runtime.dtype, runtime.savers) == ("cpu", torch.float32, ())
    assert str(runtime).startswith("No GPU")


@pytest.mark.parametrize("name, major, minor, gib, dtype", [
    ("Tesla T4", 7, 5, 14.7, torch.float16),            # Colab's free GPU: no fast bfloat16
    ("Tesla V100-SXM2-16GB", 7, 0, 15.8, torch.float16),
    ("NVIDIA L4", 8, 9, 22.0, torch.bfloat16),
    ("NVIDIA A100-SXM4-40GB", 8, 0, 39.4, torch.bfloat16),
])
def test_gpu_dtype_follows_compute_capability(monkeypatch, name, major, minor, gib, dtype):
    fake_gpu(monkeypatch, name, major, minor, gib)
    runtime = detect_runtime("cuda")
    assert runtime.dtype == dtype
    assert name in str(runtime) and f"{gib:.1f} GiB" in str(runtime)


def test_savers_grow_as_memory_shrinks():
    assert savers_for(14.7) == ("vae_slicing",)                      # a T4 holds SD v1.5 without help
    assert set(savers_for(7.5)) == {"vae_slicing", "attention_slicing", "vae_tiling"}
    assert set(savers_for(4.0)) == {"vae_slicing", "attention_slicing", "vae_tiling", "model_cpu_offload"}


def test_small_gpu_gets_offload(monkeypatch):
    fake_gpu(monkeypatch, "GeForce GTX 1650", 7, 5, 3.8)
    runtime = detect_runtime("cuda")
    assert "model_cpu_offload" in runtime.savers and "model_cpu_offload" in str(runtime)


def test_apply_switches_the_savers_on():
    pipe = sd.load_checkpoint(device="cpu")        # the shipped small model
    Runtime(torch.device("cpu"), torch.float32, ("vae_slicing", "attention_slicing", "vae_tiling")).apply(pipe)
    assert pipe.vae_slicing
    attentions = [m for m in pipe.unet.modules() if isinstance(m, (SelfAttention, CrossAttention))]
    assert attentions and all(m.slice_size == 1 for m in attentions)
    assert pipe.vae_tiling
    assert not pipe.cpu_offload


def test_dtype_can_be_forced_and_a_bad_value_says_what_is_expected(monkeypatch):
    fake_gpu(monkeypatch, "Tesla T4", 7, 5, 14.7)
    monkeypatch.setenv("SD_DTYPE", "float32")
    assert detect_runtime("cuda").dtype == torch.float32
    monkeypatch.setenv("SD_DTYPE", "bfloat16")
    assert detect_runtime("cpu").dtype == torch.bfloat16
    monkeypatch.setenv("SD_DTYPE", "fp16")
    with pytest.raises(ValueError, match=r"\$SD_DTYPE must be one of float32, float16, bfloat16, got 'fp16'"):
        detect_runtime("cpu")


def test_resolve_device_is_the_one_resolver_and_says_what_is_available(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be cpu, cuda, cuda:N or mps, got 'gpu'"):
        resolve_device("gpu")
    fake_gpu(monkeypatch, "NVIDIA L4", 8, 9, 22.0)
    with pytest.raises(ValueError, match=r"device 'cuda:1': this machine has 1 CUDA device\(s\), cuda:0 to cuda:0"):
        resolve_device("cuda:1")
    assert detect_runtime("cuda").device == resolve_device("cuda") == torch.device("cuda")


def test_under_torchrun_cuda_means_this_processs_gpu(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA L4", 8, 9, 22.0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(None) == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)      # an explicit index is kept
    assert resolve_device("cpu") == torch.device("cpu")


def fake_mac(monkeypatch, gib: float):
    """A Mac with Apple Silicon: MPS available, no CUDA, `gib` GiB of memory shared by CPU and GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(device_module, "machine_memory_bytes", lambda: int(gib * GIB))


@pytest.mark.parametrize("gib, savers", [
    (16.0, ("vae_slicing", "attention_slicing")),    # a MacBook Air: diffusers' guide slices attention below 64 GB
    (96.0, ("vae_slicing",)),
])
def test_apple_silicon_picks_mps_in_float16_with_attention_slicing_below_64_gib(monkeypatch, gib, savers):
    fake_mac(monkeypatch, gib)
    runtime = detect_runtime()
    assert runtime.device == torch.device("mps") and runtime.dtype == torch.float16
    assert runtime.savers == savers
    assert "Apple Silicon (MPS)" in str(runtime) and f"{gib:.1f} GiB" in str(runtime)
    assert resolve_device(None) == torch.device("mps")       # generate, training and load_checkpoint agree


def test_cuda_is_preferred_to_mps_and_the_cpu_is_the_last_choice(monkeypatch):
    fake_mac(monkeypatch, 16.0)
    fake_gpu(monkeypatch, "NVIDIA L4", 8, 9, 22.0)           # both reported: CUDA wins
    assert detect_runtime().device == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert detect_runtime() == Runtime(torch.device("cpu"), torch.float32)


def test_sd_dtype_overrides_mps_and_a_bad_value_names_the_variable(monkeypatch):
    fake_mac(monkeypatch, 16.0)
    monkeypatch.setenv("SD_DTYPE", "float32")
    assert detect_runtime().dtype == torch.float32
    monkeypatch.setenv("SD_DTYPE", "half")
    with pytest.raises(ValueError, match=r"^\$SD_DTYPE must be one of float32, float16, bfloat16, got 'half'$"):
        detect_runtime()


def test_mps_asked_for_on_a_machine_without_it_says_so(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="Apple's MPS is not available on this machine; use cpu"):
        detect_runtime("mps")
