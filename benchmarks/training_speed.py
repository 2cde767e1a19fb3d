"""Training throughput of rnp's PreAct-ResNet18 on this CPU: float32 vs bfloat16 autocast, with
contiguous (NCHW) or channels-last (NHWC) weights, at several widths.

    python benchmarks/training_speed.py --threads 1
    python benchmarks/training_speed.py --threads 1 --widths 32 --epoch-images 2048

"step" is the raw training step (forward, backward, SGD update) on one fixed batch, so only the
arithmetic counts. "epoch" runs :func:`rnp.training.train` for one epoch over random uint8
images through the package's own batching and augmentation, so the data pipeline counts too;
the last column is epoch / step, which should stay near 1 (the pipeline must not cap training).
Speed choices differ between machines of the same kind: measure here before relying on them.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from rnp.data.images import ImageSet
from rnp.models import build_model
from rnp.training import TrainConfig, train

VARIANTS = (("float32", False, False), ("float32", False, True), ("bfloat16", True, False),
            ("bfloat16", True, True))


def step_rate(width: int, amp: bool, channels_last: bool, batch: int, steps: int) -> float:
    """Images per second of the raw training step, after two warm-up steps."""
    model = build_model("preact_resnet18", num_classes=10, width=width).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for index in range(steps + 2):
        if index == 2:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def epoch_rate(width: int, amp: bool, channels_last: bool, batch: int, images: int) -> float:
    """Images per second of one whole epoch of :func:`rnp.training.train` (crop and flip on)."""
    generator = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=generator),
                    torch.arange(images) % 10, tuple(map(str, range(10))))
    model = build_model("preact_resnet18", num_classes=10, width=width)
    config = TrainConfig(epochs=1, batch_size=batch, amp="on" if amp else "off", channels_last=channels_last)
    start = time.perf_counter()
    train(model, data, config, progress=False)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    parser.add_argument("--epoch-images", type=int, default=0,
                        help="also time one epoch of train() over this many images (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = "| width | precision | layout | step img/s | epoch img/s | epoch / step |"
    print(f"{args.threads} thread(s), batch {args.batch_size}\n\n{header}\n|---|---|---|---|---|---|")
    for width in args.widths:
        for precision, amp, channels_last in VARIANTS:
            step = step_rate(width, amp, channels_last, args.batch_size, args.steps)
            epoch = (epoch_rate(width, amp, channels_last, args.batch_size, args.epoch_images)
                     if args.epoch_images else None)
            ratio = f"{epoch / step:.2f}" if epoch else "-"
            print(f"| {width} | {precision} | {'channels_last' if channels_last else 'contiguous'} "
                  f"| {step:.0f} | {f'{epoch:.0f}' if epoch else '-'} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
