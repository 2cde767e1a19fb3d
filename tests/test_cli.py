"""The ``rnp`` command line: train -> evaluate -> defend on a tiny dataset, outside models,
one-line errors with exit status 2, help texts, and one option per config field.

Everything runs in-process through ``rnp.cli.main.main(argv)`` (it returns the exit status),
except one subprocess run proving that a real process prints one line and no traceback.
The dataset is 40 training and 20 test 16x16 PNG images; models have width 4.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rnp.cli.main import build_parser, main
from rnp.cli.options import config_overrides
from rnp.defenses import DEFENSES, RNPConfig, batchnorm_layers
from rnp.io.checkpoint import load_checkpoint
from rnp.models import build_model
from rnp.runs.folder import load_run
from rnp.training import TrainConfig

from helpers import write_dataset

SRC = Path(__file__).resolve().parents[1] / "src"
N_TRAIN, N_TEST = 40, 20
TINY = ["--width", "4", "--epochs", "1", "--batch-size", "16"]
RNP_FAST = ["--unlearn-epochs", "2", "--recover-epochs", "2", "--clean-size", "20", "--batch-size", "16"]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _environment(tmp_path_factory):
    """A private dataset cache, and one torch thread: tiny models run far faster without
    thread contention, above all beside another job."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RNP_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data3(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data3"), classes=3, n_train=N_TRAIN, n_test=N_TEST)


