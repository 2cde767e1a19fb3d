"""float32 against bfloat16 autocast on this CPU: does the precision change what training and RNP
reach, and how much faster is RNP in bfloat16?

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/amp_parity.py --threads 1

For each seed the subject of ``rnp demo`` (PreAct-ResNet18 width 16, BadNets 10% to class 0,
15 epochs on the packaged 6,000-image CIFAR-10 slice, 500 clean training images held out) is
trained once in float32 and once in bfloat16 (``TrainConfig(amp=...)``). RNP, at its defaults
with the seed, then defends each float32-trained model twice, ``amp`` off and on, on the same
500 held-out images; the float32 optimisation floor (:mod:`rnp.bench.cost`) of the float32 run
is timed right after it. Channels-last stays off in both precisions, as when the documented
numbers were measured (with ``amp`` "on" it would now follow bfloat16), so the kept runs match.
Trained models are kept in ``--runs`` and reused by a later call.

Parity, as issue 14 asks: the mean clean accuracy of the two trainings within 0.5 points, and
RNP's mean CA/ASR after pruning in the two precisions within the seed-to-seed spread (one
standard deviation over the seeds, float32). It depends on the CPU's bfloat16 arithmetic, so
it stays a script, measured per machine, rather than a committed study.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rnp import RNP
from rnp.attacks import build_attack
from rnp.bench.cost import optimisation_floor, rnp_floor_images
from rnp.data.demo import DEMO_DATASET_PATH
from rnp.metrics import evaluate_backdoor
from rnp.runs.folder import load_run
from rnp.runs.training import train_run
from rnp.training import TrainConfig

PRECISIONS = (("float32", "off"), ("bfloat16", "on"))


def train_subject(runs: Path, seed: int, amp: str, args) -> dict:
    """Trains (or reuses) the demo subject of ``seed`` in precision ``amp``; its test metrics and
    training seconds (wall-clock, as the run recorded them, and CPU, 0 for a reused run)."""
    start = time.process_time()
    out = train_run(runs / f"seed{seed}-amp-{amp}", str(DEMO_DATASET_PATH), width=args.width,
                    attack=build_attack("badnets", target=0, poison_rate=0.1),
                    config=TrainConfig(epochs=args.epochs, seed=seed, augment=False, amp=amp, channels_last=False),
                    holdout=args.clean_size, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"path": out, "ca": metrics["clean_accuracy"], "asr": metrics["attack_success_rate"],
            "seconds": metrics["train_seconds_this_session"], "cpu": time.process_time() - start}


def defend(path: Path, seed: int, amp: str, clean_size: int, *, floor: bool) -> dict:
    """RNP at its defaults with ``seed`` and ``amp`` on the run at ``path``: CA/ASR after pruning,
    channels pruned, wall-clock seconds per stage, CPU seconds in all, the images it passed
    forward and backward, and with ``floor`` the CPU seconds of the float32 floor of as many
    images (timed once per model: it does not depend on RNP's precision)."""
    run = load_run(path)
    clean, _ = run.clean_images(clean_size)
    start = time.process_time()
    result = RNP(seed=seed, amp=amp, channels_last=False).fit(run.model, clean)
    cpu = time.process_time() - start
    after = evaluate_backdoor(result.model, run.data.test, run.triggered_test())
    row = {"ca": after.clean_accuracy, "asr": after.attack_success_rate,
           "pruned": result.report["pruning"]["pruned"], "steps": result.report["unlearning"]["steps"],
           **result.timings, "cpu": cpu, "images": rnp_floor_images(result)}
    if floor:
        start = time.process_time()
        optimisation_floor(run.model, clean, images=row["images"], batch_size=result.report["config"]["batch_size"],
                           seed=seed)
        row["floor_cpu"] = time.process_time() - start
    return row


def mean_sd(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def training_table(trained: dict) -> list[str]:
    lines = ["| seed | precision | CA | ASR | train s | train CPU s |", "|---|---|---|---|---|---|"]
    for (seed, name), row in sorted(trained.items()):
        lines.append(f"| {seed} | {name} | {row['ca']:.4f} | {row['asr']:.4f} | {row['seconds']:.0f} "
                     f"| {row['cpu']:.0f} |")
    for name, _ in PRECISIONS:
        rows = [row for (_, n), row in trained.items() if n == name]
        lines.append(f"| mean ± sd | {name} | {mean_sd([r['ca'] for r in rows])} "
                     f"| {mean_sd([r['asr'] for r in rows])} | {statistics.mean(r['seconds'] for r in rows):.0f} "
                     f"| {statistics.mean(r['cpu'] for r in rows):.0f} |")
    return lines


def rnp_table(defended: dict) -> list[str]:
    lines = ["| seed | RNP precision | CA after | ASR after | pruned | unlearn steps | unlearn s "
             "| recover s | prune s | RNP CPU s | RNP CPU / fp32 floor CPU, per image |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (seed, name), row in sorted(defended.items()):
        reference = defended[seed, "float32"]
        ratio = (row["cpu"] / row["images"]) / (reference["floor_cpu"] / reference["images"])
        lines.append(f"| {seed} | {name} | {row['ca']:.4f} | {row['asr']:.4f} | {row['pruned']} "
                     f"| {row['steps']} | {row['unlearn']:.1f} | {row['recover']:.1f} | {row['prune']:.1f} "
                     f"| {row['cpu']:.1f} | {ratio:.2f} |")
    for name, _ in PRECISIONS:
        rows = [row for (_, n), row in defended.items() if n == name]
        means = " | ".join(f"{statistics.mean(r[key] for r in rows):.1f}"
                           for key in ("unlearn", "recover", "prune", "cpu"))
        lines.append(f"| mean ± sd | {name} | {mean_sd([r['ca'] for r in rows])} "
                     f"| {mean_sd([r['asr'] for r in rows])} | {statistics.mean(r['pruned'] for r in rows):.1f} "
                     f"| | {means} | |")
    return lines


def verdict(trained: dict, defended: dict) -> list[str]:
    """The parity checks and RNP's speed-up, in words."""
    def column(table, name, key):
        return [row[key] for (_, n), row in sorted(table.items()) if n == name]

    ca_gap = abs(statistics.mean(column(trained, "float32", "ca"))
                 - statistics.mean(column(trained, "bfloat16", "ca")))
    lines = [f"- training: mean CA differs by {100 * ca_gap:.2f} points "
             f"({'within' if ca_gap <= 0.005 else 'OUTSIDE'} 0.5)"]
    for key in ("ca", "asr"):
        fp32, bf16 = column(defended, "float32", key), column(defended, "bfloat16", key)
        gap, spread = abs(statistics.mean(fp32) - statistics.mean(bf16)), statistics.stdev(fp32)
        lines.append(f"- RNP {key.upper()} after pruning: means differ by {gap:.4f}, seed sd {spread:.4f} "
                     f"({'within' if gap <= spread else 'OUTSIDE'} the spread)")
    def per_image(name, *keys):
        """Seconds per image passed forward and backward, summed over the seeds."""
        rows = [row for (_, n), row in defended.items() if n == name]
        return sum(row[key] for row in rows for key in keys) / sum(row["images"] for row in rows)

    fp32, bf16 = per_image("float32", "cpu"), per_image("bfloat16", "cpu")
    floor = per_image("float32", "floor_cpu")
    lines.append(f"- RNP CPU time per image passed forward and backward (all three stages): float32 "
                 f"{1e3 * fp32:.2f} ms, bfloat16 {1e3 * bf16:.2f} ms ({fp32 / bf16:.2f}x faster); "
                 f"float32 floor {1e3 * floor:.2f} ms: bfloat16 RNP costs {bf16 / floor:.2f}x the float32 "
                 f"floor, float32 RNP {fp32 / floor:.2f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--clean-size", type=int, default=500)
    parser.add_argument("--runs", type=Path, default=Path("benchmarks/cache/amp-parity"),
                        help="folder of the trained subjects, reused by a later call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trained, defended = {}, {}
    for seed in args.seeds:
        for name, amp in PRECISIONS:
            trained[seed, name] = train_subject(args.runs, seed, amp, args)
        for name, amp in PRECISIONS:
            defended[seed, name] = defend(trained[seed, "float32"]["path"], seed, amp, args.clean_size,
                                          floor=name == "float32")
            print(f"seed {seed}, RNP {name}: {defended[seed, name]}", flush=True)
    print(f"{args.threads} thread(s), {torch.__version__}\n")
    print("\n".join(training_table(trained) + [""] + rnp_table(defended) + [""] + verdict(trained, defended)))


if __name__ == "__main__":
    main()
