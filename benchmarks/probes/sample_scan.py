"""Issue 16, item 3: the combined sample scan (:func:`rnp.detection.scan_samples`, as
``rnp scan-data`` runs it) on a subject's poisoned training set, one JSON record per grid cell
named, and a Markdown table of every record in the folder.

For each cell (a record of ``label-runs-w16.yaml`` names the subject and the clean seed): the
500 clean images of that clean seed, a seeded 5,000-sample subset of the poisoned training set
(seed 0, as the exposure grid), the default detectors with STRIP at 20 overlays, the flag at
5%. The loss detector is scanned alone beside it, for its realised rate. Records already in
the folder are kept (rerun to resume). Usage, from the repository root:

    OMP_NUM_THREADS=1 PYTHONPATH=benchmarks/probes python benchmarks/probes/sample_scan.py OUT CELL.json...
    python benchmarks/probes/sample_scan.py OUT          # the table only, from OUT's records
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from oracle import DATA_CACHE
from rnp.bench.cells import _load_subject
from rnp.data.clean_subset import select_clean_subset
from rnp.detection import SampleScanConfig, scan_samples
from rnp.detection.poisoned_samples import StripConfig
from rnp.io.files import write_json, write_text
from rnp.io.tables import render_table
from rnp.metrics import auroc, positives_mask

SAMPLES, CLEAN, RATE = 5000, 500, 0.05


def measure(cell_file: str) -> dict:
    record = json.load(open(cell_file))
    clean_seed = record["cell"]["clean_seed"]
    subject = _load_subject(record["subject_run"], DATA_CACHE, record["data_spec"])
    run, model = subject["run"], subject["run"].model.eval()
    clean, _ = select_clean_subset(subject["pool"], CLEAN, seed=clean_seed, exclude=subject["exclude"])
    poisoned = run.poisoned_train(cache_dir=DATA_CACHE)
    chosen = torch.randperm(len(poisoned.data), generator=torch.Generator().manual_seed(0))[:SAMPLES]
    data = poisoned.data.subset(chosen)
    positives = positives_mask(poisoned.poisoned_indices, len(poisoned.data))[chosen]
    result = {"label": record["label"], "subject_run": Path(record["subject_run"]).name, "clean_seed": clean_seed,
              "scored": len(data), "poisoned": int(positives.sum()), "target_fpr": RATE}
    for name, detectors in (("scan", None), ("loss alone", ("loss",))):
        settings = SampleScanConfig(strip=StripConfig(overlays=20), seed=clean_seed, false_positive_rate=RATE,
                                    **({"detectors": detectors} if detectors else {}))
        start = time.perf_counter()
        scan = scan_samples(model, data, clean, settings)
        result[name] = {"detectors": list(settings.detectors), "auroc": auroc(scan.combined, positives),
                        "fpr_scanned_clean": float(scan.flagged[~positives].double().mean()),
                        "tpr": float(scan.flagged[positives].double().mean()),
                        "detector_auroc": {d: auroc(s, positives) for d, s in scan.scores.items()},
                        "seconds": time.perf_counter() - start}
    return result


def table(records: list[dict]) -> str:
    rows = [["subject", "clean seed", "poisoned / scored", "AUROC", "poison flagged", "FPR scanned clean",
             "per detector AUROC", "loss alone: FPR", "seconds"]]
    for r in records:
        s = r["scan"]
        rows.append([r["label"]["attack"], r["clean_seed"], f"{r['poisoned']} / {r['scored']}", f"{s['auroc']:.3f}",
                     f"{100 * s['tpr']:.1f}%", f"{100 * s['fpr_scanned_clean']:.1f}%",
                     " ".join(f"{d} {v:.3f}" for d, v in s["detector_auroc"].items()),
                     f"{100 * r['loss alone']['fpr_scanned_clean']:.1f}%", f"{s['seconds']:.0f}"])
    scans = [r["scan"] for r in records]
    rows.append(["mean", "", "", f"{statistics.mean(s['auroc'] for s in scans):.3f}",
                 f"{100 * statistics.mean(s['tpr'] for s in scans):.1f}%",
                 f"{100 * statistics.mean(s['fpr_scanned_clean'] for s in scans):.1f}%", "",
                 f"{100 * statistics.mean(r['loss alone']['fpr_scanned_clean'] for r in records):.1f}%", ""])
    return (f"# Combined sample scan, width-16 subjects\n\nFlag threshold at {100 * RATE:g}% of the clean images' "
            "combined scores; FPR scanned clean: the share of the scanned training samples known to be clean "
            "that it flags. Regenerate: `python benchmarks/probes/sample_scan.py "
            "benchmarks/results/sample-scan-w16`.\n\n" + render_table(rows, markdown=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="folder of the records and the table")
    parser.add_argument("cells", nargs="*", help="grid cell records naming subject and clean seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for cell in args.cells:
        target = out / Path(cell).name
        if not target.exists():
            write_json(target, measure(cell))
            print(f"{cell}: done", file=sys.stderr, flush=True)
    records = sorted((json.loads(p.read_text()) for p in out.glob("*.json")),
                     key=lambda r: (r["label"]["attack"], r["clean_seed"]))
    if records:
        write_text(out / "results.md", table(records))


if __name__ == "__main__":
    main()
