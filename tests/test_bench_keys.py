"""Cache keys of ``rnp bench``: cells are keyed on the package's source, subjects on the training
code's, pre-fingerprint subjects are adopted once, and moving the data keeps every subject.

One tiny subject (90 training images, width 4, one epoch) per test, defended by ``none`` only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import rnp
from rnp import utils
from rnp.bench import grid as grid_module, subjects
from rnp.bench.grid import parse_grid
from rnp.bench.report import code_note
from rnp.bench.runner import run_grid
from rnp.bench.suite import suite_attack
from rnp.data.sources import load_dataset
from rnp.errors import RnpError
from rnp.runs import fingerprint, training as run_training
from rnp.runs.folder import config_dict
from rnp.training import TrainConfig
from rnp.utils import AMP_AUTO_VARIABLE, resolve_precision

from helpers import write_dataset
from test_bench_grid import FT_FAST, grid_dict
from test_cli import _environment  # noqa: F401 (autouse fixture: private cache, one thread)


@pytest.fixture
def data(tmp_path) -> Path:
    """A dataset of this test's own, so a test may move it."""
    return write_dataset(tmp_path / "data", classes=3, n_train=90, n_test=30)


def small_grid(data: Path, **overrides):
    return parse_grid(grid_dict(data, **{"defenses": {"none": {}}, "retuning": None, **overrides}))


def run(grid, tmp_path: Path, lines: list | None = None):
    log = (lambda line: lines.append(line)) if lines is not None else (lambda line: None)
    return run_grid(grid, tmp_path / "out", cache=tmp_path / "models", log=log)


def test_fingerprints_hash_the_imported_package_source(tmp_path, monkeypatch):
    assert fingerprint.PACKAGE_ROOT == Path(rnp.__file__).resolve().parent
    copy = tmp_path / "rnp"
    shutil.copytree(fingerprint.PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fingerprint, "PACKAGE_ROOT", copy)

    def both():
        fingerprint.source_fingerprint.cache_clear()
        return fingerprint.package_fingerprint(), fingerprint.training_fingerprint()

    try:
        package, training = both()
        assert len(package) == len(training) == fingerprint.FINGERPRINT_LENGTH and package != training
        (copy / "defenses" / "rnp.py").write_text((copy / "defenses" / "rnp.py").read_text() + "\n# edit\n")
        edited_defense = both()
        assert edited_defense[0] != package and edited_defense[1] == training  # subjects survive
        (copy / "training" / "loop.py").rename(copy / "training" / "loop2.py")
        moved = both()
        assert moved[0] != edited_defense[0] and moved[1] != training  # a renamed file counts
    finally:
        fingerprint.source_fingerprint.cache_clear()


def test_a_code_change_recomputes_cells_but_keeps_subjects(data, tmp_path, monkeypatch):
    first = run(small_grid(data), tmp_path)
    record = first.records[0]
    assert record["cell"]["code"] == fingerprint.package_fingerprint()
    assert record["subject_code"] == {"training_code": fingerprint.training_fingerprint(), "adopted": False}
    monkeypatch.setattr(grid_module, "package_fingerprint", lambda: "0ther0code000")
    monkeypatch.setattr(run_training, "train", lambda *a, **k: pytest.fail("a subject was retrained"))
    second = run(small_grid(data), tmp_path)
    assert len(second.computed) == 1 and second.records[0]["key"] != record["key"]  # not the stale record
    assert second.records[0]["subject_run"] == record["subject_run"]


def test_keep_older_counts_a_cell_of_older_code_as_done(data, tmp_path, monkeypatch):
    first = run(small_grid(data), tmp_path)
    monkeypatch.setattr(grid_module, "package_fingerprint", lambda: "0ther0code000")
    kept = run_grid(small_grid(data), tmp_path / "out", cache=tmp_path / "models", keep_older=True,
                    log=lambda line: None)
    assert kept.computed == [] and [r["key"] for r in kept.records] == [first.records[0]["key"]]
    changed = small_grid(data, defenses={"ft": FT_FAST})  # other settings: computed all the same
    again = run_grid(changed, tmp_path / "out", cache=tmp_path / "models", keep_older=True, log=lambda line: None)
    assert len(again.computed) == 1


