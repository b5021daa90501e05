"""Reading checkpoint files safely: safetensors, or a pickle read with `weights_only=True` (never runs code).

Three things can go wrong, and each gets its own one-line message naming the file: the file is no checkpoint at all
(random bytes, a truncated download), it is a pickle that holds Python objects beyond tensors (loading it would run
code: refused), or its metadata is broken.
"""
from __future__ import annotations

import io
import json
import pickle
import pickletools
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# safetensors metadata entries of this package's own checkpoints: the model configs (JSON), and the name of the
# tokenizer folder saved beside the file.
CONFIG_METADATA_KEY = "sd_config"
TOKENIZER_METADATA_KEY = "sd_tokenizer"
# Pickle opcodes that import a Python object by name: what the weights-only unpickler refuses beyond its allowlist.
IMPORT_OPCODES = ("GLOBAL", "STACK_GLOBAL", "INST")
# What the weights-only unpickler imports itself for a plain state dict (tensors, storages, ordered dicts).
WEIGHTS_ONLY_IMPORTS = ("torch.", "collections.OrderedDict")
NOT_A_CHECKPOINT = "not a checkpoint (could not be read as safetensors or a PyTorch file)"


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A file -> (name -> tensor, its safetensors metadata or {}). Raises ValueError if it is no checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path), {}
    raise ValueError(f"{path}: expected a .safetensors or .ckpt/.pt/.pth/.bin checkpoint, or a diffusers folder")


def stored_configs(metadata: dict[str, str], path: str | Path) -> dict:
    """The model configs this package saved in a file's metadata ({} when there are none)."""
    if CONFIG_METADATA_KEY not in metadata:
        return {}
    try:
        configs = json.loads(metadata[CONFIG_METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its `{CONFIG_METADATA_KEY}` metadata is not valid JSON ({e.msg} at character "
                         f"{e.pos}); re-save the model with sd.save_checkpoint") from None
    if not isinstance(configs, dict) or not all(isinstance(c, dict) for c in configs.values()):
        raise ValueError(f"{path}: its `{CONFIG_METADATA_KEY}` metadata should map 'unet', 'vae', 'clip' to "
                         f"config dicts, got {metadata[CONFIG_METADATA_KEY][:80]!r}")
    return configs


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        reason = _first_line(e)
        raise ValueError(f"{path}: {NOT_A_CHECKPOINT}; safetensors: {reason}") from None
    return tensors, metadata


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # the weights-only unpickler raises this both for a refused object and for bytes that are no pickle at all
        imported = _imported_objects(path)
        if imported is not None:
            refused = _refused_object(str(e), imported)
            what = f" (`{refused}`)" if refused else ""
            raise ValueError(f"{path}: this file holds Python objects beyond tensors{what}; loading it would run "
                             "code, refused (only plain state dicts are read, with torch.load(weights_only=True))"
                             ) from None
        raise ValueError(f"{path}: {NOT_A_CHECKPOINT}") from None
    except Exception as e:   # the weights-only unpickler never runs code; anything else it meets is just broken
        raise ValueError(f"{path}: {NOT_A_CHECKPOINT}; torch.load: {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def _imported_objects(path: Path) -> list[str] | None:
    """The Python objects that well-formed pickles in the file import by name, or None if it holds no such pickle.

    Reads a plain pickle, torch's legacy format (several pickles in a row, then raw bytes) or the `data.pkl` of torch's
    zip format, opcode by opcode with `pickletools`: nothing is imported or called.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                inner = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(inner) if inner else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return None
    stream, imported = io.BytesIO(data), []
    while stream.tell() < len(data):
        strings, names = [], []
        try:
            for op, arg, _ in pickletools.genops(stream):   # one pickle, up to its STOP
                if isinstance(arg, str):
                    strings.append(arg)
                if op.name in IMPORT_OPCODES:
                    # GLOBAL and INST carry "module name"; STACK_GLOBAL takes the two strings pushed before it
                    names.append(arg.replace(" ", ".") if isinstance(arg, str) else ".".join(strings[-2:]))
        except Exception:   # pickletools raises ValueError and others where the bytes stop being a pickle
            break
        imported += names   # only pickles read to their STOP count
    return imported or None


def _refused_object(message: str, imported: list[str]) -> str:
    """The object torch's weights-only unpickler refused: named in its message, else the first one beyond torch's."""
    if found := re.search(r"GLOBAL ([\w.]+)", message):
        return found[1]
    return next((name for name in imported if not name.startswith(WEIGHTS_ONLY_IMPORTS)), "")


def _first_line(e: Exception) -> str:
    """The first sentence of an exception's message, on one line, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return text.splitlines()[0].split(". ")[0][:200] if text else type(e).__name__


def unwrap_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """Some files wrap everything in {'state_dict': {...}} (Lightning); keep only the tensors."""
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, configs: dict,
                     tokenizer_folder: str | None = None) -> None:
    """Save tensors with the model configs (and the tokenizer folder's name) in the metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {CONFIG_METADATA_KEY: json.dumps(configs)}
    if tokenizer_folder is not None:
        metadata[TOKENIZER_METADATA_KEY] = tokenizer_folder
    save_file(tensors, str(path), metadata=metadata)
