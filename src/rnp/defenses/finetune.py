"""Fine-tuning (FT): plain SGD on all weights over the defender's clean images.

The simplest removal baseline: continue training the suspect model on the few clean images
the defender holds, hoping that the update overwrites what the trigger relies on. Liu,
Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
Networks", RAID 2018 (arXiv 1805.12185) studied it as a defense on its own; it is the
"Finetuning" baseline of Li, Lyu, Koren, Lyu, Li and Ma, "Neural Attention Distillation:
Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021 (arXiv 2101.05930). The
defaults are the fine-tuning baseline setting used with NAD's comparison: SGD with learning
rate 0.01, momentum 0.9, weight decay 5e-4, batch 64, 10 epochs, random crop (padding 4) and
horizontal flip, constant learning rate. (The NAD paper's appendix text for this baseline could
not be re-checked when this was written; NAD's own fine-tuning recipe, used for its teacher,
is different and lives in ``NADConfig``: learning rate 0.1 then 0.01, weight decay 1e-4.)

:func:`fine_tune` is the one fine-tuning routine of the package: Fine-Pruning fine-tunes its
pruned model with it, NAD its teacher and (with a distillation penalty) its student.

Deviation: NAD's experiments also apply Cutout to the clean images; the package's loader
(:func:`rnp.data.loader.iterate_batches`) offers crop and flip only, so Cutout is left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rnp.data.images import ImageSet
from rnp.defenses.base import DefenseResult, RemovalDefense, StageTimer, prepare_inputs
from rnp.errors import RnpError
from rnp.metrics.backdoor import accuracy
from rnp.training.evaluate import predict
from rnp.training.loop import EpochStats, StepInfo, run_epoch
from rnp.training.precision import PrecisionFields, grad_scaler, model_layout
from rnp.utils import check_config, generator_for, progress_bar, resolve_precision


@dataclass
class FineTuneFields(PrecisionFields):
    """The SGD recipe shared by every defense that fine-tunes (FT, FP, NAD, TSBD), with its
    precision (:class:`rnp.training.precision.PrecisionFields`).

    Not a defense's config by itself: :class:`FTConfig`, ``FPConfig`` and ``NADConfig``
    extend it, and each sets the defaults of its own paper.
    """

    epochs: int = 10
    """Fine-tuning epochs (NAD's FT baseline: 10)."""
    batch_size: int = 64
    """Clean images per batch (NAD's FT baseline: 64)."""
    lr: float = 0.01
    """SGD learning rate (NAD's FT baseline: 0.01)."""
    momentum: float = 0.9
    """SGD momentum (NAD's FT baseline: 0.9)."""
    weight_decay: float = 5e-4
    """SGD weight decay (NAD's FT baseline: 5e-4)."""
    nesterov: bool = False
    """Nesterov momentum (default: plain momentum SGD)."""
    milestones: tuple[int, ...] = ()
    """Epochs at which the learning rate is multiplied by gamma."""
    gamma: float = 0.1
    """Learning-rate factor at each milestone."""
    augment: bool = True
    """Random crop (padding 4) and horizontal flip of the clean images."""
    seed: int = 0
    """Seeds the batch order and augmentation."""

    def __post_init__(self):
        check_config(self)
        self.milestones = tuple(int(m) for m in self.milestones)
        if self.nesterov and self.momentum == 0:
            raise RnpError("momentum must be > 0 with nesterov")
        if any(m < 1 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise RnpError("milestones must be increasing positive epoch numbers")

    def schedule(self) -> dict:
        """The fields :func:`fine_tune` takes, as keyword arguments."""
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "momentum": self.momentum, "weight_decay": self.weight_decay,
                "nesterov": self.nesterov, "milestones": self.milestones, "gamma": self.gamma,
                "augment": self.augment}


@dataclass
class FTConfig(FineTuneFields):
    """Every FT hyperparameter; the defaults are NAD's fine-tuning baseline (see module doc)."""


def lr_at(lr: float, milestones: tuple[int, ...], gamma: float, epoch: int) -> float:
    """The learning rate of ``epoch`` (0-based) under a step schedule."""
    return lr * gamma ** sum(epoch >= m for m in milestones)


def fine_tune(model: nn.Module, clean: ImageSet, *, epochs: int, lr: float, momentum: float = 0.9,
              weight_decay: float = 5e-4, nesterov: bool = False, milestones: tuple[int, ...] = (),
              gamma: float = 0.1, batch_size: int = 64, augment: bool = True, seed: int = 0,
              purpose: str = "fine-tune",
              penalty: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
              after_step: Callable[[StepInfo], bool] | None = None, progress: bool = False,
              device="cpu", mixed: bool = False, frozen_batchnorm: bool = False) -> list[EpochStats]:
    """Trains every trainable parameter of ``model`` in place by SGD on ``clean``.

    One :func:`run_epoch` per epoch; ``penalty`` (an extra loss term) and ``after_step`` (a
    callback after each update, e.g. re-applying a pruning mask) are handed to it. ``purpose``
    names the seeded stream of batches, so two fine-tunings in one defense draw different
    batches from one seed. ``mixed`` runs the epochs in mixed precision (a fresh gradient
    scaler). ``frozen_batchnorm`` keeps BatchNorm's running statistics as they were (see
    :func:`run_epoch`). The model is left in eval mode. Returns the per-epoch statistics.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                nesterov=nesterov)
    generator = generator_for(seed, purpose)
    scaler = grad_scaler(mixed, device)
    history = []
    steps = math.ceil(len(clean) / batch_size)
    with progress_bar(epochs * steps, purpose, progress, detail=f"{epochs} epochs x {steps} steps") as bar:
        for epoch in range(epochs):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(lr, milestones, gamma, epoch)
            history.append(run_epoch(model, clean, optimizer, batch_size=batch_size,
                                     generator=generator, augment=augment, penalty=penalty,
                                     after_step=after_step, progress=bar, device=device, scaler=scaler,
                                     frozen_batchnorm=frozen_batchnorm))
    model.eval()
    return history


def epoch_rows(history: list[EpochStats], lr: float, milestones: tuple[int, ...],
               gamma: float) -> list[dict]:
    """The per-epoch report rows of a fine-tuning: epoch, learning rate, loss, accuracy."""
    return [{"epoch": epoch + 1, "lr": lr_at(lr, milestones, gamma, epoch), "loss": stats.loss,
             "accuracy": stats.accuracy} for epoch, stats in enumerate(history)]


def clean_accuracy(model: nn.Module, clean: ImageSet, device, mixed: bool = False) -> float:
    """Accuracy of ``model`` on the defender's clean images (the only accuracy it can measure),
    computed in mixed precision when ``mixed``."""
    return accuracy(predict(model, clean, device=device, mixed=mixed), clean.labels)


class FT(RemovalDefense):
    """Fine-tuning: ``FT(**config).fit(model, clean_data)``; fields of :class:`FTConfig`.

    The report holds the per-epoch training loss and accuracy and the clean-set accuracy
    before and after.
    """

    name = "ft"
    summary = ("Fine-tuning on the clean set, the baseline of Fine-Pruning (Liu et al., RAID 2018) "
               "and NAD (Li et al., ICLR 2021)")
    config_class = FTConfig

    def purify(self, model: nn.Module, clean_data) -> DefenseResult:
        working, clean, device = prepare_inputs(model, clean_data)
        cfg = resolve_precision(self.config, device)
        timer = StageTimer()
        before = clean_accuracy(working, clean, device)
        with timer.stage("fine_tune"), model_layout(working, cfg.channels_last):
            history = fine_tune(working, clean, **cfg.schedule(), seed=cfg.seed, purpose="ft",
                                progress=self.progress, device=device, mixed=cfg.amp == "on")
        report = {**self.base_report(clean, timer, cfg),
                  "fine_tuning": epoch_rows(history, cfg.lr, cfg.milestones, cfg.gamma),
                  "clean_accuracy_before": before,
                  "clean_accuracy_after": clean_accuracy(working, clean, device)}
        return DefenseResult(working, report, {}, dict(timer.seconds))
