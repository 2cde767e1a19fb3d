"""Neural Cleanse (NC): reverse-engineer a trigger per class, flag outliers, unlearn them.

Wang, Yao, Shan, Li, Viswanath, Zheng and Zhao, "Neural Cleanse: Identifying and Mitigating
Backdoor Attacks in Neural Networks", IEEE Symposium on Security and Privacy 2019
(doi 10.1109/SP.2019.00031; the paper has no arXiv version). Authors' release (Keras):
github.com/bolunwang/backdoor. Three stages on the defender's clean images:

1. *Reverse*: for every class, the smallest mask and pattern that send clean images to it
   (:func:`rnp.detection.reverse_engineer_trigger`, the release's optimisation and defaults).
2. *Detect*: anomaly index of each class's mask L1 norm, ``|norm - median| / (1.4826 * MAD)``;
   classes BELOW the median with index > 2 are flagged as backdoor targets (paper Sec. IV-C,
   release ``mad_outlier_detection.py``).
3. *Unlearn* (paper Sec. VI-C): fine-tune on the clean set in which a fraction (paper: 20%)
   of the images carry a flagged class's recovered trigger but keep their TRUE labels, for one
   epoch (paper). If no class is flagged the model is returned unchanged (a copy).

Defaults (:class:`NeuralCleanseConfig`): the search as in :mod:`rnp.defenses.trigger_reverse`
(1000 steps of 1000 samples, batch 32, Adam 0.1 with betas (0.5, 0.9), init cost 1e-3, threshold
0.99, patience 5, multiplier 2, early stop after 25 stale steps); anomaly threshold 2; unlearning
on 20% stamped images for 1 epoch. Deviations and choices the paper leaves open:

- The paper does not publish the unlearning optimiser, learning rate or batch size (the
  release has no unlearning code). We use SGD, lr 0.01, momentum 0.9, weight decay 5e-4 (the
  fine-tuning recipe used elsewhere in this toolkit) and batch 32 (the release's batch size),
  without augmentation (the release's data generators do not augment).
- The paper fine-tunes on a 10% sample of the training set; here the defender's clean set is
  the sample. The stamped 20% are drawn once (seeded), as in the paper, and stamped images are
  stored as uint8 like any image; with several flagged classes their triggers take turns.

Budget: the paper's search costs up to 1000 steps x 31 batches = 31,000 batches per class,
days on a CPU (a user's CPU run, 10 classes at width 8 on 2,000 clean images, showed an ETA of
133 hours). So :class:`NeuralCleanse` runs the ``"cpu"`` budget unless told otherwise: 120
steps of 64 samples per class (2 batches each, 240 per class; the CPU benchmark grid's,
``benchmarks/grids/cpu.yaml``), everything else as above. ``budget="paper"`` (CLI
``--budget paper``) runs the published search; a whole :class:`NeuralCleanseConfig` (its
defaults are the paper's) and explicit ``steps`` or ``samples_per_step`` settings take
precedence over the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rnp.data.images import ImageSet, to_uint8
from rnp.defenses.base import DefenseResult, RemovalDefense, StageTimer, prepare_inputs
from rnp.defenses.finetune import fine_tune
from rnp.defenses.trigger_reverse import (RecoveredTrigger, TriggerReverseConfig, apply_trigger, flag_classes,
                                          output_classes, reverse_engineer_trigger)
from rnp.errors import RnpError
from rnp.metrics.detection import anomaly_indices
from rnp.training.precision import PrecisionFields, model_layout
from rnp.utils import check_config, generator_for, progress_bar, resolve_precision

BUDGETS = {"cpu": {"steps": 120, "samples_per_step": 64}, "paper": {}}
"""Search settings per budget (see the module docstring); "paper" keeps the config's defaults."""


