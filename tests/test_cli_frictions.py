"""The command line's conveniences for a newcomer: ``--threads`` on every command, the time
estimate before long work, Ctrl-C as one line with exit status 130 (saying when a rerun
resumes), rerunning ``rnp train`` into a finished run, and Neural Cleanse's ``--budget``.

Same tiny dataset as ``test_cli.py`` (40 training and 20 test 16x16 images, width-4 models).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from rnp.cli import commands
from rnp.cli.main import build_parser, main
from rnp.training import trainer

from helpers import write_dataset
from test_cli import TINY, _environment, run_cli  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def data3(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data3"), classes=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data3) -> Path:
    out = tmp_path_factory.mktemp("runs") / "clean"
    assert main(["train", "--data", str(data3), *TINY, "--out", str(out), "--quiet"]) == 0
    return out


def assert_one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", ["demo", "train", "evaluate", "defend", "inspect", "scan-data", "bench"])
def test_every_command_takes_threads(command):
    parser = build_parser()
    required = {"demo": [], "train": ["--data", "d", "--out", "o"], "evaluate": ["--run", "r"],
                "defend": ["--run", "r", "--out", "o"], "inspect": ["--run", "r", "--out", "o"],
                "scan-data": ["--run", "r", "--out", "o"], "bench": ["grid.yaml"]}[command]
    assert parser.parse_args([command, *required, "--threads", "3"]).threads == 3
    assert parser.parse_args([command, *required]).threads is None  # torch's own choice


def test_threads_are_set_before_the_work_and_restored_after(trained, capsys, monkeypatch):
    seen = []
    real = commands.load_run
    monkeypatch.setattr(commands, "load_run", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    code, _, err = run_cli(capsys, "evaluate", "--run", trained, "--out", trained.parent / "m.json",
                           "--threads", before + 1)
    assert code == 0, err
    assert seen == [before + 1]
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_thread_counts_are_one_line_errors(trained, capsys, value):
    code, _, err = run_cli(capsys, "evaluate", "--run", trained, "--threads", value)
    assert code == 2
    assert "--threads: expected a number of threads (1 or more)" in assert_one_line(err)


def test_training_prints_its_estimate_before_the_rest(data3, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", data3, "--width", "4", "--epochs", "2",
                           "--batch-size", "8", "--out", tmp_path / "run", "--quiet")
    assert code == 0, err
    lines = err.splitlines()
    estimate = next(i for i, line in enumerate(lines) if line.startswith("estimated "))
    assert "(training: 2 epochs x 5 steps at " in lines[estimate]
    assert estimate < next(i for i, line in enumerate(lines) if line.startswith("epoch 1/2"))


def test_a_defense_prints_its_estimate(trained, tmp_path, capsys):
    code, _, err = run_cli(capsys, "defend", "--run", trained, "--out", tmp_path / "d", "--quiet",
                           "--clean-size", "20", "--batch-size", "4", "--unlearn-epochs", "2",
                           "--recover-epochs", "2")
    assert code == 0, err
    assert "estimated at most" in err and "(unlearn: 2 epochs x 5 steps at " in err
    assert "(recover: 2 epochs x 5 steps at " in err


def interrupt_epoch_two(monkeypatch, data, out, *, wait: float = 0.0) -> list:
    """Makes `rnp train` (2 epochs into ``out``) stop with Ctrl-C as its second epoch begins,
    each epoch first spending ``wait`` seconds asleep (the core held by other work: wall-clock
    time, no processor time); returns the command's arguments, to rerun it."""
    run_epoch, epochs = trainer.run_epoch, []

    def interrupted_in_epoch_two(*args, **kwargs):
        epochs.append(1)
        time.sleep(wait)
        if len(epochs) == 2:
            raise KeyboardInterrupt
        return run_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "run_epoch", interrupted_in_epoch_two)
    return ["train", "--data", data, "--width", "4", "--epochs", "2", "--batch-size", "16", "--out", out, "--quiet"]