@pytest.fixture(scope="module")
def data4(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data4"), classes=4, n_train=N_TRAIN, n_test=N_TEST)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data3) -> Path:
    out = tmp_path_factory.mktemp("runs") / "badnets"
    code = main(["train", "--data", str(data3), "--model", "preact_resnet18", *TINY,
                 "--attack", "badnets", "--poison-rate", "0.1", "--target", "0",
                 "--trigger", "size=4", "--trigger", "patch=white", "--out", str(out), "--quiet"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def defended(tmp_path_factory, trained) -> Path:
    out = tmp_path_factory.mktemp("defended") / "rnp"
    code = main(["defend", "--run", str(trained), "--method", "rnp", *RNP_FAST, "--oracle-sweep",
                 "--threshold", "0.5", "--prune-rule", "threshold", "--ranking", "masks", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# -- train -> evaluate -> defend ---------------------------------------------------------------


def test_train_writes_a_complete_run_folder(trained, data3):
    assert {"model.safetensors", "run.json", "poisoned_indices.txt", "metrics.json"} <= set(
        p.name for p in trained.iterdir())
    info = json.loads((trained / "run.json").read_text())
    assert info["dataset"]["spec"] == str(data3.resolve())
    assert len(info["dataset"]["checksum"]) == 64
    assert info["model"]["arch"] == "preact_resnet18"
    assert info["model"]["width"] == 4 and info["model"]["num_classes"] == 3
    assert info["attack"] == {"name": "badnets", "target": 0, "mode": "all2one", "poison_rate": 0.1,
                              "seed": 0, "patch": "white", "size": 4, "location": None}
    assert info["seed"] == 0 and info["train"]["epochs"] == 1
    assert info["rnp_version"]
    indices = (trained / "poisoned_indices.txt").read_text().split()
    assert len(indices) == round(0.1 * N_TRAIN)
    assert all(0 <= int(i) < N_TRAIN for i in indices)
    metrics = json.loads((trained / "metrics.json").read_text())
    assert {"clean_accuracy", "attack_success_rate", "robust_accuracy"} <= set(metrics)


def test_evaluate_writes_metrics(trained, tmp_path, capsys):
    code, out, err = run_cli(capsys, "evaluate", "--run", trained, "--out", tmp_path / "m.json")
    assert code == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0 <= metrics["clean_accuracy"] <= 1 and metrics["attack_success_rate"] is not None
    assert "CA" in out and "ASR" in out
    # the default output merges into the run's metrics.json, keeping what training recorded
    before = json.loads((trained / "metrics.json").read_text())
    assert run_cli(capsys, "evaluate", "--run", trained)[0] == 0
    after = json.loads((trained / "metrics.json").read_text())
    assert after == before


def test_defend_writes_model_masks_sweep_and_report(defended, trained, capsys):
    files = {p.name for p in defended.iterdir()}
    assert {"model.safetensors", "masks.csv", "sweep.csv", "report.json"} <= files

    tensors, metadata = load_checkpoint(defended / "model.safetensors")
    spec = json.loads((trained / "run.json").read_text())["model"]
    assert metadata["model"] == spec
    model = build_model(**spec)
    model.load_state_dict(tensors, strict=True)

    masks = read_csv(defended / "masks.csv")
    assert (defended / "masks.csv").read_text().splitlines()[0] == "layer,channel,value"
    assert len(masks) == sum(m.num_features for _, m in batchnorm_layers(model))
    assert all(0 <= float(row["value"]) <= 1 for row in masks)

    sweep = read_csv(defended / "sweep.csv")
    assert sweep and {"threshold", "pruned", "clean_set_accuracy"} <= set(sweep[0])
    assert any(c.startswith("oracle_") for c in sweep[0]) and "oracle_attack_success_rate" in sweep[0]

    report = json.loads((defended / "report.json").read_text())
    assert report["oracle_sweep_included"] is True
    for when in ("before", "after"):
        assert {"clean_accuracy", "attack_success_rate", "robust_accuracy"} <= set(report["metrics"][when])
    steps = report["unlearning"]["per_step"]
    assert steps and [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    assert {"loss", "accuracy"} <= set(steps[0])
    assert set(report["seconds"]) == {"unlearn", "recover", "prune"}
    assert all(v >= 0 for v in report["seconds"].values())
    # command-line overrides reach the defense's config
    assert report["config"]["threshold"] == 0.5 and report["config"]["prune_rule"] == "threshold"
    assert report["config"]["unlearn_epochs"] == 2 and report["config"]["batch_size"] == 16
    assert report["clean_set"]["size"] == 20

    # the defended model evaluates against the run's data and trigger
    code, _, err = run_cli(capsys, "evaluate", "--run", trained, "--model", defended / "model.safetensors")
    assert code == 0, err
    assert (defended / "metrics.json").is_file()


def test_defend_without_oracle_sweep_has_no_oracle_columns(trained, tmp_path, capsys):
    code, out, err = run_cli(capsys, "defend", "--run", trained, *RNP_FAST, "--preset", "paper",
                             "--out", tmp_path / "d", "--quiet")
    assert code == 0, err
    sweep = read_csv(tmp_path / "d" / "sweep.csv")
    assert not any(c.startswith("oracle_") for c in sweep[0])
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["oracle_sweep_included"] is False
    assert report["config"]["stop_check"] == "epoch"  # the paper preset
    assert "pruned" in out


def test_defend_rnp_with_every_experimental_option_reports_each(trained, tmp_path, capsys):
    code, _, err = run_cli(capsys, "defend", "--run", trained, *RNP_FAST, "--prune-rule", "exposure",
                           "--exposure-share", "1.5", "--mask-runs", "2", "--mask-runs-unlearn",
                           "--unlearn-depths", "0.5", "0.2", "--repair-epochs", "1", "--repair-lr", "0.005",
                           "--out", tmp_path / "d", "--quiet")
    assert code == 0, err
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["pruning"]["rule"] == "exposure" and report["pruning"]["curve"]
    assert report["mask_runs"]["recoveries"] == 4 and len(report["unlearning"]["depths"]) == 2
    assert len(report["repair"]["epochs"]) == 1 and "repair" in report["seconds"]


# -- outside models ----------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "wrapped-dataparallel"])
def test_defend_outside_torch_state_dict(data3, tmp_path, capsys, wrap):
    torch.manual_seed(0)
    state = build_model("preact_resnet18", num_classes=3, width=4).state_dict()
    if wrap:  # the official RNP layout: {"state_dict": {"module.<name>": tensor}}
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(state, tmp_path / "outside.pt")
    code, _, err = run_cli(capsys, "defend", "--model", tmp_path / "outside.pt", "--data", data3,
                           "--arch", "preact_resnet18", "--width", "4", *RNP_FAST,
                           "--out", tmp_path / "d", "--quiet")
    assert code == 0, err
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["metrics"]["before"]["attack_success_rate"] is None  # no attack known
    spec = load_checkpoint(tmp_path / "d" / "model.safetensors")[1]["model"]
    assert spec["arch"] == "preact_resnet18" and spec["width"] == 4 and spec["num_classes"] == 3


def test_defend_rnp_safetensors_reads_spec_from_metadata(trained, data3, tmp_path, capsys):
    code, _, err = run_cli(capsys, "defend", "--model", trained / "model.safetensors", "--data", data3,
                           *RNP_FAST, "--out", tmp_path / "d", "--quiet")
    assert code == 0, err
    tensors, metadata = load_checkpoint(tmp_path / "d" / "model.safetensors")
    build_model(**metadata["model"]).load_state_dict(tensors, strict=True)


def test_demo_on_a_given_dataset(data3, tmp_path, capsys):
    code, out, err = run_cli(capsys, "demo", "--data", data3, "--out", tmp_path / "demo", "--epochs", "1",
                             "--width", "4", "--clean-size", "20", "--quiet")
    assert code == 0, err
    assert (tmp_path / "demo" / "run.json").is_file()
    assert (tmp_path / "demo" / "rnp" / "report.json").is_file()
    assert "before" in out and "after" in out


def test_holdout_keeps_clean_images_out_of_training_and_feeds_the_defense(data3, tmp_path, capsys):
    run = tmp_path / "held"
    code, _, err = run_cli(capsys, "train", "--data", data3, *TINY, "--attack", "badnets",
                           "--holdout", "12", "--out", run, "--quiet")
    assert code == 0, err
    held = [int(line) for line in (run / "holdout_indices.txt").read_text().split()]
    poisoned = {int(line) for line in (run / "poisoned_indices.txt").read_text().split()}
    assert len(set(held)) == 12 and not poisoned & set(held)
    assert json.loads((run / "run.json").read_text())["holdout"] == 12
    code, _, err = run_cli(capsys, "defend", "--run", run, *RNP_FAST[:-4], "--clean-size", "13",
                           "--batch-size", "16", "--out", tmp_path / "d", "--quiet")
    assert code == 2 and "only 12" in err
    code, _, err = run_cli(capsys, "defend", "--run", run, *RNP_FAST[:-4], "--clean-size", "12",
                           "--batch-size", "16", "--out", tmp_path / "d", "--quiet")
    assert code == 0, err


def test_train_an_attack_fitted_on_a_clean_reference_run(data3, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", data3, *TINY, "--attack", "label_consistent",
                           "--poison-rate", "0.1", "--out", tmp_path / "lc0", "--quiet")
    assert_one_line_error(code, err)
    assert "--reference-run" in err
    clean = tmp_path / "clean"
    assert run_cli(capsys, "train", "--data", data3, *TINY, "--out", clean, "--quiet")[0] == 0
    code, out, err = run_cli(capsys, "train", "--data", data3, *TINY, "--attack", "label_consistent",
                             "--poison-rate", "0.1", "--trigger", "steps=2", "--reference-run", clean,
                             "--out", tmp_path / "lc", "--quiet")
    assert code == 0, err
    info = json.loads((tmp_path / "lc" / "run.json").read_text())
    assert info["attack"]["steps"] == 2 and info["attack"]["poison_rate"] == 0.1
    assert info["reference_run"]["path"] == str(clean.resolve())
    run = load_run(tmp_path / "lc")
    assert len(run.poisoned_indices) == 4  # 10% of 40, all from the target class
    assert (run.data.train.labels[run.poisoned_indices] == 0).all()


def test_attack_default_poison_rate_is_the_attacks_own(data3, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", data3, *TINY, "--attack", "sig",
                           "--out", tmp_path / "sig", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "sig" / "run.json").read_text())["attack"]["poison_rate"] == 0.08


# -- errors: exit 2, one line, no traceback ----------------------------------------------------


class _Malicious:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def assert_one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rnp: error: ")
    return lines[0]


def test_error_missing_data_path(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "nowhere", *TINY, "--out", tmp_path / "r")
    line = assert_one_line_error(code, err)
    assert "nowhere" in line and "not found" in line
    assert not (tmp_path / "r").exists()


def test_error_wrong_data_layout(tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "flat" / "image.png")
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "flat", *TINY, "--out", tmp_path / "r")
    assert "train/<class>/" in assert_one_line_error(code, err)
    (tmp_path / "half" / "train" / "cat").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "half" / "train" / "cat" / "0.png")
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "half", *TINY, "--out", tmp_path / "r")
    assert "test/" in assert_one_line_error(code, err)


@pytest.mark.parametrize("command", ["evaluate", "defend"])
def test_error_run_folder_without_run_json(tmp_path, capsys, command):
    (tmp_path / "empty").mkdir()
    argv = [command, "--run", tmp_path / "empty"] + (["--out", tmp_path / "d"] if command == "defend" else [])
    code, _, err = run_cli(capsys, *argv)
    assert "run.json" in assert_one_line_error(code, err)


def test_error_malicious_pickle_is_refused_and_never_runs(data3, tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"weight": _Malicious(f"touch {shlex.quote(str(marker))}")}, tmp_path / "evil.pt")
    code, _, err = run_cli(capsys, "defend", "--model", tmp_path / "evil.pt", "--data", data3,
                           "--arch", "preact_resnet18", "--width", "4", *RNP_FAST, "--out", tmp_path / "d")
    line = assert_one_line_error(code, err)
    assert "evil.pt" in line and "refused" in line
    assert not marker.exists()
    assert not (tmp_path / "d" / "model.safetensors").exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_error_garbage_model_file(data3, tmp_path, capsys, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    code, _, err = run_cli(capsys, "defend", "--model", path, "--data", data3, "--arch", "preact_resnet18",
                           "--width", "4", *RNP_FAST, "--out", tmp_path / "d")
    assert path.name in assert_one_line_error(code, err)


def test_error_class_count_mismatch(trained, data4, tmp_path, capsys):
    code, _, err = run_cli(capsys, "defend", "--model", trained / "model.safetensors", "--data", data4,
                           *RNP_FAST, "--out", tmp_path / "d")
    line = assert_one_line_error(code, err)
    assert "3 classes" in line and "4" in line
    code, _, err = run_cli(capsys, "defend", "--model", trained / "model.safetensors", "--data", data4,
                           "--arch", "preact_resnet18", "--width", "4", *RNP_FAST, "--out", tmp_path / "d")
    assert "class count" in assert_one_line_error(code, err)


def test_error_outside_model_needs_an_architecture(trained, data3, tmp_path, capsys):
    torch.save(build_model("preact_resnet18", num_classes=3, width=4).state_dict(), tmp_path / "m.pt")
    code, _, err = run_cli(capsys, "defend", "--model", tmp_path / "m.pt", "--data", data3,
                           *RNP_FAST, "--out", tmp_path / "d")
    assert "--arch" in assert_one_line_error(code, err)
    code, _, err = run_cli(capsys, "defend", "--model", trained / "model.safetensors", "--data", data3,
                           "--width", "8", *RNP_FAST, "--out", tmp_path / "d")
    assert "--width needs --arch" in assert_one_line_error(code, err)


@pytest.mark.parametrize("size, expected", [("100000", "100000 clean images"), ("3", "at least 10"),
                                            ("1.5", "fraction"), ("abc", "--clean-size")])
def test_error_clean_size(trained, tmp_path, capsys, size, expected):
    code, _, err = run_cli(capsys, "defend", "--run", trained, "--clean-size", size,
                           "--unlearn-epochs", "1", "--recover-epochs", "1", "--out", tmp_path / "d")
    assert expected in assert_one_line_error(code, err)


def test_error_train_never_overwrites_another_run(trained, data3, tmp_path, capsys):
    before = snapshot(trained)
    code, _, err = run_cli(capsys, "train", "--data", data3, *TINY, "--seed", "1", "--attack", "badnets",
                           "--out", trained)
    assert "different run" in assert_one_line_error(code, err)
    assert snapshot(trained) == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "train", "--data", data3, *TINY, "--out", tmp_path / "busy")
    assert "not empty" in assert_one_line_error(code, err)
    assert snapshot(tmp_path / "busy") == {"notes.txt": b"mine"}


def test_error_evaluate_refuses_to_overwrite_its_input(trained, tmp_path, capsys):
    model = tmp_path / "copy.safetensors"
    model.write_bytes((trained / "model.safetensors").read_bytes())
    before = model.read_bytes()
    code, _, err = run_cli(capsys, "evaluate", "--run", trained, "--model", model, "--out", model)
    assert "input" in assert_one_line_error(code, err)
    assert model.read_bytes() == before
    run_files = snapshot(trained)
    for name in ("model.safetensors", "run.json"):
        code, _, err = run_cli(capsys, "evaluate", "--run", trained, "--out", trained / name)
        assert_one_line_error(code, err)
    assert snapshot(trained) == run_files


def test_error_defend_refuses_to_write_into_the_run(trained, tmp_path, capsys):
    run_files = snapshot(trained)
    code, _, err = run_cli(capsys, "defend", "--run", trained, *RNP_FAST, "--out", trained)
    assert "input" in assert_one_line_error(code, err)
    assert snapshot(trained) == run_files


@pytest.mark.parametrize("trigger, expected", [("size=abc", "an integer"), ("size=4.5", "an integer"),
                                               ("location=5", "2 comma-separated values"),
                                               ("target=1", "--target"), ("noise=1", "no parameter noise"),
                                               ("size", "KEY=VALUE")])
def test_error_bad_trigger_parameter(data3, tmp_path, capsys, trigger, expected):
    code, _, err = run_cli(capsys, "train", "--data", data3, *TINY, "--attack", "badnets",
                           "--trigger", trigger, "--out", tmp_path / "r")
    assert expected in assert_one_line_error(code, err)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv, expected", [
    (["defend", "--out", "x"], "either --run"),
    (["defend", "--run", "r", "--stop-check", "sometimes", "--out", "x"], "stop_check"),
    (["train", "--data", "d"], "--out"),
    (["frobnicate"], "invalid choice"),
    ([], "COMMAND"),
])
def test_error_command_line_mistakes_are_one_line(capsys, argv, expected):
    code, _, err = run_cli(capsys, *argv)
    assert expected in assert_one_line_error(code, err)


