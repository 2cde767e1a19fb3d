"""RNP's end-to-end seconds against its cost floor, on cached CIFAR-10 subjects.

The floor (:mod:`rnp.bench.cost`) is the plain optimisation RNP cannot avoid: as many images'
worth of forward + backward + SGD steps, all weights trainable, as RNP's unlearning steps and
recovering epochs pass through the model. It is timed in the same process, on the same model,
right after each RNP run, so the ratio (RNP seconds / floor seconds) is taken under the same
machine load. Each subject is the cached PreAct-ResNet18 (width 16, 10 epochs) of
``attacks_cifar10.py`` with 500 clean images (seed 0) from its clean pool; RNP runs with its
default config. With ``--repeats`` runs per subject the table shows medians (the ratio is the
median of the per-run ratios). Every repeat must give the same result (pruned model, masks,
pruning report), which is checked; ``--fingerprint`` writes them to a JSON file so that two
versions of RNP can be compared.

    python benchmarks/rnp_cost.py --threads 1 --subjects badnets blend wanet
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from rnp import RNP
from rnp.attacks import ATTACKS
from rnp.bench.cost import optimisation_floor, rnp_floor_images
from rnp.bench.subjects import cached_subject
from rnp.bench.suite import suite_attack
from rnp.data import select_clean_subset
from rnp.io.runs import load_run
from rnp.training import TrainConfig

STAGES = ("unlearn", "recover", "prune")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10/cifar10-jpeg.zip")
    parser.add_argument("--cache", default="benchmarks/cache")
    parser.add_argument("--subjects", nargs="+", default=["badnets", "blend", "wanet"], choices=sorted(ATTACKS))
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of the cached subjects")
    parser.add_argument("--clean-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="runs per subject; medians are reported")
    parser.add_argument("--threads", type=int, help="torch threads (1 when jobs run side by side)")
    parser.add_argument("--channels-last", action="store_true",
                        help="RNP with channels_last=True (the floor stays the model's own layout)")
    parser.add_argument("--fingerprint", help="write each subject's RNP result digest to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, prints = [], {}
    for name in args.subjects:
        row, prints[name] = measure(args, name)
        rows.append(row)
        print(f"[{name}] done: ratio {row['ratio']:.3f}", file=sys.stderr, flush=True)
    print(table(rows, args))
    if args.fingerprint:
        Path(args.fingerprint).write_text(json.dumps(prints, indent=1) + "\n")


def measure(args, name: str) -> tuple[dict, dict]:
    """RNP then its floor, ``--repeats`` times on one subject; medians and the result digest."""
    run_dir = cached_subject(args.cache, args.data, suite_attack(name), arch="preact_resnet18", width=16,
                             config=TrainConfig(epochs=args.epochs), cache_dir=Path(args.cache) / "data",
                             progress=False, log=lambda line: print(f"[{name}] {line}", file=sys.stderr))
    run = load_run(run_dir, cache_dir=Path(args.cache) / "data")
    pool, exclude = run.clean_pool()
    clean, _ = select_clean_subset(pool, args.clean_size, seed=0, exclude=exclude)
    runs, digests = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = RNP(channels_last=args.channels_last).fit(run.model, clean)
        seconds = time.perf_counter() - start
        images = rnp_floor_images(result)
        floor = optimisation_floor(run.model, clean, images=images, batch_size=result.report["config"]["batch_size"])
        runs.append({"seconds": seconds, "floor": floor, "ratio": seconds / floor, "images": images,
                     **{stage: result.timings[stage] for stage in STAGES}})
        digests.append(fingerprint(result))
    if any(d != digests[0] for d in digests):
        raise SystemExit(f"{name}: RNP gave different results across repeats")
    row = {"subject": name, "images": runs[0]["images"], "pruned": result.report["pruning"]["pruned"]}
    for key in ("seconds", "floor", "ratio", *STAGES):
        row[key] = statistics.median(r[key] for r in runs)
    return row, digests[0]


def fingerprint(result) -> dict:
    """What must not change when RNP gets faster: masks, order, pruned weights, the decision."""
    def digest(tensors) -> str:
        sha = hashlib.sha256()
        for tensor in tensors:
            sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return sha.hexdigest()[:16]

    report = result.report
    return {"masks": digest([result.masks.values]), "order": digest([result.artifacts["order"]]),
            "pruned_model": digest(result.model.state_dict().values()),
            "unlearned_model": digest(result.unlearned_model.state_dict().values()),
            "unlearning_steps": report["unlearning"]["steps"], "pruning": report["pruning"],
            "mask_summary": report["masks"]}


def table(rows: list[dict], args) -> str:
    setting = "channels_last=True" if args.channels_last else "default config"
    lines = [f"RNP ({setting}) vs its optimisation floor; median of {args.repeats} runs, "
             f"{torch.get_num_threads()} thread(s), {args.clean_size} clean images", "",
             "| subject | floor images | pruned | RNP s | unlearn s | recover s | prune s | floor s | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['subject']} | {r['images']} | {r['pruned']} | {r['seconds']:.1f} | "
                     f"{r['unlearn']:.1f} | {r['recover']:.1f} | {r['prune']:.2f} | {r['floor']:.1f} | "
                     f"{r['ratio']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
