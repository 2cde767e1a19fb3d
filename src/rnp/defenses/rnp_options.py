"""Ingredients of a sturdier RNP, each a :class:`rnp.defenses.rnp.RNPConfig` option (issue 15).
The target-gradient ranking is the default order of pruning; the others are opt-in and leave
RNP unchanged at their defaults.

- :func:`average_masks` and :func:`rank_agreement`: several recoveries (other seeds, other
  unlearning depths) averaged into one mask per channel, and how far their rankings agree;
- :func:`exposure_curve`: how many channels, pruned in mask order on the UNLEARNED model, end
  the concentration of its clean-set predictions on one class (the exposed backdoor's target);
- :func:`target_gradient`: a ranking of the channels by how much zeroing each would lower the
  unlearned model's log-probability of the class its clean-set predictions collapsed onto, or
  (``objective="margin"``) that class's logit margin over the others, which does not saturate;
- :func:`repair`: fine-tuning of the pruned model on the clean set with the pruned channels held
  at exactly zero, the repair stage that RNP's successors add (NFT, TSBD).

Issue 15's ablation (docs/benchmarks/rnp-options-w32.md) measures them against the published
recipe; only the target-gradient ranking held on every development attack.
"""

from __future__ import annotations

import copy
import itertools
import math
import time

import torch
from torch import nn

from rnp.data.images import ImageSet
from rnp.defenses.finetune import clean_accuracy, fine_tune
from rnp.data.loader import iterate_batches
from rnp.defenses.masks import ChannelScores, MaskSet, channels_pruned, prune_channels
from rnp.errors import RnpError
from rnp.models.probes import eval_mode
from rnp.training.evaluate import predict
from rnp.training.loop import StepInfo

REPAIR_MOMENTUM = 0.9
"""Momentum of the repair's SGD: FT's default (NAD's fine-tuning baseline)."""
REPAIR_WEIGHT_DECAY = 5e-4
"""Weight decay of the repair's SGD: FT's default (NAD's fine-tuning baseline)."""


