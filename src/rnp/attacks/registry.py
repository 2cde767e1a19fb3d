"""Attack names, as used in specs and on the command line."""

from __future__ import annotations

import dataclasses

from rnp.attacks.badnets import BadNets
from rnp.attacks.base import Attack
from rnp.attacks.blend import Blend
from rnp.errors import RnpError

ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (BadNets, Blend)}


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
    """Rebuilds an attack from :meth:`Attack.spec` and :meth:`Attack.artifacts`."""
    params = dict(spec)
    name = params.pop("name", None)
    return build_attack(name, **params, **(artifacts or {}))
