"""Neural mask Fine-Tuning (NFT).

Karim, Arafat, Khalid, Guo and Rahnavard, "Augmented Neural Fine-Tuning for Efficient Backdoor
Purification", ECCV 2024 (arXiv 2407.10052); authors' release: github.com/nazmul-karim170/NFT
(``src/Remove_Backdoor.py``, read for its values).

Fine-tuning all weights on a few hundred clean images overfits them and costs clean accuracy;
NFT keeps the weights frozen and fine-tunes one multiplicative mask per neuron instead, each
starting at 1. The clean images are augmented with MixUp, which the paper puts in place of the
trigger synthesis (an adversarial search) of earlier defenses. Per batch:

1. mix the (cropped and flipped) batch with a shuffled copy of itself, ``x = w x_i + (1 - w) x_j``
   with ``w ~ Beta(alpha, alpha)``, and take one SGD step on the masks for
   ``w CE(x, y_i) + (1 - w) CE(x, y_j) + mask_penalty * sum(1 - m) / N_c``, where ``N_c`` is the
   number of clean images per class: the regulariser keeps the masks near 1 (the paper's guard
   against drifting away from the clean function), and more so the fewer clean images there are;
2. clip the masks of the ``l``-th masked layer (from 1, in the model's order) to
   ``[mu(l), 1]`` with ``mu(l) = floor_scale * exp(-floor_decay * l)``: early layers may lose at
   most half of a neuron, deep layers all of it.

The learning rate follows a cosine schedule, one value per round of ``steps_per_round``
updates. At the end the soft masks are folded into the weights (no channel is pruned), so the
purified model is a plain module of the input's class; its BatchNorm running statistics are
the ones the masked model updated while training, as in the release.

Defaults (``NFTConfig``) are the release's: masks on every BatchNorm channel's scale, 5 rounds of
200 updates (``--nb-epochs 1000`` counts updates, ``--epoch-aggregation 200``), batch 128,
random crop and flip before MixUp with alpha 1, mask SGD with learning rate 0.05 and momentum
0.95 annealed by cosine towards 0.02, regulariser weight 0.001, floors 0.8 exp(-0.5 l). The
paper's own text on these settings could not be read when this was written; its "scheduling
function" is taken here to be the per-layer floor ``mu(l)``. The release's default clean set
(``--val-ratio 0.01``, 500 CIFAR-10 images) is the size of the package's default clean set.
The release cannot have produced the paper's numbers exactly as published: its training
function adds to two accuracy counters it never defines, which stops it at the first batch.
So its defaults are the best record of the settings, not a proof of them.

Deviations:

- The release draws each batch with replacement; here batches come from reshuffled passes over
  the clean set (each image equally often), the last batch of a pass being smaller.
- Masks are attached with ``torch.nn.utils.parametrize`` to layers found by type, so any model
  works; the release swaps the model's BatchNorm class. Models without BatchNorm get masks on
  LayerNorm, or convolution and linear, channels (``mask_layers``, see
  :mod:`rnp.defenses.masks`); the paper's vision experiments use BatchNorm networks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rnp.defenses.base import DefenseResult, RemovalDefense, StageTimer, prepare_inputs
from rnp.defenses.finetune import clean_accuracy
from rnp.defenses.masks import ChannelScores, MaskSet, parse_layer_kinds
from rnp.errors import RnpError
from rnp.training.hooks import TrainingHook
from rnp.training.loop import StepInfo, run_epoch
from rnp.training.precision import PrecisionFields, grad_scaler, model_layout
from rnp.utils import check_config, derive_seed, generator_for, progress_bar, resolve_precision


@dataclass
class NFTConfig(PrecisionFields):
    """Every NFT hyperparameter. (release): the authors' src/Remove_Backdoor.py."""

    rounds: int = 5
    """Rounds of mask updates; the learning rate changes once per round and the report has one
    row per round (release: --nb-epochs 1000 updates / --epoch-aggregation 200 = 5)."""
    steps_per_round: int = 200
    """Mask updates, one batch each, per round (release --epoch-aggregation)."""
    batch_size: int = 128
    """Clean images per batch (release)."""
    augment: bool = True
    """Random crop (padding 4) and horizontal flip of the clean images before mixing (release)."""
    lr: float = 0.05
    """Learning rate of the masks' SGD in the first round (release)."""
    final_lr_fraction: float = 0.4
    """The cosine schedule falls from lr towards this fraction of it (release: eta_min 0.02 of
    lr 0.05)."""
    momentum: float = 0.95
    """Momentum of the masks' SGD (release)."""
    mixup_alpha: float = 1.0
    """MixUp's mixing weight is drawn from Beta(alpha, alpha), per batch; 0 turns MixUp off
    (release: 1, a uniform weight)."""
    mask_penalty: float = 0.001
    """Weight of the regulariser sum(1 - mask) over all masks, divided by the clean images per
    class (release)."""
    floor_scale: float = 0.8
    """Masks of the l-th masked layer stay at least floor_scale * exp(-floor_decay * l), l from 1
    (release --alpha)."""
    floor_decay: float = 0.5
    """How fast that floor falls with depth; 0 gives every layer the floor floor_scale (release
    --beta)."""
    mask_layers: str = "auto"
    """Layers that carry masks: auto (BatchNorm if any, else LayerNorm, else convolution and
    linear) or a comma list of batchnorm, layernorm, conv, linear (release: BatchNorm)."""
    seed: int = 0
    """Seeds the batch order, augmentation and MixUp."""

    def __post_init__(self):
        check_config(self)
        if self.steps_per_round < 1:
            raise RnpError(f"steps_per_round must be at least 1, got {self.steps_per_round!r}")
        if self.mixup_alpha < 0:
            raise RnpError(f"mixup_alpha must be at least 0, got {self.mixup_alpha!r}")
        if not 0 <= self.floor_scale <= 1 or self.floor_decay < 0:
            raise RnpError(f"floor_scale must lie in [0, 1] and floor_decay be at least 0, got "
                           f"{self.floor_scale!r} and {self.floor_decay!r}")
        parse_layer_kinds(self.mask_layers)

    def lr_at(self, round_index: int) -> float:
        """The learning rate of round ``round_index`` (from 0): cosine annealing over the rounds
        from lr towards lr * final_lr_fraction, one value per round (the release's schedule)."""
        low = self.lr * self.final_lr_fraction
        return low + (self.lr - low) * (1 + math.cos(math.pi * round_index / self.rounds)) / 2

    def floors(self, layers: int) -> list[float]:
        """The lowest value each masked layer's masks may take, in layer order."""
        return [self.floor_scale * math.exp(-self.floor_decay * index) for index in range(1, layers + 1)]


