"""The benchmarks' subject cache: each (backdoored) model trained once into a run folder
(:func:`rnp.runs.training.train_run`) and found again by its full spec.

The cache (:func:`cached_run`) keys a subject on its spec (data checksum, architecture, attack
with every parameter, training config, reference model, holdout) and on the fingerprint of the
code that shapes a trained model (:func:`rnp.runs.fingerprint.training_fingerprint`): folder
``<spec hash>-<training fingerprint>``. The policy, since a subject costs hours:

- an edit to the training code (data, models, attacks, training, seeding) retrains, into a new
  folder beside the old one, and says why (which other fingerprints the cache holds);
- an edit anywhere else (defenses, benchmarks, reports, the CLI) reuses every subject;
- an edit to the training code that changes no trained weight reuses them too, once
  ``benchmarks/training_equivalence.py`` has verified it and the fingerprints are declared
  equivalent (:data:`rnp.runs.fingerprint.EQUIVALENT_TRAINING_CODE`);
- a *pre-fingerprint* folder (keyed on the package version, as every subject trained before
  this policy was) is adopted once: the first code that finds it marks it as its own
  (``adopted.json``, with a log line saying so and how to retrain) and reuses it; code with
  another training fingerprint retrains. Cell records say which subjects were adopted.

Every run folder records the training fingerprint it was trained by (``run.json``:
``training_code``); :func:`subject_code` reads it back for the cell records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from rnp.attacks import Attack
from rnp.data.sources import load_dataset
from rnp.errors import RnpError
from rnp.io.files import file_sha256, read_json, write_json
from rnp.runs.fingerprint import equivalent_training_codes, training_fingerprint
from rnp.runs.folder import CHECKPOINT_FILE, MODEL_FILE, config_dict, read_run_info
from rnp.runs.training import train_run
from rnp.training import TrainConfig
from rnp.utils import resolve_device, resolve_precision

logger = logging.getLogger(__name__)


class SubjectNotTrained(RnpError):
    """A subject asked for with ``train=False`` that the cache does not hold finished."""


ADOPTED_FILE = "adopted.json"
"""In a pre-fingerprint subject folder: the training fingerprint that adopted it."""

LEGACY_VERSION = "0.1.0"
"""The package version every pre-fingerprint subject key hashed."""


def cached_run(cache_root, data_spec: str, *, train: bool = True, role: str = "subject", **kwargs) -> Path:
    """:func:`train_run` into ``cache_root/<spec hash>-<training fingerprint>``, so each subject
    is trained once however many benchmarks use it, and again only when the code that shapes it
    changes (the module's policy). Says why whenever it trains, and what the model is for
    (``role``). With ``train=False`` a subject the cache does not hold finished raises
    :class:`SubjectNotTrained` instead (e.g. to run the defenses of the subjects a training
    queue has finished, beside it)."""
    cache_root, log = Path(cache_root), kwargs.get("log", logger.info)
    spec, code = _subject_spec(data_spec, kwargs), training_fingerprint()
    out = cache_root / f"{_hash(spec)}-{code}"
    if not (out / MODEL_FILE).exists():
        earlier = _equivalent_folder(cache_root, spec, code, fresh=not out.exists() and train)
        if earlier is not None:
            log(f"reusing subject {earlier.name}: its training code was verified to train the same "
                f"models as this code ({code})")
            return train_run(earlier, data_spec, **kwargs)
        legacy = _adopted_legacy(cache_root, spec, code, log)
        if legacy is not None:
            return train_run(legacy, data_spec, **kwargs)
        if not train:
            raise SubjectNotTrained(f"subject {out.name} is not trained yet")
        log(f"training {role} {out.name}: {_why_train(cache_root, spec, out)}")
    return train_run(out, data_spec, **kwargs)


def subject_code(run_dir) -> dict:
    """The training fingerprint a cached subject was trained by (None when unknown), and whether
    it is a pre-fingerprint folder adopted as that code's."""
    adopted = Path(run_dir) / ADOPTED_FILE
    if adopted.exists():
        return {"training_code": read_json(adopted)["training_code"], "adopted": True}
    return {"training_code": read_run_info(run_dir).get("training_code"), "adopted": False}


def _subject_spec(data_spec: str, kwargs: dict) -> dict:
    """Everything that shapes the model but the code: what the cache key hashes. The training
    config enters with its precision resolved for the device (as :func:`train_run` records it),
    so a subject trained in bfloat16 never takes the place of one trained in float32."""
    attack, device = kwargs.get("attack"), resolve_device(kwargs.get("device", "cpu"))
    config = resolve_precision(kwargs.get("config") or TrainConfig(), device)
    data = load_dataset(data_spec, cache_dir=kwargs.get("cache_dir"))
    spec = {"data": data.checksum, "arch": kwargs.get("arch", "preact_resnet18"),
            "width": kwargs.get("width", 16), "attack": attack.spec() if attack else None,
            "train": config_dict(config)}
    if attack is not None and attack.needs_reference_model and kwargs.get("reference_run"):
        spec["reference_model"] = file_sha256(Path(kwargs["reference_run"]) / MODEL_FILE)
    if kwargs.get("holdout"):
        spec["holdout"] = kwargs["holdout"]
    return spec


def _equivalent_folder(cache_root: Path, spec: dict, code: str, *, fresh: bool) -> Path | None:
    """The folder of ``spec`` trained by a training code verified equivalent to ``code``: a
    finished one, else (when ``fresh``: this code has not started its own) an interrupted one,
    which this code then resumes."""
    attack = spec["attack"]["name"] if spec["attack"] else "none"
    folders = [cache_root / f"{_hash(spec)}-{older}" for older in equivalent_training_codes(code, attack)]
    finished = [f for f in folders if (f / MODEL_FILE).exists()]
    if finished:
        return finished[0]
    started = [f for f in folders if (f / CHECKPOINT_FILE).exists()]
    return started[0] if started and fresh else None


def _adopted_legacy(cache_root: Path, spec: dict, code: str, log) -> Path | None:
    """The finished pre-fingerprint folder of ``spec`` if it is (or now becomes) this training
    code's; None when there is none or another training code adopted it."""
    folder = cache_root / _hash({**spec, "rnp_version": LEGACY_VERSION})
    if not (folder / MODEL_FILE).exists():
        return None
    marker = folder / ADOPTED_FILE
    if marker.exists():
        return folder if read_json(marker)["training_code"] == code else None
    write_json(marker, {"training_code": code, "adopted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    log(f"adopting subject {folder}: trained before subjects were keyed on their training code, "
        f"now taken as trained by this code ({code}); delete the folder to retrain it")
    return folder


def _why_train(cache_root: Path, spec: dict, out: Path) -> str:
    """Why a subject is trained: resumed, retrained after a training-code change, or new."""
    if out.exists():
        return "resuming an interrupted training"
    others = sorted(p.name.rsplit("-", 1)[1] for p in cache_root.glob(f"{_hash(spec)}-*") if p != out)
    legacy = cache_root / _hash({**spec, "rnp_version": LEGACY_VERSION}) / ADOPTED_FILE
    if legacy.exists():
        others.append(read_json(legacy)["training_code"] + " (adopted pre-fingerprint model)")
    if others:
        return (f"the training code changed (this code {out.name.rsplit('-', 1)[1]}; "
                f"the cache holds it trained by {', '.join(others)})")
    return "not in the cache"


def _hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def cached_subject(cache_root, data_spec: str, attack: Attack | None, **kwargs) -> Path:
    """A (backdoored) model from the cache, trained if missing. An attack fitted on a clean model
    gets the clean model trained with the same architecture and config as its reference, which
    is itself cached (and is the clean baseline a benchmark compares against). Its training
    says so: a user who asked for one subject sees why two trainings run."""
    if attack is not None and attack.needs_reference_model:
        kwargs["reference_run"] = cached_run(cache_root, data_spec, role=f"the clean model {attack.name} is fitted on,",
                                             **{**kwargs, "attack": None})
    return cached_run(cache_root, data_spec, attack=attack, **kwargs)
