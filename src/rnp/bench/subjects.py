"""Training a (backdoored) model into a run folder, resumable, and caching it by its full spec."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from rnp import __version__
from rnp.attacks import Attack
from rnp.data.clean_subset import select_clean_subset
from rnp.data.sources import load_dataset
from rnp.errors import RnpError
from rnp.io.files import write_json
from rnp.io.runs import (CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE, RUN_FILE, config_dict,
                         read_run_info, save_model, write_run_files)
from rnp.metrics import evaluate_backdoor
from rnp.models import build_model, model_spec
from rnp.training import TrainConfig, train
from rnp.utils import derive_seed


def train_run(out, data_spec: str, *, arch: str = "preact_resnet18", width: int = 16,
              attack: Attack | None = None, config: TrainConfig | None = None,
              holdout: int = 0, cache_dir=None, progress: bool = True, log=print) -> Path:
    """Trains a model on ``data_spec`` poisoned by ``attack`` and writes a run folder at ``out``.

    An interrupted run resumes from its per-epoch checkpoint when called again with the same
    settings. A finished run is returned as it is. A folder holding a different run is an error,
    never overwritten. ``holdout`` clean training images are kept out of training and recorded,
    so a defender can later draw clean images the model has never seen.
    """
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
    }
    if (out / RUN_FILE).exists():
        existing = read_run_info(out)
        if _identity(existing) != _identity(info):
            raise RnpError(f"{out} already holds a different run; choose another --out")
        if (out / MODEL_FILE).exists():
            return out
    elif out.exists() and any(out.iterdir()):
        raise RnpError(f"{out} exists and is not empty; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if attack is not None:
        poisoned = attack.poison(data.train)
        train_set, indices = poisoned.data, poisoned.poisoned_indices
    else:
        train_set, indices = data.train, torch.empty(0, dtype=torch.long)
    held = torch.empty(0, dtype=torch.long)
    if holdout:
        _, held = select_clean_subset(data.train, holdout, seed=derive_seed(config.seed, "holdout"),
                                      exclude=indices)
        keep = torch.ones(len(train_set), dtype=torch.bool)
        keep[held] = False
        train_set = train_set.subset(keep.nonzero().squeeze(1))
    write_run_files(out, info, attack, indices, held)
    torch.manual_seed(derive_seed(config.seed, "model-init"))
    model = build_model(**spec)
    start = time.perf_counter()

    def on_epoch(epoch, stats):
        log(f"epoch {epoch + 1}/{config.epochs}: loss {stats.loss:.4f}, train accuracy {stats.accuracy:.4f}")

    history = train(model, train_set, config, checkpoint=out / CHECKPOINT_FILE, progress=progress,
                    on_epoch=on_epoch)
    seconds = time.perf_counter() - start
    triggered = attack.triggered_test(data.test) if attack is not None else None
    metrics = evaluate_backdoor(model, data.test, triggered).to_dict()
    save_model(out / MODEL_FILE, model, spec)
    write_json(out / METRICS_FILE, {**metrics, "train_seconds_this_session": seconds,
                                    "train_loss": history[-1].loss, "train_accuracy": history[-1].accuracy})
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return out


def cached_run(cache_root, data_spec: str, **kwargs) -> Path:
    """:func:`train_run` into ``cache_root/<key>``, the key hashing everything that shapes the
    model, so each subject is trained once however many benchmarks use it."""
    attack, config = kwargs.get("attack"), kwargs.get("config") or TrainConfig()
    data = load_dataset(data_spec, cache_dir=kwargs.get("cache_dir"))
    identity = {"rnp_version": __version__, "data": data.checksum, "arch": kwargs.get("arch", "preact_resnet18"),
                "width": kwargs.get("width", 16), "attack": attack.spec() if attack else None,
                "train": config_dict(config)}
    if kwargs.get("holdout"):
        identity["holdout"] = kwargs["holdout"]
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return train_run(Path(cache_root) / key, data_spec, **kwargs)


def _identity(info: dict) -> str:
    keys = ("dataset", "model", "attack", "train")
    return json.dumps({k: info.get(k) for k in keys}, sort_keys=True)
