"""Supervised training with SGD, a learning-rate schedule, seeds, mixed precision where it is fast,
and resume after interruption."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rnp.data.images import ImageSet
from rnp.errors import RnpError
from rnp.io.checkpoint import load_checkpoint, save_checkpoint
from rnp.progress import Progress
from rnp.training.hooks import TrainingHook
from rnp.training.loop import EpochStats, run_epoch
from rnp.utils import (check_config, config_record, generator_for, progress_bar, resolve_device,
                       resolve_precision, uses_amp)

SCHEDULES = ("cosine", "multistep", "constant")


@dataclass
class TrainConfig:
    """How a model is trained.

    The optimiser settings are those of the official RNP ``train_backdoor.py`` (SGD, lr 0.1,
    momentum 0.9, weight decay 5e-4, batch 128, 60 epochs, crop+flip augmentation). Its
    MultiStep [10, 20] schedule is kept as an option; the default is cosine annealing, which
    reaches a usable accuracy in the short runs a CPU allows.

    ``amp`` (not in the official code, which trains in float32) sets mixed precision. "auto"
    (the default) uses it where it is fast: on CUDA (float16 with loss scaling, for its tensor
    cores) and on CPUs with native bfloat16 (AVX512-BF16 or AMX, :func:`rnp.utils.fast_bfloat16_cpu`:
    2-4x faster for PreAct-ResNet18, clean accuracy within a point of float32 on the demo data,
    ``benchmarks/amp_parity.py``); other CPUs and MPS stay in float32. "on" uses it on any CPU
    too, "off" never. For float32 on such a CPU: ``amp="off"``, ``--amp off``, or the
    environment variable ``RNP_AMP_AUTO=off`` (which makes every "auto" float32).

    ``channels_last`` stores the weights (and so the activations) in NHWC order while training,
    which oneDNN's bfloat16 convolutions run about 1.3x faster on CPUs with AMX (PreAct-ResNet18
    width 32, one thread: 210 -> 273 img/s); the trained weights are returned in the usual order.
    Unset (None) it follows the precision: on where bfloat16 runs on the CPU, else off.

    Run records and cache keys hold both as resolved for the device
    (:func:`rnp.utils.resolve_precision`): amp "on" or "off", channels_last true or false, each
    left out at float32's value ("off", false), so records of float32 runs keep their keys and a
    bfloat16 run never takes a float32 run's place.
    """

    epochs: int = 60
    """Training epochs (official code: 60)."""
    batch_size: int = 128
    """Images per step (official code)."""
    lr: float = 0.1
    """Initial SGD learning rate (official code)."""
    momentum: float = 0.9
    """SGD momentum (official code)."""
    weight_decay: float = 5e-4
    """SGD weight decay (official code)."""
    schedule: str = "cosine"
    """Learning-rate schedule: cosine (reaches a usable accuracy in short CPU runs), multistep
    (official code) or constant."""
    milestones: tuple[int, ...] = (10, 20)
    """Epochs at which the multistep schedule multiplies the learning rate by gamma (official
    code)."""
    gamma: float = 0.1
    """Learning-rate factor at each milestone of the multistep schedule (official code)."""
    augment: bool = True
    """Random crop (padding 4) and horizontal flip of the training images (official code)."""
    seed: int = 0
    """Seeds the initial weights, the batch order and the augmentation."""
    amp: str = field(default="auto", metadata={"omit": "off"})
    """Mixed precision: auto (CUDA, float16 with loss scaling, and CPUs with native bfloat16),
    on (any CPU too) or off (float32); recorded as on or off, left out at off."""
    channels_last: bool | None = field(default=None, metadata={"omit": False})
    """Train with channels-last (NHWC) weights, faster for bfloat16 on CPUs with AMX; unset:
    on where bfloat16 runs on the CPU. The trained weights come back in the usual order."""

    def __post_init__(self):
        check_config(self)  # types, finite floats, momentum in [0, 1), weight decay >= 0, gamma > 0
        if self.schedule not in SCHEDULES:
            raise RnpError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise RnpError("epochs, batch size and learning rate must be positive")
        self.milestones = tuple(self.milestones)

    def lr_at(self, epoch: int) -> float:
        """The learning rate used during ``epoch`` (counted from 0)."""
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))
        if self.schedule == "multistep":
            return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        return self.lr

    def uses_amp(self, device: torch.device) -> bool:
        """Whether training on ``device`` runs in mixed precision."""
        return uses_amp(self.amp, device)


def train(model: nn.Module, data: ImageSet, config: TrainConfig | None = None, *,
          checkpoint: str | Path | None = None, progress: bool = True, device="cpu",
          on_epoch=None, hook: TrainingHook | None = None) -> list[EpochStats]:
    """Trains ``model`` in place on ``data`` and returns the per-epoch statistics.

    With ``checkpoint`` the state (weights, optimizer, random generator, history) is saved after
    every epoch, and a later call with the same checkpoint and config resumes where it stopped.
    ``device`` is a device or a name for :func:`rnp.utils.resolve_device` ("auto", "cuda", ...);
    ``config.amp`` decides whether the epochs run in mixed precision there, with one gradient
    scaler for the whole run, checkpointed with the rest.
    ``on_epoch(epoch, stats)`` is called after each epoch, e.g. for logging. A few steps in, the
    time the remaining epochs will take is logged (see :mod:`rnp.progress`). ``hook`` is an
    attack's :class:`TrainingHook`; its state is checkpointed with the model's.
    """
    device = resolve_device(device)
    config = resolve_precision(config or TrainConfig(), device)
    mixed = config.uses_amp(device)
    torch.manual_seed(config.seed)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type, enabled=mixed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    generator = generator_for(config.seed, "train-batches")
    history: list[EpochStats] = []
    if checkpoint is not None and Path(checkpoint).exists():
        history = _resume(checkpoint, model, optimizer, generator, scaler, config, hook)
    steps = math.ceil(len(data) / config.batch_size)
    remaining = config.epochs - len(history)
    clock = Progress(remaining * steps, "training", detail=f"{remaining} epochs x {steps} steps")

    def count_step(_) -> bool:
        clock.update()
        return False  # never stops the epoch

    for epoch in range(len(history), config.epochs):
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(epoch)
        if hook is not None:
            hook.start_epoch(epoch, config.epochs)
        with progress_bar(total=steps, desc=f"epoch {epoch + 1}/{config.epochs}",
                          enabled=progress, timed=False) as bar:
            stats = run_epoch(model, data, optimizer, batch_size=config.batch_size,
                              generator=generator, augment=config.augment, hook=hook,
                              after_step=count_step, progress=bar, device=device, scaler=scaler)
        history.append(stats)
        if checkpoint is not None:
            _save(checkpoint, model, optimizer, generator, scaler, config, history, hook)
        if on_epoch is not None:
            on_epoch(epoch, stats)
    if config.channels_last:
        model.to(memory_format=torch.contiguous_format)
    return history


def _save(path, model, optimizer, generator, scaler, config, history, hook) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if hook is not None:
        tensors.update({f"hook.{k}": v for k, v in hook.state_dict().items()})
    state = optimizer.state_dict()
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value
    tensors["generator"] = generator.get_state()
    metadata = {"config": config_record(config), "scaler": scaler.state_dict(),
                "history": [dataclasses.asdict(h) for h in history]}
    save_checkpoint(path, tensors, metadata)


def _resume(path, model, optimizer, generator, scaler, config, hook) -> list[EpochStats]:
    tensors, metadata = load_checkpoint(path)
    saved = metadata.get("config", {})
    if saved != json.loads(json.dumps(config_record(config))):
        raise RnpError(f"{path}: checkpoint was written with another training config; "
                       "delete it or use the same settings to resume")
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state = optimizer.state_dict()
    params = state["param_groups"][0]["params"]
    state["state"] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state["state"].setdefault(int(index), {})[name] = value
    if set(state["state"]) - set(params):
        raise RnpError(f"{path}: optimizer state does not match the model")
    optimizer.load_state_dict(state)
    generator.set_state(tensors["generator"])
    if scaler.is_enabled() and metadata.get("scaler"):  # empty when the run began without it
        scaler.load_state_dict(metadata["scaler"])
    if hook is not None:
        hook.load_state_dict({k[len("hook."):]: v for k, v in tensors.items() if k.startswith("hook.")})
    return [EpochStats(**h) for h in metadata.get("history", [])]
