"""Run folders: a trained (possibly backdoored) model and everything needed to rebuild its data.

A run folder holds ``model.safetensors`` (the weights), ``run.json`` (dataset spec and checksum,
model spec, attack spec with every trigger parameter, training config, seed, package version),
``attack.safetensors`` (only for attacks with tensor artefacts: a given pattern, an optimised
trigger, trained generators), ``poisoned_indices.txt`` (the training images that carry the
trigger), ``cover_indices.txt`` (images the attack changed but left with their true label, if
any) and ``metrics.json``. :func:`load_run` rebuilds the model, the data, the attack and the triggered
test set from these files without unpickling anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rnp.attacks import Attack, TriggeredSet, attack_from_spec
from rnp.attacks.base import PoisonedSet
from rnp.data.clean_subset import select_clean_subset
from rnp.data.images import ImageSet
from rnp.data.sources import DatasetSplits, load_dataset
from rnp.errors import RnpError
from rnp.io.checkpoint import load_checkpoint, load_state_dict, save_checkpoint
from rnp.io.files import read_json, write_json, write_text
from rnp.models import build_model
from rnp.utils import config_record

MODEL_FILE = "model.safetensors"
RUN_FILE = "run.json"
ATTACK_FILE = "attack.safetensors"
INDICES_FILE = "poisoned_indices.txt"
HOLDOUT_FILE = "holdout_indices.txt"
COVER_FILE = "cover_indices.txt"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
EPOCH_TIMES_FILE = "epoch_seconds.json"
"""Wall-clock seconds of every training epoch, kept across resumed sessions (a subject of the
benchmark zoo trains over several), so that a run's total training time is known."""
EPOCH_CPU_TIMES_FILE = "epoch_cpu_seconds.json"
"""Processor seconds of every training epoch (all the process's threads), kept like
:data:`EPOCH_TIMES_FILE`: the cost of a run on a shared machine, where wall-clock seconds also
count the time other work held the cores."""
RECORD_FILES = (RUN_FILE, MODEL_FILE, ATTACK_FILE, INDICES_FILE, HOLDOUT_FILE, COVER_FILE, CHECKPOINT_FILE,
                EPOCH_TIMES_FILE, EPOCH_CPU_TIMES_FILE)
"""The files that make a run (``metrics.json`` aside, a record of measurements): no command
writes onto any of them in another command's place, whether or not the run has each one."""


@dataclass(eq=False)
class Run:
    """A loaded run folder."""

    path: Path
    info: dict
    model: nn.Module
    data: DatasetSplits
    attack: Attack | None
    poisoned_indices: torch.Tensor
    holdout_indices: torch.Tensor
    cover_indices: torch.Tensor = dataclasses.field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def clean_pool(self) -> tuple[ImageSet, torch.Tensor]:
        """Where the defender's clean images come from: the clean training images the model
        never saw when the run held some out, else the unpoisoned training images; returned
        with the indices to exclude from it."""
        if len(self.holdout_indices):
            return self.data.train.subset(self.holdout_indices), torch.empty(0, dtype=torch.long)
        return self.data.train, torch.cat([self.poisoned_indices, self.cover_indices])

    def clean_images(self, size: int | float, *, seed: int = 0,
                     stratified: bool = False) -> tuple[ImageSet, torch.Tensor]:
        """The defender's clean set drawn from :meth:`clean_pool`; a fraction ``size`` is of the
        whole training split (as ``--clean-size`` says), and a run that held out too few images
        says so in those words."""
        pool, exclude = self.clean_pool()
        if isinstance(size, float) and 0 < size < 1:
            size = round(size * len(self.data.train))
        held = len(self.holdout_indices)
        if held and isinstance(size, int) and size > held:
            raise RnpError(f"asked for {size} clean images but {self.path} held out only {held} "
                           f"(rnp train --holdout {held}); ask for at most {held}")
        return select_clean_subset(pool, size, seed=seed, stratified=stratified, exclude=exclude)

    def triggered_test(self) -> TriggeredSet | None:
        return self.attack.triggered_test(self.data.test) if self.attack is not None else None

    def poisoned_train(self, *, cache_dir=None) -> PoisonedSet:
        """The training set as the model saw it: rebuilt from the attack spec (an attack fitted
        on a clean model is prepared again from the recorded reference run), checked against
        the recorded poisoned indices. A clean run gives its training set, nothing poisoned."""
        if self.attack is None:
            return PoisonedSet(self.data.train, torch.empty(0, dtype=torch.long))
        if self.attack.needs_reference_model and not self.attack.artifacts():  # not stored: refit
            reference = self.info.get("reference_run")
            if not reference:
                raise RnpError(f"{self.path}: the {self.attack.name} attack was fitted on a reference "
                               "model the run does not record")
            self.attack.prepare(self.data.train, load_run(reference["path"], cache_dir=cache_dir).model.eval())
        poisoned = self.attack.poison(self.data.train)
        if not torch.equal(poisoned.poisoned_indices.sort().values, self.poisoned_indices.sort().values):
            raise RnpError(f"{self.path}: rebuilding the poisoned training set gave other indices "
                           "than the run recorded")
        return poisoned


