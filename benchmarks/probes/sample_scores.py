"""Issue 16 probe: every sample detector's score on a subject's poisoned training set, saved for
study, so that a way of combining or calibrating them can be tried in seconds without scoring
again.

As ``rnp scan-data`` does, a seeded fifth of the defender's 500 clean images (clean seed 0) is
held out of the unlearning and scored too: the reference a defender could set a threshold on.
The file (``torch.save`` of plain tensors; read it back with ``torch.load(path, weights_only=True)``)
holds, for the scored training samples and for the held-out clean images, one score tensor per
detector, the samples' given labels and which of them are poisoned. Usage (a record of one of the
subject's grid cells names the subject; run from the repository root):

    OMP_NUM_THREADS=1 PYTHONPATH=benchmarks/probes python benchmarks/probes/sample_scores.py CELL.json OUT.pt
"""

import argparse
import json

import torch
from oracle import DATA_CACHE

from rnp.bench.cells import _load_subject
from rnp.data.clean_subset import select_clean_subset
from rnp.detection import SAMPLE_DETECTORS, Strip, expose
from rnp.detection.poisoned_samples import StripConfig
from rnp.metrics import auroc, positives_mask

HELD_OUT = 100  # of the 500 clean images, as scan-data's CALIBRATION_SHARE of 0.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cell", help="a grid cell record of the subject")
    parser.add_argument("out", help="file to write the scores to (torch.save)")
    parser.add_argument("--samples", type=int, default=5000, help="training samples scored (seeded draw)")
    parser.add_argument("--strip-overlays", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    record = json.load(open(args.cell))
    subject = _load_subject(record["subject_run"], DATA_CACHE, record["data_spec"])
    run, model = subject["run"], subject["run"].model.eval()
    clean, _ = select_clean_subset(subject["pool"], 500, seed=0, exclude=subject["exclude"])
    order = torch.randperm(len(clean), generator=torch.Generator().manual_seed(0))
    held_out, unlearning = clean.subset(order[:HELD_OUT].sort().values), clean.subset(order[HELD_OUT:].sort().values)
    poisoned = run.poisoned_train(cache_dir=DATA_CACHE)
    chosen = torch.randperm(len(poisoned.data), generator=torch.Generator().manual_seed(0))[:args.samples]
    data = poisoned.data.subset(chosen)
    positives = positives_mask(poisoned.poisoned_indices, len(poisoned.data))[chosen]
    exposure = expose(model, unlearning, amp="off")
    saved = {"labels": data.labels, "poisoned": positives, "held_out_labels": held_out.labels}
    detectors = {name: cls() for name, cls in SAMPLE_DETECTORS.items()}
    detectors["strip"] = Strip(StripConfig(overlays=args.strip_overlays))
    for name, detector in detectors.items():
        extra = {"exposure": exposure} if name == "unlearned" else {}
        saved[name] = detector.score(model, data, unlearning, **extra)
        saved[f"held_out_{name}"] = detector.score(model, held_out, unlearning, **extra)
        value = auroc(saved[name], positives) if 0 < int(positives.sum()) < len(positives) else float("nan")
        print(f"{name}: AUROC {value:.3f}", flush=True)
    torch.save(saved, args.out)


if __name__ == "__main__":
    main()
