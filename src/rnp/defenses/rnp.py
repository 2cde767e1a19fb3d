"""Reconstructive Neuron Pruning (RNP).

Li, Lyu, Ma, Koren, Lyu, Li and Jiang, "Reconstructive Neuron Pruning for Backdoor Defense",
ICML 2023 (arXiv 2305.14876). Three stages on a few hundred clean images:

1. *Unlearn*: gradient ascent on the cross-entropy, all weights, until the clean accuracy
   collapses. The backdoor survives, so the unlearned model exposes it.
2. *Recover*: on the unlearned model, learn one mask in [0, 1] per channel by ordinary
   descent (BatchNorm channels as in the paper; LayerNorm, convolution or linear channels for
   models without BatchNorm, see :mod:`rnp.defenses.masks`). Clean function comes back through
   the clean channels; masks of channels that carry the backdoor stay small.
3. *Prune*: zero the low-mask channels' weights in the ORIGINAL model.

The package prunes in another order by default (``ranking="target_margin"``, issue 15): the
channels whose zeroing would most lower the unlearned model's logit margin of the class its
clean predictions collapsed onto over the other classes. At width 32 the masks' order left
Blend, WaNet and SIG on two clean sets of three each; the log-probability of that class
(``"target_gradient"``) took all four development attacks to at most 4% ASR on every clean set
but failed on Trojan, where the unlearned model is so certain of the class that the
log-probability's gradient vanishes (at most 3.7e-21); the margin keeps it and met the rule
written before its cells (mean ASR 0.78%, CA drop 0.85 points on the development attacks;
docs/benchmarks/rnp-options-w32.md). ``ranking="masks"`` is the paper's order.

Precision: ``amp`` runs the forward passes of unlearning and recovering under
:func:`torch.autocast`, with the modes and the rule of :class:`rnp.training.TrainConfig`
(:func:`rnp.utils.uses_amp`); weights and masks stay float32 parameters. The default "auto"
computes in float16 (with loss scaling) on CUDA and in bfloat16 on CPUs with native bfloat16
(AVX512-BF16 or AMX), float32 elsewhere: on such a CPU bfloat16 pruned the same channels as
float32 on three demo subjects in 0.6x the time (``benchmarks/amp_parity.py``); float16 on CUDA
has not been measured yet. ``amp="off"`` (``--amp off``, or ``RNP_AMP_AUTO=off`` for every
"auto") keeps float32. The baselines that optimise share the rule through their own ``amp``
(:class:`rnp.training.precision.PrecisionFields`); I-BAU and CLP compute in float32.

Memory layout: ``channels_last=True`` trains the unlearning and recovering copies with
channels-last convolution weights, which made those stages 1.15-1.4x faster on one CPU thread
in float32 (PreAct-ResNet18 width 16, three CIFAR-10 subjects, ``benchmarks/grids/rnp-cost.yaml``)
and about 1.3x faster in bfloat16. Other convolution kernels round differently, so the masks then
differ in the fourth decimal from the default layout's (the three pruned models came out the
same) and a near-tie may order differently. Unset (None), it follows the precision: on where
bfloat16 runs on the CPU, off in float32, so that a float32 seed keeps giving the same result.
``torch.compile`` was measured too and left out: compiling the training step took longer
(about 40 s) than a whole default RNP run on CIFAR-10 (about 20 s).

Records (a grid cell's key, the report's config) hold ``amp`` and ``channels_last`` resolved
for the device (:func:`rnp.utils.resolve_precision`), left out at float32's "off" and false.

``RNPConfig.paper()`` is the published recipe of the official code (mask order, threshold
0.2). The package defaults differ where measurement showed the published recipe to be fragile
on small models; each such field says so, and the documentation (docs/method/) lists the
measurements.

Experimental options (issue 15, :mod:`rnp.defenses.rnp_options`), all off by default and left
out of records at their defaults: ``repair_epochs`` fine-tunes the pruned model with the pruned
channels held at zero; ``prune_rule="exposure"`` prunes until the unlearned model's predictions
stop concentrating on one class; ``mask_runs`` and ``unlearn_depths`` average the masks of
several recoveries (other seeds, other unlearning depths).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rnp.data.images import ImageSet
from rnp.defenses.base import DefenseResult, RemovalDefense, StageTimer, prepare_inputs
from rnp.defenses.masks import (ChannelScores, MaskSet, channels_pruned, maskable_layers, parse_layer_kinds,
                                prune_channels)
from rnp.defenses.rnp_options import average_masks, exposure_curve, rank_agreement, repair, target_gradient
from rnp.errors import RnpError
from rnp.metrics.collapse import RUNS, SUBSET, BackdoorVerdict, collapse_map, confusion_matrix, judge
from rnp.models.checks import check_finite_weights
from rnp.training.evaluate import predict
from rnp.training.loop import StepInfo, run_epoch
from rnp.utils import check_config, generator_for, progress_bar, resolve_precision, uses_amp

STOP_CHECKS = ("step", "epoch")
TIE_BREAKS = ("gradient", "index")
PRUNE_RULES = ("auto", "threshold", "number", "exposure")
RANKINGS = ("masks", "target_gradient", "target_margin")
TARGET_OBJECTIVES = {"target_gradient": "log_prob", "target_margin": "margin"}
"""The measure of the collapse that each target ranking differentiates (see :func:`target_gradient`)."""
TARGET_SOURCES = ("dominant", "collapse")
SWEEP_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(19))


@dataclass
class RNPConfig:
    """Every RNP hyperparameter. Defaults marked (paper) are the official code's."""

    batch_size: int = 128
    """Clean images per step of unlearning and recovering, and per batch when the pruning rule
    evaluates (paper)."""
    augment: bool = True
    """Random crop with padding 4 and horizontal flip of the clean images while unlearning and
    recovering (paper)."""
    unlearn_lr: float = 0.01
    """Learning rate of the unlearning SGD, stage 1 (paper)."""
    unlearn_momentum: float = 0.9
    """Momentum of the unlearning SGD (paper)."""
    unlearn_weight_decay: float = 5e-4
    """Weight decay of the unlearning SGD (paper)."""
    unlearn_milestones: tuple[int, ...] = (10, 20)
    """Epochs at which the unlearning learning rate is multiplied by unlearn_gamma (paper:
    MultiStepLR)."""
    unlearn_gamma: float = 0.1
    """Factor of the unlearning learning rate at each milestone (paper)."""
    unlearn_epochs: int = 20
    """Most epochs of unlearning (paper)."""
    clean_threshold: float = 0.2
    """Unlearning stops once clean-set accuracy is at most this (paper)."""
    stop_check: str = "step"
    """When the stop is checked: 'step' on the batch just used; 'epoch' on the epoch's running
    accuracy (paper)."""
    recover_lr: float = 0.02
    """Learning rate of the masks while recovering, stage 2 (paper: 0.2, which drives many masks to
    exactly 0 on small models)."""
    recover_momentum: float = 0.9
    """Momentum of the masks' SGD while recovering (paper)."""
    recover_epochs: int = 20
    """Epochs of mask recovery (paper)."""
    alpha: float = 0.2
    """The recovering loss is alpha times the cross-entropy (paper)."""
    tie_break: str = "gradient"
    """Order of equal masks: 'gradient' by how hard descent pushed them down; 'index' in layer order
    (paper)."""
    prune_rule: str = "auto"
    """How many channels to prune: 'auto' (decided on the clean set only), 'threshold' (paper),
    'number' or 'exposure' (experimental: see exposure_share)."""
    threshold: float = 0.2
    """Rule 'threshold': prune channels with mask <= this."""
    prune_number: int = 10
    """Rule 'number': prune this many channels, first in the ranking's order."""
    tolerance: float = 0.02
    """Rule 'auto': the largest pruning whose clean-set accuracy drop is at most this."""
    max_prune_fraction: float = 0.05
    """Rules 'auto' and 'exposure': never prune more than this share of the channels."""
    mask_layers: str = "auto"
    """Layers that carry masks: auto (BatchNorm if any, else LayerNorm, else convolution and linear)
    or a comma list of batchnorm, layernorm, conv, linear (paper: batchnorm)."""
    mask_skip_last: bool = field(default=False, metadata={"omit": False})
    """Experimental (issue 15): leave the last of the mask layers (registration order) unmasked,
    and so never pruned. In a PreAct-ResNet that is the BatchNorm before pooling: at width 32 its
    masks fall first on every clean set and pruning them leaves Blend's backdoor in place."""
    channels_last: bool | None = field(default=None, metadata={"omit": False})
    """Unlearn and recover with channels-last weights: speed only, not in the paper; unset: on
    where bfloat16 runs on the CPU, off in float32 so that a seed keeps giving the same result."""
    amp: str = field(default="auto", metadata={"omit": "off"})
    """Mixed precision of unlearning and recovering: auto (CUDA, float16 with loss scaling, and
    CPUs with native bfloat16: same pruning as float32 on the demo subjects, 0.6x the time), on
    (any CPU too) or off (float32, the paper's); recorded as on or off, left out at off."""
    seed: int = 0
    """Seeds the batch order and augmentation of unlearning and recovering."""
    exposure_share: float = field(default=2.0, metadata={"omit": 2.0})
    """Rule 'exposure' (experimental, issue 15): prune in the ranking's order until the unlearned
    model's top class gets at most this many times 1/num_classes of its clean-set predictions."""
    # left out of records at "masks": every record from before this default pruned in that order
    ranking: str = field(default="target_margin", metadata={"omit": "masks"})
    """Order in which channels are pruned: 'target_margin', on the unlearned model, the
    first-order drop in the mean logit margin of its dominant clean-set class over the others
    if the channel were zeroed, largest first (the masks are still recovered and reported);
    'target_gradient', the same with the class's log-probability, whose gradient vanishes where
    the unlearned model is certain of the class on every clean image (Trojan); 'masks' (paper),
    the recovered masks, lowest first, the only order prune_rule 'threshold' can cut."""
    target_source: str = field(default="dominant", metadata={"omit": "dominant"})
    """Which class a target ranking prunes for: 'dominant', the unlearned model's most predicted
    clean-set class; 'collapse' (experimental, issue 15), the all-to-one target of the collapse
    map of target_runs more unlearnings on random target_subset shares of the clean set (the
    verdict ``rnp inspect`` gives), or the dominant class where the map calls the model clean or
    all-to-all. One unlearning can collapse onto a class the clean set favours: on the width-32
    Trojan subject's clean set 1 it was class 3 on 3 of 5 unlearning seeds, and the map named 0."""
    target_runs: int = field(default=RUNS, metadata={"omit": RUNS})
    """target_source 'collapse': unlearnings of the collapse map (``rnp inspect``'s setting)."""
    target_subset: float = field(default=SUBSET, metadata={"omit": SUBSET})
    """target_source 'collapse': the share of the clean images each of them draws."""
    mask_runs: int = field(default=1, metadata={"omit": 1})
    """Experimental (issue 15): recover the masks this many times, seeds seed, seed+1, ..., and
    rank the channels by their mean mask; 1: one recovery (paper)."""
    mask_runs_unlearn: bool = field(default=False, metadata={"omit": False})
    """Experimental: with mask_runs > 1, unlearn again with each run's seed too, instead of
    recovering every run on the first unlearned model."""
    unlearn_depths: tuple[float, ...] = field(default=(), metadata={"omit": ()})
    """Experimental (issue 15): clean accuracies at which to snapshot one unlearning (stopping at
    the lowest, in place of clean_threshold); masks recovered on every snapshot are averaged."""
    repair_epochs: int = field(default=0, metadata={"omit": 0, "own_range": True})
    """Experimental (issue 15): epochs of fine-tuning the pruned model on the clean set (batch_size,
    augment), the pruned channels held at zero; 0: no repair (paper)."""
    repair_lr: float = field(default=0.01, metadata={"omit": 0.01})
    """Learning rate of the repair's SGD (momentum 0.9 and weight decay 5e-4, FT's defaults)."""
    repair_freeze_bn: bool = field(default=False, metadata={"omit": False})
    """Experimental (issue 15): repair with BatchNorm in eval mode, its running statistics kept
    as the pruning left them (re-estimated on clean images they revived part of the backdoor)."""

    def __post_init__(self):
        check_config(self)
        for name, value, choices in (("stop_check", self.stop_check, STOP_CHECKS),
                                     ("tie_break", self.tie_break, TIE_BREAKS),
                                     ("prune_rule", self.prune_rule, PRUNE_RULES),
                                     ("ranking", self.ranking, RANKINGS),
                                     ("target_source", self.target_source, TARGET_SOURCES)):
            if value not in choices:
                raise RnpError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        self.unlearn_milestones = tuple(int(m) for m in self.unlearn_milestones)
        parse_layer_kinds(self.mask_layers)
        if not 0 <= self.clean_threshold <= 1 or not 0 <= self.threshold <= 1:
            raise RnpError("clean_threshold and threshold must lie in [0, 1]")
        if not 0 < self.max_prune_fraction <= 1 or self.tolerance < 0 or self.prune_number < 0:
            raise RnpError("max_prune_fraction must lie in (0, 1]; tolerance and prune_number >= 0")
        if not self.alpha > 0:
            raise RnpError(f"alpha must be positive, got {self.alpha!r}")
        self.unlearn_depths = tuple(float(d) for d in self.unlearn_depths)
        if not all(0 <= d <= 1 for d in self.unlearn_depths):
            raise RnpError(f"unlearn_depths must lie in [0, 1], got {list(self.unlearn_depths)}")
        if self.mask_runs < 1 or self.repair_epochs < 0:
            raise RnpError("mask_runs must be at least 1 and repair_epochs at least 0")
        if self.ranking != "masks" and self.prune_rule == "threshold":
            raise RnpError(f"prune_rule 'threshold' cuts at a mask value, so it needs ranking 'masks' "
                           f"(got {self.ranking!r}): set ranking 'masks' (--ranking masks) or use the "
                           f"rule auto, number or exposure")
        if self.target_source != "dominant" and self.ranking not in TARGET_OBJECTIVES:
            raise RnpError(f"target_source {self.target_source!r} chooses the class of a target ranking; "
                           f"ranking {self.ranking!r} prunes for none: use target_margin or target_gradient")
        if self.target_runs < 1 or not 0 < self.target_subset <= 1:
            raise RnpError(f"target_runs must be at least 1 and target_subset in (0, 1], got "
                           f"{self.target_runs!r} and {self.target_subset!r}")
        if not self.exposure_share > 1:
            raise RnpError(f"exposure_share must exceed 1 (the even share), got {self.exposure_share!r}")

    @classmethod
    def paper(cls, **overrides) -> "RNPConfig":
        """The published recipe: per-epoch stop, index order among ties, threshold 0.2, and
        float32 (amp off; the official code has no mixed precision), whatever the device;
        ``amp="auto"`` among the overrides gives it the package's mixed-precision rule."""
        return cls(**{"stop_check": "epoch", "recover_lr": 0.2, "tie_break": "index", "ranking": "masks",
                      "prune_rule": "threshold", "threshold": 0.2, "amp": "off", **overrides})

    def unlearn_lr_at(self, epoch: int) -> float:
        return self.unlearn_lr * self.unlearn_gamma ** sum(epoch >= m for m in self.unlearn_milestones)


