"""Datasets from a path: CIFAR-10 batches, image folders or a zip of them, decoded once and cached.

A dataset spec is a path to one of three layouts:

- CIFAR-10 as torchvision downloads it: the ``cifar-10-batches-py`` folder or its parent;
- an image-folder tree ``train/<class>/*.png|jpg|jpeg|bmp`` and ``test/<class>/*``;
- a ``.zip`` of such a tree, possibly wrapped in one top-level folder.

Classes are the sorted class folder names (CIFAR-10's names sort into CIFAR-10's label order,
so a CIFAR-10 image tree gets the standard labels) and files are read in name order, so a
dataset always decodes to the same arrays. Decoding tens of thousands of files takes seconds,
so the arrays are stored once as a ``.npz`` in the cache directory, named by a sha256 of the
dataset's content: a changed file gets a new entry, a renamed or touched copy reuses the old one.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rnp.data.images import ImageSet
from rnp.errors import RnpError

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png")
CIFAR_DIR_NAME = "cifar-10-batches-py"

_SPLITS = ("train", "test")
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_FILES = (*_CIFAR_TRAIN_FILES, "test_batch", "batches.meta")
_GRAY_MODES = ("1", "L", "LA")
_CACHE_FORMAT = 1  # bump when the decoded arrays change, so stale cache entries are not reused
_LAYOUTS = (f"a CIFAR-10 '{CIFAR_DIR_NAME}' folder (or its parent), a folder holding "
            "train/<class>/ and test/<class>/ image folders, or a .zip of such a folder")

Reader = Callable[[str], bytes]
Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train and test sets, the spec they came from and the sha256 of its content."""

    train: ImageSet
    test: ImageSet
    spec: str
    checksum: str


@dataclass(frozen=True)
class _Source:
    """A recognised dataset on disk: how to hash its content and how to decode its arrays."""

    checksum: Callable[[], str]
    decode: Callable[[], Arrays]


