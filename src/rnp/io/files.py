"""Output files: atomic (a reader sees the old file or the complete new one, never half of
one), strict JSON, and output locations checked before any work is done."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

from rnp.errors import RnpError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path beside ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:  # name the folder, not the temporary file that was never made
        raise RnpError(f"{path.parent}: cannot write there ({error.strerror or error})") from None
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_umask())
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


NON_FINITE_KEY = "non_finite_values"
"""Top-level key listing the values strict JSON cannot hold (see :func:`write_json`)."""


def write_json(path, obj) -> None:
    """Writes ``obj`` as strict JSON, which has no NaN or Infinity.

    A non-finite float (e.g. Neural Cleanse's anomaly index of a class whose norm stands apart when
    the median absolute deviation of the norms is 0) is written as null, and its place and value
    are listed under ``"non_finite_values"``
    (``{"detection/anomaly_indices/3": "Infinity"}``) so the null is never mistaken for a missing
    value. Only a JSON object has room for that note: any other ``obj`` holding a non-finite
    float is refused.
    """
    replaced = {}
    finite = _finite(obj, "", replaced)
    if replaced:
        if not isinstance(finite, dict):
            raise RnpError(f"{path}: cannot write {', '.join(replaced.values())} as JSON")
        finite = {**finite, NON_FINITE_KEY: replaced}
    write_text(path, json.dumps(finite, indent=2, sort_keys=False, allow_nan=False) + "\n")


def _finite(value, where: str, replaced: dict):
    """``value`` with every non-finite float set to None, each one recorded in ``replaced``."""
    if isinstance(value, float) and not math.isfinite(value):
        name = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        replaced[where.lstrip("/")] = name
        return None
    if isinstance(value, dict):
        return {key: _finite(item, f"{where}/{key}", replaced) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item, f"{where}/{index}", replaced) for index, item in enumerate(value)]
    return value


def file_sha256(path) -> str:
    """The sha256 of a file's bytes in hex, read in 1 MiB blocks (model files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RnpError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RnpError(f"{path}: not valid JSON ({error})") from None


def check_output_path(out, inputs=(), *, folder: bool) -> Path:
    """Checks an output location before any work is done, so a mistake costs no computation.

    ``out`` (a folder if ``folder``, else a file) may not be one of ``inputs`` (the files and
    folders the command reads), hold one of them, or lie inside an input folder; it must be of
    the right kind if it exists, and writable: a file is test-written in it, or in the nearest
    existing folder above it, and removed at once, so nothing is created yet.
    """
    out = Path(out)
    _refuse_inputs(out, inputs)
    if folder and out.exists() and not out.is_dir():
        raise RnpError(f"{out} exists and is not a folder; choose another --out")
    if not folder and out.is_dir():
        raise RnpError(f"{out} is a folder; --out takes a file name here")
    _check_writable(out if folder else out.parent)
    return out


def _refuse_inputs(out: Path, inputs) -> None:
    target = out.resolve()
    for item in inputs:
        source = Path(item).expanduser().resolve()  # as the dataset loader reads it
        if target == source:
            raise RnpError(f"{out} is an input of this command; choose another --out")
        if target in source.parents:
            raise RnpError(f"{out} holds {item}, an input of this command; choose another --out")
        if source.is_dir() and source in target.parents:
            raise RnpError(f"{out} lies inside {item}, an input of this command; choose another --out")


def _check_writable(folder: Path) -> None:
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RnpError(f"{folder}: cannot make this folder, {existing} is a file")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".rnp-write-test.")
    except OSError as error:
        raise RnpError(f"{folder}: cannot write there ({error.strerror or error})") from None
    os.close(handle)
    os.unlink(probe)