@dataclass
class NeuralCleanseConfig(TriggerReverseConfig, PrecisionFields):
    """Every NC hyperparameter: the trigger search's (inherited) plus detection and unlearning,
    and the precision of both searches and unlearning."""

    anomaly_threshold: float = 2.0
    """Flag the classes whose anomaly index is above this (paper, release)."""
    unlearn_fraction: float = 0.2
    """Share of the clean images stamped with the recovered trigger, true labels kept, for
    unlearning (paper)."""
    unlearn_epochs: int = field(default=1, metadata={"own_range": True})
    """Epochs of unlearning (paper: 1); 0: none."""
    unlearn_lr: float = 0.01
    """Learning rate of the unlearning SGD (not published; this toolkit's fine-tuning rate)."""
    unlearn_momentum: float = 0.9
    """Momentum of the unlearning SGD (not published)."""
    unlearn_weight_decay: float = 5e-4
    """Weight decay of the unlearning SGD (not published)."""
    unlearn_batch_size: int = 32
    """Batch size of unlearning (not published; the release's batch size)."""
    unlearn_augment: bool = False
    """Crop and flip while unlearning (not published; the release does not augment)."""
    seed: int = 0
    """Seeds the trigger searches, the images stamped and the unlearning."""

    def __post_init__(self):
        check_config(self)
        super().__post_init__()
        if self.anomaly_threshold <= 0:
            raise RnpError(f"anomaly_threshold must be positive, got {self.anomaly_threshold}")
        if not 0 < self.unlearn_fraction <= 1:
            raise RnpError(f"unlearn_fraction must lie in (0, 1], got {self.unlearn_fraction}")
        if self.unlearn_epochs < 0:
            raise RnpError(f"unlearn_epochs must be >= 0, got {self.unlearn_epochs}")


