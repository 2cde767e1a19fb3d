"""Small helpers shared across rnp: seeding, progress bars, devices, and configs' checks and records."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import numbers
import os
import random
import sys
import types
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

AMP_AUTO_VARIABLE = "RNP_AMP_AUTO"
"""Environment variable read by the "auto" rule: ``off`` makes "auto" compute in float32 on every
device (the test suite sets it, so its results do not depend on the CPU); unset or empty leaves
the rule as :func:`uses_amp` describes it."""


@functools.lru_cache(maxsize=None)
def fast_bfloat16_cpu() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles), where bfloat16
    autocast trained a PreAct-ResNet18 2-4x faster than float32. A torch without these checks,
    or another platform, answers False."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),
              getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and bool(check()) for check in checks)


def _auto_amp(device: torch.device) -> bool:
    """The "auto" rule: CUDA, and CPUs with native bfloat16, unless :data:`AMP_AUTO_VARIABLE`
    says off."""
    override = os.environ.get(AMP_AUTO_VARIABLE, "").strip().lower()
    if override not in ("", "off"):
        raise RnpError(f"{AMP_AUTO_VARIABLE} must be off or unset, got {override!r}")
    if override == "off":
        return False
    return device.type == "cuda" or (device.type == "cpu" and fast_bfloat16_cpu())


def uses_amp(mode: str, device: torch.device | str) -> bool:
    """Whether the mixed-precision setting ``mode`` (one of ``AMP_MODES``) computes in low
    precision on ``device``: "on" everywhere, "off" never, "auto" on CUDA (float16) and on CPUs
    with native bfloat16 (:func:`fast_bfloat16_cpu`), not on MPS; ``RNP_AMP_AUTO=off`` turns
    "auto" off everywhere. Training and the defenses that optimise share this one rule. A mode
    that would use it where :func:`torch.autocast` is not available is an :class:`RnpError`."""
    device = torch.device(device)
    mixed = mode == "on" or (mode == "auto" and _auto_amp(device))
    if mixed and not torch.amp.is_autocast_available(device.type):
        raise RnpError(f"mixed precision is not available on {device.type}; use amp off")
    return mixed


def uses_channels_last(setting: bool | None, mixed: bool, device: torch.device | str) -> bool:
    """Whether to compute with channels-last weights: ``setting`` when given, else (None) where
    bfloat16 runs on the CPU (``mixed`` there), which oneDNN's convolutions run about 1.3x
    faster in that layout (PreAct-ResNet18 width 32, one thread)."""
    return setting if setting is not None else mixed and torch.device(device).type == "cpu"


def resolve_precision(config, device: torch.device | str):
    """A copy of ``config`` (a dataclass with ``amp`` and ``channels_last`` fields) with both set
    to what they do on ``device``: amp "on" or "off", channels_last True or False.

    Run records and cache keys take the resolved config, so they name the precision actually
    used: "auto" that stays float32 is recorded as "off" (left out of records, as float32 runs
    always were) and "auto" that computes in low precision as "on".
    """
    mixed = uses_amp(config.amp, device)
    return dataclasses.replace(config, amp="on" if mixed else "off",
                               channels_last=uses_channels_last(config.channels_last, mixed, device))


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
    (("amp",), lambda v: v in AMP_MODES, f"one of {', '.join(AMP_MODES)}"),
)


def check_config(config) -> None:
    """RnpError unless every field of the dataclass ``config`` fits its annotation and its name.

    The checks every config shares, called first in each config's ``__post_init__``, which
    then checks only what is its own. Types: a bool is True or False, an int an integer, a float
    a finite number, a str a string, a tuple a list or tuple of such values. Ranges by name: see
    ``_NAMED_RANGES`` (learning rates positive, epochs and batch sizes at least 1, fractions in
    [0, 1], momenta in [0, 1), weight decays at least 0, mixed-precision modes in ``AMP_MODES``).
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
    annotations are not checked), or None where ``kind`` is optional (``bool | None``). Floats
    must be finite; bools are not numbers here."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else ()
    if type(None) in options:
        if value is not None:
            _check_type(name, value, next(option for option in options if option is not type(None)))
        return
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
    ``metadata={"omit": VALUE}`` while they hold that value.

    Such a field was added after configs were first hashed into cache keys and recorded in run
    folders; leaving it out at the value every earlier record meant (float32: amp "off",
    channels_last False) keeps those keys and records valid.
    """
    values = dataclasses.asdict(config)
    omitted = {f.name for f in dataclasses.fields(config)
               if "omit" in f.metadata and values[f.name] == f.metadata["omit"]}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if k not in omitted}
