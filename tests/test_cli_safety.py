"""Output safety of the ``rnp`` command line (issue 13): no command writes outside its ``--out`` or
onto an input, a non-empty ``--out`` needs ``--force`` (which replaces only rnp's own files), the
output location is checked before any work, JSON output is strict, and input errors say what is
wrong, on one line with exit status 2.

Runs in-process through ``rnp.cli.main.main`` on the tiny dataset of ``test_cli.py`` (40 training
and 20 test 16x16 images, width-4 models). Where a test must prove that a refusal comes before any
work, the work itself (loading a run, training, a defense) is replaced by :func:`_never`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest

from rnp.errors import RnpError
from rnp.io.files import write_json, write_text
from rnp.runs.folder import load_run

from test_cli import TINY, _environment, assert_one_line_error, data3, run_cli, snapshot  # noqa: F401

BADNETS = ["--model", "preact_resnet18", *TINY, "--attack", "badnets", "--poison-rate", "0.1",
           "--target", "0", "--trigger", "size=4", "--trigger", "patch=white"]
FT_FAST = ["--method", "ft", "--epochs", "1", "--clean-size", "20", "--quiet"]
SCORES_CSV = "layer,channel,value\nlayer1.bn,0,0.500000\n"


def _never(*args, **kwargs):
    raise AssertionError("the command started its work before refusing its --out")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data3) -> Path:
    out = tmp_path_factory.mktemp("runs") / "badnets"
    assert run_cli_plain("train", "--data", data3, *BADNETS, "--out", out, "--quiet") == 0
    return out


@pytest.fixture(scope="module")
def zipped(tmp_path_factory, data3) -> Path:
    """The dataset as a zip file, as the run's recorded input."""
    base = tmp_path_factory.mktemp("zipped") / "data"
    return Path(shutil.make_archive(str(base), "zip", data3))


@pytest.fixture(scope="module")
def held(tmp_path_factory, zipped) -> Path:
    """A run on the zip that held 6 clean training images out for the defender."""
    out = tmp_path_factory.mktemp("held") / "run"
    assert run_cli_plain("train", "--data", zipped, *TINY, "--attack", "badnets", "--holdout", "6",
                         "--out", out, "--quiet") == 0
    return out


def run_cli_plain(*argv) -> int:
    from rnp.cli.main import main
    return main([str(a) for a in argv])


def _stop_work(monkeypatch) -> None:
    """Makes loading a run, training and running a grid fail the test if they are reached."""
    for target in ("rnp.cli.commands.load_run", "rnp.cli.inspection.load_run",
                   "rnp.cli.commands.train_run", "rnp.cli.bench.run_grid"):
        monkeypatch.setattr(target, _never)


# -- 1. nothing outside --out, no input replaced -----------------------------------------------


@pytest.mark.parametrize("name", ["data zip", "holdout_indices.txt", "cover_indices.txt"])
def test_evaluate_never_writes_onto_the_runs_data_or_record(held, zipped, capsys, name):
    out = zipped if name == "data zip" else held / name
    before, run_files = out.read_bytes() if out.exists() else None, snapshot(held)
    code, _, err = run_cli(capsys, "evaluate", "--run", held, "--out", out)
    assert "input" in assert_one_line_error(code, err)
    assert (out.read_bytes() if out.exists() else None) == before
    assert snapshot(held) == run_files


