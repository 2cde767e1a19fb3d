"""Issue 15 probe: is the class the unlearned model collapses onto stable across unlearning seeds?

RNP's default ranking differentiates the unlearned model's dominant clean-set class, taken as
the backdoor's target. On Trojan's and BppAttack's clean set 1 that class was wrong (3 and 5, not
0), and RNP failed there. For each clean seed this unlearns with RNP's defaults under several
seeds of the batch order and augmentation (the clean images fixed) and prints each run's dominant
class and its share of the clean predictions, then the class most runs chose, and the
target ``rnp inspect`` names (six unlearnings on random halves, read label by label): whether
either could replace the single run's guess. It uses no test data. Usage
(a record of the subject's grid cell names the subject; run from the repository root):

    OMP_NUM_THREADS=1 PYTHONPATH=benchmarks/probes python benchmarks/probes/target_vote.py CELL.json 0,1,2 --runs 5
"""

import argparse
from collections import Counter

import torch
from oracle import clean_sets, subject_and_oracle

from rnp.defenses.rnp import RNP
from rnp.detection.collapse import detect_backdoor
from rnp.training.evaluate import predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cell", help="a grid cell record of the subject")
    parser.add_argument("seeds", help="clean seeds, comma-separated")
    parser.add_argument("--runs", type=int, default=5, help="unlearning seeds per clean set")
    args = parser.parse_args()
    torch.set_num_threads(1)
    subject, _ = subject_and_oracle(args.cell)
    model = subject["run"].model.eval()
    for seed, clean in clean_sets(subject, args.seeds):
        votes = Counter()
        for run in range(args.runs):
            unlearn_seed = seed + run  # run 0 is the grid cell's own unlearning
            unlearned, summary, _ = RNP(seed=unlearn_seed).unlearn(model, clean, torch.device("cpu"))
            shares = torch.bincount(predict(unlearned.eval(), clean), minlength=clean.num_classes) / len(clean)
            top = int(shares.argmax())
            votes[top] += 1
            print(f"clean seed {seed}, unlearning seed {unlearn_seed}: {summary['steps']} steps, "
                  f"class {top} ({100 * float(shares[top]):.1f}%)", flush=True)
        verdict = detect_backdoor(model, clean, seed=seed)
        print(f"clean seed {seed}: votes {dict(votes.most_common())}; rnp inspect's verdict: {verdict.kind}, "
              f"target {verdict.target}, map agreement {verdict.agreement:.2f}", flush=True)


if __name__ == "__main__":
    main()
