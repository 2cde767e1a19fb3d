"""Checkpoints and weights files: round trips, atomic writes, and refusing unsafe or broken files."""

from __future__ import annotations

import os
import shlex

import pytest
import torch
from safetensors.torch import save_file

from rnp.errors import RnpError
from rnp.io import (atomic_path, load_checkpoint, load_state_dict, read_json, save_checkpoint,
                    save_state_dict, write_json, write_text)


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=generator),
            "bn.num_batches_tracked": torch.tensor(7),
            "pixels": torch.randint(0, 256, (2, 5), dtype=torch.uint8, generator=generator)}


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


class RunsShell:
    """Unpickling this object runs a shell command: what a malicious checkpoint holds."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


# --- checkpoints -----------------------------------------------------------------------------

def test_checkpoint_round_trip_with_metadata(tmp_path):
    path = tmp_path / "run" / "model.safetensors"  # the folder is created
    metadata = {"arch": "resnet18", "epochs": 3, "history": [{"loss": 0.5}], "ok": True}
    save_checkpoint(path, sample_tensors(), metadata)
    tensors, loaded = load_checkpoint(path)
    assert_same_tensors(tensors, sample_tensors())
    assert loaded == metadata


def test_checkpoint_without_metadata_reads_empty_dict(tmp_path):
    save_checkpoint(tmp_path / "w.safetensors", {"x": torch.ones(2)})
    assert load_checkpoint(tmp_path / "w.safetensors")[1] == {}


def test_checkpoint_stores_non_contiguous_tensors(tmp_path):
    transposed = torch.arange(6.0).reshape(2, 3).t()
    save_checkpoint(tmp_path / "t.safetensors", {"t": transposed})
    assert torch.equal(load_checkpoint(tmp_path / "t.safetensors")[0]["t"], transposed)


def test_save_checkpoint_leaves_no_temporary_files(tmp_path):
    save_checkpoint(tmp_path / "a.safetensors", sample_tensors(), {"v": 1})
    save_checkpoint(tmp_path / "a.safetensors", {"x": torch.zeros(1)}, {"v": 2})  # overwrite
    write_json(tmp_path / "b.json", {"k": [1, 2]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.json"]
    assert load_checkpoint(tmp_path / "a.safetensors")[1] == {"v": 2}
    assert read_json(tmp_path / "b.json") == {"k": [1, 2]}


def test_failure_inside_atomic_path_keeps_the_old_file(tmp_path):
    path = tmp_path / "notes.txt"
    write_text(path, "old")
    with pytest.raises(ValueError):
        with atomic_path(path) as temporary:
            temporary.write_text("half of the new cont")
            raise ValueError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_failed_save_checkpoint_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, sample_tensors(), {"v": 1})
    with pytest.raises(TypeError):
        save_checkpoint(path, {"x": torch.ones(1)}, {"bad": object()})  # not JSON-serialisable
    tensors, metadata = load_checkpoint(path)
    assert metadata == {"v": 1}
    assert_same_tensors(tensors, sample_tensors())
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_read_json_errors(tmp_path):
    with pytest.raises(RnpError):
        read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RnpError):
        read_json(tmp_path / "bad.json")


# --- load_state_dict: accepted layouts -------------------------------------------------------

def test_load_state_dict_reads_safetensors(tmp_path):
    save_state_dict(tmp_path / "w.safetensors", sample_tensors())
    assert_same_tensors(load_state_dict(tmp_path / "w.safetensors"), sample_tensors())
    save_file(sample_tensors(), str(tmp_path / "plain.safetensors"))  # written by other tools
    assert_same_tensors(load_state_dict(tmp_path / "plain.safetensors"), sample_tensors())


def test_load_state_dict_reads_plain_torch_state_dict(tmp_path):
    torch.save(sample_tensors(), tmp_path / "w.pt")
    assert_same_tensors(load_state_dict(tmp_path / "w.pt"), sample_tensors())


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_load_state_dict_reads_official_rnp_layout(tmp_path, key):
    checkpoint = {key: sample_tensors(), "epoch": 59, "clean_acc": 93.1, "bad_acc": 100.0}
    torch.save(checkpoint, tmp_path / "model_last.th")
    assert_same_tensors(load_state_dict(tmp_path / "model_last.th"), sample_tensors())


def test_load_state_dict_strips_data_parallel_prefix(tmp_path):
    wrapped = {f"module.{k}": v for k, v in sample_tensors().items()}
    torch.save({"state_dict": wrapped}, tmp_path / "dp.pth")
    assert_same_tensors(load_state_dict(tmp_path / "dp.pth"), sample_tensors())


# --- load_state_dict: refused files ----------------------------------------------------------

def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": sample_tensors(), "payload": RunsShell(f"touch {shlex.quote(str(marker))}")},
               path)
    with pytest.raises(RnpError, match="refused"):
        load_state_dict(path)
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_non_tensor_content_is_refused(tmp_path):
    torch.save({"weights": [1, 2, 3]}, tmp_path / "list.pt")
    with pytest.raises(RnpError):
        load_state_dict(tmp_path / "list.pt")


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])
@pytest.mark.parametrize("keep", [0.5, 8, 0])
def test_truncated_file_gives_rnp_error(tmp_path, name, keep):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_checkpoint(path, sample_tensors(), {"v": 1})
    else:
        torch.save(sample_tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(RnpError):
        load_state_dict(path)
    if name.endswith(".safetensors"):
        with pytest.raises(RnpError):
            load_checkpoint(path)


@pytest.mark.parametrize("name", ["junk.safetensors", "junk.pt"])
def test_garbage_file_gives_rnp_error(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not a model file at all\x00\xff" * 10)
    with pytest.raises(RnpError):
        load_state_dict(tmp_path / name)


def test_missing_file_gives_rnp_error(tmp_path):
    for load in (load_state_dict, load_checkpoint):
        with pytest.raises(RnpError, match="not found"):
            load(tmp_path / "missing.safetensors")
    with pytest.raises(RnpError, match="not found"):
        load_state_dict(tmp_path / "missing.pt")
    with pytest.raises(RnpError):
        load_state_dict(tmp_path)  # a folder is not a weights file
