"""Loading datasets from a path: every layout, the content-keyed cache, safe unpickling, errors."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rnp.data import DEMO_DATASET_PATH, DatasetSplits, load_dataset, load_demo
from rnp.data import sources
from rnp.errors import RnpError

CLASSES = ("cat", "dog", "frog")
TRAIN_PER_CLASS, TEST_PER_CLASS, SIZE = 4, 2, 8
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def image_bytes(label: int, index: int, mode: str = "RGB", size: int = SIZE, fmt: str = "PNG") -> bytes:
    """A small image whose pixels encode its label and index, so order can be checked."""
    value = 40 * label + 5 * index
    color = value if mode == "L" else (value, 255 - value, label)
    buffer = io.BytesIO()
    Image.new(mode, (size, size), color).save(buffer, fmt)
    return buffer.getvalue()


def tree_files(modes=("RGB",)) -> dict[str, bytes]:
    """Relative paths and bytes of a tiny image-folder dataset; image ``i`` uses ``modes[i % len]``."""
    files = {}
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label, name in enumerate(CLASSES):
            for index in range(count):
                mode = modes[(label + index) % len(modes)]
                files[f"{split}/{name}/{index:03d}.png"] = image_bytes(label, index, mode)
    return files


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def write_zip(path: Path, files: dict[str, bytes], prefix: str = "") -> Path:
    """A zip with file entries only (no folder entries), as the shared CIFAR-10 zip has."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(prefix + name, data)
    return path


