"""A picture of every attack's test-time trigger: clean image, triggered image, and the change.

Uses the same cached subjects as ``grids/attacks.yaml`` (so the generator-based attacks show
the generators trained there; a missing subject is trained first) and writes one PNG: a row per
attack with four test images, each as clean | triggered | |difference| amplified 5x.

    python benchmarks/attack_gallery.py --epochs 10 --out docs/attack_gallery.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from rnp.attacks import ATTACKS
from rnp.bench.subjects import cached_subject
from rnp.bench.suite import suite_attack
from rnp.data.images import to_uint8
from rnp.io.files import atomic_path
from rnp.runs import load_run
from rnp.training import TrainConfig

SCALE, AMPLIFY, LABEL_WIDTH = 3, 5.0, 130


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10/cifar10-jpeg.zip")
    parser.add_argument("--cache", default="benchmarks/cache")
    parser.add_argument("--attacks", nargs="+", default=sorted(ATTACKS), choices=sorted(ATTACKS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--out", default="docs/attack_gallery.png")
    args = parser.parse_args()
    rows = []
    for name in args.attacks:
        run_dir = cached_subject(args.cache, args.data, suite_attack(name), arch="preact_resnet18",
                                 width=args.width, config=TrainConfig(epochs=args.epochs),
                                 cache_dir=Path(args.cache) / "data", progress=False,
                                 log=lambda line, name=name: print(f"[{name}] {line}", file=sys.stderr))
        run = load_run(run_dir, cache_dir=Path(args.cache) / "data")
        test = run.data.test
        shown = (test.labels != run.attack.target).nonzero().squeeze(1)[:args.images]
        clean = test.images[shown]
        rows.append((name, clean, run.attack.trigger_uint8(clean)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        gallery(rows).save(tmp, format="PNG")
    print(out)


def gallery(rows: list[tuple[str, torch.Tensor, torch.Tensor]]) -> Image.Image:
    """Composes the rows: for each image, clean | triggered | amplified absolute difference."""
    tiles = [(name, torch.cat([torch.cat([c, t, to_uint8((t.float() - c.float()).abs() / 255 * AMPLIFY)], 2)
                               for c, t in zip(clean, triggered)], 2)) for name, clean, triggered in rows]
    height, width = tiles[0][1].shape[1:]
    gap = 4
    canvas = Image.new("RGB", (LABEL_WIDTH + width * SCALE, len(tiles) * (height * SCALE + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (name, tile) in enumerate(tiles):
        top = row * (height * SCALE + gap)
        picture = Image.fromarray(tile.permute(1, 2, 0).numpy()).resize((width * SCALE, height * SCALE),
                                                                         Image.NEAREST)
        canvas.paste(picture, (LABEL_WIDTH, top))
        draw.text((6, top + height * SCALE // 2 - 6), name, fill="black")
    return canvas


if __name__ == "__main__":
    main()