def test_error_in_a_real_process_prints_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1",
           "RNP_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "rnp.cli.main", "train", "--data", str(tmp_path / "nowhere"),
                             "--out", str(tmp_path / "r")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"rnp: error: dataset not found: {tmp_path / 'nowhere'}"]


# -- bad model and run files -------------------------------------------------------------------


@pytest.mark.parametrize("content", ["{}", "[1]"])
def test_incomplete_run_json_is_an_input_error(tmp_path, capsys, content):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(content)
    code, _, err = run_cli(capsys, "evaluate", "--run", tmp_path / "run")
    assert_one_line_error(code, err)


def test_malicious_pickle_message_names_the_blocked_call(data3, tmp_path, capsys):
    torch.save({"weight": _Malicious("true")}, tmp_path / "evil.pt")
    code, _, err = run_cli(capsys, "defend", "--model", tmp_path / "evil.pt", "--data", data3,
                           "--arch", "preact_resnet18", "--width", "4", "--out", tmp_path / "d")
    line = assert_one_line_error(code, err)
    assert "system" in line and "weights_only" not in line


def test_garbage_pickle_is_reported_as_unreadable_not_unsafe(data3, tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(2000))
    code, _, err = run_cli(capsys, "defend", "--model", tmp_path / "garbage.pt", "--data", data3,
                           "--arch", "preact_resnet18", "--width", "4", "--out", tmp_path / "d")
    line = assert_one_line_error(code, err)
    assert "could run code" not in line