def write_run_files(path: Path, info: dict, attack: Attack | None, poisoned_indices,
                    holdout_indices=(), cover_indices=()) -> None:
    write_json(path / RUN_FILE, info)
    if attack is not None and attack.artifacts():
        save_checkpoint(path / ATTACK_FILE, attack.artifacts())
    write_text(path / INDICES_FILE, "".join(f"{int(i)}\n" for i in poisoned_indices))
    if len(holdout_indices):
        write_text(path / HOLDOUT_FILE, "".join(f"{int(i)}\n" for i in holdout_indices))
    if len(cover_indices):
        write_text(path / COVER_FILE, "".join(f"{int(i)}\n" for i in cover_indices))


def save_model(path, model: nn.Module, model_spec: dict) -> None:
    """Writes the weights with their spec; tensors are copied to the CPU first (by
    :func:`save_checkpoint`), so a model on a GPU saves the same file as one on the CPU."""
    save_checkpoint(path, model.state_dict(), {"model": model_spec})


def load_model(spec: dict, weights_path) -> nn.Module:
    """Builds the architecture ``spec`` and loads weights into it, with a clear error on mismatch."""
    model = build_model(**spec)
    load_weights(model, load_state_dict(weights_path), weights_path)
    return model


def load_weights(model: nn.Module, state_dict: dict, source) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise RnpError(f"{source}: weights do not fit the model ({detail}"
                       f"{' ...' if len(missing or unexpected) > 3 else ''})")
    for name, tensor in state_dict.items():
        if tensor.shape != expected[name].shape:
            raise RnpError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects "
                           f"{tuple(expected[name].shape)} (wrong architecture, width or class count?)")
    model.load_state_dict(state_dict)


def read_run_info(path) -> dict:
    """Reads ``run.json``, checking it has what :func:`load_run` needs."""
    path = Path(path)
    if not (path / RUN_FILE).is_file():
        raise RnpError(f"{path}: not a run folder (no {RUN_FILE})")
    info = read_json(path / RUN_FILE)
    if not isinstance(info, dict) or not isinstance(info.get("model"), dict) \
            or not isinstance(info.get("dataset"), dict) or "spec" not in info["dataset"] \
            or "checksum" not in info["dataset"]:
        raise RnpError(f"{path / RUN_FILE}: incomplete run record (needs model, and dataset with "
                       "spec and checksum)")
    return info


def run_inputs(path) -> list[Path]:
    """What loading run ``path`` reads, which no output may replace, hold or lie inside: its
    record files, its dataset, and the record files of the reference run an attack was fitted on."""
    info = read_run_info(path)
    inputs = [*record_files(path), Path(info["dataset"]["spec"])]
    reference = info.get("reference_run")
    if isinstance(reference, dict) and isinstance(reference.get("path"), str):
        inputs += record_files(reference["path"])
    return inputs


def record_files(path) -> list[Path]:
    """The paths of a run folder's :data:`RECORD_FILES`, whether they exist or not."""
    return [Path(path) / name for name in RECORD_FILES]


def load_run(path, *, cache_dir=None, model_file=None, data_spec=None) -> Run:
    """Loads a run folder; ``model_file`` replaces its weights (e.g. a defended model);
    ``data_spec`` is where its data lies now, when it moved since training (checksum checked)."""
    path = Path(path)
    info = read_run_info(path)
    model = load_model(info["model"], Path(model_file) if model_file else path / MODEL_FILE)
    data_spec = data_spec or info["dataset"]["spec"]
    data = load_dataset(data_spec, cache_dir=cache_dir)
    if data.checksum != info["dataset"]["checksum"]:
        raise RnpError(f"{data_spec}: the data changed since the run was trained "
                       f"(checksum {data.checksum[:12]} != {info['dataset']['checksum'][:12]})")
    attack = None
    if info.get("attack"):
        artifacts = load_checkpoint(path / ATTACK_FILE)[0] if (path / ATTACK_FILE).exists() else {}
        attack = attack_from_spec(info["attack"], artifacts)
    return Run(path, info, model, data, attack, _read_indices(path / INDICES_FILE),
               _read_indices(path / HOLDOUT_FILE), _read_indices(path / COVER_FILE))


def _read_indices(path: Path) -> torch.Tensor:
    if not path.exists():
        return torch.empty(0, dtype=torch.long)
    try:
        values = [int(line) for line in path.read_text().split()]
    except ValueError:
        raise RnpError(f"{path}: expected one integer per line") from None
    return torch.tensor(values, dtype=torch.long)


def config_dict(config) -> dict:
    """A dataclass config as JSON-ready data (tuples become lists), as recorded in ``run.json``
    and hashed into cache keys; fields added later are left out at their defaults (see
    :func:`rnp.utils.config_record`), so older run folders and cache keys stay valid."""
    return config_record(config)


def config_from_dict(config_class, record: dict):
    """The config a :func:`config_dict` record describes: a field the record leaves out holds
    the value it is left out at (amp "off", not the default "auto"), so an old float32 run is
    rebuilt as float32 on any machine."""
    omitted = {f.name: f.metadata["omit"] for f in dataclasses.fields(config_class) if "omit" in f.metadata}
    return config_class(**{**omitted, **record})