class NeuralCleanse(RemovalDefense):
    """Neural Cleanse: ``NeuralCleanse(**config).fit(model, clean_data)``.

    The result's report holds per-class mask norms, anomaly indices, attack success of the
    recovered triggers and the flagged classes; its artifacts hold the recovered ``trigger_masks``
    (K, H, W), ``trigger_patterns`` (K, C, H, W), the ``triggers`` (RecoveredTrigger per class) and
    ``flagged``.

    ``budget`` is "cpu" (the default: 120 steps of 64 samples per class) or "paper" (1000 steps
    of 1000 samples, the published search, days on a CPU); settings given explicitly override
    it, and a whole ``config`` is used as it is.
    """

    name = "nc"
    summary = ("Neural Cleanse: reverse-engineer triggers, flag outliers by MAD, unlearn them "
               "(Wang et al., IEEE S&P 2019)")
    config_class = NeuralCleanseConfig

    def __init__(self, config: NeuralCleanseConfig | None = None, *, budget: str | None = None,
                 progress: bool = False, **overrides):
        if budget not in (None, *BUDGETS):
            raise RnpError(f"unknown Neural Cleanse budget {budget!r}; choose {' or '.join(BUDGETS)}")
        if config is not None and budget is not None:
            raise RnpError("give either a config or a budget, not both")
        if config is None:
            overrides = {**BUDGETS[budget or "cpu"], **self.check_settings(overrides)}
        super().__init__(config, progress=progress, **overrides)

    def purify(self, model: nn.Module, clean_data) -> DefenseResult:
        working, clean, device = prepare_inputs(model, clean_data)
        cfg = resolve_precision(self.config, device)
        timer = StageTimer()
        with timer.stage("reverse"), model_layout(working, cfg.channels_last):
            triggers = self.reverse(working, clean, device)
        with timer.stage("detect"):
            norms = torch.tensor([t.norm for t in triggers], dtype=torch.float64)
            indices = anomaly_indices(norms)
            flagged = flag_classes(norms, self.config.anomaly_threshold)
        with timer.stage("unlearn"), model_layout(working, cfg.channels_last):
            unlearning = self.unlearn(working, clean, [triggers[k] for k in flagged], device)
        working.eval()
        report = {**self.base_report(clean, timer, cfg),
                  "norms": norms.tolist(),
                  "anomaly_indices": indices.tolist(),
                  "model_anomaly_index": float(indices[int(norms.argmin())]),
                  "flagged": flagged,
                  "attack_success": [t.attack_success for t in triggers],
                  "classes": [_describe(t, float(i)) for t, i in zip(triggers, indices)],
                  "unlearning": unlearning}
        artifacts = {"trigger_masks": torch.stack([t.mask for t in triggers]),
                     "trigger_patterns": torch.stack([t.pattern for t in triggers]),
                     "triggers": triggers, "flagged": flagged}
        return DefenseResult(working, report, artifacts, dict(timer.seconds))

    def reverse(self, model: nn.Module, clean: ImageSet, device) -> list[RecoveredTrigger]:
        """Stage 1: the smallest trigger of every class, each from its own seeded stream."""
        cfg = resolve_precision(self.config, device)
        classes = output_classes(model, clean, device)
        triggers = []
        with progress_bar(classes * cfg.steps * cfg.batches_per_step, "reverse", self.progress,
                          detail=f"{classes} classes x {cfg.steps} steps x {cfg.batches_per_step} batches",
                          unit="batch", bounded=cfg.early_stop) as bar:
            for target in range(classes):
                trigger = reverse_engineer_trigger(model, clean, target, cfg, device=device, progress=bar,
                                                   generator=generator_for(cfg.seed, f"nc-reverse-{target}"),
                                                   mixed=cfg.amp == "on")
                bar.skip((cfg.steps - trigger.steps) * cfg.batches_per_step)  # stopped early
                triggers.append(trigger)
        return triggers

    def unlearn(self, model: nn.Module, clean: ImageSet, triggers: list[RecoveredTrigger],
                device) -> dict:
        """Stage 3: fine-tunes ``model`` in place on the clean set with part of it stamped by
        the flagged triggers under true labels; nothing is done if no class was flagged."""
        cfg = resolve_precision(self.config, device)
        if not triggers:
            return {"performed": False,
                    "note": "no class was flagged; the model is returned unchanged"}
        stamped, count = stamp_clean_set(clean, triggers, cfg.unlearn_fraction,
                                         generator_for(cfg.seed, "nc-stamp"))
        history = fine_tune(model, stamped, epochs=cfg.unlearn_epochs, lr=cfg.unlearn_lr,
                            momentum=cfg.unlearn_momentum, weight_decay=cfg.unlearn_weight_decay,
                            batch_size=cfg.unlearn_batch_size, augment=cfg.unlearn_augment,
                            seed=cfg.seed, purpose="nc-unlearn", device=device, mixed=cfg.amp == "on")
        epochs = [{"epoch": epoch + 1, "loss": stats.loss, "accuracy": stats.accuracy}
                  for epoch, stats in enumerate(history)]
        return {"performed": True, "targets": [t.target for t in triggers],
                "stamped_images": count, "per_epoch": epochs}


def stamp_clean_set(clean: ImageSet, triggers: list[RecoveredTrigger], fraction: float,
                    generator: torch.Generator) -> tuple[ImageSet, int]:
    """The clean set with ``round(fraction * N)`` random images stamped by the triggers (taking
    turns), labels unchanged; returns the set and the number of stamped images."""
    if not triggers:
        raise RnpError("stamping needs at least one trigger")
    count = round(fraction * len(clean))
    chosen = torch.randperm(len(clean), generator=generator)[:count]
    turn = torch.arange(count) % len(triggers)
    masks = torch.stack([t.mask for t in triggers])[turn][:, None]
    patterns = torch.stack([t.pattern for t in triggers])[turn]
    images = clean.images.clone()
    images[chosen] = to_uint8(apply_trigger(images[chosen].float().div(255), masks, patterns))
    return clean.with_images(images), count


def _describe(trigger: RecoveredTrigger, index: float) -> dict:
    return {"class": trigger.target, "norm": trigger.norm, "anomaly_index": index,
            "attack_success": trigger.attack_success, "reached_threshold": trigger.reached_threshold,
            "steps": trigger.steps, "final_cost": trigger.final_cost}
