"""Small helpers shared across rnp: seeding, progress bars, devices, and configs' checks and records."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import numbers
import random
import sys
import typing

import numpy as np
import torch
from tqdm import tqdm

from rnp.errors import RnpError
from rnp.progress import Progress


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and PyTorch so that a run repeats exactly on the same machine."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True, *, detail: str = "",
                 unit: str = "step", bounded: bool = False, timed: bool = True):
    """A :class:`rnp.progress.Progress` counting the loop's steps and logging its time estimate,
    shown as a tqdm bar on stderr when ``enabled`` (``detail``, ``unit``, ``bounded``, ``timed``: see there)."""
    if not enabled:
        yield Progress(total, desc, detail=detail, unit=unit, bounded=bounded, timed=timed)
        return
    with tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        yield Progress(total, desc, bar, detail=detail, unit=unit, bounded=bounded, timed=timed)


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


AMP_MODES = ("auto", "on", "off")


def uses_amp(mode: str, device: torch.device | str) -> bool:
    """Whether the mixed-precision setting ``mode`` (one of ``AMP_MODES``) computes in low
    precision on ``device``: "auto" on CUDA only, "on" everywhere, "off" never. Training and the
    defenses that optimise share this one rule. A mode that would use it where
    :func:`torch.autocast` is not available is an :class:`RnpError`."""
    device = torch.device(device)
    mixed = mode == "on" or (mode == "auto" and device.type == "cuda")
    if mixed and not torch.amp.is_autocast_available(device.type):
        raise RnpError(f"mixed precision is not available on {device.type}; use amp off")
    return mixed


def amp_dtype(device: torch.device | str) -> torch.dtype:
    """The low-precision type of mixed precision on ``device``: float16 on CUDA (the type its
    tensor cores and :class:`torch.amp.GradScaler` are made for), bfloat16 elsewhere (the type
    CPU autocast supports; its float32 exponent range needs no loss scaling, which is harmless)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def fits_seed(value: int) -> bool:
    """Whether ``value`` is a seed ``torch.manual_seed`` takes (it raises ValueError otherwise)."""
    return -2**63 <= value < 2**64


# Ranges that config fields get from their names: a field named ``NAME`` or ``..._NAME`` for a
# NAME below. A field whose metadata holds ``own_range`` skips these; its config checks it.
_NAMED_RANGES = (
    (("lr", "gamma"), lambda v: v > 0, "positive"),
    (("epochs", "batch_size", "iterations", "rounds"), lambda v: v >= 1, "at least 1"),
    (("fraction",), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("momentum",), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("weight_decay", "penalty"), lambda v: v >= 0, "at least 0"),
    (("seed",), fits_seed, "a 64-bit integer"),
)


def check_config(config) -> None:
    """RnpError unless every field of the dataclass ``config`` fits its annotation and its name.

    The checks every config shares, called first in each config's ``__post_init__``, which
    then checks only what is its own. Types: a bool is True or False, an int an integer, a float
    a finite number, a str a string, a tuple a list or tuple of such values. Ranges by name: see
    ``_NAMED_RANGES`` (learning rates positive, epochs and batch sizes at least 1, fractions in
    [0, 1], momenta in [0, 1), weight decays at least 0).
    """
    hints = _type_hints(type(config))
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        _check_type(spec.name, value, hints.get(spec.name))
        if spec.metadata.get("own_range"):
            continue
        for endings, test, wording in _NAMED_RANGES:
            if any(spec.name == end or spec.name.endswith("_" + end) for end in endings) and not test(value):
                raise RnpError(f"{spec.name} must be {wording}, got {value!r}")


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _check_type(name: str, value, kind) -> None:
    """RnpError unless ``value`` is of ``kind`` (bool, int, float, str or a tuple of them; other
    annotations are not checked). Floats must be finite; bools are not numbers here."""
    if typing.get_origin(kind) is tuple:
        elements = typing.get_args(kind)
        if not isinstance(value, (tuple, list)):
            raise RnpError(f"{name} must be a list of values, got {value!r}")
        if elements and elements[-1] is not Ellipsis and len(value) != len(elements):
            raise RnpError(f"{name} must hold {len(elements)} values, got {value!r}")
        for item in value:
            _check_type(name, item, elements[0] if elements else None)
        return
    valid = {bool: lambda v: isinstance(v, (bool, np.bool_)),
             int: lambda v: isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)),
             float: lambda v: (isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
                               and math.isfinite(v)),
             str: lambda v: isinstance(v, str)}.get(kind)
    if valid is not None and not valid(value):
        wanted = {bool: "True or False", int: "an integer", float: "a finite number", str: "a string"}
        raise RnpError(f"{name} must be {wanted[kind]}, got {value!r}")


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
