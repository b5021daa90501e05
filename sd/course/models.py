"""Which trained model the notebooks use: real SD v1.5 when at hand, else the project's own small model."""
from __future__ import annotations

import dataclasses

import torch

from ..clip import CLIP
from ..decoder import VAE_Decoder
from ..encoder import VAE_Encoder
from ..io import checkpoint
from ..pipeline import StableDiffusion
from ..runtime.device import detect_runtime
from ..runtime.settings import env_path
from ..tokenizer import CLIPTokenizer
from ..training.presets import get_preset
from ..unet import DiffusionUNET

# Where real weights come from: a path in this environment variable, else the Hub (on a GPU, e.g. Colab).
CHECKPOINT_ENV = "SD_CHECKPOINT"
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def load_course_model(device: str | torch.device | None = None, allow_download: bool | None = None):
    """The best trained model available, and one sentence saying which; None if there is none.

    Order: $SD_CHECKPOINT (a local SD v1.x file or folder; a path that does not exist is one line naming the
    variable, not a silent fall-back); SD v1.5 from the Hugging Face Hub (cache or download,
    tried on a GPU only: on a CPU it is too slow to be useful in a notebook); the project's small shapes model.
    """
    runtime = detect_runtime(device)   # float16 / bfloat16 and memory savers on a GPU, float32 on a CPU
    device = runtime.device
    if allow_download is None:
        allow_download = device.type == "cuda"

    def load(source=None):
        return runtime.apply(checkpoint.load_checkpoint(source, device=device, dtype=runtime.dtype))

    path = env_path(CHECKPOINT_ENV)
    if path is not None:
        print(f"Using the SD v1.x checkpoint at ${CHECKPOINT_ENV} = {path}.")
        return load(path)
    if allow_download:
        try:
            pipe = load(SD15_REPO)
            print(f"Using real Stable Diffusion v1.5 weights ({SD15_REPO}) on {device} in {runtime.dtype}.")
            return pipe
        except ValueError as e:
            print(f"SD v1.5 is not reachable ({str(e)[:120]}...); falling back to the project's small model.")
    if checkpoint.DEFAULT_MODEL.is_file():   # read at call time: tests point it elsewhere
        print("Using the project's own small model, trained on the shapes dataset (no SD v1.5 weights here; "
              f"set ${CHECKPOINT_ENV} to a checkpoint to use them).")
        return load()
    print("No trained model is available (neither SD v1.5 weights nor the project's small model): "
          "the figures that need one are skipped or drawn with untrained weights.")
    return None


def untrained_model(device: str | torch.device = "cpu", image_size: int = 32, seed: int = 0):
    """The small model's shapes with random weights (its pictures are noise): the notebooks' stand-in when no
    trained model is at hand, so that every cell still runs the same code."""
    small = get_preset("small")
    unet_config = dataclasses.replace(small.unet, sample_size=image_size // small.vae.downsample_factor)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = dict(clip=CLIP(small.clip), encoder=VAE_Encoder(small.vae), decoder=VAE_Decoder(small.vae),
                      unet=DiffusionUNET(unet_config))
    for model in models.values():
        model.to(device).eval().requires_grad_(False)
    return StableDiffusion(**models, tokenizer=CLIPTokenizer(), device=device)
