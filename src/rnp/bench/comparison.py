"""Each defense against a reference row on the same cells, development attacks apart from
held-back ones.

A mean over all of a defense's cells compares badly with another defense's when the two ran on
different subjects (the costly baselines often on a few). So besides each defense's own means,
the table pairs its cells with the reference row's cells on the same subject and clean set and
reports the mean DER difference over those pairs alone. A grid that names its ``development``
attacks (those its settings were chosen on) gets one block for them and one for the rest, held
back, so that a reader sees how much of a result is selection.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from rnp.bench.grid import NO_ATTACK, NO_DEFENSE
from rnp.io.tables import render_table

DEVELOPMENT, HELD_BACK, ALL = "development", "held back", "all"


def comparison_table(records: list[dict], *, reference: str, development: tuple[str, ...] = ()) -> str:
    """The table, or "" when no finished cell of ``reference`` (a defense row's name) exists.
    ``development`` holds attack labels as the report prints them."""
    ok = [r for r in records if r["status"] == "ok" and _defended(r) and _backdoored(r)]
    reference_der = {cell_group(r): r["der"] for r in ok if r["label"]["defense"] == reference}
    if not reference_der or all(r["label"]["defense"] == reference for r in ok):
        return ""
    blocks = defaultdict(lambda: defaultdict(list))
    for r in ok:
        blocks[_group(r, development)][r["label"]["defense"]].append(r)
    table = [["attacks", "defense", "attacks run", "cells", "ASR", "CA drop", "DER",
              f"paired cells with {reference}", f"DER minus {reference}'s, paired", "higher / equal / lower"]]
    for group in (DEVELOPMENT, HELD_BACK, ALL):
        rows_by_defense = blocks.get(group, {})
        for defense in sorted(rows_by_defense, key=lambda name: name != reference):  # the reference first
            rows = rows_by_defense[defense]
            table.append([group, defense, *_means(rows), *_paired(rows, reference_der, defense == reference)])
    groups = (f"development: {', '.join(development)}; held back: the others" if development
              else "the grid names no development attacks")
    return (f"Each defense against `{reference}` on the same cells (subject and clean set), backdoored "
            f"subjects only; ASR, CA drop (points) and DER in %, means over the defense's own cells "
            f"({groups}):\n\n"
            + render_table(table, markdown=True))


def cell_group(record: dict) -> tuple:
    """The subject and the clean set a cell defended: cells alike in it compare. A cell without
    a clean seed drew its clean images with the subject's seed (:attr:`rnp.bench.grid.Cell.seed`),
    the same images as a clean seed equal to it."""
    label = record["label"]
    return label["dataset"], label["model"], label["attack"], label["seed"], label.get("clean_seed", label["seed"])


def _defended(record: dict) -> bool:
    return record["cell"].get("defense", record["label"]["defense"]) != NO_DEFENSE


def _backdoored(record: dict) -> bool:
    """Clean subjects (a grid's clean twins) have no backdoor to remove, so no DER."""
    return record["cell"].get("subject", {}).get("attack", record["label"]["attack"]) != NO_ATTACK


def _group(record: dict, development: tuple[str, ...]) -> str:
    if not development:
        return ALL
    return DEVELOPMENT if record["label"]["attack"] in development else HELD_BACK


def _means(rows: list[dict]) -> list:
    ders = [r["der"] for r in rows if r["der"] is not None]
    drops = [r["before"]["clean_accuracy"] - r["after"]["clean_accuracy"] for r in rows]
    asr = [r["after"]["attack_success_rate"] for r in rows if r["after"].get("attack_success_rate") is not None]
    return [len({r["label"]["attack"] for r in rows}), len(rows), _pct(asr), _pct(drops), _pct(ders)]


def _paired(rows: list[dict], reference_der: dict, is_reference: bool) -> list:
    if is_reference:
        return ["-", "-", "-"]
    pairs = [(r["der"], reference_der[cell_group(r)]) for r in rows
             if r["der"] is not None and reference_der.get(cell_group(r)) is not None]
    if not pairs:
        return [0, "-", "-"]
    difference = statistics.mean(ours - theirs for ours, theirs in pairs)
    higher, equal = sum(ours > theirs for ours, theirs in pairs), sum(ours == theirs for ours, theirs in pairs)
    return [len(pairs), f"{100 * difference:+.2f}", f"{higher} / {equal} / {len(pairs) - higher - equal}"]


def _pct(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.2f}" if values else "-"
