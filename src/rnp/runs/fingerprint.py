"""Fingerprints of the code that computed a result, so a cache never serves what older code made.

The package version is no fingerprint: it stays the same across commits. These hash the source
files of the imported package itself (so they hold for an editable checkout and an installed
wheel alike): every ``*.py`` file under the given subfolders, in sorted order, each with its
path relative to the package and its length, so a renamed or moved file changes the hash too.
Each is computed once per process.

- :func:`package_fingerprint` covers all of ``rnp``: it keys a grid cell (minutes to recompute).
- :func:`training_fingerprint` covers only the code that shapes a trained model
  (:data:`TRAINING_CODE`): it keys a subject (hours to retrain), so an edit to a defense, a
  report or the CLI keeps every trained model.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import rnp

PACKAGE_ROOT = Path(rnp.__file__).resolve().parent

TRAINING_CODE = ("data", "models", "attacks", "training", "utils.py")
"""What shapes a trained model: data decoding and clean-image draws, the architectures, the
attacks (poisoning, triggers, generators), the training loop, and the seeding helpers of
``rnp/utils.py``. ``rnp/runs/training.py`` and ``rnp/bench/subjects.py`` (which call them) are
left out on purpose: they also hold run folders' and the cache's own logic, whose edits must not
retrain every subject."""

EQUIVALENT_TRAINING_CODE: dict[str, tuple[str, ...]] = {
    # 2026-12-05: the re-layering (rnp.runs, probes, tables), docstrings and progress estimates;
    # 24 of 24 canaries identical against c89da19 (benchmarks/training_equivalence.py)
    "c08c2480d48d": ("61ddfb885c65",),
    # 2026-12-05: one amp rule in rnp.utils shared by training and RNP; 24 of 24 identical vs c89da19
    "d94a7af75c3c": ("61ddfb885c65",),
    # 2026-12-05: amp "auto" resolved per device (bfloat16 on CPUs that have it), records and keys
    # take the precision used; 24 of 24 identical vs a104d1c (d94a7af75c3c, itself 61ddfb885c65's)
    "a0615746df13": ("d94a7af75c3c",),
    # 2026-12-06: the precision helpers (rnp.training.precision) shared by the loop, the
    # evaluation and the baselines; 24 of 24 identical vs 7cbc4b8 (a0615746df13)
    "4491a04dc800": ("a0615746df13",),
    # 2026-12-06: a hook's transform runs under the step's autocast; 21 of 24 identical vs de7eae7,
    # the three hook attacks in bfloat16 differ (RETRAINED_ATTACKS)
    "2ab04311e7b6": ("4491a04dc800",),
    # 2026-12-06: run_epoch's frozen_batchnorm option (off unless asked, for RNP's repair);
    # 24 of 24 identical vs 7e75974 (2ab04311e7b6)
    "9388b787ca56": ("2ab04311e7b6",),
}
"""Training fingerprints verified to train the same models as older ones: ``{newer: (older,
...)}``. An entry is added only after ``benchmarks/training_equivalence.py --against REV`` found
every canary subject (each attack, float32 and bfloat16) bit-identical under both codes, so an
edit that changes no trained weight (a docstring, a moved helper) keeps the cached subjects,
which cost hours each, instead of retraining them. An edit that changes the weights of some
attacks only gets an entry with those attacks in :data:`RETRAINED_ATTACKS`; one that changes
every subject gets no entry."""

RETRAINED_ATTACKS: dict[str, tuple[str, ...]] = {
    "2ab04311e7b6": ("bpp", "input_aware", "lira"),
}
"""For an entry of :data:`EQUIVALENT_TRAINING_CODE`, the attacks (``"none"``: a clean model)
whose canaries differed: their subjects are trained anew, the other attacks' are kept."""

FINGERPRINT_LENGTH = 12
"""Hex digits kept: enough to tell code versions apart, short enough for folder names."""


@functools.lru_cache(maxsize=None)
def source_fingerprint(parts: tuple[str, ...] | None = None) -> str:
    """The sha256 (first :data:`FINGERPRINT_LENGTH` hex digits) of the package's ``*.py`` files
    under ``parts`` (subfolders or files relative to the package; None: the whole package)."""
    files = sorted(_sources(parts), key=lambda p: p.relative_to(PACKAGE_ROOT).as_posix())
    digest = hashlib.sha256()
    for path in files:
        content = path.read_bytes()
        digest.update(f"{path.relative_to(PACKAGE_ROOT).as_posix()}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()[:FINGERPRINT_LENGTH]


def package_fingerprint() -> str:
    """The fingerprint of every source file of ``rnp``."""
    return source_fingerprint(None)


def training_fingerprint() -> str:
    """The fingerprint of the code that shapes a trained model (:data:`TRAINING_CODE`)."""
    return source_fingerprint(TRAINING_CODE)


def equivalent_training_codes(code: str, attack: str | None = None) -> list[str]:
    """The older training fingerprints ``code`` was verified to train the same models as, through
    chains of :data:`EQUIVALENT_TRAINING_CODE` entries, nearest first. With ``attack`` (an attack
    name, ``"none"`` for a clean model) a link that retrained it (:data:`RETRAINED_ATTACKS`) is
    not followed."""
    found, frontier = [], [code]
    while frontier:
        older = [c for current in frontier if attack not in RETRAINED_ATTACKS.get(current, ())
                 for c in EQUIVALENT_TRAINING_CODE.get(current, ()) if c != code and c not in found]
        found.extend(dict.fromkeys(older))
        frontier = older
    return found


def _sources(parts: tuple[str, ...] | None) -> list[Path]:
    if parts is None:
        return list(PACKAGE_ROOT.rglob("*.py"))
    found = []
    for part in parts:
        path = PACKAGE_ROOT / part
        found.extend(path.rglob("*.py") if path.is_dir() else [path])
    return found