def load_dataset(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> DatasetSplits:
    """Loads the train and test sets at ``spec``, decoding them only if no cache entry exists.

    ``cache_dir`` defaults to ``$RNP_CACHE_DIR``, else ``~/.cache/rnp``. Raises :class:`RnpError`
    for a missing path, an unknown layout, a malformed tree or a file that cannot be read.
    """
    source = _open_source(Path(spec).expanduser())
    checksum = source.checksum()
    cache_file = _cache_root(cache_dir) / f"dataset-{checksum}-v{_CACHE_FORMAT}.npz"
    splits = _read_cache(cache_file)
    if splits is None:
        arrays = source.decode()
        _write_cache(cache_file, arrays)
        splits = _to_splits(arrays)
    return DatasetSplits(*splits, spec=os.fspath(spec), checksum=checksum)


def _open_source(path: Path) -> _Source:
    """Recognises the layout at ``path`` and checks its structure, without decoding anything."""
    if path.is_dir():
        cifar = _cifar_folder(path)
        return _cifar_source(cifar) if cifar else _folder_source(path)
    if path.is_file() and path.suffix.lower() == ".zip":
        return _zip_source(path)
    if path.exists():
        raise RnpError(f"{path} is not a dataset rnp can read; give {_LAYOUTS}")
    raise RnpError(f"dataset not found: {path}")


# -- image trees -------------------------------------------------------------------------------


def _folder_source(root: Path) -> _Source:
    """An image-folder tree on disk; its checksum hashes the names and bytes of its images."""
    tree = _image_tree(_folder_names(root), str(root))
    read = partial(_read_file, root)
    names = sorted(name for classes in tree.values() for files in classes.values() for name in files)
    return _Source(partial(_files_checksum, names, read), partial(_decode_tree, tree, read, str(root)))


def _folder_names(root: Path) -> list[str]:
    """Relative names of the folders (ending in ``/``) and files under ``root/train`` and ``root/test``."""
    names = []
    for split in _SPLITS:
        for folder, _, files in os.walk(root / split):
            relative = Path(folder).relative_to(root).as_posix()
            names.append(relative + "/")
            names.extend(f"{relative}/{file}" for file in files)
    if not names:
        raise RnpError(f"{root} is not a dataset rnp can read; give {_LAYOUTS}")
    return names


def _read_file(root: Path, name: str) -> bytes:
    """The bytes of ``root/name``; an unreadable file is the user's to fix, so it is an RnpError."""
    try:
        return (root / name).read_bytes()
    except OSError as error:
        raise RnpError(f"cannot read {root / name}: {error.strerror or error}") from None


def _zip_source(path: Path) -> _Source:
    """A zip of an image-folder tree; its checksum is the sha256 of the zip file."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if _visible(name)]
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise RnpError(f"{path} is a corrupt zip file ({error})") from None
    root = _zip_root(names)
    if root is None:
        raise RnpError(f"{path} is not a dataset rnp can read; give {_LAYOUTS}")
    where = f"{path}/{root}".rstrip("/")
    tree = _image_tree((name[len(root):] for name in names if name.startswith(root)), where)
    return _Source(partial(_file_checksum, path), partial(_decode_zip, path, root, tree, where))


def _zip_root(names: list[str]) -> str | None:
    """The prefix under which a zip holds ``train/`` and ``test/``: none, or one wrapping folder."""
    tops = {name.split("/", 1)[0] for name in names}
    if tops & set(_SPLITS):
        return ""
    if len(tops) == 1:
        root = f"{tops.pop()}/"
        if any(name[len(root):].split("/", 1)[0] in _SPLITS for name in names):
            return root
    return None


def _decode_zip(path: Path, root: str, tree: dict, where: str) -> Arrays:
    """Decodes an image tree from the members of a zip, keeping the zip open while it reads."""
    with zipfile.ZipFile(path) as archive:
        def read(name: str) -> bytes:
            try:
                return archive.read(root + name)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as error:
                raise RnpError(f"{path} is a corrupt zip file ({root + name}: {error})") from None
        return _decode_tree(tree, read, where)


def _visible(name: str) -> bool:
    """False for hidden files and folders and for the ``__MACOSX`` folder macOS adds to zips."""
    return not any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def _image_tree(names: Iterable[str], where: str) -> dict[str, dict[str, list[str]]]:
    """Groups names ``split/class/.../file`` into ``{split: {class: sorted image names}}`` and checks it.

    Folder names end in ``/``: a class folder counts even when it holds no image, so that it
    is reported rather than silently dropped.
    """
    tree: dict[str, dict[str, list[str]]] = {}
    for name in names:
        is_folder = name.endswith("/")
        parts = name.rstrip("/").split("/")
        if parts[0] not in _SPLITS or not _visible(name):
            continue
        classes = tree.setdefault(parts[0], {})
        if len(parts) > 2 or (len(parts) == 2 and is_folder):
            files = classes.setdefault(parts[1], [])
            if len(parts) > 2 and not is_folder and name.lower().endswith(IMAGE_SUFFIXES):
                files.append(name)
    _check_tree(tree, where)
    for classes in tree.values():
        for files in classes.values():
            files.sort()
    return tree


def _check_tree(tree: dict[str, dict[str, list[str]]], where: str) -> None:
    """Raises :class:`RnpError` unless both splits hold images and every class has training images."""
    accepted = ", ".join(IMAGE_SUFFIXES)
    for split in _SPLITS:
        if split not in tree:
            raise RnpError(f"{where} has no {split}/ folder; an image-folder dataset needs "
                           "train/<class>/ and test/<class>/ folders of images")
    unknown = sorted(set(tree["test"]) - set(tree["train"]))
    if unknown:
        raise RnpError(f"{where}: test/ has class folders that train/ lacks: {', '.join(unknown)}")
    for split in _SPLITS:
        if not any(tree[split].values()):
            raise RnpError(f"{where}: no images in {split}/<class>/ folders (accepted: {accepted})")
    empty = sorted(name for name, files in tree["train"].items() if not files)
    if empty:
        raise RnpError(f"{where}: no images in train/{empty[0]}/ (accepted: {accepted})")


def _decode_tree(tree: dict[str, dict[str, list[str]]], read: Reader, where: str) -> Arrays:
    """Decodes both splits; labels index the sorted training class names.

    Images become RGB unless every image of both splits is grayscale, which keeps one channel.
    """
    classes = sorted(tree["train"])
    arrays: Arrays = {"classes": np.array(classes)}
    size, all_gray = None, True
    for split in _SPLITS:
        files = [(name, label) for label, class_name in enumerate(classes)
                 for name in tree[split].get(class_name, ())]
        images, gray = _decode_files([name for name, _ in files], read, where, size)
        size, all_gray = images.shape[2:], all_gray and gray
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = np.array([label for _, label in files], dtype=np.int64)
    if all_gray:
        for split in _SPLITS:
            arrays[f"{split}_images"] = np.ascontiguousarray(arrays[f"{split}_images"][:, :1])
    return arrays


def _decode_files(names: list[str], read: Reader, where: str,
                  size: tuple[int, int] | None) -> tuple[np.ndarray, bool]:
    """Decodes images into one ``(N, 3, H, W)`` uint8 array; also says whether all were grayscale.

    ``size`` is the ``(H, W)`` every image must have; ``None`` takes it from the first image.
    """
    images, all_gray = None, True
    for index, name in enumerate(names):
        pixels = _decode_image(read(name), f"{where}/{name}")
        if images is None:
            size = size or pixels.shape[:2]
            images = np.empty((len(names), 3, *size), dtype=np.uint8)
        if pixels.shape[:2] != size:
            raise RnpError(f"{where}/{name} is {pixels.shape[1]}x{pixels.shape[0]} pixels but the "
                           f"other images are {size[1]}x{size[0]}; all images must have one size")
        images[index] = pixels.transpose(2, 0, 1)  # a grayscale image fills all three channels
        all_gray = all_gray and pixels.shape[2] == 1
    return images, all_gray


def _decode_image(data: bytes, name: str) -> np.ndarray:
    """Decodes one image file to ``(H, W, C)`` uint8: one channel if grayscale, else RGB."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode = "L" if image.mode in _GRAY_MODES else "RGB"
            pixels = np.asarray(image if image.mode == mode else image.convert(mode))
    except UnidentifiedImageError:
        raise RnpError(f"cannot decode {name}: not a PNG, JPEG or BMP image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise RnpError(f"cannot decode {name}: {error}") from None
    return pixels[..., None] if pixels.ndim == 2 else pixels


# -- CIFAR-10 batches --------------------------------------------------------------------------


def _cifar_folder(path: Path) -> Path | None:
    """The ``cifar-10-batches-py`` folder at or directly under ``path``, if there is one."""
    for folder in (path, path / CIFAR_DIR_NAME):
        if any((folder / name).is_file() for name in _CIFAR_FILES):
            return folder
    return None


def _cifar_source(folder: Path) -> _Source:
    """CIFAR-10 in the authors' pickled batches; its checksum hashes the names and bytes of the batches."""
    missing = [name for name in _CIFAR_FILES if not (folder / name).is_file()]
    if missing:
        raise RnpError(f"{folder} lacks CIFAR-10 files: {', '.join(missing)}")
    read = partial(_read_file, folder)
    return _Source(partial(_files_checksum, _CIFAR_FILES, read), partial(_decode_cifar, folder))


def _decode_cifar(folder: Path) -> Arrays:
    """Reads the five training batches, the test batch and the class names."""
    meta = _unpickle(folder / "batches.meta")
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(name, bytes) for name in names):
        raise RnpError(f"{folder / 'batches.meta'} has no list of label names")
    train = [_cifar_batch(folder / name) for name in _CIFAR_TRAIN_FILES]
    test_images, test_labels = _cifar_batch(folder / "test_batch")
    return {"classes": np.array([name.decode() for name in names]),
            "train_images": np.concatenate([images for images, _ in train]),
            "train_labels": np.concatenate([labels for _, labels in train]),
            "test_images": test_images, "test_labels": test_labels}


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch: images ``(N, 3, 32, 32)`` uint8 (a view of the stored rows) and int64 labels."""
    batch = _unpickle(path)
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != 3 * 32 * 32 or not isinstance(labels, list)
            or len(labels) != len(data)):
        raise RnpError(f"{path} is not a CIFAR-10 batch (expected uint8 'data' of shape (N, 3072) "
                       "and N 'labels')")
    return data.reshape(-1, 3, 32, 32), np.array(labels, dtype=np.int64)


class _ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle names a function or class that is not on the allowed list."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays, and refuses every other global.

    Loading a pickle can call any function it names, so plain :func:`pickle.load` on a file
    runs whatever the file says. CIFAR-10's batches only need numpy's array reconstruction
    (named ``numpy.core`` by numpy 1 and ``numpy._core`` by numpy 2); nothing else resolves.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[module, name]
        except KeyError:
            raise _ForbiddenGlobal(f"it calls {module}.{name}, and only numpy arrays, "
                                         "dicts, lists, strings and numbers are allowed") from None


def _unpickle(path: Path):
    """Loads a CIFAR batch pickle safely, as Python 2 wrote it (strings stay bytes)."""
    try:
        with open(path, "rb") as file:
            return _ArrayUnpickler(file, encoding="bytes").load()
    except _ForbiddenGlobal as error:
        raise RnpError(f"refusing to load {path}: {error}") from None
    except Exception as error:  # a damaged pickle fails in many ways; all mean the same to a user
        raise RnpError(f"cannot read {path}: {type(error).__name__}: {error}") from None


# -- checksums ---------------------------------------------------------------------------------


def _file_checksum(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(partial(file.read, 1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files_checksum(names: Iterable[str], read: Reader) -> str:
    """sha256 over each name and its bytes, each prefixed by its length so no two sets collide."""
    digest = hashlib.sha256()
    for name in names:
        data = read(name)
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


# -- cache -------------------------------------------------------------------------------------


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir``, else ``$RNP_CACHE_DIR``, else ``~/.cache/rnp``."""
    if cache_dir is None:
        cache_dir = os.environ.get("RNP_CACHE_DIR") or Path.home() / ".cache" / "rnp"
    return Path(cache_dir).expanduser()


def _read_cache(path: Path) -> tuple[ImageSet, ImageSet] | None:
    """The splits stored at ``path``, or ``None`` if there is no entry or it is unreadable."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            return _to_splits({key: stored[key] for key in stored.files})
    except (OSError, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile, RnpError):
        return None


def _write_cache(path: Path, arrays: Arrays) -> None:
    """Stores ``arrays`` at ``path`` atomically: a reader sees the old entry or the whole new one.

    A cache that cannot be written only costs decoding again next time, so it warns.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, **arrays)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as error:
        warnings.warn(f"could not cache the decoded dataset in {path.parent}: {error}", stacklevel=3)


def _to_splits(arrays: Arrays) -> tuple[ImageSet, ImageSet]:
    """Wraps decoded or cached arrays as train and test :class:`ImageSet` without copying pixels."""
    classes = tuple(str(name) for name in arrays["classes"])
    return tuple(ImageSet(torch.from_numpy(arrays[f"{split}_images"]),
                          torch.as_tensor(arrays[f"{split}_labels"], dtype=torch.long), classes)
                 for split in _SPLITS)
