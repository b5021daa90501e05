"""Reading checkpoint files safely: safetensors, or a pickle read with `weights_only=True` (never runs code)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# safetensors metadata entry where this package stores the model configs of its own checkpoints.
CONFIG_METADATA_KEY = "sd_config"


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A file -> (name -> tensor, the model configs stored with it or {}). Raises ValueError if it is no checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path), {}
    raise ValueError(f"{path.name}: expected a .safetensors or .ckpt/.pt/.pth/.bin checkpoint, or a diffusers folder")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path.name} is not a valid safetensors checkpoint ({e})") from None
    configs = json.loads(metadata[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in metadata else {}
    return tensors, configs


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise ValueError(f"{path.name}: refused to load: the file holds more than tensors and could run code "
                         f"when unpickled ({first_line}); only plain state dicts are read, with weights_only=True") from None
    except Exception as e:   # the weights-only unpickler never runs code; anything else it meets is just broken
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path.name} is not a PyTorch checkpoint ({reason})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path.name} holds a {type(obj).__name__}, not a state dict")
    return obj


def unwrap_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """Some files wrap everything in {'state_dict': {...}} (Lightning); keep only the tensors."""
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, configs: dict) -> None:
    """Save tensors with the model configs in the metadata, so `load_checkpoint` needs no guessing."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(configs)})
