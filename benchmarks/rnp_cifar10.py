"""RNP on full CIFAR-10: backdoored PreAct-ResNet18 (width 16), any attack of the suite.

Each attack poisons at its usual rate (its class default) with target 0. Trains each backdoored
model once (cached under --cache by its full spec; attacks fitted on a clean model get the
clean model trained the same way), then runs RNP with
the fixed threshold and with the automatic clean-data rule over several seeds (each seed draws
its own 500 clean images and seeds RNP), and prints CA / ASR / RA before and after, channels
pruned and seconds per stage as mean +- standard deviation.

    python benchmarks/rnp_cifar10.py --data ../shared/data/cifar10/cifar10-jpeg.zip
    python benchmarks/rnp_cifar10.py --epochs 10 --attacks all --settings "default (auto)"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from rnp import RNP
from rnp.attacks import ATTACKS
from rnp.bench.subjects import cached_subject
from rnp.bench.suite import suite_attack
from rnp.data.clean_subset import select_clean_subset
from rnp.io.runs import load_run
from rnp.metrics import der, evaluate_backdoor
from rnp.training import TrainConfig

SETTINGS = {
    "paper": dict(preset="paper"),
    "default, threshold 0.2": dict(prune_rule="threshold"),
    "default (auto)": dict(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10/cifar10-jpeg.zip")
    parser.add_argument("--cache", default="benchmarks/cache")
    parser.add_argument("--attacks", nargs="+", default=["badnets", "blend"],
                        choices=["all", *sorted(ATTACKS)], help="attacks to test ('all': every one)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--clean-size", type=int, default=500)
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--json", help="write all rows to this JSON file")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="print one table from the rows of earlier --json files and exit")
    parser.add_argument("--threads", type=int, help="torch threads (1 per job when jobs run side by side)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        print(table([row for path in args.merge for row in json.loads(Path(path).read_text())]))
        return

    rows = []
    attacks = sorted(ATTACKS) if "all" in args.attacks else args.attacks
    for attack_name in attacks:
        attack = suite_attack(attack_name)
        run_dir = cached_subject(args.cache, args.data, attack, arch="preact_resnet18", width=args.width,
                                 config=TrainConfig(epochs=args.epochs),
                                 cache_dir=Path(args.cache) / "data", progress=False,
                                 log=lambda line: print(f"[{attack_name}] {line}", file=sys.stderr))
        if args.train_only:
            continue
        run = load_run(run_dir, cache_dir=Path(args.cache) / "data")
        triggered = run.triggered_test()
        before = evaluate_backdoor(run.model, run.data.test, triggered)
        for setting in args.settings:
            for seed in args.seeds:
                pool, exclude = run.clean_pool()
                clean, _ = select_clean_subset(pool, args.clean_size, seed=seed, exclude=exclude)
                start = time.perf_counter()
                result = RNP(**SETTINGS[setting], seed=seed).fit(run.model, clean)
                seconds = time.perf_counter() - start
                after = evaluate_backdoor(result.model, run.data.test, triggered)
                rows.append({"attack": attack_name, "setting": setting, "seed": seed,
                             "before": before.to_dict(), "after": after.to_dict(),
                             "der": der(before, after), "pruned": result.report["pruning"]["pruned"],
                             "unlearn_steps": result.report["unlearning"]["steps"],
                             "seconds": {**result.timings, "total": seconds}})
                print(f"{attack_name:8s} {setting:9s} seed {seed}: CA {after.clean_accuracy:.4f} "
                      f"ASR {after.attack_success_rate:.4f} pruned {rows[-1]['pruned']} "
                      f"{seconds:.1f}s", file=sys.stderr)
    if rows:
        print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def table(rows: list[dict]) -> str:
    def stat(values, scale=100.0):
        values = [v * scale for v in values]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.1f} ± {spread:.1f}"

    lines = ["| attack | RNP setting | CA before | ASR before | RA before | CA after | ASR after | "
             "RA after | DER | channels pruned | unlearn s | recover s | prune s | total s |",
             "|" + "---|" * 14]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["attack"], row["setting"]), []).append(row)
    for (attack, setting), group in groups.items():
        b = group[0]["before"]
        after = lambda key: stat([r["after"][key] for r in group])
        secs = lambda key: stat([r["seconds"][key] for r in group], 1.0)
        lines.append(
            f"| {attack} | {setting} (n={len(group)}) | {100 * b['clean_accuracy']:.1f} | "
            f"{100 * b['attack_success_rate']:.1f} | {100 * b['robust_accuracy']:.1f} | "
            f"{after('clean_accuracy')} | {after('attack_success_rate')} | {after('robust_accuracy')} | "
            f"{stat([r['der'] for r in group])} | {stat([r['pruned'] for r in group], 1.0)} | "
            f"{secs('unlearn')} | {secs('recover')} | {secs('prune')} | {secs('total')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
