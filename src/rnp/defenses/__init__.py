"""Backdoor removal defenses: ``Defense(**settings).fit(model, clean_data) -> DefenseResult``.

RNP, ten baselines and one exposure-guided baseline behind one interface; :data:`DEFENSES`
maps each CLI name to its class.
"""

from rnp.defenses.base import DefenseResult, RemovalDefense
from rnp.defenses.masks import (ChannelScores, MaskSet, batchnorm_layers, maskable_layers,
                                 prune_channels)
from rnp.defenses.anp import ANP, ANPConfig
from rnp.defenses.clp import CLP, CLPConfig
from rnp.defenses.fine_pruning import FP, FPConfig
from rnp.defenses.finetune import FT, FTConfig, fine_tune
from rnp.defenses.exposed_fp import ExposedFP, ExposedFPConfig
from rnp.defenses.ibau import IBAU, IBAUConfig
from rnp.defenses.nad import NAD, NADConfig
from rnp.defenses.neural_cleanse import NeuralCleanse, NeuralCleanseConfig
from rnp.defenses.nft import NFT, NFTConfig
from rnp.defenses.rnp import RNP, RNPConfig, threshold_sweep
from rnp.defenses.sau import SAU, SAUConfig
from rnp.defenses.tsbd import TSBD, TSBDConfig

DEFENSES: dict[str, type[RemovalDefense]] = {
    cls.name: cls for cls in (RNP, FT, FP, ExposedFP, NAD, ANP, IBAU, CLP, NeuralCleanse, SAU, NFT, TSBD)}

__all__ = ["DefenseResult", "RemovalDefense", "ChannelScores", "MaskSet", "batchnorm_layers",
           "maskable_layers", "prune_channels", "RNP", "RNPConfig", "threshold_sweep",
           "FT", "FTConfig", "fine_tune", "FP", "FPConfig", "ExposedFP", "ExposedFPConfig", "NAD", "NADConfig",
           "ANP", "ANPConfig",
           "IBAU", "IBAUConfig", "CLP", "CLPConfig", "NeuralCleanse", "NeuralCleanseConfig",
           "SAU", "SAUConfig", "NFT", "NFTConfig", "TSBD", "TSBDConfig", "DEFENSES"]