def test_evaluate_never_writes_another_runs_metrics(trained, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    before = snapshot(other)
    code, _, err = run_cli(capsys, "evaluate", "--run", trained, "--model", other / "model.safetensors")
    assert "--out" in assert_one_line_error(code, err)
    assert snapshot(other) == before
    code, _, err = run_cli(capsys, "evaluate", "--run", trained, "--model", other / "model.safetensors",
                           "--out", tmp_path / "measured.json")
    assert code == 0, err
    assert snapshot(other) == before


@pytest.mark.parametrize("case", ["defend into the model's folder", "defend into the data",
                                  "train into the data", "inspect into the run",
                                  "scan-data onto the known indices", "bench into the grid's folder"])
def test_an_out_holding_or_inside_an_input_is_refused_up_front(trained, data3, tmp_path, capsys,
                                                               monkeypatch, case):
    _stop_work(monkeypatch)
    model = tmp_path / "suspect.safetensors"
    shutil.copy(trained / "model.safetensors", model)
    (tmp_path / "scores.csv").write_text("3\n")
    (tmp_path / "grid.yaml").write_text(f"datasets: {{tiny: {data3}}}\nattacks: [badnets]\n"
                                        "defenses: [none]\n")
    argv, expected = {
        "defend into the model's folder": (["defend", "--model", model, "--data", data3, "--out", tmp_path],
                                           "holds"),
        "defend into the data": (["defend", "--run", trained, "--out", data3 / "purified"], "inside"),
        "train into the data": (["train", "--data", data3, *TINY, "--out", data3 / "run"], "inside"),
        "inspect into the run": (["inspect", "--run", trained, "--out", trained], "holds"),
        "scan-data onto the known indices": (["scan-data", "--model", model, "--data", data3,
                                              "--poisoned-indices", tmp_path / "scores.csv",
                                              "--out", tmp_path], "holds"),
        "bench into the grid's folder": (["bench", tmp_path / "grid.yaml", "--out", tmp_path], "holds"),
    }[case]
    watched = {path: snapshot(path) for path in (tmp_path, trained, data3)}
    code, _, err = run_cli(capsys, *argv)
    assert expected in assert_one_line_error(code, err)
    assert {path: snapshot(path) for path in watched} == watched
    assert not (data3 / "purified").exists() and not (data3 / "run").exists()


# -- 2. a non-empty --out needs --force, which replaces only rnp's files ------------------------


@pytest.mark.parametrize("command", ["defend", "inspect", "scan-data"])
def test_a_non_empty_out_is_refused_before_any_work(trained, tmp_path, capsys, monkeypatch, command):
    _stop_work(monkeypatch)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.json").write_text("{}")
    code, _, err = run_cli(capsys, command, "--run", trained, "--out", tmp_path / "out")
    line = assert_one_line_error(code, err)
    assert "not empty" in line and "--force" in line
    assert snapshot(tmp_path / "out") == {"report.json": b"{}"}


def test_demo_refuses_a_non_empty_defense_folder_before_training(data3, tmp_path, capsys, monkeypatch):
    _stop_work(monkeypatch)
    (tmp_path / "demo" / "rnp").mkdir(parents=True)
    (tmp_path / "demo" / "rnp" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "demo", "--data", data3, "--out", tmp_path / "demo", "--quiet")
    assert "--force" in assert_one_line_error(code, err)
    assert sorted(p.name for p in (tmp_path / "demo").rglob("*")) == ["notes.txt", "rnp"]


def test_defend_force_replaces_the_files_rnp_wrote_and_keeps_the_rest(trained, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    stale = {"bounds.csv": SCORES_CSV, "sweep.csv": "threshold,pruned\n", "metrics.json": "{}",
             "scores_loss.png": "png", "scores_loss.svg": "svg",
             "scores_loss.csv": "panel,series,x,x_end,y,y_min,y_max,n\n"}
    kept = {"notes.txt": "mine", "table.csv": "a,b\n1,2\n"}
    for name, text in {**stale, **kept}.items():
        (out / name).write_text(text)
    (out / "sub" / "report.json").write_text("{}")
    code, _, err = run_cli(capsys, "defend", "--run", trained, *FT_FAST, "--out", out, "--force")
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert not names & set(stale)
    assert {"model.safetensors", "report.json", "sub", *kept} <= names
    assert all((out / name).read_text() == text for name, text in kept.items())
    assert (out / "sub" / "report.json").read_text() == "{}"
    assert json.loads((out / "report.json").read_text())["method"] == "ft"


def test_inspect_force_leaves_no_trigger_files_of_an_earlier_run(trained, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("triggers.png", "triggers.safetensors", "report.json", "predictions.svg"):
        (out / name).write_text("old")
    code, _, err = run_cli(capsys, "inspect", "--run", trained, "--no-trigger", "--unlearn-epochs", "1",
                           "--clean-size", "20", "--batch-size", "16", "--out", out, "--force", "--quiet")
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"predictions.png", "predictions.svg", "predictions.csv",
                                               "report.json", "summary.md"}


# -- 3. the output location is checked first ---------------------------------------------------


@pytest.mark.parametrize("command", ["defend", "inspect", "scan-data", "evaluate", "train"])
def test_an_unwritable_out_is_found_before_any_work(trained, data3, tmp_path, capsys, monkeypatch, command):
    _stop_work(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / ("metrics.json" if command == "evaluate" else "out")
    source = ["--data", data3, *TINY] if command == "train" else ["--run", trained]
    code, _, err = run_cli(capsys, command, *source, "--out", out)
    line = assert_one_line_error(code, err)
    assert str(blocker) in line and ".tmp" not in line


def test_a_failed_write_names_the_folder_not_a_temporary_file(tmp_path, monkeypatch):
    def refuse(**kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".x.json.1234.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(RnpError) as caught:
        write_text(tmp_path / "x.json", "{}")
    assert str(caught.value) == f"{tmp_path}: cannot write there (Permission denied)"


# -- 4. strict JSON ----------------------------------------------------------------------------


def _no_constants(name):
    raise AssertionError(f"bare {name} in the JSON")


def test_json_output_is_strict_with_a_note_for_non_finite_values(tmp_path):
    write_json(tmp_path / "r.json", {"anomaly_indices": [0.5, math.inf], "loss": -math.inf,
                                     "nested": {"accuracy": math.nan}, "ok": 1.0})
    data = json.loads((tmp_path / "r.json").read_text(), parse_constant=_no_constants)
    assert data["anomaly_indices"] == [0.5, None] and data["loss"] is None and data["ok"] == 1.0
    assert data["non_finite_values"] == {"anomaly_indices/1": "Infinity", "loss": "-Infinity",
                                         "nested/accuracy": "NaN"}


def test_json_without_room_for_the_note_is_refused(tmp_path):
    with pytest.raises(RnpError, match="NaN"):
        write_json(tmp_path / "r.json", [1.0, math.nan])
    assert list(tmp_path.iterdir()) == []


# -- 5. messages that say what is wrong --------------------------------------------------------


def test_a_holdout_run_names_its_holdout_not_the_unpoisoned_images(held, tmp_path, capsys):
    code, _, err = run_cli(capsys, "defend", "--run", held, *FT_FAST[:-3], "--clean-size", "7",
                           "--out", tmp_path / "d")
    line = assert_one_line_error(code, err)
    assert "held out only 6" in line and "--holdout 6" in line and "unpoisoned" not in line
    assert not (tmp_path / "d").exists()


def test_a_clean_set_fraction_is_of_the_training_split_on_a_holdout_run(held):
    clean, _ = load_run(held).clean_images(0.1)
    assert len(clean) == 4  # 10% of the 40 training images, not of the 6 held out


@pytest.mark.parametrize("holdout, expected", [("-1", "expected a count of images"),
                                               ("40", "--holdout 40: ")])
def test_holdout_errors_speak_of_the_holdout(data3, tmp_path, capsys, holdout, expected):
    code, _, err = run_cli(capsys, "train", "--data", data3, *TINY, "--holdout", holdout,
                           "--out", tmp_path / "r")
    line = assert_one_line_error(code, err)
    assert expected in line and "--holdout" in line and "clean" not in line
    assert not (tmp_path / "r").exists()


def test_another_methods_setting_names_its_method(trained, tmp_path, capsys):
    code, _, err = run_cli(capsys, "defend", "--run", trained, "--method", "ft", "--unlearn-lr", "0.1",
                           "--out", tmp_path / "ft")
    line = assert_one_line_error(code, err)
    assert "--method rnp" in line and "not of --method ft" in line
    assert "`rnp defend --method ft --help`" in line


def test_an_unknown_option_points_to_its_commands_help(trained, tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", "--run", trained, "--bogus", "--out", tmp_path / "i")
    assert "`rnp inspect --help`" in assert_one_line_error(code, err)


# -- 6. a run folder's identity includes its holdout ----------------------------------------


def test_train_with_a_holdout_never_returns_a_run_trained_without(trained, data3, capsys):
    before = snapshot(trained)
    assert run_cli(capsys, "train", "--data", data3, *BADNETS, "--out", trained, "--quiet")[0] == 0
    code, _, err = run_cli(capsys, "train", "--data", data3, *BADNETS, "--holdout", "6",
                           "--out", trained, "--quiet")
    assert "different run" in assert_one_line_error(code, err)
    assert snapshot(trained) == before
