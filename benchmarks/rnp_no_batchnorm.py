"""RNP on a model without BatchNorm: where its convolution masks put the backdoor.

Trains (or takes from the cache) VGG-16 without BN, width 16, BadNets at 10%, then runs RNP with
its masks on convolution channels (``mask_layers="auto"`` picks them on this model) under a few
settings, and prints, per setting: the masks at exactly 0, the channels the auto rule pruned,
and an ORACLE ANALYSIS of test CA / ASR after pruning the first N channels of the mask order.
The oracle columns use test data, which a defender does not have; they explain a failure and
choose nothing.

    python benchmarks/rnp_no_batchnorm.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from rnp import RNP
from rnp.bench.subjects import cached_subject
from rnp.bench.suite import suite_attack
from rnp.data import select_clean_subset
from rnp.defenses import prune_channels
from rnp.io.runs import load_run
from rnp.metrics import evaluate_backdoor
from rnp.training import TrainConfig

SETTINGS = {
    "default": {},
    "recover lr 0.002": {"recover_lr": 0.002},
    "recover lr 0.002, unlearn lr 0.001": {"recover_lr": 0.002, "unlearn_lr": 0.001},
    "alpha 1, recover lr 0.002, epoch stop": {"alpha": 1.0, "recover_lr": 0.002, "stop_check": "epoch"},
}
COUNTS = (5, 10, 20, 40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10/cifar10-jpeg.zip")
    parser.add_argument("--cache", default="benchmarks/cache")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.05, help="training learning rate of the subject")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = cached_subject(args.cache, args.data, suite_attack("badnets"), arch="vgg16", width=16,
                             config=TrainConfig(epochs=args.epochs, lr=args.lr),
                             cache_dir=Path(args.cache) / "data", progress=False)
    run = load_run(run_dir, cache_dir=Path(args.cache) / "data")
    triggered = run.triggered_test()
    pool, exclude = run.clean_pool()
    clean, _ = select_clean_subset(pool, 500, seed=0, exclude=exclude)
    before = evaluate_backdoor(run.model, run.data.test, triggered)
    print(f"VGG-16 without BN, BadNets: CA {100 * before.clean_accuracy:.1f}, "
          f"ASR {100 * before.attack_success_rate:.1f}\n")
    header = " | ".join(f"oracle CA / ASR @{n}" for n in COUNTS)
    print(f"| setting | masks = 0 | auto pruned | CA / ASR after | {header} | seconds |")
    print("|---" * (5 + len(COUNTS)) + "|")
    for label, settings in SETTINGS.items():
        start = time.perf_counter()
        result = RNP(**settings).fit(run.model, clean)
        seconds = time.perf_counter() - start
        masks, order = result.masks, result.artifacts["order"]
        after = evaluate_backdoor(result.model, run.data.test, triggered)
        cells = []
        for count in COUNTS:
            pruned = prune_channels(copy.deepcopy(run.model), masks, order[:count])
            oracle = evaluate_backdoor(pruned, run.data.test, triggered)
            cells.append(f"{100 * oracle.clean_accuracy:.1f} / {100 * oracle.attack_success_rate:.1f}")
        print(f"| {label} | {int((masks.values == 0).sum())} of {len(masks)} | "
              f"{result.report['pruning']['pruned']} | {100 * after.clean_accuracy:.1f} / "
              f"{100 * after.attack_success_rate:.1f} | {' | '.join(cells)} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