@pytest.mark.parametrize("newer_name", ["00000000000000aa.json", "ffffffffffffffaa.json"])
def test_keep_older_takes_the_record_started_last_of_the_same_settings(data, tmp_path, monkeypatch, newer_name):
    first = run(small_grid(data), tmp_path)
    cells = tmp_path / "out" / "cells"
    record = json.loads((cells / f"{first.records[0]['key']}.json").read_text())
    assert record["started_at"].endswith("+00:00")
    (cells / f"{record['key']}.json").unlink()
    copies = ((newer_name, "2026-12-07T01:00:00+00:00"), ("8888888888888888.json", "2026-12-06T23:00:00+00:00"),
              ("7777777777777777.json", None))  # None: a record from before started_at
    for name, started in copies:
        older = {**record, "key": name[:-5], "started_at": started}
        (cells / name).write_text(json.dumps({k: v for k, v in older.items() if v is not None}))
    monkeypatch.setattr(grid_module, "package_fingerprint", lambda: "0ther0code000")
    kept = run_grid(small_grid(data), tmp_path / "out", cache=tmp_path / "models", keep_older=True,
                    log=lambda line: None)
    assert kept.computed == [] and [r["key"] for r in kept.records] == [newer_name[:-5]]


def new_training_code(monkeypatch) -> str:
    """Makes the code look edited (training fingerprint "newtraining0"); the old fingerprint."""
    old = fingerprint.training_fingerprint()
    monkeypatch.setattr(subjects, "training_fingerprint", lambda: "newtraining0")
    monkeypatch.setattr(run_training, "training_fingerprint", lambda: "newtraining0")
    monkeypatch.setattr(grid_module, "package_fingerprint", lambda: "newpackage00")
    return old


def test_a_training_code_change_retrains_and_says_why(data, tmp_path, monkeypatch):
    first = run(small_grid(data), tmp_path)
    old = new_training_code(monkeypatch)
    lines = []
    second = run(small_grid(data), tmp_path, lines)
    assert second.records[0]["subject_run"] != first.records[0]["subject_run"]
    assert second.records[0]["subject_code"]["training_code"] == "newtraining0"
    why = [line for line in lines if "training subject" in line]
    assert len(why) == 1 and "training code changed" in why[0] and old in why[0]
    assert why[0].startswith("tiny preact_resnet18-w4 badnets seed 0:")


def test_a_verified_equivalent_training_code_reuses_the_subject(data, tmp_path, monkeypatch):
    first = run(small_grid(data), tmp_path)
    old = new_training_code(monkeypatch)
    monkeypatch.setitem(fingerprint.EQUIVALENT_TRAINING_CODE, "newtraining0", (old,))
    lines = []
    second = run(small_grid(data), tmp_path, lines)
    assert second.records[0]["subject_run"] == first.records[0]["subject_run"]
    assert second.records[0]["subject_code"]["training_code"] == old
    assert not [line for line in lines if "training subject" in line]
    assert [line for line in lines if "verified to train the same models" in line]


def test_equivalent_training_codes_follow_chains_nearest_first(monkeypatch):
    monkeypatch.setattr(fingerprint, "EQUIVALENT_TRAINING_CODE", {"c": ("b",), "b": ("a",), "a": ("c",)})
    assert fingerprint.equivalent_training_codes("c") == ["b", "a"]
    assert fingerprint.equivalent_training_codes("z") == []


def test_a_link_that_retrained_an_attack_is_not_followed_for_it(monkeypatch):
    monkeypatch.setattr(fingerprint, "EQUIVALENT_TRAINING_CODE", {"c": ("b",), "b": ("a",)})
    monkeypatch.setattr(fingerprint, "RETRAINED_ATTACKS", {"b": ("bpp",), "c": ("lira",)})
    assert fingerprint.equivalent_training_codes("c", "badnets") == ["b", "a"]
    assert fingerprint.equivalent_training_codes("c", "bpp") == ["b"]
    assert fingerprint.equivalent_training_codes("c", "lira") == []


def test_an_equivalent_code_that_retrained_the_attack_retrains_the_subject(data, tmp_path, monkeypatch):
    first = run(small_grid(data), tmp_path)
    old = new_training_code(monkeypatch)
    monkeypatch.setitem(fingerprint.EQUIVALENT_TRAINING_CODE, "newtraining0", (old,))
    monkeypatch.setitem(fingerprint.RETRAINED_ATTACKS, "newtraining0", ("badnets",))
    second = run(small_grid(data), tmp_path)
    assert second.records[0]["subject_run"] != first.records[0]["subject_run"]
    assert second.records[0]["subject_code"]["training_code"] == "newtraining0"


