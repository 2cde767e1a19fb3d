"""The attack suite as the benchmarks run it.

Every attack at its own default poisoning rate (its paper's) with target 0. Attacks that train
generators are reduced on the CPU, where their paper-size generators would cost hours
(Input-Aware's mask pre-training at width 32 takes about 2 h on one core; LIRA's width-64 U-Net
step costs 25 classifier steps); the reductions are
listed in :data:`CPU_REDUCTIONS`, printed with every table, and ``reduced=False`` gives the
paper's settings.
"""

from __future__ import annotations

from rnp.attacks import Attack, build_attack

CPU_REDUCTIONS: dict[str, dict] = {
    "input_aware": {"generator_width": 8, "mask_epochs": 2},
    "lira": {"generator_width": 16},
}


def suite_attack(name: str, *, reduced: bool = True, **params) -> Attack:
    """The attack ``name`` with target 0, CPU reductions applied unless ``reduced`` is False,
    and ``params`` on top."""
    settings = {**(CPU_REDUCTIONS.get(name, {}) if reduced else {}), **params}
    return build_attack(name, target=0, **settings)
