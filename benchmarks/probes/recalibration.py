"""Issue 15 probe: does a purified model keep its backdoor out once BatchNorm's running statistics
are re-estimated on clean images (what a user who recalibrates or fine-tunes it would do)?

For each named defense (its defaults, or ``name:key=value,...`` overrides; clean set
``--seed``), purify the subject and print the ORACLE CA / ASR on 1,000 test images (test data a
defender does not have: it explains and chooses nothing) of the purified model and of the same
model with every BatchNorm's statistics re-estimated on the 500 clean images
(:func:`rnp.bench.recalibration.recalibrated`: five passes with crop and flip, as the model was
trained; before 2026-12-06 one plain pass in stored order, which alone cost 6 points of
accuracy). Usage (run from the repository root):

    OMP_NUM_THREADS=1 PYTHONPATH=benchmarks/probes python benchmarks/probes/recalibration.py \
        CELL.json rnp clp fp anp rnp:tolerance=0.1,repair_epochs=5,repair_lr=0.001,repair_freeze_bn=true
"""

import argparse

import torch
import yaml
from oracle import clean_sets, subject_and_oracle

from rnp.bench.recalibration import recalibrated
from rnp.defenses import DEFENSES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cell", help="a grid cell record of the subject")
    parser.add_argument("defenses", nargs="+", help="defense names, as `rnp defend --list` gives them")
    parser.add_argument("--seed", default="0", help="the clean set's seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    subject, oracle = subject_and_oracle(args.cell)
    model = subject["run"].model.eval()
    _, clean = next(clean_sets(subject, args.seed))
    print("ORACLE CA / ASR: purified -> statistics re-estimated")
    print(f"no defense: {oracle(model)} -> {oracle(recalibrated(model, clean))}")
    for spec in args.defenses:
        name, _, settings = spec.partition(":")
        overrides = {key: yaml.safe_load(value) for key, value in
                     (item.split("=", 1) for item in settings.split(",") if item)}
        purified = DEFENSES[name](**overrides).fit(model, clean).model.eval()
        again = recalibrated(purified, clean)
        print(f"{spec}: {oracle(purified)} -> {oracle(again)}", flush=True)


if __name__ == "__main__":
    main()
