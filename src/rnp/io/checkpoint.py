"""The one checkpoint format: safetensors tensors plus a JSON metadata record.

Model files handed to a backdoor defense are untrusted by definition, so nothing here ever
unpickles: safetensors holds only tensors, and PyTorch files are read with
``torch.load(weights_only=True)``, which refuses any object that would run code.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rnp.errors import RnpError
from rnp.io.files import atomic_path

_METADATA_KEY = "rnp"


def save_checkpoint(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Writes tensors and a JSON-serialisable metadata dict to a safetensors file, atomically."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={_METADATA_KEY: json.dumps(metadata or {})})


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Reads what :func:`save_checkpoint` wrote."""
    path = Path(path)
    if not path.is_file():
        raise RnpError(f"{path}: file not found")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(_METADATA_KEY, "{}")
        return tensors, json.loads(raw)
    except (SafetensorError, OSError, ValueError) as error:
        raise RnpError(f"{path}: not a readable safetensors file ({error})") from None


def save_state_dict(path, state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    save_checkpoint(path, state_dict, metadata)


def load_state_dict(path) -> dict[str, torch.Tensor]:
    """Loads model weights from safetensors or a PyTorch file, without unpickling objects.

    PyTorch checkpoints may hold the weights directly or under ``state_dict`` / ``model`` (the
    layout of the official RNP checkpoints); a ``module.`` prefix from DataParallel is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise RnpError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        return load_checkpoint(path)[0]
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(error))
        if blocked is None:
            raise RnpError(f"{path}: not a readable model file (damaged or not a PyTorch file)") from None
        raise RnpError(f"{path}: refused to load: the file asks to import {blocked.group(1)}, "
                       "which could run code; only plain tensors are accepted") from None
    except Exception as error:  # noqa: BLE001 - a damaged pickle fails in many ways, none runs code
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RnpError(f"{path}: not a readable model file ({detail})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise RnpError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}
