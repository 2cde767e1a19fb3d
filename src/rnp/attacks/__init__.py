"""Backdoor attacks: make the test subjects that defenses are measured on."""

from rnp.attacks.base import Attack, PoisonedSet, TriggeredSet
from rnp.attacks.badnets import BadNets
from rnp.attacks.blend import Blend
from rnp.attacks.registry import ATTACKS, attack_from_spec, build_attack

__all__ = ["Attack", "PoisonedSet", "TriggeredSet", "BadNets", "Blend", "ATTACKS",
           "attack_from_spec", "build_attack"]
