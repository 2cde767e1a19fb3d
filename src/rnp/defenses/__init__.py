"""Backdoor removal defenses: ``fit(model, clean_data) -> DefenseResult``."""

from rnp.defenses.base import DefenseResult, RemovalDefense
from rnp.defenses.masks import ChannelScores, MaskSet, batchnorm_layers, prune_channels
from rnp.defenses.rnp import RNP, RNPConfig, threshold_sweep

DEFENSES: dict[str, type[RemovalDefense]] = {RNP.name: RNP}

__all__ = ["DefenseResult", "RemovalDefense", "ChannelScores", "MaskSet", "batchnorm_layers",
           "prune_channels", "RNP", "RNPConfig", "threshold_sweep", "DEFENSES"]