def test_interrupted_training_says_a_rerun_resumes_and_it_does(data3, tmp_path, capsys, monkeypatch):
    run_epoch = trainer.run_epoch
    argv = interrupt_epoch_two(monkeypatch, data3, tmp_path / "run")
    code, _, err = run_cli(capsys, *argv)
    assert code == 130
    assert err.splitlines()[-1] == "rnp: interrupted: rerun the same command to resume"
    assert "Traceback" not in err
    monkeypatch.setattr(trainer, "run_epoch", run_epoch)
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "resuming the interrupted training" in err
    assert "epoch 1/2" not in err and "epoch 2/2" in err
    epoch_seconds = json.loads((tmp_path / "run" / "epoch_seconds.json").read_text())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(epoch_seconds) == ["1", "2"]  # the first session's epoch is kept
    assert min(epoch_seconds.values()) > 0 and metrics["train_seconds"] == pytest.approx(sum(epoch_seconds.values()))
    cpu_seconds = json.loads((tmp_path / "run" / "epoch_cpu_seconds.json").read_text())
    assert list(cpu_seconds) == ["1", "2"] and min(cpu_seconds.values()) > 0
    assert metrics["train_cpu_seconds"] == pytest.approx(sum(cpu_seconds.values()))


def test_cpu_seconds_leave_out_waiting_and_need_every_epoch(data3, tmp_path, capsys, monkeypatch):
    argv = interrupt_epoch_two(monkeypatch, data3, tmp_path / "run", wait=0.5)
    assert run_cli(capsys, *argv)[0] == 130
    run = tmp_path / "run"
    wall, cpu = (json.loads((run / name).read_text())["1"] for name in ("epoch_seconds.json", "epoch_cpu_seconds.json"))
    assert wall - cpu > 0.3  # 0.5 s asleep; margin for the epoch's own overhead
    (run / "epoch_cpu_seconds.json").unlink()  # epoch 1 as a run begun by code that kept no processor times
    assert run_cli(capsys, *argv)[0] == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_seconds"] > 1.0 and metrics["train_cpu_seconds"] is None


def test_an_interrupted_defense_says_only_interrupted(trained, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands.RNP, "_unlearn", interrupt)
    code, _, err = run_cli(capsys, "defend", "--run", trained, "--out", tmp_path / "d", "--quiet",
                           "--clean-size", "20")
    assert code == 130
    assert assert_one_line(err) == "rnp: interrupted"


def test_rerunning_train_into_the_finished_run_reuses_it(trained, data3, capsys):
    model = (trained / "model.safetensors").read_bytes()
    code, out, err = run_cli(capsys, "train", "--data", data3, *TINY, "--out", trained, "--quiet")
    assert code == 0, err
    assert f"reused the finished run in {trained}" in err and "--force" in err
    assert "epoch 1/1" not in err and "run folder:" in out
    assert (trained / "model.safetensors").read_bytes() == model


def test_train_force_retrains_a_run_folder_and_only_a_run_folder(data3, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", data3, *TINY, "--out", out, "--quiet"]
    assert run_cli(capsys, *argv)[0] == 0
    code, _, err = run_cli(capsys, *argv, "--force")
    assert code == 0, err
    assert "epoch 1/1" in err and "reused" not in err
    (out / "notes.txt").write_text("mine")
    files = sorted(p.name for p in out.iterdir())
    code, _, err = run_cli(capsys, *argv, "--force")
    assert code == 2
    assert "holds more than a training run (notes.txt)" in assert_one_line(err)
    assert sorted(p.name for p in out.iterdir()) == files


def test_neural_cleanse_budget_option(capsys):
    code, out, _ = run_cli(capsys, "defend", "--method", "nc", "--help")
    assert code == 0 and "--budget {cpu,paper}" in out
    parser = build_parser("nc")
    base = ["defend", "--method", "nc", "--run", "r", "--out", "o"]
    assert commands._defense_from_args(parser.parse_args(base)).config.steps == 120
    assert commands._defense_from_args(parser.parse_args([*base, "--budget", "paper"])).config.steps == 1000
    paper = commands._defense_from_args(parser.parse_args([*base, "--budget", "paper", "--steps", "5"]))
    assert (paper.config.steps, paper.config.samples_per_step) == (5, 1000)
