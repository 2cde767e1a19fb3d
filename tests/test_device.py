"""Devices and mixed precision: ``resolve_device``, the amp "auto" rule (the CPU's bfloat16
answer patched both ways), the training loop under autocast with a gradient scaler,
``TrainConfig.amp`` (validation, resolved run records, resume) and ``--device`` on every
subcommand.

The machine running the tests may have no GPU, so the CUDA paths are checked on the CPU: CUDA's
availability is patched where a test is about choosing or refusing it, and mixed precision runs
with CPU autocast (bfloat16) and a CPU ``GradScaler``, the same code path CUDA takes with float16.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from helpers import separable_image_set, tiny_cnn
from rnp.cli.main import build_parser, main
from rnp.errors import RnpError
from rnp.io.checkpoint import load_checkpoint
from rnp import utils
from rnp.runs.folder import config_dict, config_from_dict
from rnp.training import TrainConfig, run_epoch, train
from rnp.training.hooks import TrainingHook
from rnp.utils import AMP_AUTO_VARIABLE, amp_dtype, resolve_device, resolve_precision

pytestmark = pytest.mark.usefixtures("one_thread")

NO_CUDA = "cuda was asked for but torch.cuda.is_available() is False"


class Interrupted(Exception):
    pass


@pytest.fixture
def no_cuda(monkeypatch):
    """CUDA reported missing, whatever the machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def conv_output_dtypes(model: nn.Module) -> set[torch.dtype]:
    """Records the output dtype of every convolution's forward pass from now on."""
    seen: set[torch.dtype] = set()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda _m, _i, output: seen.add(output.dtype))
    return seen


def dataset_loss(model: nn.Module, data) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(data.images.float() / 255), data.labels))


# --- resolve_device, amp_dtype -------------------------------------------------------------------

def test_resolve_device_auto_and_explicit_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu") == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(torch.device("cpu"))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # CUDA wins over MPS
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device(" CUDA:1 ") == torch.device("cuda", 1)
    with pytest.raises(RnpError, match="only 2 CUDA"):
        resolve_device("cuda:2")


