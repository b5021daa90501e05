"""Which machine the course runs on: the device, the number format, and the memory savers that fit its GPU.

`resolve_device` is the package's one device resolver (generate, training, load_checkpoint all use it).

The notebooks' set-up cell calls `detect_runtime()` once; `sd.course.load_course_model` applies the same choice.
The order of preference: an NVIDIA GPU (CUDA), then Apple Silicon's GPU (MPS), then the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .settings import env_choice

# bfloat16 needs Ampere or newer (compute capability 8.0: A100, L4, H100, RTX 30xx); older GPUs (T4 is 7.5, V100
# 7.0) emulate it slowly, so they get float16. Both halve the memory and the download of the weights.
BF16_MIN_CAPABILITY = 8
# GPU memory (GiB) below which each saver is switched on. SD v1.5 in half precision holds 2.3 GB of weights and
# peaks near 3.5 GB for one 512 x 512 image with fused attention; CPU offload keeps only one model on the GPU.
SLICING_BELOW_GIB = 8.0        # attention slicing and VAE tiling: smaller attention and decoder activations
OFFLOAD_BELOW_GIB = 6.0        # model CPU offload: the text encoder, UNet and VAE visit the GPU in turn
# Apple Silicon (MPS): the CPU and the GPU share the machine's memory. diffusers' MPS guide recommends attention
# slicing "if your computer has < 64 GB of RAM" (https://huggingface.co/docs/diffusers/optimization/mps).
# The number format is float16, as on a T4: it about halves SD v1.5's weights in memory the CPU needs too, and the
# VAE still decodes in float32 (sd/pipeline.py). The guide's own example keeps float32: SD_DTYPE=float32 gives that.
MPS_SLICING_BELOW_GIB = 64.0
MPS_DTYPE = torch.float16

# Set to float32, float16 or bfloat16 to override the choice (e.g. float32 on a GPU to rule out precision issues).
DTYPE_ENV = "SD_DTYPE"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# torchrun sets it to the process's index on its machine: the GPU that process trains on.
LOCAL_RANK_ENV = "LOCAL_RANK"


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    savers: tuple[str, ...] = ()
    gpu_name: str | None = None
    gpu_gib: float | None = None

    def apply(self, pipe):
        """Switch on this runtime's memory savers on an `sd.StableDiffusion` pipeline; returns it."""
        for saver in self.savers:
            getattr(pipe, f"enable_{saver}")()
        return pipe

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        if self.device.type == "cpu":
            return f"No GPU: {self.device}, {dtype}"
        savers = ", ".join(self.savers) or "none"
        shared = " shared with the CPU" if self.device.type == "mps" else ""
        return f"GPU: {self.gpu_name}, {self.gpu_gib:.1f} GiB{shared}; {dtype}; memory savers: {savers}"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The one device resolver: None (CUDA when available, else Apple's MPS, else the CPU), 'cpu', 'cuda', 'cuda:N',
    'mps' or a torch.device -> a device this machine has; else one line saying what is available.

    Under torchrun ($LOCAL_RANK set), 'cuda' without an index (and None on a GPU machine) means this process's GPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine (no GPU, or a CPU-only "
                             f"torch {torch.__version__}); use cpu")
        if resolved.index is None and LOCAL_RANK_ENV in os.environ:
            resolved = torch.device("cuda", int(os.environ[LOCAL_RANK_ENV]))
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: Apple's MPS is not available on this machine; use cpu")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}")
    return resolved


def savers_for(gib: float) -> tuple[str, ...]:
    """Memory savers for a GPU with `gib` GiB. VAE slicing (decode a batch one image at a time) is always on:
    it changes no number and costs almost nothing."""
    savers = ["vae_slicing"]
    if gib < SLICING_BELOW_GIB:
        savers += ["attention_slicing", "vae_tiling"]
    if gib < OFFLOAD_BELOW_GIB:
        savers.append("model_cpu_offload")
    return tuple(savers)


def mps_savers_for(gib: float) -> tuple[str, ...]:
    """Memory savers on Apple Silicon with `gib` GiB of memory (shared by CPU and GPU): VAE slicing, and attention
    slicing below 64 GiB as diffusers' MPS guide recommends."""
    return ("vae_slicing", "attention_slicing") if gib < MPS_SLICING_BELOW_GIB else ("vae_slicing",)


def machine_memory_bytes() -> int:
    """The machine's physical memory (on a Mac, what the CPU and the GPU share)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def detect_runtime(device: str | torch.device | None = None) -> Runtime:
    """CUDA when available (float16 or bfloat16, savers by memory), else Apple's MPS (float16, savers by memory),
    else the CPU in float32; $SD_DTYPE overrides the number format."""
    device = resolve_device(device)
    forced = env_choice(DTYPE_ENV, tuple(DTYPES))
    if device.type == "mps":
        gib = machine_memory_bytes() / 2**30
        return Runtime(device, DTYPES[forced] if forced else MPS_DTYPE, mps_savers_for(gib), "Apple Silicon (MPS)",
                       gib)
    if device.type != "cuda":
        return Runtime(device, DTYPES[forced] if forced else torch.float32)
    props = torch.cuda.get_device_properties(device)
    gib = props.total_memory / 2**30
    dtype = torch.bfloat16 if props.major >= BF16_MIN_CAPABILITY else torch.float16
    return Runtime(device, DTYPES[forced] if forced else dtype, savers_for(gib), props.name, gib)