class MixUp(TrainingHook):
    """Mixes each batch with a shuffled copy of itself and remembers how, so that :meth:`loss`
    can score the mixed images against both labels. ``alpha`` 0 leaves batches unmixed."""

    def __init__(self, alpha: float, seed: int):
        self.alpha = alpha
        self.weights = np.random.default_rng(derive_seed(seed, "nft-mixup-weight"))
        self.pairing = generator_for(seed, "nft-mixup-pairs")
        self.weight, self.partner_labels = 1.0, None

    def transform(self, model, images, labels):
        self.weight = float(self.weights.beta(self.alpha, self.alpha)) if self.alpha > 0 else 1.0
        order = torch.randperm(len(labels), generator=self.pairing).to(labels.device)
        self.partner_labels = labels[order]
        return self.weight * images + (1 - self.weight) * images[order], labels, None

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """MixUp's cross-entropy: each label weighted by its image's share in the mix."""
        return (self.weight * F.cross_entropy(logits, labels)
                + (1 - self.weight) * F.cross_entropy(logits, self.partner_labels))

    def correct(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """Correct predictions in the batch, each label counted by its share in the mix."""
        predictions = logits.detach().argmax(1)
        return float(self.weight * (predictions == labels).sum()
                     + (1 - self.weight) * (predictions == self.partner_labels).sum())


class NFTResult(DefenseResult):
    """A :class:`DefenseResult` with NFT's learned masks as an attribute."""

    @property
    def masks(self) -> ChannelScores:
        """The fine-tuned mask of every masked channel, as folded into the purified model."""
        return self.artifacts["masks"]


class NFT(RemovalDefense):
    """Neural mask Fine-Tuning: ``NFT(**config).fit(model, clean_data)``; fields of
    :class:`NFTConfig`.

    The result holds the purified model (masks folded into the weights), ``masks`` (a
    ChannelScores) and a report with per-round loss, accuracy and mask statistics, the final
    masks' statistics, the clean-set accuracy before and after, and the seconds per stage.
    """

    name = "nft"
    summary = ("Neural mask Fine-Tuning: fine-tune per-neuron masks, weights frozen, on MixUp "
               "clean images (Karim et al., ECCV 2024)")
    config_class = NFTConfig

    def purify(self, model: nn.Module, clean_data) -> NFTResult:
        working, clean, device = prepare_inputs(model, clean_data)
        cfg = resolve_precision(self.config, device)
        timer = StageTimer()
        before = clean_accuracy(working, clean, device)
        trainable = {name: p.requires_grad for name, p in working.named_parameters()}
        working.requires_grad_(False)
        masks = MaskSet(working, self.config.mask_layers)
        with timer.stage("fine_tune_masks"), model_layout(working, cfg.channels_last):
            rounds = self.fine_tune_masks(working, masks, clean, device, cfg.amp == "on")
        with timer.stage("fold"):
            scores = masks.scores()
            masks.fold()
            for name, parameter in working.named_parameters():
                parameter.requires_grad_(trainable[name])
            working.eval()
        floors = self.config.floors(len(masks.layers))
        report = {**self.base_report(clean, timer, cfg),
                  "mask_layers": {"setting": self.config.mask_layers, "layers": len(masks.layers),
                                  "layer_types": sorted({type(m).__name__ for _, m in masks.layers}),
                                  "floors": floors},
                  "rounds": rounds,
                  "masks": mask_statistics(scores, floors),
                  "clean_accuracy_before": before,
                  "clean_accuracy_after": clean_accuracy(working, clean, device)}
        return NFTResult(working, report, {"masks": scores}, dict(timer.seconds))

    def fine_tune_masks(self, model: nn.Module, masks: MaskSet, clean, device,
                        mixed: bool = False) -> list[dict]:
        """Trains the masks of ``model`` (weights frozen) in place, in mixed precision when
        ``mixed``; returns one row per round.

        :func:`run_epoch` runs each pass with the MixUp hook; its own single-label
        cross-entropy is weighted 0, so the objective is the penalty it adds: MixUp's two-label
        cross-entropy plus the mask regulariser.
        """
        cfg = self.config
        mixup = MixUp(cfg.mixup_alpha, cfg.seed)
        floors = cfg.floors(len(masks.layers))
        weight = cfg.mask_penalty * clean.num_classes / len(clean)  # mask_penalty / N_c
        optimizer = torch.optim.SGD(masks.parameters, lr=cfg.lr, momentum=cfg.momentum)
        batches = generator_for(cfg.seed, "nft-batches")
        scaler = grad_scaler(mixed, device)
        totals: dict[str, float] = {}

        def objective(images, labels, logits):
            mixed_loss = mixup.loss(logits, labels)
            drift = sum((1 - mask).sum() for mask in masks.parameters)
            for key, value in (("loss", float(mixed_loss.detach()) * len(labels)),
                               ("drift", float(drift.detach()) * len(labels)),
                               ("correct", mixup.correct(logits, labels)), ("seen", len(labels))):
                totals[key] = totals.get(key, 0.0) + value
            return mixed_loss + weight * drift

        def after_step(info: StepInfo) -> bool:
            with torch.no_grad():
                for mask, floor in zip(masks.parameters, floors):
                    mask.clamp_(floor, 1.0)
            totals["steps"] = totals.get("steps", 0) + 1
            return totals["steps"] >= cfg.steps_per_round

        rows = []
        total = cfg.rounds * cfg.steps_per_round
        with progress_bar(total, "nft", self.progress,
                          detail=f"{cfg.rounds} rounds x {cfg.steps_per_round} steps") as bar:
            for index in range(cfg.rounds):
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr_at(index)
                start = time.perf_counter()
                totals.clear()
                while totals.get("steps", 0) < cfg.steps_per_round:
                    run_epoch(model, clean, optimizer, batch_size=cfg.batch_size, generator=batches,
                              augment=cfg.augment, loss_scale=0.0, penalty=objective, hook=mixup,
                              after_step=after_step, progress=bar, device=device, scaler=scaler)
                values = torch.cat([mask.detach().cpu() for mask in masks.parameters])
                rows.append({"round": index + 1, "steps": (index + 1) * cfg.steps_per_round,
                             "lr": cfg.lr_at(index), "loss": totals["loss"] / totals["seen"],
                             "accuracy": totals["correct"] / totals["seen"],
                             "mask_drift": totals["drift"] / totals["seen"],
                             "mask_mean": float(values.mean()), "mask_min": float(values.min()),
                             "seconds": time.perf_counter() - start})
        model.eval()
        return rows


def mask_statistics(scores: ChannelScores, floors: list[float]) -> dict:
    """How far the masks moved: their count, min and mean, how many fell below 0.5, how many
    sit on their layer's floor and how many stayed at 1."""
    values = scores.values
    floor_of = torch.tensor(floors, dtype=values.dtype)[scores.layers]
    return {"count": len(values), "min": float(values.min()), "mean": float(values.mean()),
            "below_half": int((values < 0.5).sum()), "at_floor": int((values <= floor_of).sum()),
            "exactly_one": int((values == 1).sum())}
