"""Small helpers shared across rnp: seeding, progress bars, devices and dataclass records."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import random
import sys

import numpy as np
import torch
from tqdm import tqdm

from rnp.errors import RnpError


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and PyTorch so that a run repeats exactly on the same machine."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr, or None when disabled (callers pass it on and check for None)."""
    if not enabled:
        yield None
        return
    with tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        yield bar


def derive_seed(seed: int, purpose: str) -> int:
    """A seed for one purpose ("poison", "shuffle", ...), independent of the other purposes.

    Two generators seeded with the same number draw the same permutation; if the poisoned
    indices and the first epoch's batch order both came from seed 0, every early batch would be
    poisoned. Hashing the purpose in keeps each stream separate while one user seed fixes all.
    """
    digest = hashlib.sha256(f"{purpose}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def generator_for(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose))


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s parameters (the CPU for a model without any)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return kind == "cpu"


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The device ``spec`` names, checked to exist: "auto" is CUDA when available, else MPS
    (Apple GPUs), else the CPU; "cpu", "cuda", "cuda:1" and "mps" are taken as they are.

    An unknown or missing device is an :class:`RnpError`, so a machine without a GPU says so
    in one line instead of failing deep inside the first forward pass.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device(next((kind for kind in ("cuda", "mps") if _available(kind)), "cpu"))
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise RnpError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise RnpError(f"unsupported device {spec!r}; use auto, cpu, cuda, cuda:N or mps")
    if not _available(device.type):
        check = "torch.cuda.is_available()" if device.type == "cuda" else "torch.backends.mps.is_available()"
        raise RnpError(f"{device.type} was asked for but {check} is False")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RnpError(f"{spec} was asked for but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def amp_dtype(device: torch.device | str) -> torch.dtype:
    """The low-precision type of mixed precision on ``device``: float16 on CUDA (the type its
    tensor cores and :class:`torch.amp.GradScaler` are made for), bfloat16 elsewhere (the type
    CPU autocast supports; its float32 exponent range needs no loss scaling, which is harmless)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def config_record(config) -> dict:
    """A dataclass config as JSON-ready data (tuples become lists), without the fields marked
    ``metadata={"omit_default": True}`` while they hold their default.

    Such a field was added after configs were first hashed into cache keys and recorded in run
    folders; leaving it out at its default keeps those keys and records valid.
    """
    values = dataclasses.asdict(config)
    omitted = {f.name for f in dataclasses.fields(config)
               if f.metadata.get("omit_default") and values[f.name] == f.default}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if k not in omitted}
