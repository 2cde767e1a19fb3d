"""Attack names, as used in specs and on the command line."""

from __future__ import annotations

import dataclasses

from rnp.attacks.adaptive_blend import AdaptiveBlend
from rnp.attacks.badnets import BadNets
from rnp.attacks.base import Attack
from rnp.attacks.blend import Blend
from rnp.attacks.bpp import Bpp
from rnp.attacks.input_aware import InputAware
from rnp.attacks.label_consistent import LabelConsistent
from rnp.attacks.lira import Lira
from rnp.attacks.low_frequency import LowFrequency
from rnp.attacks.sig import SIG
from rnp.attacks.trojan import Trojan
from rnp.attacks.wanet import WaNet
from rnp.errors import RnpError

ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (
    BadNets, Blend, Trojan, SIG, LabelConsistent, WaNet, AdaptiveBlend, LowFrequency, Bpp, InputAware, Lira)}


def build_attack(name: str, **params) -> Attack:
    """Builds the attack registered as ``name``; unknown parameters are an error."""
    if name not in ATTACKS:
        raise RnpError(f"unknown attack {name!r}; choose one of {', '.join(sorted(ATTACKS))}")
    cls = ATTACKS[name]
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - known)
    if unknown:
        raise RnpError(f"attack {name!r} has no parameter {', '.join(unknown)}; "
                       f"it takes {', '.join(sorted(known))}")
    return cls(**params)


def attack_from_spec(spec: dict, artifacts: dict | None = None) -> Attack:
    """Rebuilds an attack from :meth:`Attack.spec` and :meth:`Attack.artifacts`.

    Artefacts named like a constructor field (a blend pattern) are passed to it; the rest
    (generator weights) go to :meth:`Attack.load_artifacts`.
    """
    params = dict(spec)
    name = params.pop("name", None)
    if name not in ATTACKS:
        raise RnpError(f"unknown attack {name!r}; choose one of {', '.join(sorted(ATTACKS))}")
    fields = {f.name for f in dataclasses.fields(ATTACKS[name]) if f.init}
    artifacts = artifacts or {}
    attack = build_attack(name, **params, **{k: v for k, v in artifacts.items() if k in fields})
    attack.load_artifacts({k: v for k, v in artifacts.items() if k not in fields})
    return attack
