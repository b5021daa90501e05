"""Fetching SD v1.5 from the Hugging Face Hub (cache, resume and progress bar come from `huggingface_hub`)."""
from __future__ import annotations

import re
from pathlib import Path

# What a pipeline needs from a diffusers-format repository: weights, configs and the tokenizer.
FOLDERS = ("unet", "vae", "text_encoder")
# Seconds to wait for the Hub before giving up: offline should fail at once, not after minutes of retries.
HUB_TIMEOUT_S = 5.0
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(source) -> bool:
    """'stable-diffusion-v1-5/stable-diffusion-v1-5' yes; './model.safetensors' or an existing path no."""
    return isinstance(source, str) and bool(REPO_ID.match(source)) and not Path(source).exists() \
        and not source.endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin"))


def allow_patterns(fp16: bool) -> list[str]:
    """The files to fetch; the fp16 variant halves the download on a GPU."""
    weights = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
    variant = ".fp16" if fp16 else ""
    return ([f"{sub}/{name}{variant}.safetensors" for sub, name in weights.items()]
            + [f"{sub}/config.json" for sub in FOLDERS] + ["tokenizer/*"])


def fetch(repo_id: str, fp16: bool = False) -> Path:
    """Local folder of `repo_id`: from the cache when there, else downloaded. One clear error when neither works."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{repo_id!r} looks like a Hugging Face Hub id, and huggingface_hub is not installed: "
                         "pip install huggingface-hub, or pass a local checkpoint path") from None
    patterns = allow_patterns(fp16)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass   # not in the cache: download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=HUB_TIMEOUT_S))
    except Exception as e:
        from huggingface_hub.constants import HF_HUB_CACHE
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"could not get {repo_id!r}: not in the local Hub cache ({HF_HUB_CACHE}) and the Hub could not be reached "
            f"({type(e).__name__}: {reason[:160]}). Place a checkpoint by hand: download "
            f"v1-5-pruned-emaonly.safetensors from https://huggingface.co/{repo_id} on a machine that is online, "
            "copy it here and pass its path to sd.load_checkpoint(path) or --checkpoint PATH") from None