# -- listing and help --------------------------------------------------------------------------


def test_defend_list_shows_every_defense_with_its_description(capsys):
    code, out, _ = run_cli(capsys, "defend", "--list")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(rows) == set(DEFENSES) >= {"rnp", "ft", "fp", "nad", "anp", "ibau", "clp", "nc", "sau", "nft"}
    assert all(len(line.split()) > 3 for line in rows.values())


@pytest.mark.parametrize("method", sorted(DEFENSES))
def test_defend_help_lists_the_settings_of_the_chosen_method(capsys, method):
    code, out, _ = run_cli(capsys, "defend", f"--method={method}", "--help")
    assert code == 0
    for field in dataclasses.fields(DEFENSES[method].config_class):
        assert "--" + field.name.replace("_", "-") in out


def test_defend_refuses_another_methods_setting(capsys, trained, tmp_path):
    code, _, err = run_cli(capsys, "defend", "--run", trained, "--method", "ft", "--unlearn-lr", "0.1",
                           "--out", tmp_path / "ft")
    assert code == 2 and "unrecognized arguments: --unlearn-lr" in err
    code, _, err = run_cli(capsys, "defend", "--run", trained, "--method", "nope", "--out", tmp_path / "x")
    assert code == 2 and "invalid choice: 'nope'" in err


