"""The report's comparison of each defense with a reference row on the same cells."""

import csv
import io

from rnp.bench.comparison import comparison_table
from rnp.bench.report import cost_table, results_csv


def record(defense, attack, der, clean_seed=None, ca=(0.9, 0.88), asr=0.01, status="ok"):
    label = {"dataset": "d", "model": "m", "attack": attack, "seed": 0, "defense": defense,
             **({} if clean_seed is None else {"clean_seed": clean_seed})}
    cell = {"defense": defense, "subject": {"attack": "none" if attack == "clean" else attack}}
    return {"label": label, "cell": cell, "status": status, "der": der, "before": {"clean_accuracy": ca[0]},
            "after": {"clean_accuracy": ca[1], "attack_success_rate": asr}}


def rows(table: str) -> dict[tuple, list[str]]:
    lines = [line.strip("|").split(" | ") for line in table.splitlines() if line.startswith("| ")]
    return {(cells[0].strip(), cells[1].strip()): [c.strip() for c in cells[2:]] for cells in lines[1:]}


RECORDS = [
    record("none", "badnets", 0.5),
    record("rnp", "badnets", 0.98, clean_seed=0), record("rnp", "badnets", 0.90, clean_seed=1),
    record("rnp", "blend", 0.96, clean_seed=0), record("rnp", "trojan", 0.60, clean_seed=0),
    record("tsbd", "badnets", 0.97), record("tsbd", "blend", 0.99),   # clean set: the subject's seed, 0
    record("tsbd", "trojan", 0.70, asr=0.2, ca=(0.9, 0.8)), record("nc", "sig", 0.8),
    record("nft", "blend", None, status="not_applicable"), record("tsbd", "clean", None, ca=(0.9, 0.5)),
]


def test_each_defense_is_paired_with_the_reference_on_the_same_clean_set():
    table = rows(comparison_table(RECORDS, reference="rnp", development=("badnets", "blend", "sig")))
    # tsbd vs rnp on (badnets, clean 0) and (blend, clean 0): -0.01 and +0.03; rnp's clean set 1 has no pair
    assert table[("development", "tsbd")] == ["2", "2", "1.00", "2.00", "98.00", "2", "+1.00", "1 / 0 / 1"]
    # the clean subject (no backdoor, no DER) is left out: trojan alone is held back
    assert table[("held back", "tsbd")] == ["1", "1", "20.00", "10.00", "70.00", "1", "+10.00", "1 / 0 / 0"]
    assert table[("development", "rnp")][:5] == ["2", "3", "1.00", "2.00", "94.67"]
    assert table[("development", "rnp")][5:] == ["-", "-", "-"]
    assert table[("development", "nc")][5:] == ["0", "-", "-"]  # no rnp cell on sig
    assert not any(defense in ("none", "nft") for _, defense in table)


def test_without_development_attacks_one_block_and_without_the_reference_no_table():
    table = comparison_table(RECORDS, reference="rnp")
    assert set(group for group, _ in rows(table)) == {"all"} and "names no development attacks" in table
    assert rows(table)[("all", "tsbd")][5:] == ["3", "+4.00", "2 / 0 / 1"]
    assert list(rows(table))[0] == ("all", "rnp")  # the reference leads its block
    assert comparison_table(RECORDS, reference="target margin") == ""
    assert comparison_table([r for r in RECORDS if r["label"]["defense"] == "rnp"], reference="rnp") == ""
    tie = [record("rnp", "badnets", 0.9, clean_seed=0), record("copy", "badnets", 0.9, clean_seed=0)]
    assert rows(comparison_table(tie, reference="rnp"))[("all", "copy")][5:] == ["1", "+0.00", "0 / 1 / 0"]


def test_any_row_can_be_the_reference():
    table = rows(comparison_table(RECORDS, reference="tsbd", development=("badnets",)))
    assert table[("development", "tsbd")][5:] == ["-", "-", "-"]
    assert table[("development", "rnp")][5:] == ["1", "+1.00", "1 / 0 / 0"]  # its clean set 1 has no tsbd cell
    assert table[("held back", "rnp")][5:] == ["2", "-6.50", "0 / 0 / 2"]


def test_a_cell_without_a_clean_seed_times_against_rnp_on_the_same_clean_images():
    def timed(defense, seconds, clean_seed=None):
        full = record(defense, "badnets", 0.9, clean_seed=clean_seed)
        metrics = {"clean_accuracy": 0.9, "attack_success_rate": 1.0, "robust_accuracy": 0.0}
        return {**full, "key": defense, "seconds": seconds, "peak_memory_mb": 1.0, "memory_kind": "rss",
                "summary": {}, "before": metrics, "after": metrics}

    cells = [timed("rnp", 50.0, clean_seed=0), timed("rnp", 70.0, clean_seed=1), timed("tsbd", 500.0),
             timed("none", 0.0), timed("ft", 25.0) | {"environment": {"device_name": "Other", "cpu_capability": "X"}}]
    rows = {row["defense"]: row for row in csv.DictReader(io.StringIO(results_csv(cells)))}
    assert float(rows["tsbd"]["seconds_over_rnp"]) == 10.0  # against clean set 0's run, not set 1's
    assert rows["none"]["seconds_over_rnp"] == rows["ft"]["seconds_over_rnp"] == ""  # undefended; other machine


def test_the_cost_table_names_the_stages_beyond_rnps_three():
    plain = {"status": "ok", "label": {"attack": "trojan", "seed": 0, "clean_seed": 1, "defense": "rnp"},
             "cell": {"defense": "rnp"}, "seconds": 57.0, "stages": {"unlearn": 10.0, "recover": 32.0, "prune": 15.0},
             "rnp": {"floor_seconds": 55.0, "floor_ratio": 1.04, "floor_precision": "on"}}
    searched = {**plain, "label": {**plain["label"], "defense": "rnp (collapse target)"}, "seconds": 117.0,
                "stages": {"unlearn": 10.0, "recover": 32.0, "target": 60.0, "prune": 15.0}}
    rows = {line.split(" | ")[2]: line for line in cost_table([plain, searched]).splitlines() if "| trojan |" in line}
    assert "| 10.0 / 32.0 / 15.0 |" in rows["rnp"]
    assert "| 10.0 / 32.0 / 15.0; target 60.0 |" in rows["rnp (collapse target)"]
