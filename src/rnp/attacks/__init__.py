"""Backdoor attacks: make the test subjects that defenses are measured on."""

from rnp.attacks.base import Attack
from rnp.attacks.badnets import BadNets
from rnp.attacks.blend import Blend
from rnp.attacks.wanet import WaNet
from rnp.attacks.adaptive_blend import AdaptiveBlend
from rnp.attacks.bpp import Bpp
from rnp.attacks.sig import SIG
from rnp.attacks.low_frequency import LowFrequency
from rnp.attacks.trojan import Trojan
from rnp.attacks.label_consistent import LabelConsistent
from rnp.attacks.input_aware import InputAware
from rnp.attacks.lira import Lira
from rnp.attacks.registry import ATTACKS, attack_from_spec, build_attack
from rnp.data.poisoned import PoisonedSet, TriggeredSet

__all__ = ["Attack", "PoisonedSet", "TriggeredSet", "BadNets", "Blend", "WaNet", "AdaptiveBlend", "Bpp", "SIG",
           "LowFrequency", "Trojan", "LabelConsistent",
           "InputAware", "Lira",
           "ATTACKS",
           "attack_from_spec", "build_attack"]