def test_resolve_device_refuses_missing_and_unknown_devices(no_cuda, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for spec in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(RnpError) as error:
            resolve_device(spec)
        assert str(error.value) == NO_CUDA
    with pytest.raises(RnpError, match="mps was asked for"):
        resolve_device("mps")
    for bad in ("gpu", "", "meta", "xla"):
        with pytest.raises(RnpError, match="device"):
            resolve_device(bad)


@pytest.fixture
def bfloat16_cpu(monkeypatch):
    """The amp "auto" rule as on a user's machine (the suite's ``RNP_AMP_AUTO=off`` removed),
    with the CPU's answer to "native bfloat16?" set by calling the fixture with True or False."""
    monkeypatch.delenv(AMP_AUTO_VARIABLE)
    return lambda fast: monkeypatch.setattr(utils, "fast_bfloat16_cpu", lambda: fast)


def test_amp_dtype_and_when_auto_uses_amp(bfloat16_cpu, monkeypatch):
    assert amp_dtype("cuda") == amp_dtype(torch.device("cuda", 1)) == torch.float16
    assert amp_dtype("cpu") == amp_dtype("mps") == torch.bfloat16
    auto, on, off = TrainConfig(), TrainConfig(amp="on"), TrainConfig(amp="off")
    bfloat16_cpu(True)
    assert auto.uses_amp(torch.device("cpu")) and auto.uses_amp(torch.device("cuda"))
    assert not auto.uses_amp(torch.device("mps"))
    bfloat16_cpu(False)
    assert auto.uses_amp(torch.device("cuda")) and not auto.uses_amp(torch.device("cpu"))
    assert on.uses_amp(torch.device("cpu")) and not off.uses_amp(torch.device("cuda"))
    bfloat16_cpu(True)
    monkeypatch.setenv(AMP_AUTO_VARIABLE, "off")  # float32 for every "auto", "on" still on
    assert not auto.uses_amp(torch.device("cpu")) and not auto.uses_amp(torch.device("cuda"))
    assert on.uses_amp(torch.device("cpu"))
    monkeypatch.setenv(AMP_AUTO_VARIABLE, "fast")
    with pytest.raises(RnpError, match=AMP_AUTO_VARIABLE):
        auto.uses_amp(torch.device("cpu"))


def test_fast_bfloat16_cpu_asks_torch_and_says_no_where_torch_cannot_tell(monkeypatch):
    utils.fast_bfloat16_cpu.cache_clear()
    try:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
        assert utils.fast_bfloat16_cpu()
        utils.fast_bfloat16_cpu.cache_clear()
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert not utils.fast_bfloat16_cpu()
        utils.fast_bfloat16_cpu.cache_clear()
        monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # an older torch
        monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
        assert not utils.fast_bfloat16_cpu()
    finally:
        monkeypatch.undo()
        utils.fast_bfloat16_cpu.cache_clear()


def test_channels_last_follows_the_precision_unless_given(bfloat16_cpu):
    bfloat16_cpu(True)
    assert resolve_precision(TrainConfig(), "cpu").channels_last
    assert not resolve_precision(TrainConfig(amp="off"), "cpu").channels_last
    assert not resolve_precision(TrainConfig(channels_last=False), "cpu").channels_last
    assert resolve_precision(TrainConfig(amp="off", channels_last=True), "cpu").channels_last
    assert not resolve_precision(TrainConfig(), "cuda").channels_last  # measured on the CPU only
    with pytest.raises(RnpError, match="channels_last"):
        TrainConfig(channels_last="yes")


# --- run_epoch with a scaler ---------------------------------------------------------------------

def test_run_epoch_with_a_scaler_runs_the_forward_in_bfloat16_and_learns():
    data = separable_image_set(n=32)
    model = tiny_cnn(width=8)  # at width 4 one fixture seed of five starts with every ReLU dead
    before = dataset_loss(model, data)
    dtypes = conv_output_dtypes(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    history = [run_epoch(model, data, optimizer, batch_size=8, augment=False, scaler=scaler,
                         generator=torch.Generator().manual_seed(0)) for _ in range(5)]
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32
    assert all(h.steps == 4 and 0 <= h.accuracy <= 1 for h in history)
    assert history[-1].accuracy == 1.0
    assert history[-1].loss < history[0].loss
    dtypes.clear()
    assert dataset_loss(model, data) < 0.5 * before and dtypes == {torch.float32}
    assert scaler.state_dict()["_growth_tracker"] == 20  # every step went through the scaler


@pytest.mark.parametrize("scaler", [None, torch.amp.GradScaler("cpu", enabled=False)],
                         ids=["no-scaler", "disabled-scaler"])
def test_run_epoch_without_an_enabled_scaler_is_full_precision_and_unchanged(scaler):
    data = separable_image_set(n=24)
    plain = tiny_cnn()
    run_epoch(plain, data, torch.optim.SGD(plain.parameters(), lr=0.1), batch_size=8,
              generator=torch.Generator().manual_seed(1))
    model = tiny_cnn()
    dtypes = conv_output_dtypes(model)
    run_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=8,
              generator=torch.Generator().manual_seed(1), scaler=scaler)
    assert dtypes == {torch.float32}
    for name, tensor in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


class CountingHook(TrainingHook):
    """Relabels every image as class 0 (so training follows the hook) and counts its calls."""

    def __init__(self):
        self.transforms = self.updates = 0

    def transform(self, model, images, labels):
        self.transforms += 1
        assert torch.is_autocast_enabled("cpu")  # the hook's own passes share the step's precision
        return images, torch.zeros_like(labels), torch.zeros(())

    def after_update(self):
        self.updates += 1


def test_hooks_penalty_and_after_step_work_in_mixed_precision():
    data = separable_image_set(n=32)
    model = tiny_cnn()
    hook, penalties, steps = CountingHook(), [], []

    def penalty(images, labels, logits):
        penalties.append(logits.dtype)
        return logits.float().pow(2).mean() * 0.0

    optimizer, scaler = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), torch.amp.GradScaler("cpu")
    stats = None
    for _ in range(3):
        stats = run_epoch(model, data, optimizer, batch_size=8, augment=False, hook=hook, penalty=penalty,
                          scaler=scaler, after_step=lambda info: steps.append(info.step) or info.step == 3)
    assert stats.stopped and stats.steps == 3 and steps == [1, 2, 3] * 3
    assert hook.transforms == hook.updates == 9
    assert penalties == [torch.bfloat16] * 9
    model.eval()
    with torch.no_grad():  # trained on the hook's labels: it predicts class 0 for all
        assert bool((model(data.images.float() / 255).argmax(1) == 0).all())


# --- TrainConfig.amp and train() -----------------------------------------------------------------

FLOAT32_RECORD = {"epochs": 10, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0005,
                  "schedule": "cosine", "milestones": [10, 20], "gamma": 0.1, "augment": True, "seed": 0}
"""A float32 training config's record (and cached subject's key) as it was before amp existed."""


def test_records_hold_the_precision_used_and_float32_keeps_its_old_record(bfloat16_cpu):
    with pytest.raises(RnpError, match="amp"):
        TrainConfig(amp="fast")

    def record(device="cpu", **changes):
        return config_dict(resolve_precision(TrainConfig(epochs=10, **changes), device))

    bfloat16_cpu(False)  # "auto" is float32 here: recorded as every float32 run was
    assert record() == record(amp="off") == record(amp="off", channels_last=False) == FLOAT32_RECORD
    assert record(amp="on") == {**FLOAT32_RECORD, "amp": "on", "channels_last": True}
    assert record("cuda") == {**FLOAT32_RECORD, "amp": "on"}
    bfloat16_cpu(True)  # "auto" is bfloat16 here: never the float32 record
    assert record() == {**FLOAT32_RECORD, "amp": "on", "channels_last": True}
    assert record(amp="off") == FLOAT32_RECORD
    # the width-32 grid's subjects pinned both: their records, and so their keys, stay as they were
    pinned = {**FLOAT32_RECORD, "amp": "on", "channels_last": True}
    assert record(amp="on", channels_last=True) == pinned
    bfloat16_cpu(False)
    assert record(amp="on", channels_last=True) == pinned
    # a record rebuilds the config it describes: left out means float32, not "auto"
    assert config_from_dict(TrainConfig, FLOAT32_RECORD) == TrainConfig(epochs=10, amp="off", channels_last=False)
    assert config_from_dict(TrainConfig, pinned) == TrainConfig(epochs=10, amp="on", channels_last=True)


