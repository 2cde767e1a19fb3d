"""The attack suite on full CIFAR-10: does each backdoor take hold at our CPU scale?

Trains a clean PreAct-ResNet18 (width 16) and one backdoored copy per attack, the same way
(same epochs, schedule, seed), each at the attack's usual poisoning rate (its class default,
from its paper) with target 0; every model is cached under --cache by its full spec. Prints
CA, ASR and RA of each model, its CA gap to the clean model, whether it meets the suite's bar
(ASR >= 90% and CA within 3 points of clean), and the seconds spent fitting the attack
(generators, adversarial perturbations) and training.

    python benchmarks/attacks_cifar10.py --epochs 10
    python benchmarks/attacks_cifar10.py --epochs 10 --attacks wanet sig --threads 1 --train-only

Run several --train-only processes side by side (one thread each), then once more without
--train-only to print the table from the cache.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from rnp.attacks import ATTACKS, attack_from_spec
from rnp.bench.subjects import cached_subject
from rnp.bench.suite import CPU_REDUCTIONS, suite_attack
from rnp.io.files import read_json
from rnp.training import TrainConfig

ASR_BAR, CA_GAP_BAR = 0.90, 0.03


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10/cifar10-jpeg.zip")
    parser.add_argument("--cache", default="benchmarks/cache")
    parser.add_argument("--attacks", nargs="+", default=sorted(ATTACKS), choices=sorted(ATTACKS))
    parser.add_argument("--rate", action="append", default=[], metavar="ATTACK=RATE",
                        help="poisoning rate for one attack instead of its default (repeatable)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--paper-settings", action="store_true",
                        help="no CPU reductions of generator-based attacks (hours on a CPU)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--threads", type=int, help="torch threads (1 per job when jobs run side by side)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rates = dict(item.split("=", 1) for item in args.rate)
    config = TrainConfig(epochs=args.epochs)
    common = dict(arch="preact_resnet18", width=args.width, config=config,
                  cache_dir=Path(args.cache) / "data", progress=False)

    def subject(name: str | None) -> Path:
        attack = None
        if name is not None:
            params = {"poison_rate": float(rates[name])} if name in rates else {}
            attack = suite_attack(name, reduced=not args.paper_settings, **params)
        label = name or "clean"
        return cached_subject(args.cache, args.data, attack,
                              log=lambda line: print(f"[{label}] {line}", file=sys.stderr, flush=True),
                              **common)

    clean = read_json(subject(None) / "metrics.json")
    rows = [{**row("clean", None, clean, clean), "poisoning": "-"}]
    for name in args.attacks:
        run = subject(name)
        spec = read_json(run / "run.json")["attack"]
        rows.append({**row(name, spec, read_json(run / "metrics.json"), clean),
                     "poisoning": attack_from_spec(spec).describe_poisoning()})
    if args.train_only:
        return
    print(table(rows, args.epochs, args.width))
    if not args.paper_settings:
        print("\nCPU reductions: " + "; ".join(f"{name} {params}" for name, params in CPU_REDUCTIONS.items()
                                                if name in args.attacks))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def row(name: str, spec: dict | None, metrics: dict, clean: dict) -> dict:
    gap = clean["clean_accuracy"] - metrics["clean_accuracy"]
    asr = metrics.get("attack_success_rate")
    return {"attack": name, "mode": spec["mode"] if spec else "-",
            "poison_rate": spec["poison_rate"] if spec else 0.0,
            "clean_accuracy": metrics["clean_accuracy"], "attack_success_rate": asr,
            "robust_accuracy": metrics.get("robust_accuracy"), "ca_gap": gap,
            "meets_bar": None if spec is None else bool(asr >= ASR_BAR and gap <= CA_GAP_BAR),
            "prepare_seconds": metrics.get("attack_prepare_seconds", 0.0),
            "train_seconds": metrics["train_seconds_this_session"]}


def table(rows: list[dict], epochs: int, width: int) -> str:
    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}"

    lines = [f"PreAct-ResNet18 width {width}, {epochs} epochs, CIFAR-10, target 0",
             "",
             "| attack | mode | poisoning rate | CA | ASR | RA | CA drop vs clean | ASR>=90 and drop<=3 | "
             "attack fit s | training s |",
             "|" + "---|" * 10]
    for r in rows:
        verdict = "-" if r["meets_bar"] is None else ("yes" if r["meets_bar"] else "**no**")
        lines.append(f"| {r['attack']} | {r['mode']} | {r['poisoning']} | {pct(r['clean_accuracy'])} | "
                     f"{pct(r['attack_success_rate'])} | {pct(r['robust_accuracy'])} | "
                     f"{100 * r['ca_gap']:+.1f} | {verdict} | {r['prepare_seconds']:.0f} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
