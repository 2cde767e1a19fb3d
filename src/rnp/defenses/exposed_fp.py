"""Fine-Pruning guided by what RNP's unlearned model exposes.

Fine-Pruning (:mod:`rnp.defenses.fine_pruning`) ranks the last convolution's channels by how
dormant they are on clean images, a proxy for "carries the backdoor" that an attacker can
defeat by keeping backdoor neurons active on clean inputs (Liu et al. discuss this pruning-aware
attack themselves). RNP's unlearning and recovering give a direct ranking instead: channels
whose masks stay small while the clean function is recovered on the unlearned model (Li et al.,
ICML 2023). :class:`ExposedFP` keeps everything of Fine-Pruning (its clean-set stopping rule:
prune until the clean accuracy would fall by more than 4 points; its fine-tuning with the
pruned channels held at zero) and replaces only the ranking by RNP's masks, over every masked
layer (BatchNorm channels for our models) rather than the last convolution alone. Set beside
plain FP in the exposure benchmark, it measures what the exposure adds to a pruning baseline.

The unlearning and recovering use RNP's defaults (:class:`rnp.defenses.rnp.RNPConfig`) with
this config's seed, ``mask_layers`` and precision (``amp``, ``channels_last``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rnp.data.images import ImageSet
from rnp.defenses.fine_pruning import FP, FPConfig
from rnp.defenses.masks import ChannelScores, parse_layer_kinds
from rnp.defenses.rnp import RNP


@dataclass
class ExposedFPConfig(FPConfig):
    """Fine-Pruning's settings, plus which layers RNP masks (see ``RNPConfig.mask_layers``)."""

    mask_layers: str = "auto"
    """Layers that carry RNP's masks, as RNPConfig.mask_layers."""

    def __post_init__(self):
        super().__post_init__()
        parse_layer_kinds(self.mask_layers)


class ExposedFP(FP):
    """Fine-Pruning with RNP's mask ranking: ``ExposedFP(**config).fit(model, clean_data)``.

    The artifacts hold the masks (a ChannelScores) under ``masks`` and the pruning order; the
    report's ``pruning`` section says the ranking came from RNP.
    """

    name = "fp_rnp"
    summary = ("Fine-Pruning with the channel ranking of RNP's unlearned model instead of "
               "clean activations (exposure-guided baseline)")
    config_class = ExposedFPConfig
    ranking_stage = "masks"

    def rank(self, model: nn.Module, clean: ImageSet, device) -> tuple[ChannelScores, torch.Tensor, dict]:
        cfg = self.config
        rnp = RNP(seed=cfg.seed, mask_layers=cfg.mask_layers, amp=cfg.amp, channels_last=cfg.channels_last,
                  progress=self.progress)
        unlearned, unlearning, _ = rnp.unlearn(model, clean, device)
        scores, push = rnp.recover(unlearned, clean, device)
        return scores, scores.order(push), {"ranking": "rnp_masks",
                                            "unlearning_steps": unlearning["steps"],
                                            "mask_layers": cfg.mask_layers}