@pytest.mark.parametrize("method, options", [
    ("ft", ["--epochs", "1"]),
    ("fp", ["--epochs", "1", "--max-prune-fraction", "0.25"]),
    ("nad", ["--epochs", "1", "--teacher-epochs", "1", "--lr", "0.01"]),  # 0.1 diverges here
    ("anp", ["--iterations", "2", "--batch-size", "8"]),
    ("ibau", ["--rounds", "1", "--batch-size", "10"]),
    ("clp", ["--u", "0.5"]),
    ("nc", ["--steps", "2", "--samples-per-step", "16", "--batch-size", "8"]),
    ("sau", ["--epochs", "1", "--batch-size", "10"]),
    ("nft", ["--rounds", "1", "--steps-per-round", "2", "--batch-size", "10"]),
    ("tsbd", ["--epochs", "1", "--unlearn-epochs", "2", "--batch-size", "10"]),
])
def test_defend_runs_a_baseline_defense_end_to_end(capsys, trained, tmp_path, method, options):
    out = tmp_path / method
    code, stdout, _ = run_cli(capsys, "defend", "--run", trained, "--method", method, *options,
                              "--clean-size", "20", "--out", out, "--quiet")
    assert code == 0, stdout
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["clean_images"] == 20
    assert set(report["metrics"]) == {"before", "after", "der"}
    assert "oracle_sweep_included" not in report and not (out / "sweep.csv").exists()
    assert (out / "model.safetensors").exists()
    assert f"{method} on 20 clean images" in stdout
    if method == "clp":
        assert "pruned" in stdout and report["pruning"]["pruned"] > 0
    scores = {"anp": "masks.csv", "nft": "masks.csv", "clp": "bounds.csv", "fp": "activations.csv",
              "tsbd": "nwc.csv"}.get(method)
    if scores:
        assert (out / scores).read_text().startswith("layer,channel,value\n")
    tensors = {"nc": {"trigger_masks", "trigger_patterns"}, "ibau": {"perturbations"}}.get(method)
    if tensors:
        assert set(load_checkpoint(out / "artifacts.safetensors")[0]) == tensors


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


