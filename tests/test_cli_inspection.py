"""``rnp inspect`` and ``rnp scan-data`` end to end on a tiny run folder and on an outside model."""

from __future__ import annotations

import csv
import shutil
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rnp.cli import inspection
from rnp.cli.main import main
from rnp.detection import sample_scan
from rnp.io.checkpoint import load_checkpoint
from helpers import write_dataset
from test_cli import TINY, _environment, run_cli  # noqa: F401 (autouse fixture)

FAST = ["--clean-size", "20", "--batch-size", "16", "--unlearn-epochs", "2", "--quiet"]
TRIGGER_FAST = ["--trigger-steps", "3", "--trigger-samples-per-step", "16", "--trigger-batch-size", "8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), classes=3, n_train=60)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("runs") / "badnets"
    code = main(["train", "--data", str(data), *TINY, "--attack", "badnets", "--poison-rate", "0.2",
                 "--trigger", "size=4", "--trigger", "patch=white", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_inspect_writes_reports_and_figures(capsys, run, tmp_path):
    out = tmp_path / "inspect"
    code, stdout, _ = run_cli(capsys, "inspect", "--run", run, "--out", out, *FAST, *TRIGGER_FAST)
    assert code == 0 and "target label" in stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"exposure", "label_detection", "model_detection", "trigger_recovery"}
    assert len(report["label_detection"]["shares"]) == 3
    trigger = report["trigger_recovery"]
    assert trigger["target"] == report["label_detection"]["candidate"]
    assert set(trigger["models"]) == {"unlearned", "original"} and trigger["patch_trigger"] is True
    assert "IoU, any trained placement" in stdout
    for name in ("predictions.png", "triggers.png"):
        assert Image.open(out / name).size[0] > 200
    assert "<svg" in (out / "predictions.svg").read_text()
    with (out / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    bars = [r for r in rows if r["panel"].startswith("Clean images predicted")]
    assert [float(r["y"]) for r in bars] == report["model_detection"]["shares"]
    tensors, _ = load_checkpoint(out / "triggers.safetensors")
    assert tensors["original_mask"].shape == (16, 16) and tensors["unlearned_pattern"].shape == (3, 16, 16)
    assert (out / "summary.md").read_text().startswith("# rnp inspect")


def test_inspect_options_reach_the_api(capsys, run, tmp_path):
    out = tmp_path / "inspect"
    code, _, _ = run_cli(capsys, "inspect", "--run", run, "--out", out, *FAST, "--no-trigger",
                         "--label-threshold", "1000", "--variance-threshold", "0")
    report = json.loads((out / "report.json").read_text())
    assert code == 0 and "trigger_recovery" not in report
    assert report["label_detection"]["target"] is None and report["label_detection"]["threshold"] == 1000
    assert report["model_detection"]["threshold"] == 0

    code, stdout, _ = run_cli(capsys, "inspect", "--run", run, "--out", tmp_path / "again", *FAST,
                              "--no-trigger", "--label-threshold", "0", "--variance-threshold", "1")
    assert code == 0 and "does not look backdoored" in stdout
    assert report["exposure"]["unlearning_steps"] <= 2 * 3  # --unlearn-epochs 2, 20 images in batches of 16


def test_inspect_gives_a_verdict_from_repeated_unlearnings(capsys, run, tmp_path):
    out = tmp_path / "inspect"
    code, stdout, _ = run_cli(capsys, "inspect", "--run", run, "--out", out, *FAST, "--no-trigger", "--runs", "3")
    found = json.loads((out / "report.json").read_text())["collapse"]
    assert code == 0 and found["runs"] == 3 and found["subset"] == 0.5 and found["threshold"] == 0.5
    assert 0 <= found["agreement"] <= 1 and len(found["consensus"]) == 3 and found["false_alarm_bound"] is None
    assert "- verdict: **" in stdout and "promises no false-positive rate" in stdout

    code, stdout, _ = run_cli(capsys, "inspect", "--run", run, "--out", tmp_path / "strict", *FAST, "--no-trigger",
                              "--runs", "3", "--map-threshold", "1")
    assert code == 0 and "- verdict: **no backdoor found**" in stdout
    code, stdout, _ = run_cli(capsys, "inspect", "--run", run, "--out", tmp_path / "lax", *FAST, "--no-trigger",
                              "--runs", "3", "--map-threshold", "-1")
    assert code == 0 and "- verdict: **backdoored" in stdout and "do not deploy it" in stdout

    # the model's own report as the only known-clean reference: the threshold is its own agreement
    code, stdout, _ = run_cli(capsys, "inspect", "--run", run, "--out", tmp_path / "calibrated", *FAST,
                              "--no-trigger", "--runs", "3", "--map-threshold", "-1",
                              "--clean-reports", out / "report.json")
    calibrated = json.loads((tmp_path / "calibrated" / "report.json").read_text())["collapse"]
    assert code == 0 and calibrated["threshold"] == found["agreement"] and calibrated["kind"] == "clean"
    assert calibrated["false_alarm_bound"] == 0.5 and "with chance at most 50.0%" in stdout
    # one reference: the rate of its threshold is uniform over draws (Beta(1, 1))
    assert calibrated["references"] == 1 and calibrated["false_alarm_interval"] == pytest.approx([0.025, 0.975])
    assert "between 2.5% and 97.5%" in stdout

    code, _, _ = run_cli(capsys, "inspect", "--run", run, "--out", tmp_path / "single", *FAST, "--no-trigger",
                         "--runs", "0")
    assert code == 0 and "collapse" not in json.loads((tmp_path / "single" / "report.json").read_text())


@pytest.mark.parametrize("argv, message", [
    (["--runs", "-1"], "--runs must be 0 or more"),
    (["--run-subset", "0"], "--run-subset is a share"),
    (["--runs", "0", "--clean-reports", "r.json"], "--runs 0 skips them"),
    (["--clean-reports", "missing.json"], "missing.json: file not found"),
    (["--clean-reports", "{report}"], "not a report of `rnp inspect` with repeated unlearnings"),
    (["--clean-reports", "{report}", "--fpr", "2"], "--fpr must be a rate in [0, 1]"),
])
def test_inspect_bad_verdict_options_are_one_line(capsys, run, tmp_path, argv, message):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"collapse": {"agreement": 1.5}}))
    argv = [a.replace("{report}", str(report)) for a in argv]
    code, _, err = run_cli(capsys, "inspect", "--run", run, "--out", tmp_path / "o", *FAST, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_scan_data_scores_every_sample_with_known_poison(capsys, run, tmp_path):
    out = tmp_path / "scan"
    code, stdout, _ = run_cli(capsys, "scan-data", "--run", run, "--out", out, *FAST,
                              "--strip-overlays", "2", "--detectors", "unlearned", "loss", "strip", "ss")
    assert code == 0 and "AUROC" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["scored"] == 60 and report["poisoned"] == 12
    assert set(report["detectors"]) == {"unlearned", "loss", "strip", "ss"}
    entries = [*report["detectors"].values(), report["combined"]]
    assert all(0 <= entry["auroc"] <= 1 and entry["target_fpr"] == 0.05 for entry in entries)
    assert sum(report["combined"]["flagged_per_class"]) == report["combined"]["flagged"]
    with (out / "scores.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    poisoned = {int(line) for line in (run / "poisoned_indices.txt").read_text().split()}
    assert len(rows) == 60 and {int(r["index"]) for r in rows if r["poisoned"] == "1"} == poisoned
    assert sum(int(r["flagged"]) for r in rows) == report["combined"]["flagged"]
    assert all((float(r["combined"]) > report["combined"]["threshold"]) == (r["flagged"] == "1") for r in rows)
    for detector in ("unlearned", "loss", "strip", "ss", "combined"):
        assert {(out / f"scores_{detector}.{suffix}").exists() for suffix in ("png", "svg", "csv")} == {True}
    assert "verdict" in stdout


def test_without_matplotlib_inspect_writes_the_figure_data_and_says_so_in_one_line(capsys, run, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    out = tmp_path / "inspect"
    code, _, err = run_cli(capsys, "inspect", "--run", run, "--out", out, *FAST, "--no-trigger")
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"predictions.csv", "report.json", "summary.md"}
    notes = [line for line in err.splitlines() if "matplotlib" in line]
    assert notes == ["note: figures need matplotlib: pip install 'rnp-backdoor[plots]' "
                     "(the plotted data is in the .csv beside each figure)"]


def test_scan_data_calibrates_on_clean_images_the_unlearning_never_saw(capsys, run, tmp_path, monkeypatch):
    unlearned_on, real_expose = [], sample_scan.expose

    def spy_expose(model, clean, *args, **kwargs):
        unlearned_on.append(clean.images)
        return real_expose(model, clean, *args, **kwargs)

    monkeypatch.setattr(sample_scan, "expose", spy_expose)
    out = tmp_path / "scan"
    code, stdout, _ = run_cli(capsys, "scan-data", "--run", run, "--out", out, *FAST,
                              "--detectors", "unlearned", "loss", "--fpr", "0.1")
    report = json.loads((out / "report.json").read_text())
    assert code == 0 and report["clean_set"] == {"size": 20, "seed": 0} and report["folds"] == 2
    first, second = unlearned_on  # one unlearning per fold, on the other fold's 10 images
    assert len(first) == len(second) == 10
    assert not (first[:, None] == second[None]).flatten(2).all(2).any()  # disjoint images
    with (out / "scores.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for name in ("unlearned", "loss", "combined"):
        entry = report["detectors"].get(name, report["combined"])
        # the csv holds each float32 score in 9 digits: read back as float32, it is exact
        clean_scores = [float(np.float32(r[name])) for r in rows if r["poisoned"] == "0"]
        flagged_clean = sum(s > entry["threshold"] for s in clean_scores)
        assert entry["fpr_scanned_clean"] == pytest.approx(flagged_clean / len(clean_scores), abs=1e-4)
        assert entry["fpr_references"] <= 0.1 and entry["target_fpr"] == 0.1
        low, high = entry["fpr_interval"]  # 20 references: the rate of one threshold spreads widely
        assert 0 < low < 0.05 and 0.3 < high < 0.5
    summary = (out / "summary.md").read_text()
    assert "FPR references" in stdout and "your 20 clean images" in summary
    assert f"flags between {100 * low:.1f}% and {100 * high:.1f}%" in summary


def test_scan_verdict_counts_flags_beyond_what_the_rate_explains():
    assert inspection.excess_allowance(1000, 500, 0.05) == 86  # ceil(50 + 3 * sqrt(47.5 + 95))
    report = {"scored": 1000, "clean_set": {"size": 500},
              "combined": {"target_fpr": 0.05, "flagged": 86, "flagged_per_class": [80, 6]}}
    assert "no sign of poisoning" in inspection._scan_verdict(report, ["a", "b"])[0]
    report["combined"]["flagged"] = 87
    words = inspection._scan_verdict(report, ["a", "b"])
    assert "poisoned samples likely" in words[0] and "a 80, b 6" in words[1]


def test_scan_data_of_an_outside_model_and_a_subset(capsys, run, data, tmp_path):
    out = tmp_path / "scan"
    indices = tmp_path / "poisoned.txt"
    indices.write_text("0\n3\n6\n")
    code, stdout, _ = run_cli(capsys, "scan-data", "--model", run / "model.safetensors", "--data", data,
                              "--poisoned-indices", indices, "--samples", "30", "--detectors", "loss",
                              "--out", out, *FAST)
    report = json.loads((out / "report.json").read_text())
    assert code == 0 and report["scored"] == 30 and report["poisoned_known"]


@pytest.mark.parametrize("argv, message", [
    (["--detectors", "nope"], "invalid choice"),
    (["--data", "x"], "--model FILE"),
    (["--clean-size", "3"], "--clean-size 4 or more"),
    (["--fpr", "0"], "false_positive_rate"),
    (["--folds", "1"], "folds takes"),
])
def test_scan_data_bad_input_is_one_line(capsys, run, tmp_path, argv, message):
    code, _, err = run_cli(capsys, "scan-data", "--run", run, "--out", tmp_path / "o", *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_scan_data_refuses_a_run_whose_poisoned_indices_do_not_match(capsys, run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "poisoned_indices.txt").write_text("1\n2\n")
    code, _, err = run_cli(capsys, "scan-data", "--run", copy, "--out", tmp_path / "o", *FAST,
                           "--detectors", "loss")
    assert code == 2 and "other indices than the run recorded" in err