class Python2Pickler(pickle._Pickler):
    """Writes pickles as the CIFAR authors' Python 2 did: protocol 2, every string a byte string,
    arrays rebuilt by ``numpy.core.multiarray._reconstruct``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = save_py2_string

    def save_global(self, obj, name=None):
        if obj is np.empty(0).__reduce__()[0]:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle(path: Path, obj) -> None:
    with open(path, "wb") as file:
        Python2Pickler(file, protocol=2).dump(obj)


def write_cifar(folder: Path, per_batch: int = 3) -> Path:
    """A fake ``cifar-10-batches-py``: pixel (c, y, x) of image i is i + c, stored channel-major."""
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for number, name in enumerate(names):
        first = number * per_batch
        data = np.stack([np.repeat(np.arange(3, dtype=np.uint8) + i, 1024) for i in
                         range(first, first + per_batch)])
        py2_pickle(folder / name, {"batch_label": name, "data": data,
                                   "labels": [i % 10 for i in range(first, first + per_batch)],
                                   "filenames": [f"{i}.png" for i in range(first, first + per_batch)]})
    py2_pickle(folder / "batches.meta", {"label_names": list(CIFAR10_CLASSES),
                                         "num_cases_per_batch": per_batch, "num_vis": 3072})
    return folder


def check_tree_splits(splits: DatasetSplits, channels: int = 3) -> None:
    assert splits.train.classes == CLASSES and splits.test.classes == CLASSES
    assert splits.train.images.shape == (len(CLASSES) * TRAIN_PER_CLASS, channels, SIZE, SIZE)
    assert splits.test.images.shape == (len(CLASSES) * TEST_PER_CLASS, channels, SIZE, SIZE)
    assert splits.train.labels.tolist() == [i // TRAIN_PER_CLASS for i in range(12)]
    assert splits.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # train/dog/002.png: label 1, index 2, so its first channel is 40 + 10
    assert int(splits.train.images[TRAIN_PER_CLASS + 2, 0, 0, 0]) == 50
    assert len(splits.checksum) == 64


# -- layouts -----------------------------------------------------------------------------------


def test_image_folder_loads(tmp_path):
    root = write_tree(tmp_path / "data", tree_files())
    splits = load_dataset(root, tmp_path / "cache")
    check_tree_splits(splits)
    assert splits.spec == str(root)
    assert int(splits.train.images[0, 1, 0, 0]) == 255  # green channel of train/cat/000.png


@pytest.mark.parametrize("prefix", ["", "my-dataset/"])
def test_zip_loads_with_or_without_a_wrapping_folder(tmp_path, prefix):
    archive = write_zip(tmp_path / "data.zip", tree_files(), prefix)
    check_tree_splits(load_dataset(str(archive), tmp_path / "cache"))


def test_zip_checksum_is_the_sha256_of_the_file(tmp_path):
    archive = write_zip(tmp_path / "data.zip", tree_files())
    expected = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert load_dataset(archive, tmp_path / "cache").checksum == expected


@pytest.mark.parametrize("nested", [False, True])
def test_cifar_batches_load_from_the_folder_or_its_parent(tmp_path, nested):
    folder = write_cifar(tmp_path / "cifar" / "cifar-10-batches-py")
    splits = load_dataset(folder.parent if nested else folder, tmp_path / "cache")
    assert splits.train.classes == CIFAR10_CLASSES
    assert splits.train.images.shape == (15, 3, 32, 32) and splits.test.images.shape == (3, 3, 32, 32)
    assert splits.train.labels.tolist() == [i % 10 for i in range(15)]
    assert splits.test.labels.tolist() == [5, 6, 7]
    # channel-major rows: image 4 has value 4 + c in every pixel of channel c
    assert splits.train.images[4, :, 5, 7].tolist() == [4, 5, 6]
    assert splits.test.images[0, 2].unique().tolist() == [17]


def test_grayscale_stays_one_channel_only_when_every_image_is_gray(tmp_path):
    gray = load_dataset(write_tree(tmp_path / "gray", tree_files(("L",))), tmp_path / "cache")
    check_tree_splits(gray, channels=1)
    mixed = load_dataset(write_tree(tmp_path / "mixed", tree_files(("L", "RGB"))), tmp_path / "cache")
    check_tree_splits(mixed, channels=3)
    gray_image = mixed.train.images[0]  # train/cat/000.png is grayscale: its channels are equal
    assert (gray_image[0] == gray_image[1]).all() and (gray_image[0] == gray_image[2]).all()


def test_cifar10_class_names_keep_cifar10_label_order(tmp_path):
    files = {f"{split}/{name}/0.png": image_bytes(0, 0) for split in ("train", "test")
             for name in reversed(CIFAR10_CLASSES)}
    splits = load_dataset(write_tree(tmp_path / "data", files), tmp_path / "cache")
    assert splits.train.classes == CIFAR10_CLASSES
    assert splits.train.labels.tolist() == list(range(10))


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    files = tree_files()
    files.update({"train/cat/.DS_Store": b"junk", "train/notes.txt": b"hi", "test/dog/info.csv": b"a,b",
                  "__MACOSX/train/cat/._000.png": b"junk"})
    check_tree_splits(load_dataset(write_zip(tmp_path / "data.zip", files), tmp_path / "cache"))


# -- cache -------------------------------------------------------------------------------------


def forbid_decoding(monkeypatch):
    def fail(*args):
        raise AssertionError("decoded again although the cache holds the arrays")
    monkeypatch.setattr(sources, "_decode_image", fail)
    monkeypatch.setattr(sources, "_unpickle", fail)


@pytest.mark.parametrize("layout", ["folder", "zip", "cifar"])
def test_second_load_reads_the_cache_and_does_not_decode(tmp_path, monkeypatch, layout):
    if layout == "cifar":
        spec = write_cifar(tmp_path / "cifar-10-batches-py")
    elif layout == "zip":
        spec = write_zip(tmp_path / "data.zip", tree_files())
    else:
        spec = write_tree(tmp_path / "data", tree_files())
    cache = tmp_path / "cache"
    first = load_dataset(spec, cache)
    assert [path.name for path in cache.iterdir()] == [f"dataset-{first.checksum}-v1.npz"]
    forbid_decoding(monkeypatch)
    second = load_dataset(spec, cache)
    assert second.checksum == first.checksum
    assert second.train.classes == first.train.classes
    for split in ("train", "test"):
        assert getattr(second, split).images.equal(getattr(first, split).images)
        assert getattr(second, split).labels.equal(getattr(first, split).labels)


def test_cache_dir_defaults_to_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("RNP_CACHE_DIR", str(tmp_path / "env-cache"))
    splits = load_dataset(write_tree(tmp_path / "data", tree_files()))
    assert (tmp_path / "env-cache" / f"dataset-{splits.checksum}-v1.npz").is_file()


def test_corrupt_cache_entry_is_ignored_and_rewritten(tmp_path):
    root = write_tree(tmp_path / "data", tree_files())
    cache = tmp_path / "cache"
    entry = cache / f"dataset-{load_dataset(root, cache).checksum}-v1.npz"
    entry.write_bytes(b"PK\x03\x04 not really a zip")
    check_tree_splits(load_dataset(root, cache))
    with np.load(entry, allow_pickle=False) as stored:
        assert stored["train_images"].shape == (12, 3, SIZE, SIZE)


def test_checksum_follows_content_not_timestamps(tmp_path):
    root = write_tree(tmp_path / "data", tree_files())
    cache = tmp_path / "cache"
    checksum = load_dataset(root, cache).checksum
    target = root / "train" / "dog" / "001.png"
    os.utime(target, ns=(1, 1))
    assert load_dataset(root, cache).checksum == checksum
    target.write_bytes(image_bytes(2, 3))
    changed = load_dataset(root, cache)
    assert changed.checksum != checksum
    assert int(changed.train.images[TRAIN_PER_CLASS + 1, 0, 0, 0]) == 95


# -- unsafe pickles ----------------------------------------------------------------------------


class RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_calls_a_function_is_refused_without_running_it(tmp_path):
    folder = write_cifar(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "pwned"
    py2_pickle(folder / "data_batch_2", {"data": RunsACommand(marker), "labels": []})
    with pytest.raises(RnpError, match=r"refusing to load .*data_batch_2.*system"):
        load_dataset(folder, tmp_path / "cache")
    assert not marker.exists()


# -- errors ------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(RnpError, match="not found"):
        load_dataset(tmp_path / "nowhere", tmp_path / "cache")


@pytest.mark.parametrize("layout", ["folder", "file", "zip"])
def test_unknown_layout_names_the_accepted_ones(tmp_path, layout):
    if layout == "folder":
        spec = write_tree(tmp_path / "data", {"images/cat/0.png": image_bytes(0, 0)})
    elif layout == "file":
        spec = tmp_path / "data.npz"
        spec.write_bytes(b"not a dataset")
    else:
        spec = write_zip(tmp_path / "data.zip", {"images/cat/0.png": image_bytes(0, 0)})
    with pytest.raises(RnpError, match="cifar-10-batches-py.*train/<class>/.*zip"):
        load_dataset(spec, tmp_path / "cache")


@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_split(tmp_path, split):
    files = {name: data for name, data in tree_files().items() if not name.startswith(split)}
    with pytest.raises(RnpError, match=f"no {split}/ folder"):
        load_dataset(write_tree(tmp_path / "data", files), tmp_path / "cache")


def test_test_class_missing_from_train(tmp_path):
    files = tree_files()
    files["test/zebra/0.png"] = image_bytes(0, 0)
    with pytest.raises(RnpError, match="train/ lacks: zebra"):
        load_dataset(write_tree(tmp_path / "data", files), tmp_path / "cache")


@pytest.mark.parametrize("files", [
    {"train/cat/readme.txt": b"", "test/cat/readme.txt": b""},
    {**tree_files(), "train/emu/readme.txt": b""},
])
def test_no_images(tmp_path, files):
    with pytest.raises(RnpError, match="no images in train/"):
        load_dataset(write_tree(tmp_path / "data", files), tmp_path / "cache")


def test_undecodable_image_is_named(tmp_path):
    files = tree_files()
    files["train/dog/002.png"] = b"not an image at all"
    with pytest.raises(RnpError, match=r"cannot decode .*train/dog/002\.png"):
        load_dataset(write_zip(tmp_path / "data.zip", files), tmp_path / "cache")


def test_image_of_another_size_is_named(tmp_path):
    files = tree_files()
    files["test/frog/001.png"] = image_bytes(2, 1, size=SIZE + 1)
    with pytest.raises(RnpError, match=r"test/frog/001\.png is 9x9 pixels .* 8x8"):
        load_dataset(write_tree(tmp_path / "data", files), tmp_path / "cache")


def test_corrupt_zip(tmp_path):
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(RnpError, match="corrupt zip"):
        load_dataset(archive, tmp_path / "cache")


def test_corrupt_zip_member(tmp_path):
    archive = write_zip(tmp_path / "data.zip", tree_files())
    data = bytearray(archive.read_bytes())
    start = data.index(b"\x89PNG")  # the first member's bytes, stored uncompressed
    data[start + 20:start + 24] = b"\xff" * 4
    archive.write_bytes(bytes(data))
    with pytest.raises(RnpError, match="corrupt zip.*CRC"):
        load_dataset(archive, tmp_path / "cache")


def test_incomplete_cifar_folder(tmp_path):
    folder = write_cifar(tmp_path / "cifar-10-batches-py")
    (folder / "test_batch").unlink()
    with pytest.raises(RnpError, match="lacks CIFAR-10 files: test_batch"):
        load_dataset(folder, tmp_path / "cache")


def test_truncated_cifar_batch(tmp_path):
    folder = write_cifar(tmp_path / "cifar-10-batches-py")
    (folder / "data_batch_1").write_bytes((folder / "data_batch_1").read_bytes()[:500])
    with pytest.raises(RnpError, match="cannot read .*data_batch_1"):
        load_dataset(folder, tmp_path / "cache")


# -- demo --------------------------------------------------------------------------------------


def test_demo_dataset_loads(tmp_path):
    assert DEMO_DATASET_PATH.is_file()
    splits = load_demo(tmp_path / "cache")
    assert splits.train.classes == CIFAR10_CLASSES
    assert splits.train.images.shape == (5000, 3, 32, 32)
    assert splits.test.images.shape == (1000, 3, 32, 32)
    assert splits.train.labels.bincount().tolist() == [500] * 10
    assert splits.test.labels.bincount().tolist() == [100] * 10
