"""Which RNP settings rank the backdoor channels first, and how much the pruning rule prunes.

For each cached backdoored model (trained by ``benchmarks/rnp_cifar10.py``) and each seed, runs
RNP under several settings and reports, besides the chosen operating point, an ORACLE view of
the ranking: ASR and CA after pruning the first k channels in mask order, for a few k, measured
on a fixed 2,000-image slice of the test set. The oracle columns use test data and poisoned
test images; they judge the ranking and never choose anything inside RNP.

    python benchmarks/rnp_ablation.py --runs benchmarks/cache/<key> [...] --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

from rnp import RNP
from rnp.data.clean_subset import select_clean_subset
from rnp.defenses import prune_channels
from rnp.io.runs import load_run
from rnp.metrics import evaluate_backdoor

SETTINGS = {
    "paper (epoch stop, lr 0.2, thr 0.2)": dict(preset="paper"),
    "step stop, lr 0.2, auto": dict(stop_check="step", recover_lr=0.2),
    "step stop, lr 0.02, auto": dict(stop_check="step", recover_lr=0.02),
    "epoch stop, lr 0.02, auto": dict(stop_check="epoch", recover_lr=0.02),
}
PREFIXES = (0, 2, 5, 10, 20, 40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--cache-dir", default="benchmarks/cache/data")
    parser.add_argument("--json")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for run_dir in args.runs:
        run = load_run(run_dir, cache_dir=args.cache_dir)
        attack = run.info["attack"]["name"]
        test, triggered = oracle_slice(run)
        for setting in args.settings:
            for seed in args.seeds:
                clean, _ = select_clean_subset(run.data.train, 500, seed=seed, exclude=run.poisoned_indices)
                result = RNP(**SETTINGS[setting], seed=seed).fit(run.model, clean)
                chosen = evaluate_backdoor(result.model, test, triggered)
                curve = {}
                for k in PREFIXES:
                    model = prune_channels(copy.deepcopy(run.model), result.masks, result.artifacts["order"][:k])
                    m = evaluate_backdoor(model, test, triggered)
                    curve[k] = (m.clean_accuracy, m.attack_success_rate)
                row = {"attack": attack, "setting": setting, "seed": seed,
                       "pruned": result.report["pruning"]["pruned"],
                       "steps": result.report["unlearning"]["steps"],
                       "ca": chosen.clean_accuracy, "asr": chosen.attack_success_rate,
                       "curve": curve, "seconds": sum(result.timings.values())}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def oracle_slice(run, size: int = 2000):
    """A fixed slice of the test set and its triggered version (all-to-one: non-target only)."""
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(len(run.data.test), generator=generator)[:size].sort().values
    test = run.data.test.subset(index)
    return test, run.attack.triggered_test(test)


def table(rows) -> str:
    def mean_sd(values):
        values = [100 * v for v in values]
        return f"{statistics.mean(values):.1f}±{statistics.stdev(values) if len(values) > 1 else 0:.1f}"

    head = ["attack", "setting", "pruned", "CA", "ASR", *(f"ASR@{k}" for k in PREFIXES[1:]),
            *(f"CA@{k}" for k in PREFIXES[1:]), "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = {}
    for row in rows:
        groups.setdefault((row["attack"], row["setting"]), []).append(row)
    for (attack, setting), group in groups.items():
        cells = [attack, setting, f"{statistics.mean(r['pruned'] for r in group):.1f}",
                 mean_sd([r["ca"] for r in group]), mean_sd([r["asr"] for r in group])]
        cells += [mean_sd([r["curve"][k][1] for r in group]) for k in PREFIXES[1:]]
        cells += [mean_sd([r["curve"][k][0] for r in group]) for k in PREFIXES[1:]]
        cells.append(f"{statistics.mean(r['seconds'] for r in group):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