def collapse_subsets(count: int, runs: int, subset: float, seed: int) -> list[torch.Tensor]:
    """The sorted indices into ``count`` clean images that each of ``runs`` collapse-map
    unlearnings draws: a ``subset`` share of them (at least one), run ``r`` from its own
    generator seeded by ``seed`` and ``r``."""
    size = max(1, round(subset * count))
    return [torch.randperm(count, generator=generator_for(seed, f"exposure-run-{run}"))[:size].sort().values
            for run in range(runs)]


class RNPResult(DefenseResult):
    """A :class:`DefenseResult` with RNP's artefacts as attributes."""

    @property
    def masks(self) -> ChannelScores:
        """The recovered mask of every masked channel."""
        return self.artifacts["masks"]

    @property
    def unlearned_model(self) -> nn.Module:
        """The model after stage 1: clean function collapsed, backdoor exposed."""
        return self.artifacts["unlearned_model"]


class RNP(RemovalDefense):
    """Reconstructive Neuron Pruning: ``RNP(**config).fit(model, clean_data)``.

    ``config`` fields are those of :class:`RNPConfig`; ``RNP(preset="paper")`` starts from the
    published recipe. The result holds the pruned model, ``masks`` (a ChannelScores), the
    ``unlearned_model`` and a report with the unlearning trajectory and the seconds per stage;
    with ``repair_epochs``, ``artifacts["pruned_model"]`` is the pruned model before repair.
    """

    name = "rnp"
    summary = "Reconstructive Neuron Pruning: unlearn, recover channel masks, prune (Li et al., ICML 2023)"
    config_class = RNPConfig

    def __init__(self, config: RNPConfig | None = None, *, preset: str | None = None,
                 progress: bool = False, **overrides):
        if preset not in (None, "default", "paper"):
            raise RnpError(f"unknown RNP preset {preset!r}; choose default or paper")
        if config is not None and preset:
            raise RnpError("give either a config or a preset, not both")
        if preset == "paper":
            config = RNPConfig.paper(**self.check_settings(overrides))
            overrides = {}
        super().__init__(config, progress=progress, **overrides)

    def purify(self, model: nn.Module, clean_data) -> RNPResult:
        original, clean, device = prepare_inputs(model, clean_data)
        cfg = self.config
        layers = maskable_layers(original, cfg.mask_layers, skip_last=cfg.mask_skip_last)
        timer = StageTimer()
        unlearned, unlearning, drift, scores, push, runs = self._masks(original, clean, device, timer)
        verdict = None
        if cfg.target_source == "collapse":
            with timer.stage("target"):
                verdict = self.collapse_verdict(original, clean, device)
        with timer.stage("prune"):
            order = scores.order(push if cfg.tie_break == "gradient" else None)
            if cfg.ranking in TARGET_OBJECTIVES:
                ranking, target = target_gradient(unlearned, clean, cfg.mask_layers, skip_last=cfg.mask_skip_last,
                                                  batch_size=cfg.batch_size, device=device,
                                                  objective=TARGET_OBJECTIVES[cfg.ranking],
                                                  target=verdict.target if verdict is not None else None)
                order = ranking.order()
            count, selection = self.choose_pruning(original, clean, scores, order, device,
                                                   unlearned=unlearned)
            pruned = prune_channels(copy.deepcopy(original), scores, order[:count])
        report = {
            "method": self.name,
            "config": dataclasses.asdict(resolve_precision(cfg, device)),
            "clean_images": len(clean),
            "mask_layers": {"setting": cfg.mask_layers,
                            "layer_types": sorted({type(module).__name__ for _, module in layers}),
                            "layers": len(layers)},
            "unlearning": unlearning,
            "masks": _mask_summary(scores),
            "pruning": {**selection, "pruned": count, "total_channels": len(scores),
                        "channels": [_describe(scores, int(i)) for i in order[:count]]},
        }
        if runs is not None:
            report["mask_runs"] = runs
        if cfg.ranking in TARGET_OBJECTIVES:
            report["ranking"] = target
            if verdict is not None:
                report["ranking"] = {**target, "target_source": cfg.target_source,
                                     "collapse_verdict": verdict.to_dict()}
        artifacts = {"masks": scores, "order": order, "unlearned_model": unlearned,
                     "original_model": original, "unlearning_predictions": drift}
        if cfg.repair_epochs:
            artifacts["pruned_model"] = copy.deepcopy(pruned)
            with timer.stage("repair"):
                report["repair"] = repair(pruned, clean, scores, order[:count], epochs=cfg.repair_epochs,
                                          lr=cfg.repair_lr, batch_size=cfg.batch_size, augment=cfg.augment,
                                          seed=cfg.seed, progress=self.progress, device=device,
                                          frozen_batchnorm=cfg.repair_freeze_bn)
        report["seconds"] = dict(timer.seconds)
        return RNPResult(pruned, report, artifacts, dict(timer.seconds))

    def collapse_verdict(self, original: nn.Module, clean: ImageSet, device) -> BackdoorVerdict:
        """The collapse map's verdict (:func:`rnp.metrics.collapse.judge`, default threshold) from
        target_runs unlearnings of ``original``, run ``r`` on its own random target_subset share of
        ``clean`` with seed ``seed + r``, each read on all of ``clean``: the runs, and so the
        verdict, of :func:`rnp.detection.collapse.detect_backdoor` with this config and seed."""
        cfg = self.config
        confusions = []
        for run, pick in enumerate(collapse_subsets(len(clean), cfg.target_runs, cfg.target_subset, cfg.seed)):
            unlearned, _, drift, _ = self._unlearn(original, clean.subset(pick), device, cfg.seed + run)
            predictions = predict(unlearned.eval(), clean, device=device)
            confusions.append(confusion_matrix(clean.labels, predictions, drift.shape[1]))
        return judge(collapse_map(torch.stack(confusions)))

    def _masks(self, original: nn.Module, clean: ImageSet, device, timer: StageTimer) -> tuple:
        """Stages 1 and 2, once or (``mask_runs``, ``unlearn_depths``) several times: the first
        run's unlearned model, trajectory and drift, the mean masks and mean push of every
        recovery, and the report's ``mask_runs`` section (None for a single recovery).

        Run ``i`` takes the seed ``seed + i``; it unlearns afresh only with ``mask_runs_unlearn``
        and otherwise recovers on the first run's unlearned model (or its depth snapshots)."""
        cfg = self.config
        recoveries, seconds = [], []
        for run in range(cfg.mask_runs):
            seed, start = cfg.seed + run, time.perf_counter()
            if run == 0 or cfg.mask_runs_unlearn:
                with timer.stage("unlearn"):
                    model, summary, counts, snapshots = self._unlearn(original, clean, device, seed)
                if run == 0:
                    unlearned, unlearning, drift = model, summary, counts
            with timer.stage("recover"):
                recoveries += [self.recover(snapshot, clean, device, seed=seed) for snapshot in snapshots]
            seconds.append(time.perf_counter() - start)
        if len(recoveries) == 1:
            scores, push = recoveries[0]
            return unlearned, unlearning, drift, scores, push, None
        masks = [scores for scores, _ in recoveries]
        orders = [scores.order(push if cfg.tie_break == "gradient" else None) for scores, push in recoveries]
        runs = {"runs": cfg.mask_runs, "recoveries": len(recoveries), "unlearn_each_run": cfg.mask_runs_unlearn,
                "seeds": [cfg.seed + run for run in range(cfg.mask_runs)], "seconds": seconds,
                **rank_agreement(masks, orders, max(1, int(cfg.max_prune_fraction * len(masks[0]))))}
        push = torch.stack([push for _, push in recoveries]).mean(0)
        return unlearned, unlearning, drift, average_masks(masks), push, runs

    def unlearn(self, original: nn.Module, clean: ImageSet, device) -> tuple[nn.Module, dict, torch.Tensor]:
        """Stage 1: gradient ascent on all weights until clean accuracy <= clean_threshold.

        Returns the unlearned model, the trajectory summary, and how many images of each step's
        batch were predicted as each class (steps x classes): where the predictions drift as the
        clean function collapses, which exposes a backdoor's target (:mod:`rnp.detection.exposure`).
        An ascent that overflowed the weights is an :class:`RnpError`: its masks would be NaN.
        """
        return self._unlearn(original, clean, device, self.config.seed)[:3]

    def _unlearn(self, original: nn.Module, clean: ImageSet, device, seed: int) -> tuple:
        """:meth:`unlearn` with the given seed, and the models to recover masks on: the
        unlearned model, or with ``unlearn_depths`` a snapshot taken when clean accuracy first
        fell to each depth (shallowest first; the last model for a depth never reached), the
        unlearning then running on to the lowest depth in place of ``clean_threshold``."""
        cfg = resolve_precision(self.config, device)
        stop_at = min(cfg.unlearn_depths) if cfg.unlearn_depths else cfg.clean_threshold
        depths = sorted(set(cfg.unlearn_depths), reverse=True)
        scaler = self._grad_scaler(device)
        model = copy.deepcopy(original)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.unlearn_lr, momentum=cfg.unlearn_momentum,
                                    weight_decay=cfg.unlearn_weight_decay)
        generator = generator_for(seed, "rnp-unlearn")
        trajectory, epochs, counts, reached, snapshots = [], [], [], False, {}

        def snapshot(clean_accuracy: float) -> None:
            for depth in depths:
                if depth not in snapshots and clean_accuracy <= depth:
                    snapshots[depth] = (copy.deepcopy(model), len(trajectory), epoch + 1)

        def after_step(info: StepInfo) -> bool:
            trajectory.append({"step": len(trajectory) + 1, "epoch": epoch + 1,
                               "loss": info.loss, "accuracy": info.accuracy})
            counts.append(torch.bincount(info.predictions, minlength=clean.num_classes))
            if cfg.stop_check == "step":
                snapshot(info.accuracy)
            return cfg.stop_check == "step" and info.accuracy <= stop_at

        steps = math.ceil(len(clean) / cfg.batch_size)
        with progress_bar(cfg.unlearn_epochs * steps, "unlearn", self.progress, bounded=True,
                          detail=f"{cfg.unlearn_epochs} epochs x {steps} steps") as bar:
            for epoch in range(cfg.unlearn_epochs):
                for group in optimizer.param_groups:
                    group["lr"] = cfg.unlearn_lr_at(epoch)
                stats = run_epoch(model, clean, optimizer, batch_size=cfg.batch_size,
                                  generator=generator, augment=cfg.augment, ascent=True,
                                  after_step=after_step, progress=bar, device=device, scaler=scaler)
                epochs.append({"epoch": epoch + 1, "loss": stats.loss, "accuracy": stats.accuracy})
                if cfg.stop_check == "epoch":
                    snapshot(stats.accuracy)
                if stats.stopped or (cfg.stop_check == "epoch" and stats.accuracy <= stop_at):
                    reached = True
                    bar.stop_early(f"clean accuracy <= {stop_at} at epoch {epoch + 1}, "
                                   f"step {len(trajectory)}")
                    break
        check_finite_weights(model, "unlearning diverged (lower unlearn_lr): the unlearned model")
        summary = {"reached_threshold": reached, "epochs": len(epochs), "steps": len(trajectory),
                   "final_accuracy": trajectory[-1]["accuracy"], "per_epoch": epochs,
                   "per_step": trajectory}
        if depths:
            summary["depths"] = [{"depth": depth, "reached": depth in snapshots,
                                  **({"step": snapshots[depth][1], "epoch": snapshots[depth][2]}
                                     if depth in snapshots else {})} for depth in depths]
        if not reached:
            summary["warning"] = (f"clean accuracy never fell to {stop_at} in "
                                  f"{cfg.unlearn_epochs} epochs; the last epoch's model is used")
        classes = max(len(c) for c in counts)  # more outputs than the data's classes: keep all
        drift = torch.stack([F.pad(c, (0, classes - len(c))) for c in counts])
        models = [snapshots[depth][0] if depth in snapshots else model for depth in depths] or [model]
        return model, summary, drift, models

    def recover(self, unlearned: nn.Module, clean: ImageSet, device,
                seed: int | None = None) -> tuple[ChannelScores, torch.Tensor]:
        """Stage 2: learn per-channel masks on a copy of the unlearned model, weights frozen;
        ``seed`` (default: the config's) seeds the batch order and augmentation.

        Returns the masks and, per channel, the summed gradient of the loss on its mask (how
        hard descent pushed it towards 0), the tie-break among equal masks. In mixed precision a
        step the gradient scaler skipped (its gradients overflowed) adds nothing to that sum.
        """
        cfg = resolve_precision(self.config, device)
        scaler = self._grad_scaler(device)
        model = copy.deepcopy(unlearned).requires_grad_(False)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        masks = MaskSet(model, cfg.mask_layers, skip_last=cfg.mask_skip_last)
        optimizer = torch.optim.SGD(masks.parameters, lr=cfg.recover_lr, momentum=cfg.recover_momentum)
        generator = generator_for(cfg.seed if seed is None else seed, "rnp-recover")
        push = torch.zeros(sum(p.numel() for p in masks.parameters))

        def after_step(info: StepInfo) -> bool:
            grad = masks.flat_grad()
            if scaler is None or bool(torch.isfinite(grad).all()):
                push.add_(grad.cpu())
            masks.clamp_(0.0, 1.0)
            return False

        steps = math.ceil(len(clean) / cfg.batch_size)
        with progress_bar(cfg.recover_epochs * steps, "recover", self.progress,
                          detail=f"{cfg.recover_epochs} epochs x {steps} steps") as bar:
            for _ in range(cfg.recover_epochs):
                run_epoch(model, clean, optimizer, batch_size=cfg.batch_size, generator=generator,
                          augment=cfg.augment, loss_scale=cfg.alpha, after_step=after_step,
                          progress=bar, device=device, scaler=scaler)
        return masks.scores(), push

    def _grad_scaler(self, device) -> torch.amp.GradScaler | None:
        """A fresh gradient scaler for a stage's :func:`run_epoch` where ``amp`` computes in low
        precision on ``device`` (which makes the stage run under autocast), else None: float32."""
        device = torch.device(device)
        return torch.amp.GradScaler(device.type) if uses_amp(self.config.amp, device) else None

    def choose_pruning(self, original: nn.Module, clean: ImageSet, scores: ChannelScores,
                       order: torch.Tensor, device, *, unlearned: nn.Module | None = None) -> tuple[int, dict]:
        """Stage 3's decision: how many channels, first in ``order``, to prune. ``original`` (and
        ``unlearned``, which the exposure rule reads) ends exactly as it was: the rules prune a
        model only for the time of each evaluation."""
        cfg = self.config
        if cfg.prune_rule == "threshold":
            count = int((scores.values <= cfg.threshold).sum())
            return count, {"rule": "threshold", "threshold": cfg.threshold}
        if cfg.prune_rule == "number":
            return min(cfg.prune_number, len(scores)), {"rule": "number"}
        if cfg.prune_rule == "exposure":
            if unlearned is None:
                raise RnpError("the exposure rule needs the unlearned model")
            return self._exposure_count(unlearned, clean, scores, order, device)
        return self._auto_count(original, clean, scores, order, device)

    def _exposure_count(self, unlearned, clean, scores, order, device) -> tuple[int, dict]:
        """The fewest channels, first in ``order``, whose pruning in the unlearned model ends the
        concentration of its clean-set predictions on one class: its top class's share falls to
        at most ``exposure_share / num_classes``. The backdoor, which unlearning left intact,
        is what makes those predictions concentrate on its target; once the channels carrying
        it are gone they spread again. Capped at ``max_prune_fraction`` with a warning, as the
        auto rule is; the report holds the share at every count tried."""
        cfg = self.config
        level = cfg.exposure_share / clean.num_classes
        cap = max(1, int(cfg.max_prune_fraction * len(scores)))
        curve = exposure_curve(unlearned, clean, scores, order, level=level, cap=cap,
                               batch_size=cfg.batch_size, device=device)
        selection = {"rule": "exposure", "exposure_share": cfg.exposure_share, "level": level,
                     "curve": curve}
        if curve[-1]["share"] > level:
            selection["warning"] = (f"the exposure rule stopped at its cap of {cap} of {len(scores)} "
                                    f"channels (max_prune_fraction {cfg.max_prune_fraction}) with the "
                                    f"unlearned model's top class still at {curve[-1]['share']:.0%} of "
                                    f"the clean predictions (level {level:.0%})")
        return curve[-1]["pruned"], selection

    def _auto_count(self, original, clean, scores, order, device) -> tuple[int, dict]:
        """The largest prefix of ``order`` whose pruning costs at most ``tolerance`` of
        accuracy on the defender's clean images, found by bisection (accuracy falls, roughly
        monotonically, as more channels go). The cost is counted in images, so that one of
        exactly the tolerance (10 of 500 images at 0.02) is within it: as a difference of
        rounded accuracies it could land either side.

        Each candidate is pruned in place on ``original`` and restored exactly afterwards (no
        copy of the model per candidate), and evaluated in batches of ``batch_size``: on the
        CPU, inference on a few hundred images at once is slower than in smaller batches.
        Stopping at the ``max_prune_fraction`` cap, still within tolerance, is warned about: the
        cap, not the clean accuracy, then chose the count.
        """
        cfg = self.config

        def correct(count: int) -> int:
            with channels_pruned(original, scores, order[:count]) as model:
                predictions = predict(model, clean, batch_size=cfg.batch_size, device=device)
            return int((predictions == clean.labels).sum())

        images = len(clean.labels)
        allowed = math.floor(cfg.tolerance * images + 1e-9)  # images the pruning may cost
        base = correct(0)
        cap = max(1, int(cfg.max_prune_fraction * len(scores)))
        low, high = 0, cap
        evaluated = {0: base}
        while low < high:
            middle = (low + high + 1) // 2
            evaluated[middle] = correct(middle)
            if evaluated[middle] >= base - allowed:
                low = middle
            else:
                high = middle - 1
        selection = {"rule": "auto", "tolerance": cfg.tolerance, "clean_accuracy_before": base / images,
                     "clean_accuracy_after": evaluated[low] / images,
                     "evaluated": {str(k): v / images for k, v in sorted(evaluated.items())}}
        if low == cap < len(scores):
            selection["warning"] = (f"the auto rule stopped at its cap of {cap} of {len(scores)} "
                                    f"channels (max_prune_fraction {cfg.max_prune_fraction}), still "
                                    "within tolerance: the backdoor may need more pruned channels")
        return low, selection


