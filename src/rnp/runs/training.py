"""Training a (backdoored) model into a run folder, resumable: what ``rnp train`` and the
benchmarks' subject cache (:mod:`rnp.bench.subjects`) both call.

Every run folder records the fingerprint of the code that shaped it (``run.json``:
``training_code``, :func:`rnp.runs.fingerprint.training_fingerprint`). Where the data lies is no
part of a run's identity: a moved dataset or cache, or a worker mounting them elsewhere, finds the
same runs.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from rnp import __version__
from rnp.attacks import Attack
from rnp.data.clean_subset import select_clean_subset
from rnp.data.sources import load_dataset
from rnp.errors import RnpError
from rnp.io.checkpoint import save_checkpoint
from rnp.io.files import file_sha256, read_json, write_json
from rnp.metrics import evaluate_backdoor
from rnp.models import build_model, model_spec
from rnp.runs.fingerprint import training_fingerprint
from rnp.runs.machine import machine
from rnp.runs.folder import (ATTACK_FILE, CHECKPOINT_FILE, EPOCH_CPU_TIMES_FILE, EPOCH_TIMES_FILE, METRICS_FILE,
                             MODEL_FILE, RUN_FILE, config_dict, load_run, read_run_info, save_model, write_run_files)
from rnp.training import TrainConfig, train
from rnp.utils import derive_seed, resolve_device, resolve_precision

logger = logging.getLogger(__name__)


def train_run(out, data_spec: str, *, arch: str = "preact_resnet18", width: int = 16,
              attack: Attack | None = None, config: TrainConfig | None = None,
              holdout: int = 0, reference_run=None, cache_dir=None, progress: bool = True,
              log=logger.info, device="cpu") -> Path:
    """Trains a model on ``data_spec`` poisoned by ``attack`` and writes a run folder at ``out``.

    An interrupted run resumes from its per-epoch checkpoint when called again with the same
    settings. A finished run is returned as it is. A folder holding a different run is an error,
    never overwritten. ``holdout`` clean training images are kept out of training and recorded,
    so a defender can later draw clean images the model has never seen. ``reference_run`` is a
    clean run folder (same data) whose model attacks with ``needs_reference_model`` are fitted
    on; its model file's sha256 is recorded. ``device`` (a device, or a name for
    :func:`rnp.utils.resolve_device`) is where it trains and is evaluated; it is recorded in
    ``metrics.json`` and is no part of the run's identity, but the precision ``config``'s "auto"
    means there is: ``run.json`` records amp "on" or "off" (left out at off) and channels_last
    resolved (:func:`rnp.utils.resolve_precision`). ``log(line)`` reports progress
    (default: this module's logger, at INFO; ``rnp train`` prints the lines).
    """
    device = resolve_device(device)
    out = Path(out)
    config = resolve_precision(config or TrainConfig(), device)  # recorded as used on the device
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
                                 "model_sha256": file_sha256(Path(reference_run) / MODEL_FILE)}
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
    epoch_seconds = _read_epoch_times(out / EPOCH_TIMES_FILE)
    epoch_cpu_seconds = _read_epoch_times(out / EPOCH_CPU_TIMES_FILE)
    epoch_start, epoch_cpu_start = start, time.process_time()

    def on_epoch(epoch, stats):
        nonlocal epoch_start, epoch_cpu_start
        now, cpu_now = time.perf_counter(), time.process_time()
        epoch_seconds[epoch + 1], epoch_cpu_seconds[epoch + 1] = now - epoch_start, cpu_now - epoch_cpu_start
        epoch_start, epoch_cpu_start = now, cpu_now
        _write_epoch_times(out / EPOCH_TIMES_FILE, epoch_seconds)
        _write_epoch_times(out / EPOCH_CPU_TIMES_FILE, epoch_cpu_seconds)
        log(f"epoch {epoch + 1}/{config.epochs}: loss {stats.loss:.4f}, train accuracy {stats.accuracy:.4f}")

    history = train(model, train_set, config, checkpoint=out / CHECKPOINT_FILE, progress=progress,
                    on_epoch=on_epoch, hook=hook, device=device)
    seconds = time.perf_counter() - start
    if hook is not None and attack.artifacts():  # what the attack learned while training
        save_checkpoint(out / ATTACK_FILE, attack.artifacts())
    triggered = attack.triggered_test(data.test) if attack is not None else None
    metrics = evaluate_backdoor(model, data.test, triggered).to_dict()
    save_model(out / MODEL_FILE, model, spec)
    every_epoch = list(range(1, config.epochs + 1))
    write_json(out / METRICS_FILE, {**metrics, "train_seconds_this_session": seconds,
                                    "train_seconds": _total(epoch_seconds, every_epoch),
                                    "train_cpu_seconds": _total(epoch_cpu_seconds, every_epoch),
                                    "attack_prepare_seconds": prepare_seconds,
                                    "train_loss": history[-1].loss, "train_accuracy": history[-1].accuracy,
                                    "device": str(device), "machine": machine(device)})
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return out


def _read_epoch_times(path: Path) -> dict[int, float]:
    return {int(k): v for k, v in read_json(path).items()} if path.exists() else {}


def _write_epoch_times(path: Path, seconds: dict[int, float]) -> None:
    write_json(path, {str(k): v for k, v in sorted(seconds.items())})


def _total(seconds: dict[int, float], epochs: list[int]):
    """The seconds of all ``epochs``, or None when some were not timed (a run begun by older code)."""
    return sum(seconds.values()) if sorted(seconds) == epochs else None


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
