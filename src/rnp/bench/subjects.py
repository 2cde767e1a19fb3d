"""Training a (backdoored) model into a run folder, resumable, and caching it by its full spec.

The cache (:func:`cached_run`) keys a subject on its spec (data checksum, architecture, attack
with every parameter, training config, reference model, holdout) and on the fingerprint of the
code that shapes a trained model (:func:`rnp.bench.fingerprint.training_fingerprint`): folder
``<spec hash>-<training fingerprint>``. The policy, since a subject costs hours:

- an edit to the training code (data, models, attacks, training, seeding) retrains, into a new
  folder beside the old one, and says why (which other fingerprints the cache holds);
- an edit anywhere else (defenses, benchmarks, reports, the CLI) reuses every subject;
- an edit to the training code that changes no trained weight reuses them too, once
  ``benchmarks/training_equivalence.py`` has verified it and the fingerprints are declared
  equivalent (:data:`rnp.bench.fingerprint.EQUIVALENT_TRAINING_CODE`);
- a *pre-fingerprint* folder (keyed on the package version, as every subject trained before
  this policy was) is adopted once: the first code that finds it marks it as its own
  (``adopted.json``, with a log line saying so and how to retrain) and reuses it; code with
  another training fingerprint retrains. Cell records say which subjects were adopted.

Every run folder records the training fingerprint it was trained by (``run.json``:
``training_code``); :func:`subject_code` reads it back for the cell records. Where the data lies
is no part of a run's identity: a moved dataset or cache, or a worker mounting them elsewhere,
finds the same runs.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from rnp import __version__
from rnp.attacks import Attack
from rnp.bench.fingerprint import equivalent_training_codes, training_fingerprint
from rnp.data.clean_subset import select_clean_subset
from rnp.data.sources import load_dataset
from rnp.errors import RnpError
from rnp.io.checkpoint import save_checkpoint
from rnp.io.files import read_json, write_json
from rnp.io.runs import (ATTACK_FILE, CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE, RUN_FILE,
                         config_dict, load_run, read_run_info, save_model, write_run_files)
from rnp.metrics import evaluate_backdoor
from rnp.models import build_model, model_spec
from rnp.training import TrainConfig, train
from rnp.utils import derive_seed, resolve_device

ADOPTED_FILE = "adopted.json"
"""In a pre-fingerprint subject folder: the training fingerprint that adopted it."""

LEGACY_VERSION = "0.1.0"
"""The package version every pre-fingerprint subject key hashed."""


def train_run(out, data_spec: str, *, arch: str = "preact_resnet18", width: int = 16,
              attack: Attack | None = None, config: TrainConfig | None = None,
              holdout: int = 0, reference_run=None, cache_dir=None, progress: bool = True,
              log=print, device="cpu") -> Path:
    """Trains a model on ``data_spec`` poisoned by ``attack`` and writes a run folder at ``out``.

    An interrupted run resumes from its per-epoch checkpoint when called again with the same
    settings. A finished run is returned as it is. A folder holding a different run is an error,
    never overwritten. ``holdout`` clean training images are kept out of training and recorded,
    so a defender can later draw clean images the model has never seen. ``reference_run`` is a
    clean run folder (same data) whose model attacks with ``needs_reference_model`` are fitted
    on; its model file's sha256 is recorded. ``device`` (a device, or a name for
    :func:`rnp.utils.resolve_device`) is where it trains and is evaluated; it is recorded in
    ``metrics.json`` and is no part of the run's identity.
    """
    device = resolve_device(device)
    out = Path(out)
    config = config or TrainConfig()
    data = load_dataset(data_spec, cache_dir=cache_dir)
    spec = model_spec(arch, num_classes=data.train.num_classes, width=width,
                      in_channels=data.train.image_shape[0])
    info = {
        "rnp_version": __version__,
        "dataset": {"spec": str(Path(data_spec).resolve()), "checksum": data.checksum,
                    "classes": list(data.train.classes), "image_shape": list(data.train.image_shape)},
        "model": spec,
        "attack": attack.spec() if attack is not None else None,
        "train": config_dict(config),
        "holdout": holdout,
        "seed": config.seed,
        "training_code": training_fingerprint(),
    }
    reference = _reference_model(attack, reference_run, data.checksum, cache_dir)
    if reference is not None:
        info["reference_run"] = {"path": str(Path(reference_run).resolve()),
                                 "model_sha256": _sha256(Path(reference_run) / MODEL_FILE)}
    if (out / RUN_FILE).exists():
        existing = read_run_info(out)
        if _identity(existing) != _identity(info):
            raise RnpError(f"{out} already holds a different run; choose another --out")
        if (out / MODEL_FILE).exists():
            return out
    elif out.exists() and any(out.iterdir()):
        raise RnpError(f"{out} exists and is not empty; choose another --out")
    if attack is not None:  # before the folder is made or a line logged: an error stays one line
        attack._check_target(data.train.num_classes)
    out.mkdir(parents=True, exist_ok=True)
    hook, cover, prepare_seconds = None, torch.empty(0, dtype=torch.long), 0.0
    if attack is not None:
        log(f"preparing the {attack.name} attack")
        prepare_start = time.perf_counter()
        attack.prepare(data.train, reference)
        prepare_seconds = time.perf_counter() - prepare_start
        poisoned = attack.poison(data.train)
        train_set, indices, cover = poisoned.data, poisoned.poisoned_indices, poisoned.cover_indices
        hook = attack.training_hook(data.train.num_classes)
    else:
        train_set, indices = data.train, torch.empty(0, dtype=torch.long)
    held = torch.empty(0, dtype=torch.long)
    if holdout:
        _, held = select_clean_subset(data.train, holdout, seed=derive_seed(config.seed, "holdout"),
                                      exclude=torch.cat([indices, cover]))
        keep = torch.ones(len(train_set), dtype=torch.bool)
        keep[held] = False
        train_set = train_set.subset(keep.nonzero().squeeze(1))
    write_run_files(out, info, attack, indices, held, cover)
    torch.manual_seed(derive_seed(config.seed, "model-init"))
    model = build_model(**spec)
    start = time.perf_counter()

    def on_epoch(epoch, stats):
        log(f"epoch {epoch + 1}/{config.epochs}: loss {stats.loss:.4f}, train accuracy {stats.accuracy:.4f}")

    history = train(model, train_set, config, checkpoint=out / CHECKPOINT_FILE, progress=progress,
                    on_epoch=on_epoch, hook=hook, device=device)
    seconds = time.perf_counter() - start
    if hook is not None and attack.artifacts():  # what the attack learned while training
        save_checkpoint(out / ATTACK_FILE, attack.artifacts())
    triggered = attack.triggered_test(data.test) if attack is not None else None
    metrics = evaluate_backdoor(model, data.test, triggered).to_dict()
    save_model(out / MODEL_FILE, model, spec)
    write_json(out / METRICS_FILE, {**metrics, "train_seconds_this_session": seconds,
                                    "attack_prepare_seconds": prepare_seconds,
                                    "train_loss": history[-1].loss, "train_accuracy": history[-1].accuracy,
                                    "device": str(device)})
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return out


def cached_run(cache_root, data_spec: str, **kwargs) -> Path:
    """:func:`train_run` into ``cache_root/<spec hash>-<training fingerprint>``, so each subject
    is trained once however many benchmarks use it, and again only when the code that shapes it
    changes (the module's policy). Says why whenever it trains."""
    cache_root, log = Path(cache_root), kwargs.get("log", print)
    spec, code = _subject_spec(data_spec, kwargs), training_fingerprint()
    out = cache_root / f"{_hash(spec)}-{code}"
    if not (out / MODEL_FILE).exists():
        earlier = _equivalent_folder(cache_root, spec, code, fresh=not out.exists())
        if earlier is not None:
            log(f"reusing subject {earlier.name}: its training code was verified to train the same "
                f"models as this code ({code})")
            return train_run(earlier, data_spec, **kwargs)
        legacy = _adopted_legacy(cache_root, spec, code, log)
        if legacy is not None:
            return train_run(legacy, data_spec, **kwargs)
        log(f"training subject {out.name}: {_why_train(cache_root, spec, out)}")
    return train_run(out, data_spec, **kwargs)


def subject_code(run_dir) -> dict:
    """The training fingerprint a cached subject was trained by (None when unknown), and whether
    it is a pre-fingerprint folder adopted as that code's."""
    adopted = Path(run_dir) / ADOPTED_FILE
    if adopted.exists():
        return {"training_code": read_json(adopted)["training_code"], "adopted": True}
    return {"training_code": read_run_info(run_dir).get("training_code"), "adopted": False}


def _subject_spec(data_spec: str, kwargs: dict) -> dict:
    """Everything that shapes the model but the code: what the cache key hashes."""
    attack, config = kwargs.get("attack"), kwargs.get("config") or TrainConfig()
    data = load_dataset(data_spec, cache_dir=kwargs.get("cache_dir"))
    spec = {"data": data.checksum, "arch": kwargs.get("arch", "preact_resnet18"),
            "width": kwargs.get("width", 16), "attack": attack.spec() if attack else None,
            "train": config_dict(config)}
    if attack is not None and attack.needs_reference_model and kwargs.get("reference_run"):
        spec["reference_model"] = _sha256(Path(kwargs["reference_run"]) / MODEL_FILE)
    if kwargs.get("holdout"):
        spec["holdout"] = kwargs["holdout"]
    return spec


def _equivalent_folder(cache_root: Path, spec: dict, code: str, *, fresh: bool) -> Path | None:
    """The folder of ``spec`` trained by a training code verified equivalent to ``code``: a
    finished one, else (when ``fresh``: this code has not started its own) an interrupted one,
    which this code then resumes."""
    folders = [cache_root / f"{_hash(spec)}-{older}" for older in equivalent_training_codes(code)]
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
    is itself cached (and is the clean baseline a benchmark compares against)."""
    if attack is not None and attack.needs_reference_model:
        kwargs["reference_run"] = cached_run(cache_root, data_spec, **{**kwargs, "attack": None})
    return cached_run(cache_root, data_spec, attack=attack, **kwargs)


def _reference_model(attack, reference_run, checksum: str, cache_dir):
    """The clean model an attack is fitted on, loaded from ``reference_run`` when it needs one."""
    if attack is None or not attack.needs_reference_model:
        return None
    if reference_run is None:
        raise RnpError(f"the {attack.name} attack is fitted on a clean model; give a clean run "
                       "folder on the same data (--reference-run)")
    run = load_run(reference_run, cache_dir=cache_dir)
    if run.data.checksum != checksum:
        raise RnpError(f"{reference_run}: the reference run was trained on other data")
    if run.attack is not None:
        raise RnpError(f"{reference_run}: the reference run is backdoored ({run.attack.name}); "
                       "it must be a clean model")
    return run.model.eval()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _identity(info: dict) -> str:
    """What makes two run records the same run. The holdout is part of it: a folder trained with
    another ``--holdout`` (a record from before holdouts were kept held none out) is another run."""
    keys = ("dataset", "model", "attack", "train", "reference_run")
    identity = {k: info.get(k) for k in keys}
    identity.update(dataset=_placeless(identity["dataset"], "spec"),
                    reference_run=_placeless(identity["reference_run"], "path"),
                    holdout=info.get("holdout") or 0)
    return json.dumps(identity, sort_keys=True)


def _placeless(record: dict | None, key: str) -> dict | None:
    """``record`` without the path at ``key``: a moved dataset or cache, or a worker mounting them
    elsewhere, holds the same run (the data checksum and the reference model's sha256 still pin
    what they are)."""
    return None if record is None else {k: v for k, v in record.items() if k != key}
