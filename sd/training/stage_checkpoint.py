"""A stage's checkpoint: one safetensors file with the weights, the EMA, the optimizer and the training state.

A save writes <stage>.safetensors.partial and renames it, so a crash mid-save never leaves a broken checkpoint;
the next start removes the partial file. Resuming reads the file back and refuses, in one line, a checkpoint
that cannot continue this run: unreadable, of another stage, or of other model sizes (another --preset).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

# Training-state entries in a stage checkpoint, beside the model weights.
METADATA_KEY = "sd_training"
# Suffix of a save in progress; renamed to the checkpoint's name once complete.
PARTIAL_SUFFIX = ".partial"
GROUPS = ("model", "ema", "optim")


def save_stage(path: Path, model: nn.Module, meta: dict, optimizer=None, ema_model: nn.Module | None = None) -> None:
    """One safetensors file: model.*, ema.* and optim.* tensors; step, losses and configs in the metadata."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema_model is not None:
        tensors.update({f"ema.{k}": v for k, v in ema_model.state_dict().items()})
    meta = dict(meta)
    if optimizer is not None:
        state = optimizer.state_dict()
        for i, s in state["state"].items():
            tensors.update({f"optim.{i}.{name}": torch.as_tensor(v) for name, v in s.items()})
        meta["param_groups"] = state["param_groups"]
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    save_file(tensors, str(partial), metadata={METADATA_KEY: json.dumps(meta)})
    partial.replace(path)     # atomic: readers see the old checkpoint or the new one, never half of one


def load_optimizer(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor], param_groups: list) -> None:
    """Give `optimizer` the state that save_stage flattened into optim.<param index>.<name> tensors."""
    state: dict = {}
    for k, v in flat.items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def remove_partial_saves(folder: Path, name: str) -> list[Path]:
    """Delete what an interrupted save of stage `name` left in `folder`; returns the removed files."""
    removed = sorted(folder.glob(f"{name}*.safetensors{PARTIAL_SUFFIX}"))
    for path in removed:
        path.unlink()
    return removed


def read_stage(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """A stage checkpoint -> ({'model': state, 'ema': state, 'optim': flat}, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no stage checkpoint at {path}: train that stage first (python -m sd train ...)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if METADATA_KEY not in meta:
                raise ValueError(f"{path} is not a training checkpoint of this package (no `{METADATA_KEY}` metadata)")
            parts: dict[str, dict] = {group: {} for group in GROUPS}
            for k in f.keys():
                group, name = k.split(".", 1)
                parts[group][name] = f.get_tensor(k)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({path.stat().st_size} bytes: empty or "
                         f"truncated, e.g. by an interrupted copy): {e}") from None
    return parts, json.loads(meta[METADATA_KEY])


def require_resumable(path: Path, saved: dict, name: str, meta: dict) -> None:
    """Raise ValueError unless the checkpoint metadata `saved` continues stage `name`, whose models `meta` describes."""
    if saved.get("stage") != name:
        raise ValueError(f"cannot resume {name} from {path}: it is the checkpoint of the {saved.get('stage')!r} stage")
    for key, ours in json.loads(json.dumps(meta)).items():     # through JSON, as saved: tuples become lists
        theirs = saved.get(key, ours)
        if theirs != ours:
            if isinstance(ours, dict) and isinstance(theirs, dict):     # a model config: name the first difference
                field = next(k for k in sorted({*ours, *theirs}) if ours.get(k) != theirs.get(k))
                key, ours, theirs = f"{key}.{field}", ours.get(field), theirs.get(field)
            raise ValueError(f"cannot resume {name} from {path}: it holds other model sizes ({key} {theirs} there, "
                             f"{ours} in this run); was it trained with another --preset? (or use another --out)")