def small_config(**changes) -> TrainConfig:
    return TrainConfig(**{**dict(epochs=3, batch_size=8, lr=0.05, augment=True, seed=3), **changes})


def test_train_with_amp_on_resumes_to_the_same_weights(tmp_path):
    data = separable_image_set(n=24)
    config = small_config(amp="on")
    reference = tiny_cnn(batch_norm=True)
    dtypes = conv_output_dtypes(reference)
    reference_history = train(reference, data, config, progress=False, device="cpu")
    assert dtypes == {torch.bfloat16}
    full_precision = tiny_cnn(batch_norm=True)
    train(full_precision, data, small_config(amp="auto"), progress=False)  # float32 in the suite
    assert not torch.equal(full_precision[0].weight, reference[0].weight)

    checkpoint = tmp_path / "train.safetensors"

    def interrupt_after_second_epoch(epoch, stats):
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(tiny_cnn(batch_norm=True), data, config, checkpoint=checkpoint, progress=False,
              on_epoch=interrupt_after_second_epoch)
    assert load_checkpoint(checkpoint)[1]["scaler"]["_growth_tracker"] == 2 * 3
    resumed = tiny_cnn(batch_norm=True, seed=99)
    history = train(resumed, data, config, checkpoint=checkpoint, progress=False)
    assert history == reference_history
    for name, tensor in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    # the scaler carried on from the checkpoint instead of starting again
    assert load_checkpoint(checkpoint)[1]["scaler"]["_growth_tracker"] == 3 * 3
    with pytest.raises(RnpError, match="config"):  # amp is part of what must match to resume
        train(tiny_cnn(batch_norm=True), data, small_config(amp="off"), checkpoint=checkpoint,
              progress=False)


# --- the command line ----------------------------------------------------------------------------

def write_dataset(root: Path, classes: int = 3, n_train: int = 30, n_test: int = 12) -> Path:
    """An image-folder tree of 16x16 PNGs whose class sets their brightness."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n_train), ("test", n_test)):
        for index in range(count):
            folder = root / split / f"class{index % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 64, (16, 16, 3)) + 60 * (index % classes)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """A private dataset cache, a dataset, and a backdoored run trained with ``--device cpu``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RNP_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        data = write_dataset(tmp_path_factory.mktemp("data"))
        run = tmp_path_factory.mktemp("runs") / "badnets"
        code = main(["train", "--data", str(data), "--width", "4", "--epochs", "1", "--batch-size", "16",
                     "--attack", "badnets", "--poison-rate", "0.1", "--out", str(run), "--quiet",
                     "--device", "cpu"])
        assert code == 0
        yield data, run


def test_train_records_the_device(cli_env):
    metrics = json.loads((cli_env[1] / "metrics.json").read_text())
    assert metrics["device"] == "cpu"


def test_evaluate_and_defend_on_the_cpu(cli_env, tmp_path, capsys):
    data, run = cli_env
    assert main(["evaluate", "--run", str(run), "--out", str(tmp_path / "m.json"), "--device", "cpu"]) == 0
    assert 0 <= json.loads((tmp_path / "m.json").read_text())["clean_accuracy"] <= 1
    out = tmp_path / "defended"
    assert main(["defend", "--run", str(run), "--unlearn-epochs", "2", "--recover-epochs", "2",
                 "--clean-size", "12", "--batch-size", "8", "--out", str(out), "--quiet",
                 "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["device"] == "cpu" and report["metrics"]["after"]["clean_accuracy"] is not None
    assert load_checkpoint(out / "model.safetensors")[0]  # the purified model was saved


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_takes_device_defaulting_to_auto():
    for name, parser in _subcommands().items():
        device = next((a for a in parser._actions if "--device" in a.option_strings), None)
        assert device is not None and device.default == "auto", name


@pytest.mark.parametrize("command", ["demo", "train", "evaluate", "defend", "inspect", "scan-data"])
def test_device_cuda_without_cuda_is_a_one_line_error(command, cli_env, no_cuda, tmp_path, capsys):
    data, run = cli_env
    out = tmp_path / "out"
    argv = {"demo": ["demo", "--data", data, "--out", out],
            "train": ["train", "--data", data, "--out", out],
            "evaluate": ["evaluate", "--run", run, "--out", out / "m.json"],
            "defend": ["defend", "--run", run, "--out", out],
            "inspect": ["inspect", "--run", run, "--out", out],
            "scan-data": ["scan-data", "--run", run, "--out", out]}[command]
    capsys.readouterr()
    code = main([str(a) for a in argv] + ["--device", "cuda", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"rnp: error: {NO_CUDA}\n"
    assert not out.exists()  # refused before anything was written