def legacy_key(data: Path, grid) -> str:
    """The key every subject was cached under before fingerprints (the package version hashed)."""
    subject = grid.subjects()[0]
    attack = suite_attack(subject.attack, seed=subject.seed)
    identity = {"rnp_version": "0.1.0", "data": load_dataset(data).checksum, "arch": subject.arch,
                "width": subject.width, "attack": attack.spec(),
                "train": config_dict(resolve_precision(TrainConfig(**subject.train, seed=subject.seed), "cpu"))}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def test_a_pre_fingerprint_subject_is_adopted_once_and_said_so(data, tmp_path, monkeypatch):
    grid = small_grid(data)
    trained = Path(run(grid, tmp_path).records[0]["subject_run"])
    legacy = trained.parent / legacy_key(data, grid)
    trained.rename(legacy)
    info = json.loads((legacy / "run.json").read_text())
    del info["training_code"]  # as a pre-fingerprint run.json
    (legacy / "run.json").write_text(json.dumps(info))
    shutil.rmtree(tmp_path / "out")
    monkeypatch.setattr(run_training, "train", lambda *a, **k: pytest.fail("the legacy subject was retrained"))
    lines = []
    adopted = run(grid, tmp_path, lines)
    record = adopted.records[0]
    assert record["subject_run"] == str(legacy) and any("adopting subject" in line for line in lines)
    assert record["subject_code"] == {"training_code": fingerprint.training_fingerprint(), "adopted": True}
    assert "Warning" in code_note(adopted.records) and "adopted" in code_note(adopted.records)

    monkeypatch.undo()
    monkeypatch.setattr(subjects, "training_fingerprint", lambda: "newtraining0")
    monkeypatch.setattr(run_training, "training_fingerprint", lambda: "newtraining0")
    monkeypatch.setattr(grid_module, "package_fingerprint", lambda: "newpackage00")
    lines = []
    retrained = run(grid, tmp_path, lines)
    assert retrained.records[0]["subject_run"] != str(legacy)  # adopted by other training code
    assert any("training code changed" in line and "adopted" in line for line in lines)


def test_moving_the_data_keeps_the_subject(data, tmp_path, monkeypatch):
    first = run(small_grid(data), tmp_path)
    moved = data.rename(tmp_path / "elsewhere")
    monkeypatch.setattr(run_training, "train", lambda *a, **k: pytest.fail("the subject was retrained"))
    again = run(small_grid(moved, defenses={"none": {}, "ft": FT_FAST}), tmp_path)
    assert not again.failures and len(again.computed) == 1  # the ft cell, on the same subject
    assert {r["subject_run"] for r in again.records} == {first.records[0]["subject_run"]}
    assert again.records[0]["key"] == first.records[0]["key"]  # the data enters by its checksum


def test_the_report_says_when_records_mix_code():
    def record(code, training, adopted=False):
        return {"cell": {"code": code}, "subject_code": {"training_code": training, "adopted": adopted}}

    same = [record("aaa", "ttt"), record("aaa", "ttt")]
    assert code_note(same) == "Code: cells by package aaa; subjects by training code ttt. Processors: not recorded."
    mixed = code_note([record("aaa", "ttt"), record("bbb", "ttt")])
    assert mixed.startswith("**Warning") and "aaa (1 cells), bbb (1 cells)" in mixed
    assert "unknown" in code_note([{"cell": {}, "key": "old record"}])


def test_the_report_names_processors_and_warns_when_a_subject_was_retrained():
    def record(weights, processor="AMD EPYC", run="/cache/zoo/abc-ttt", accuracy=0.9):
        return {"cell": {"code": "aaa"}, "subject_code": {"training_code": "ttt"}, "subject_run": run,
                "environment": {"device_name": processor, "cpu_capability": "AVX512"},
                "before": {"clean_accuracy": accuracy,
                                                                      "attack_success_rate": 1.0},
                **({"subject_weights": weights} if weights else {})}

    same = code_note([record("w1"), record("w1", "Intel Xeon"), record(None),
                      record("w2", run="/z/other-ttt", accuracy=0.8)])
    assert "Processors: AMD EPYC (3 cells), Intel Xeon (1 cells)." in same and "Warning" not in same
    warning = "**Warning: the cells of abc-ttt rest on different trained weights**"
    retrained = code_note([record("w1"), record("w2", "Intel Xeon"), record("w3", run="/z/other-ttt")])
    assert warning in retrained and "other-ttt" not in retrained
    older = code_note([record(None), record("w1", accuracy=0.91), record(None, run="/z/other-ttt")])
    assert warning in older and "other-ttt" not in older  # a record without a hash: the CA differs
    reevaluated = code_note([record("w1"), record("w1", accuracy=0.91)])
    assert "Warning" not in reevaluated  # one hash: the same weights, evaluated by other code
    legacy = record(None) | {"environment": {"device": "cpu", "device_name": "x86_64"}}
    assert "Processors: AMD EPYC (1 cells), not recorded (1 cells)." in code_note([record(None), legacy])


