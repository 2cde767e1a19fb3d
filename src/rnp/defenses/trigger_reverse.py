"""Trigger reverse-engineering of Neural Cleanse, and its flagging of outlying classes.

Wang, Yao, Shan, Li, Viswanath, Zheng and Zhao, "Neural Cleanse: Identifying and Mitigating
Backdoor Attacks in Neural Networks", IEEE Symposium on Security and Privacy 2019
(doi 10.1109/SP.2019.00031; no arXiv version). Authors' release: github.com/bolunwang/backdoor
(``visualizer.py``, ``gtsrb_visualize_example.py``, ``mad_outlier_detection.py``).

For a candidate target class ``y`` the smallest trigger that sends clean images to ``y`` is
searched as a mask ``m`` (H x W, in [0, 1]) and a pattern ``p`` (C x H x W, in [0, 1]) stamped as
``x' = (1 - m) * x + m * p``. Both are free variables squashed by ``tanh(v) / (2 - eps) + 0.5``
and Adam minimises ``CE(f(x'), y) + cost * |m|_1``. The weight ``cost`` is adjusted on the fly:
it starts at 0, is set to ``init_cost`` once the stamped images reach the attack-success
threshold for ``patience`` steps in a row, then is multiplied by ``cost_multiplier`` after
``patience`` successful steps and divided by ``cost_multiplier ** 1.5`` after ``patience``
failing ones. A "step" is ``samples_per_step // batch_size`` mini-batches. The smallest mask
of any successful step is kept; the search stops early once the cost has been both raised and
lowered and that best norm has not improved for ``early_stop_patience`` steps. A backdoor
target needs a much smaller mask than the other classes, which
:func:`rnp.metrics.anomaly_indices` (median absolute deviation, consistency constant 1.4826)
exposes (:func:`flag_classes`).

Defaults of :class:`TriggerReverseConfig` (all from the release's GTSRB example, whose values the
paper reports; see each field): 1000 steps of 1000 samples in batches of 32, Adam lr 0.1 with
betas (0.5, 0.9), init cost 1e-3, success threshold 0.99, patience 5, multiplier 2, early stop
on, threshold 1.0, patience 25. Deviations: none in the search. Classes are searched with one
independent random stream each (the release uses one global stream), so a single class can be
recovered on its own with the same result as in a full scan.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnp.data.images import ImageSet
from rnp.data.loader import iterate_batches
from rnp.errors import RnpError
from rnp.metrics.detection import anomaly_indices
from rnp.models.probes import eval_mode
from rnp.training.precision import autocast, backward_and_step, grad_scaler
from rnp.utils import check_config

TANH_EPSILON = 1e-7  # Keras' K.epsilon(), keeps the squashed values strictly inside (0, 1)


@dataclass
class TriggerReverseConfig:
    """Hyperparameters of the per-class trigger search (defaults: the authors' release)."""

    steps: int = 1000
    """Optimisation steps per class at most (release STEPS)."""
    samples_per_step: int = 1000
    """Images per step; batches per step = this // batch_size (release NB_SAMPLE)."""
    batch_size: int = 32
    """Images per batch (release BATCH_SIZE)."""
    lr: float = 0.1
    """Learning rate of Adam (release LR)."""
    betas: tuple[float, float] = (0.5, 0.9)
    """Adam's beta_1 and beta_2 (release: 0.5, 0.9)."""
    init_cost: float = 1e-3
    """First weight of the mask's L1 norm in the loss (release, paper)."""
    attack_success_threshold: float = 0.99
    """Success rate of the stamped images at which a trigger counts as found (release
    ATTACK_SUCC_THRESHOLD)."""
    patience: int = 5
    """Steps before the cost changes (release PATIENCE)."""
    cost_multiplier: float = 2.0
    """Factor that raises the cost; it is lowered by its 1.5th power (release example
    COST_MULTIPLIER)."""
    early_stop: bool = True
    """End a class's search when the best mask norm stops improving (release EARLY_STOP)."""
    early_stop_threshold: float = 1.0
    """A step is stale unless the best norm falls below this times the previous best (release
    example)."""
    early_stop_patience: int = 25
    """Stale steps that end the search (release example: 5 * PATIENCE)."""

    def __post_init__(self):
        check_config(self)  # types and finite floats (a NaN lr passed the range checks below)
        self.betas = tuple(float(b) for b in self.betas)
        if min(self.steps, self.samples_per_step, self.batch_size, self.patience,
               self.early_stop_patience) < 1:
            raise RnpError("steps, samples_per_step, batch_size, patience and early_stop_patience "
                           "must be positive")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise RnpError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.lr <= 0 or self.init_cost <= 0 or self.cost_multiplier <= 1:
            raise RnpError("lr and init_cost must be positive and cost_multiplier above 1")
        if not 0 < self.attack_success_threshold <= 1 or self.early_stop_threshold <= 0:
            raise RnpError("attack_success_threshold must lie in (0, 1] and "
                           "early_stop_threshold be positive")

    @property
    def batches_per_step(self) -> int:
        return max(1, self.samples_per_step // self.batch_size)


@dataclass(frozen=True, eq=False)
class RecoveredTrigger:
    """The smallest trigger found for ``target``.

    ``mask`` (H, W) and ``pattern`` (C, H, W) lie in [0, 1] on the CPU; ``norm`` is the mask's L1
    norm; ``attack_success`` is the share of stamped clean images classified as ``target`` in
    the step that produced the mask; ``reached_threshold`` says whether any step reached the
    success threshold (if none did, the last mask is returned); ``steps`` counts the steps run.
    """

    target: int
    mask: torch.Tensor
    pattern: torch.Tensor
    norm: float
    attack_success: float
    reached_threshold: bool
    steps: int
    final_cost: float


def apply_trigger(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Stamps a trigger on a batch ``(N, C, H, W)`` in [0, 1]: ``(1 - mask) * x + mask * pattern``."""
    return (1 - mask) * images + mask * pattern


def reverse_engineer_trigger(model: nn.Module, clean: ImageSet, target: int,
                             config: TriggerReverseConfig | None = None, *,
                             generator: torch.Generator, device="cpu",
                             progress=None, mixed: bool = False) -> RecoveredTrigger:
    """Searches the smallest mask and pattern that make ``model`` classify clean images as
    ``target`` (Neural Cleanse's reverse engineering).

    The model's weights are frozen for the search and its train/eval mode and ``requires_grad``
    flags are restored afterwards, so the caller's model is left as it was. ``generator``
    drives the random initialisation and the batch order; ``progress`` is an optional tqdm bar
    advanced once per mini-batch. ``mixed`` runs the model's passes in mixed precision
    (:mod:`rnp.training.precision`); the trigger and its loss stay float32.
    """
    config = config or TriggerReverseConfig()
    classes = output_classes(model, clean, device)
    if not 0 <= target < classes:
        raise RnpError(f"target {target} is not an output of the model (0..{classes - 1})")
    flags = [p.requires_grad for p in model.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    try:
        with eval_mode(model):
            return _search(model, clean, target, config, generator, device, progress, mixed)
    finally:
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)


def output_classes(model: nn.Module, clean: ImageSet, device="cpu") -> int:
    """How many classes ``model`` scores, read from one forward pass on a clean image."""
    with eval_mode(model), torch.no_grad():
        return int(model(clean.images[:1].float().div(255).to(device)).shape[1])


def flag_classes(norms, threshold: float = 2.0) -> list[int]:
    """Classes whose norm lies below the median with anomaly index above ``threshold``,
    smallest norm first (only unusually SMALL triggers betray a backdoor)."""
    norms = torch.as_tensor(norms, dtype=torch.float64).flatten()
    indices = anomaly_indices(norms)
    below = norms < norms.quantile(0.5)
    flagged = [int(i) for i in torch.nonzero(below & (indices > threshold)).flatten()]
    return sorted(flagged, key=lambda i: float(norms[i]))


def _squash(raw: torch.Tensor) -> torch.Tensor:
    """Maps free variables into (0, 1), as the release does."""
    return torch.tanh(raw) / (2 - TANH_EPSILON) + 0.5


def _unsquash(values: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_squash`, computed in float64 so that 0 and 1 stay finite."""
    return torch.atanh((values.double() - 0.5) * (2 - TANH_EPSILON)).float()


def _endless_batches(clean: ImageSet, batch_size: int, generator: torch.Generator,
                     device) -> Iterator[torch.Tensor]:
    """Shuffled clean images forever, one pass after another (labels are not needed)."""
    while True:
        for images, _ in iterate_batches(clean, batch_size, shuffle=True, generator=generator,
                                         device=device):
            yield images


class _CostSchedule:
    """Neural Cleanse's dynamic weight of the mask norm (see the module docstring)."""

    def __init__(self, config: TriggerReverseConfig):
        self.config = config
        self.cost = 0.0
        self.successes_at_zero = self.up = self.down = 0
        self.raised = self.lowered = False

    def update(self, success: bool) -> None:
        cfg = self.config
        if self.cost == 0 and success:
            self.successes_at_zero += 1
            if self.successes_at_zero >= cfg.patience:
                self.cost = cfg.init_cost
                self.up = self.down = 0
                self.raised = self.lowered = False
        else:
            self.successes_at_zero = 0
        self.up, self.down = (self.up + 1, 0) if success else (0, self.down + 1)
        if self.up >= cfg.patience:
            self.up, self.cost, self.raised = 0, self.cost * cfg.cost_multiplier, True
        elif self.down >= cfg.patience:
            self.down, self.cost, self.lowered = 0, self.cost / cfg.cost_multiplier ** 1.5, True


class _EarlyStop:
    """Counts steps in which the best successful norm did not improve enough."""

    def __init__(self, config: TriggerReverseConfig):
        self.config = config
        self.reference = math.inf
        self.stale = 0

    def should_stop(self, best_norm: float, schedule: _CostSchedule) -> bool:
        cfg = self.config
        if best_norm < math.inf:
            improved = best_norm < cfg.early_stop_threshold * self.reference
            self.stale = 0 if improved else self.stale + 1
        self.reference = min(self.reference, best_norm)
        return (cfg.early_stop and schedule.raised and schedule.lowered
                and self.stale >= cfg.early_stop_patience)


def _search(model, clean, target, config, generator, device, progress, mixed) -> RecoveredTrigger:
    channels, height, width = clean.image_shape
    mask_raw = _unsquash(torch.rand(height, width, generator=generator)).to(device).requires_grad_()
    pattern_raw = _unsquash(torch.rand(channels, height, width, generator=generator)
                            ).to(device).requires_grad_()
    optimizer = torch.optim.Adam([mask_raw, pattern_raw], lr=config.lr, betas=config.betas)
    batches = _endless_batches(clean, config.batch_size, generator, device)
    scaler = grad_scaler(mixed, device)
    schedule, stopper = _CostSchedule(config), _EarlyStop(config)
    best, best_norm = None, math.inf
    for step in range(1, config.steps + 1):  # noqa: B007 (the last step is reported below)
        success, norm = _one_step(model, batches, target, mask_raw, pattern_raw, optimizer,
                                  schedule.cost, config.batches_per_step, progress, scaler)
        reached = success >= config.attack_success_threshold
        if reached and norm < best_norm:
            best_norm, best = norm, (_squash(mask_raw.detach()), _squash(pattern_raw.detach()), success)
        if stopper.should_stop(best_norm, schedule):
            break
        schedule.update(reached)
    found = best is not None
    mask, pattern, success = best if found else (_squash(mask_raw.detach()),
                                                 _squash(pattern_raw.detach()), success)
    mask, pattern = mask.cpu(), pattern.cpu()
    return RecoveredTrigger(target, mask, pattern, float(mask.sum()), float(success), found, step,
                            schedule.cost)


def _one_step(model, batches, target, mask_raw, pattern_raw, optimizer, cost, count,
              progress, scaler=None) -> tuple[float, float]:
    """``count`` Adam updates; returns the step's attack success (per image) and mean mask
    norm, both measured before each update as in the release. With a gradient ``scaler`` the
    model's pass runs under autocast and the update goes through the scaler."""
    hits = seen = 0
    norm_total = 0.0
    for _ in range(count):
        images = next(batches)
        mask, pattern = _squash(mask_raw), _squash(pattern_raw)
        stamped = apply_trigger(images, mask, pattern)
        with autocast(scaler is not None, images.device):
            logits = model(stamped.contiguous(memory_format=torch.channels_last)).float()
        labels = torch.full((len(images),), target, dtype=torch.long, device=images.device)
        norm = mask.sum()
        loss = F.cross_entropy(logits, labels) + cost * norm
        optimizer.zero_grad(set_to_none=True)
        backward_and_step(loss, optimizer, scaler)
        hits += int((logits.detach().argmax(1) == target).sum())
        seen += len(images)
        norm_total += float(norm.detach())
        if progress is not None:
            progress.update(1)
    return hits / seen, norm_total / count