def threshold_sweep(result: DefenseResult, evaluate, thresholds=SWEEP_THRESHOLDS) -> list[dict]:
    """Prunes the original model at each mask threshold (the channels whose mask is at most it,
    whatever ``ranking`` ordered them by) and calls ``evaluate(model) -> dict``.

    Each distinct pruned count is evaluated once, on the original model pruned in place and
    restored afterwards (``evaluate`` must not keep the model it is given). With the defender's clean set this is a
    defender-side view of the trade-off; with test data and triggered test images it is an
    ORACLE ANALYSIS (the CLI's ``--oracle-sweep``), which a defender cannot run and which must
    never choose the operating point.
    """
    scores, original = result.artifacts["masks"], result.artifacts["original_model"]
    rows, cache = [], {}
    for threshold in thresholds:
        chosen = torch.nonzero(scores.values <= threshold).flatten()
        count = len(chosen)
        if count not in cache:
            with channels_pruned(original, scores, chosen) as pruned:
                cache[count] = evaluate(pruned)
        rows.append({"threshold": threshold, "pruned": count, **cache[count]})
    return rows


def _describe(scores: ChannelScores, index: int) -> dict:
    layer = scores.layer_names[int(scores.layers[index])]
    return {"layer": layer, "channel": int(scores.channels[index]), "mask": float(scores.values[index])}


def _mask_summary(scores: ChannelScores) -> dict:
    values = scores.values
    return {"count": len(values), "mean": float(values.mean()),
            "exactly_zero": int((values == 0).sum()), "exactly_one": int((values == 1).sum()),
            "at_most": {f"{t:.2f}": int((values <= t).sum()) for t in (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)}}
