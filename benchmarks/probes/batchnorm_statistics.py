"""Issue 15 probe: after RNP prunes, do BatchNorm's running statistics decide whether the backdoor
comes back?

For each clean seed (which also seeds RNP, as in the grid's cells): run RNP at its defaults to get
its pruning order, then for each prefix k prune the original model and print the ORACLE CA / ASR
on 1,000 test images (test data a defender does not have: it explains and chooses nothing) of

- the pruned model as it is;
- the pruned model with every BatchNorm's running statistics re-estimated on the 500 clean
  images (:func:`rnp.bench.recalibration.recalibrated`: five passes with crop and flip, as the
  model was trained; before 2026-12-06 one plain pass in stored order, which alone cost 6
  points of accuracy);
- the pruned model repaired as RNP's ``repair_epochs`` does (5 epochs, lr 0.001), BatchNorm in
  train mode, so its statistics follow the clean images;
- the same repair with ``repair_freeze_bn``, BatchNorm in eval mode and its statistics kept.

Usage (a record of the subject's grid cell names the subject; run from the repository root):

    OMP_NUM_THREADS=1 PYTHONPATH=benchmarks/probes python benchmarks/probes/batchnorm_statistics.py \
        CELL.json 0 3,6,11
"""

import argparse
import copy

import torch
from oracle import clean_sets, subject_and_oracle

from rnp.bench.recalibration import recalibrated
from rnp.defenses.masks import prune_channels
from rnp.defenses.rnp import RNP
from rnp.defenses.rnp_options import repair

REPAIR = dict(epochs=5, lr=0.001, batch_size=128, augment=True, progress=False, device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cell", help="a grid cell record of the subject")
    parser.add_argument("seeds", help="clean seeds, comma-separated")
    parser.add_argument("counts", help="channels pruned, first in RNP's order, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    subject, oracle = subject_and_oracle(args.cell)
    model = subject["run"].model.eval()
    for seed, clean in clean_sets(subject, args.seeds):
        result = RNP(seed=seed).fit(model, clean)
        scores, order = result.masks, result.artifacts["order"]
        print(f"clean seed {seed}: the defaults pruned {result.report['pruning']['pruned']}; "
              f"no defense: CA / ASR {oracle(model)}")
        print("k   pruned        re-estimated  repair        frozen-BN repair   (ORACLE: CA, ASR)")
        for count in (int(c) for c in args.counts.split(",")):
            pruned = prune_channels(copy.deepcopy(model), scores, order[:count]).eval()
            rows = [oracle(pruned), oracle(recalibrated(pruned, clean))]
            for frozen in (False, True):
                repaired = copy.deepcopy(pruned)
                repair(repaired, clean, scores, order[:count], seed=seed, frozen_batchnorm=frozen, **REPAIR)
                rows.append(oracle(repaired))
            print(f"{count:<4}" + "".join(f"{ca:>5.1f} {asr:>5.1f}   " for ca, asr in rows), flush=True)


if __name__ == "__main__":
    main()