def test_one_process_trains_the_subjects_while_another_defends_those_finished(data, tmp_path):
    grid = small_grid(data, defenses={"none": {}, "ft": FT_FAST})
    out, cache = tmp_path / "out", tmp_path / "models"
    early = run_grid(grid, out, cache=cache, trained_only=True, log=lambda line: None)
    assert early.records == [] and len(early.skipped) == 2 and not early.failures
    assert not list(cache.glob("*/model.safetensors"))  # nothing was trained
    queue = run_grid(grid, out, cache=cache, defenses=["none"], log=lambda line: None)
    assert [r["label"]["defense"] for r in queue.records] == ["none"]
    beside = run_grid(grid, out, cache=cache, trained_only=True, log=lambda line: None)
    assert sorted(r["label"]["defense"] for r in beside.records) == ["ft", "none"] and not beside.skipped
    assert beside.computed == [r["key"] for r in beside.records if r["label"]["defense"] == "ft"]


def test_an_unknown_defense_row_is_a_one_line_error(data, tmp_path):
    with pytest.raises(RnpError, match="no defense row 'rnp'; its rows: ft, none"):
        run_grid(small_grid(data, defenses={"none": {}, "ft": FT_FAST}), tmp_path / "out",
                 cache=tmp_path / "models", defenses=["rnp"], log=lambda line: None)


def test_two_training_runs_share_out_the_subjects(data, tmp_path):
    grid = small_grid(data, attacks=["badnets", "blend"])
    out, cache = tmp_path / "out", tmp_path / "models"
    first = run_grid(grid, out, cache=cache, subjects=["blend"], log=lambda line: None)
    assert [r["label"]["attack"] for r in first.records] == ["blend"]
    assert len(list(cache.glob("*/model.safetensors"))) == 1
    with pytest.raises(RnpError, match="no subject 'trojan'; its subjects: badnets, blend"):
        run_grid(grid, out, cache=cache, subjects=["trojan"], log=lambda line: None)


def test_subjects_run_in_the_order_given(data, tmp_path):
    grid = small_grid(data, attacks=["badnets", "blend"])
    lines = []
    run_grid(grid, tmp_path / "out", cache=tmp_path / "models", subjects=["blend", "badnets"], log=lines.append)
    done = [line.split("] ")[1].split(" / ")[0] for line in lines if line.startswith("[")]
    assert done == ["blend", "badnets"]  # the grid lists badnets first


def test_cell_and_subject_keys_hold_the_precision_used(data, monkeypatch):
    """On a CPU with native bfloat16 "auto" is bfloat16, so it must not find float32 records;
    pinning float32 there finds exactly the keys "auto" had on a CPU without it."""
    monkeypatch.delenv(AMP_AUTO_VARIABLE)

    def keys(fast: bool, train: dict, rnp: dict) -> tuple[list[str], str]:
        monkeypatch.setattr(utils, "fast_bfloat16_cpu", lambda: fast)
        grid = small_grid(data, train=train, defenses={"rnp": {"unlearn_epochs": 1, **rnp}})
        subject = grid.subjects()[0]
        spec = subjects._subject_spec(str(data), {"attack": subject.build_attack(),
                                                  "config": subject.train_config(), "width": 4})
        return [cell.key for cell in grid.cells({"tiny": "checksum"})], subjects._hash(spec)

    float32 = {"amp": "off", "channels_last": False}
    cells, subject = keys(False, {"epochs": 1}, {})  # "auto" on a CPU without bfloat16: float32
    assert keys(True, {"epochs": 1, **float32}, {})[1] == subject
    assert keys(True, {"epochs": 1, "amp": "off"}, float32)[0] == keys(False, {"epochs": 1, "amp": "off"}, {})[0]
    bfloat16 = keys(True, {"epochs": 1}, {})
    assert bfloat16[0] != cells and bfloat16[1] != subject
    assert keys(True, {"epochs": 1, "amp": "on"}, {})[1] == bfloat16[1]
    assert keys(True, {"epochs": 1}, {"amp": "on"})[0] == bfloat16[0]
    # the cell runs the config its key names, wherever it runs
    monkeypatch.setattr(utils, "fast_bfloat16_cpu", lambda: True)
    cell = small_grid(data, defenses={"rnp": {}}).cells({"tiny": "checksum"})[0]
    assert (cell.defense_config().amp, cell.defense_config().channels_last) == ("on", True)
    assert cell.describe()["defense_config"]["amp"] == "on"
