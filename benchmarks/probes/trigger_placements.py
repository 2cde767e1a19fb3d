"""Issue 16 probe: the exposure grid's two trigger searches on a patch-trigger subject, scored
with the IoU over the trigger's trained placements as well as at its true place.

Reruns, with the exposure grid's settings and seeds (`benchmarks/grids/exposure.yaml`, clean set
0), the unlearning that names the class, Neural Cleanse's search for that class on the original
model and Neural Cleanse's scan of every class, and prints for each the mask L1, its success on
the original model, the IoU at the true place (`mask_iou`, what the committed records hold)
and over the placements training showed (`placed_iou`: shifted by up to 4 pixels, mirrored).
The searches are seeded as the grid's, so the first columns reproduce the committed record.
``--seeds N`` also repeats the one-class search with the next N seeds, for the spread of one
search's IoU (it is the same search as Neural Cleanse's for that class).
Usage (from the repository root; a record of the subject's exposure cell names it):

    OMP_NUM_THREADS=1 PYTHONPATH=benchmarks/probes python benchmarks/probes/trigger_placements.py \
        benchmarks/results/exposure/cells/CELL.json
"""

import argparse
import json
import time

import torch
from oracle import DATA_CACHE

from rnp.bench.cells import _load_subject
from rnp.bench.measurements import _nc_scan
from rnp.data.clean_subset import select_clean_subset
from rnp.defenses.trigger_reverse import reverse_engineer_trigger
from rnp.detection import (TriggerReverseConfig, detect_target_label, expose, mask_iou, placed_iou, recover_on_both,
                           true_trigger_mask)
from rnp.utils import generator_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cell", help="the subject's exposure-grid record")
    parser.add_argument("--seeds", type=int, default=0, help="repeats of the one-class search, next seeds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    record = json.load(open(args.cell))
    settings = record["cell"]["exposure"]
    subject = _load_subject(record["subject_run"], DATA_CACHE, record["data_spec"])
    run, model = subject["run"], subject["run"].model.eval()
    clean = select_clean_subset(subject["pool"], record["cell"]["clean_size"], seed=record["cell"]["clean_seed"],
                                exclude=subject["exclude"])[0]
    test = run.data.test.subset(torch.arange(0, len(run.data.test), 10))
    true_mask = true_trigger_mask(run.attack, test)
    budget = TriggerReverseConfig(steps=settings["trigger_steps"],
                                  samples_per_step=settings["trigger_samples_per_step"])
    seed = record["exposure"]["trigger"]["seed"]
    start = time.perf_counter()
    exposure = expose(model, clean, amp="off")
    target = detect_target_label(exposure).candidate
    comparison = recover_on_both(exposure, target, budget, seed=seed)
    original = comparison.triggers["original"]
    searched = time.perf_counter() - start - comparison.seconds["unlearned"]
    scan = _nc_scan(model, exposure.clean, budget, test, true_mask, seed)
    print(f"{run.attack.name}: true trigger area {int((true_mask > 0.5).sum())} pixels")
    print("search | class | mask L1 | IoU | placed IoU | seconds")
    print(f"exposure (one class) | {target} | {original.norm:.2f} | {mask_iou(original.mask, true_mask):.2f} | "
          f"{placed_iou(original.mask, true_mask):.2f} | {searched:.0f}")
    for repeat in range(seed + 1, seed + 1 + args.seeds):
        generator = generator_for(repeat, f"trigger-recovery-{target}")  # as recover_on_both seeds its search
        again = reverse_engineer_trigger(model, clean, target, budget, generator=generator)
        print(f"exposure, seed {repeat} | {target} | {again.norm:.2f} | {mask_iou(again.mask, true_mask):.2f} | "
              f"{placed_iou(again.mask, true_mask):.2f} | -")
    print(f"Neural Cleanse (every class) | {scan['candidate']} | {scan['norm']:.2f} | {scan['iou']:.2f} | "
          f"{scan['placed_iou']:.2f} | {scan['seconds']:.0f}")


if __name__ == "__main__":
    main()