def average_masks(runs: list[ChannelScores]) -> ChannelScores:
    """The channel-wise mean of several recoveries' masks (one recovery: itself, unchanged)."""
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    return ChannelScores(first.layer_names, first.sizes, torch.stack([r.values for r in runs]).mean(0))


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks from 0, equal values sharing the mean of their ranks (as Spearman's rho needs:
    many masks end at exactly 0 or 1)."""
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    return (first + (counts - 1) / 2).double()[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two equally long value vectors (0 where one is constant)."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    scale = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / scale if scale > 0 else 0.0


def rank_agreement(runs: list[ChannelScores], orders: list[torch.Tensor], k: int) -> dict:
    """How far the recoveries agree, over every pair of runs: Spearman's rho of their masks,
    and the share of the first ``k`` channels of their pruning orders that they have in common."""
    pairs = list(itertools.combinations(range(len(runs)), 2))
    rho = [spearman(runs[i].values, runs[j].values) for i, j in pairs]
    overlap = [len(set(orders[i][:k].tolist()) & set(orders[j][:k].tolist())) / k for i, j in pairs]
    return {"spearman_mean": sum(rho) / len(rho), "spearman": rho,
            "top_k": k, "top_k_overlap_mean": sum(overlap) / len(overlap), "top_k_overlap": overlap}


def top_class_share(model: nn.Module, clean: ImageSet, *, batch_size: int, device) -> tuple[int, float]:
    """The class ``model`` predicts most often on the clean images, and the share it gets."""
    predictions = predict(model, clean, batch_size=batch_size, device=device)
    counts = torch.bincount(predictions)
    top = int(counts.argmax())
    return top, float(counts[top]) / len(predictions)


def exposure_curve(unlearned: nn.Module, clean: ImageSet, scores: ChannelScores, order: torch.Tensor,
                   *, level: float, cap: int, batch_size: int, device) -> list[dict]:
    """The unlearned model's top class and its share of the clean-set predictions after pruning
    the first k channels in mask order, for k = 0, 1, ... until the share is at most ``level``
    or k reaches ``cap``; the last row's k is the rule's count. ``unlearned`` ends exactly as it
    was (each pruning is undone, :func:`channels_pruned`)."""
    curve = []
    for count in range(cap + 1):
        with channels_pruned(unlearned, scores, order[:count]) as model:
            top, share = top_class_share(model, clean, batch_size=batch_size, device=device)
        curve.append({"pruned": count, "top_class": top, "share": share})
        if share <= level:
            break
    return curve


def repair(model: nn.Module, clean: ImageSet, scores: ChannelScores, pruned: torch.Tensor, *,
           epochs: int, lr: float, batch_size: int, augment: bool, seed: int, progress: bool,
           device, frozen_batchnorm: bool = False) -> dict:
    """Fine-tunes the pruned ``model`` in place on the clean images by SGD (FT's momentum and
    weight decay), zeroing the pruned channels' weights again after every step exactly as
    :func:`prune_channels` zeroed them (their biases train on), so they stay pruned.
    ``frozen_batchnorm`` keeps BatchNorm's running statistics as the pruning left them: updated
    on clean images, they re-centre the layers after the pruned channels and bring part of the
    backdoor back (BadNets and Blend at width 16, issue 15).

    Returns the report's ``repair`` section: clean-set accuracy before and after, and per epoch
    the training loss and accuracy and the seconds it took.
    """
    before = clean_accuracy(model, clean, device)
    steps = math.ceil(len(clean) / batch_size)
    ends = [time.perf_counter()]

    def keep_pruned(info: StepInfo) -> bool:
        prune_channels(model, scores, pruned)
        if info.step == steps:  # the epoch's last step
            ends.append(time.perf_counter())
        return False

    history = fine_tune(model, clean, epochs=epochs, lr=lr, momentum=REPAIR_MOMENTUM,
                        weight_decay=REPAIR_WEIGHT_DECAY, batch_size=batch_size, augment=augment,
                        seed=seed, purpose="rnp-repair", after_step=keep_pruned, progress=progress,
                        device=device, frozen_batchnorm=frozen_batchnorm)
    rows = [{"epoch": epoch + 1, "loss": stats.loss, "accuracy": stats.accuracy,
             "seconds": ends[epoch + 1] - ends[epoch]} for epoch, stats in enumerate(history)]
    return {"epochs": rows, "clean_accuracy_before": before,
            "clean_accuracy_after": clean_accuracy(model, clean, device)}


OBJECTIVES = ("log_prob", "margin")

VANISHED_GRADIENT = 1e-12
"""Below this largest score the target ranking is noise, and the report says so (on the
width-32 Trojan subject the log-probability's gradients were at most 3.7e-21; where the order
worked they were many orders of magnitude larger)."""


def target_gradient(unlearned: nn.Module, clean: ImageSet, kinds="auto", *, skip_last: bool = False,
                    batch_size: int = 128, device="cpu", objective: str = "log_prob",
                    target: int | None = None) -> tuple[ChannelScores, dict]:
    """Channels scored by their first-order share in the unlearned model's collapse onto one class.

    The unlearned model sends most clean images to one class (a backdoored model's target, the
    exposure RNP rests on). With a mask of 1 on every channel of the mask layers (``kinds``,
    ``skip_last`` as :class:`rnp.defenses.masks.MaskSet`), the gradient of a measure of that
    class's hold on the clean set with respect to a mask estimates how much it would fall if the
    channel were zeroed; the score is minus that gradient, so that :meth:`ChannelScores.order`
    puts the channels that hold the collapse up most first. ``objective`` is the measure, a mean
    over the clean images: "log_prob", the class's log-probability, or "margin", its logit minus
    the log-sum-exp of the other logits. Per image, the log-probability's gradient is the margin's
    times one minus the class's probability, so where the unlearned model is certain of the
    class on every image (a probability of 1 to float precision) the log-probability's gradient
    vanishes and its order is noise; the margin's does not. ``target`` names the class instead
    (a target found otherwise, e.g. by the collapse map of :meth:`RNP.collapse_verdict
    <rnp.defenses.rnp.RNP.collapse_verdict>`). Returns the scores and the class with its share
    of the clean-set predictions, and the dominant class with its share where they differ.
    """
    if objective not in OBJECTIVES:
        raise RnpError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    model = copy.deepcopy(unlearned).requires_grad_(False)
    masks = MaskSet(model, kinds, skip_last=skip_last)
    counts = torch.bincount(predict(model, clean, device=device), minlength=clean.num_classes)
    dominant = int(counts.argmax())
    if target is None:
        target = dominant
    elif isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < len(counts):
        raise RnpError(f"target must be one of the model's {len(counts)} classes, got {target!r}")
    with eval_mode(model):
        for images, _ in iterate_batches(clean, batch_size, device=device):
            logits = model(images).float()
            if objective == "log_prob":
                hold = torch.log_softmax(logits, 1)[:, target]
            else:
                others = torch.cat([logits[:, :target], logits[:, target + 1:]], 1)
                hold = logits[:, target] - torch.logsumexp(others, 1)
            (hold.sum() / len(clean)).backward()
    scores = masks.scores()
    ranking = ChannelScores(scores.layer_names, scores.sizes, -masks.flat_grad().cpu())
    rule = "target_gradient" if objective == "log_prob" else "target_margin"
    info = {"rule": rule, "class": target, "share": float(counts[target]) / len(clean)}
    if target != dominant:
        info["dominant_class"] = dominant
        info["dominant_share"] = float(counts[dominant]) / len(clean)
    largest = float(ranking.values.abs().max())
    if largest < VANISHED_GRADIENT:
        advice = "; ranking 'target_margin' keeps the gradient" if objective == "log_prob" else ""
        info["warning"] = (f"the {objective} gradient of class {target} vanished (largest {largest:.1e}): the "
                           "unlearned model is certain of it on every clean image, so this order of pruning is "
                           f"noise{advice}")
    return ranking, info