@pytest.mark.parametrize("argv", [["--help"], ["--version"], *([c, "--help"] for c in _subcommands())],
                         ids=lambda argv: " ".join(argv))
def test_help_exits_zero(capsys, argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert out.strip()


def test_subcommands_are_the_documented_ones():
    assert set(_subcommands()) == {"demo", "train", "evaluate", "defend", "inspect", "scan-data", "bench"}


# -- one option per config field ---------------------------------------------------------------


_STRING_VALUES = {"stop_check": "epoch", "tie_break": "index", "prune_rule": "number",
                  "schedule": "multistep", "mask_layers": "conv", "amp": "off", "ranking": "target_gradient",
                  "target_source": "collapse"}
_RANGED_VALUES = {"unlearn_depths": (["0.5", "0.1"], (0.5, 0.1)), "exposure_share": (["3.0"], 3.0)}
"""Fields whose range the generic non-default value (3 and 7, half the default) falls outside."""


def _non_default_argv(config_cls) -> tuple[list[str], dict]:
    """Options setting every field of ``config_cls`` to a valid non-default value."""
    hints = typing.get_type_hints(config_cls)
    argv, expected = [], {}
    for field in dataclasses.fields(config_cls):
        flag, kind, default = "--" + field.name.replace("_", "-"), hints[field.name], field.default
        if field.name in _RANGED_VALUES:
            values, expected[field.name] = _RANGED_VALUES[field.name]
            argv += [flag, *values]
        elif kind is bool or kind == bool | None:
            argv.append(flag if not default else "--no-" + flag[2:])
            expected[field.name] = not default
        elif typing.get_origin(kind) is tuple:
            argv += [flag, "3", "7"]
            expected[field.name] = (3, 7)
        elif kind is int:
            argv += [flag, str(default + 1)]
            expected[field.name] = default + 1
        elif kind is float:
            argv += [flag, repr(default / 2)]
            expected[field.name] = default / 2
        else:
            value = _STRING_VALUES[field.name]
            argv += [flag, value]
            expected[field.name] = value
    return argv, expected


@pytest.mark.parametrize("command, config_cls", [("defend", RNPConfig), ("train", TrainConfig)])
def test_every_config_field_has_an_option(command, config_cls):
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = {s for a in action.choices[command]._actions for s in a.option_strings}
    for field in dataclasses.fields(config_cls):
        assert "--" + field.name.replace("_", "-") in options, field.name
    required = {"defend": ["--run", "r", "--out", "o"], "train": ["--data", "d", "--out", "o"]}[command]
    argv, expected = _non_default_argv(config_cls)
    args = parser.parse_args([command, *required, *argv])
    overrides = config_overrides(args, config_cls)
    assert overrides == {k: list(v) if isinstance(v, tuple) else v for k, v in expected.items()}
    config = config_cls(**overrides)
    assert {k: getattr(config, k) for k in expected} == expected
    # options not given stay out, so the dataclass (or a preset) keeps its defaults
    assert config_overrides(parser.parse_args([command, *required]), config_cls) == {}
