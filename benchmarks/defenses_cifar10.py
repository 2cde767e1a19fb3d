"""Every removal defense against every attack on CIFAR-10, side by side.

For each attack the backdoored subject comes from the cache of ``attacks_cifar10.py`` (same
architecture, epochs, seed). Every defense then purifies that same model with the same 500 clean
images (drawn once per subject from the unpoisoned training images), one after another in one
process, so the runtime ratios (each defense's seconds over RNP's on the same subject) are taken
under the same machine load. Each cell is written to ``--out`` as it finishes and a finished
cell is never recomputed, so an interrupted run resumes.

    python benchmarks/defenses_cifar10.py --epochs 10 --threads 1 --attacks badnets blend
    python benchmarks/defenses_cifar10.py --epochs 10 --arch vgg16 --lr 0.02 --attacks badnets
    python benchmarks/defenses_cifar10.py --table-only

Run one process per group of attacks (one thread each), then ``--table-only`` to print the
joined table. Defenses whose paper settings cost far more than the others on this CPU run with
the budgets in :data:`CPU_BUDGETS` (shown in the table's settings column); ``--paper-settings``
lifts them. ``--variants`` adds the labelled extra settings of :data:`VARIANTS`.
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

from rnp.attacks import ATTACKS
from rnp.bench.cells import report_summary
from rnp.bench.subjects import cached_subject
from rnp.bench.suite import suite_attack
from rnp.data import select_clean_subset
from rnp.defenses import DEFENSES
from rnp.errors import RnpError
from rnp.io.files import write_json
from rnp.io.runs import load_run
from rnp.metrics import der, evaluate_backdoor
from rnp.training import TrainConfig

VARIANTS: dict[str, tuple[str, dict]] = {
    "nad (betas/10)": ("nad", {"betas": (0.0, 0.0, 500.0)}),
}
"""Labelled extra settings (``--variants``), run after NAD's paper betas were seen to collapse
clean accuracy on this architecture: a sensitivity check, not a tuned result."""

CPU_BUDGETS: dict[str, dict] = {
    "anp": {"iterations": 200},
    "nc": {"steps": 120, "samples_per_step": 64},
    "sau": {"epochs": 10},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10/cifar10-jpeg.zip")
    parser.add_argument("--cache", default="benchmarks/cache")
    parser.add_argument("--out", default="benchmarks/results/defenses", help="one JSON file per cell")
    parser.add_argument("--attacks", nargs="+", default=sorted(ATTACKS), choices=sorted(ATTACKS))
    parser.add_argument("--rate", action="append", default=[], metavar="ATTACK=RATE",
                        help="poisoning rate other than the attack's default")
    parser.add_argument("--defenses", nargs="+", default=sorted(DEFENSES), choices=sorted(DEFENSES))
    parser.add_argument("--variants", action="store_true", help="also run the VARIANTS")
    parser.add_argument("--arch", default="preact_resnet18")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.1, help="training learning rate of the subjects")
    parser.add_argument("--clean-size", type=int, default=500)
    parser.add_argument("--clean-seed", type=int, default=0)
    parser.add_argument("--paper-settings", action="store_true", help="no CPU budgets")
    parser.add_argument("--threads", type=int, help="torch threads (1 per job when jobs run side by side)")
    parser.add_argument("--table-only", action="store_true", help="print the table of --out and exit")
    parser.add_argument("--markdown", help="also write the tables to this markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not args.table_only:
        rates = dict(item.split("=", 1) for item in args.rate)
        for name in args.attacks:
            run_attack(args, name, rates.get(name), out)
    cells = [json.loads(path.read_text()) for path in sorted(out.glob("*.json"))]
    if not cells:
        sys.exit(f"no results in {out}")
    text = tables(cells)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


def run_attack(args, name: str, rate: str | None, out: Path) -> None:
    """Runs every missing defense cell of one subject."""
    params = {"poison_rate": float(rate)} if rate else {}
    attack = suite_attack(name, **params)
    subject = name + (f"@{float(rate):g}" if rate else "")
    if args.arch != "preact_resnet18":
        subject += f" ({args.arch})"
    jobs = {name: (name, {}) for name in args.defenses}
    if args.variants:
        jobs.update(VARIANTS)
    todo = [d for d in jobs if not cell_path(out, subject, d).exists()]
    if not todo:
        return
    def log(line: str) -> None:
        print(f"[{subject}] {line}", file=sys.stderr, flush=True)

    run_dir = cached_subject(args.cache, args.data, attack, arch=args.arch, width=args.width,
                             config=TrainConfig(epochs=args.epochs, lr=args.lr),
                             cache_dir=Path(args.cache) / "data", progress=False, log=log)
    run = load_run(run_dir, cache_dir=Path(args.cache) / "data")
    triggered = run.triggered_test()
    before = evaluate_backdoor(run.model, run.data.test, triggered)
    pool, exclude = run.clean_pool()
    clean, indices = select_clean_subset(pool, args.clean_size, seed=args.clean_seed, exclude=exclude)
    for defense_name in todo:
        method, extra = jobs[defense_name]
        settings = {**({} if args.paper_settings else CPU_BUDGETS.get(method, {})), **extra}
        defense = DEFENSES[method](**settings)
        start = time.perf_counter()
        try:
            result = defense.fit(run.model, clean)
        except RnpError as error:  # the defense does not apply to this model (e.g. CLP without BN)
            write_json(cell_path(out, subject, defense_name),
                       {"subject": subject, "attack": name, "arch": args.arch, "defense": defense_name,
                        "settings": settings, "before": before.to_dict(), "error": str(error)})
            log(f"{defense_name}: not applicable: {error}")
            continue
        seconds = time.perf_counter() - start
        after = evaluate_backdoor(result.model, run.data.test, triggered)
        cell = {"subject": subject, "attack": name, "arch": args.arch, "defense": defense_name,
                "settings": settings, "clean_indices_sha": _digest(indices),
                "before": before.to_dict(), "after": after.to_dict(), "der": der(before, after),
                "seconds": seconds, "stages": result.timings, "summary": report_summary(result.report)}
        write_json(cell_path(out, subject, defense_name), cell)
        log(f"{defense_name}: CA {after.clean_accuracy:.4f} ASR {after.attack_success_rate:.4f} "
            f"RA {after.robust_accuracy:.4f} {seconds:.1f}s")


def cell_path(out: Path, subject: str, defense: str) -> Path:
    def safe(text: str) -> str:
        return (text.replace(" ", "_").replace("(", "").replace(")", "").replace("@", "_at_")
                .replace("/", "_over_"))
    return out / f"{safe(subject)}__{safe(defense)}.json"


def _digest(indices: torch.Tensor) -> str:
    return hashlib.sha256(indices.numpy().tobytes()).hexdigest()[:12]


def tables(cells: list[dict]) -> str:
    """The per-cell table (attack x defense) and the per-defense means with runtime ratios."""
    def pct(value):
        return f"{100 * value:.1f}"

    present = {c["defense"] for c in cells}
    defenses = [d for d in (*DEFENSES, *VARIANTS) if d in present]
    subjects = sorted({c["subject"] for c in cells})
    by_key = {(c["subject"], c["defense"]): c for c in cells}
    lines = ["| attack | before CA / ASR / RA | defense | CA | ASR | RA | DER | seconds | x RNP time |",
             "|---|---|---|---|---|---|---|---|---|"]
    ratios: dict[str, list[float]] = {d: [] for d in defenses}  # PreAct subjects only
    for subject in subjects:
        rnp = by_key.get((subject, "rnp"))
        for defense in defenses:
            cell = by_key.get((subject, defense))
            if cell is None:
                continue
            b = cell["before"]
            if "error" in cell:
                lines.append(f"| {subject} | {pct(b['clean_accuracy'])} / {pct(b['attack_success_rate'])} / "
                             f"{pct(b['robust_accuracy'])} | {defense} | n/a: {cell['error']} |||||")
                continue
            a = cell["after"]
            ratio = cell["seconds"] / rnp["seconds"] if rnp else None
            if ratio is not None and cell["arch"] == "preact_resnet18":
                ratios[defense].append(ratio)
            lines.append(f"| {subject} | {pct(b['clean_accuracy'])} / {pct(b['attack_success_rate'])} / "
                         f"{pct(b['robust_accuracy'])} | {defense} | {pct(a['clean_accuracy'])} | "
                         f"{pct(a['attack_success_rate'])} | {pct(a['robust_accuracy'])} | "
                         f"{pct(cell['der'])} | {cell['seconds']:.0f} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}'} |")
    lines += ["", "Means over the PreAct-ResNet18 subjects:", "",
              "| defense | subjects | mean CA | mean ASR | mean RA | mean DER | mean seconds | "
              "mean x RNP time | settings |", "|---|---|---|---|---|---|---|---|---|"]
    for defense in defenses:
        rows = [c for c in cells if c["defense"] == defense and "error" not in c
                and c["arch"] == "preact_resnet18"]
        if not rows:
            continue

        def mean(key, rows=rows):
            return statistics.mean(c["after"][key] for c in rows)

        ratio = f"{statistics.mean(ratios[defense]):.2f}" if ratios[defense] else "-"
        settings = rows[0]["settings"] or "defaults"
        lines.append(f"| {defense} | {len(rows)} | {pct(mean('clean_accuracy'))} | "
                     f"{pct(mean('attack_success_rate'))} | {pct(mean('robust_accuracy'))} | "
                     f"{pct(statistics.mean(c['der'] for c in rows))} | "
                     f"{statistics.mean(c['seconds'] for c in rows):.0f} | {ratio} | {settings} |")
    for key, label in (("attack_success_rate", "ASR"), ("clean_accuracy", "CA"), ("der", "DER")):
        lines += ["", pivot(cells, subjects, defenses, key, label)]
    return "\n".join(lines)


def pivot(cells: list[dict], subjects: list[str], defenses: list[str], key: str, label: str) -> str:
    """One metric (after defense) as a subject x defense grid, the value before in column 2."""
    by_key = {(c["subject"], c["defense"]): c for c in cells}
    lines = [f"{label} after each defense (%):", "",
             "| attack | before | " + " | ".join(defenses) + " |", "|---" * (len(defenses) + 2) + "|"]
    for subject in subjects:
        some = next((by_key[(subject, d)] for d in defenses if (subject, d) in by_key), None)
        before = "-" if key == "der" or some is None else f"{100 * some['before'][key]:.1f}"
        row = []
        for defense in defenses:
            cell = by_key.get((subject, defense))
            if cell is None or "error" in cell:
                row.append("n/a" if cell else "")
            else:
                value = cell["der"] if key == "der" else cell["after"][key]
                row.append(f"{100 * value:.1f}")
        lines.append(f"| {subject} | {before} | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
