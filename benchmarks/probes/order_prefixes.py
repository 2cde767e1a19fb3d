"""Issue 15 probe: where RNP's default fails on a subject, is it the order or the amount pruned?

For each clean seed (which also seeds RNP, as in the grid's cells): unlearn as RNP's defaults do,
rank the channels by the unlearned model's target ranking (``--ranking``, default the package's
``target_margin``), then for each prefix k print the defender's clean-set accuracy (what the auto
rule watches) and the ORACLE CA / ASR on 1,000 test images (test data a defender does not have:
it explains a failure and chooses nothing). ``--target`` ranks for a given class instead of the
unlearned model's dominant one, ``--unlearn-seed`` unlearns with another seed than the clean
seed: where the dominant class was not the target, do a right class or another unlearning
of the same images mend the order? Usage (a record of the subject's grid cell names the
subject; run from the repository root):

    OMP_NUM_THREADS=1 PYTHONPATH=benchmarks/probes python benchmarks/probes/order_prefixes.py CELL.json 0,1,2
"""

import argparse
import copy

import torch
from oracle import clean_sets, subject_and_oracle

from rnp.defenses.masks import prune_channels
from rnp.defenses.rnp import RNP, TARGET_OBJECTIVES
from rnp.defenses.rnp_options import target_gradient
from rnp.metrics.backdoor import accuracy
from rnp.training.evaluate import predict

PREFIXES = (0, 1, 2, 3, 5, 7, 10, 15, 20, 30, 40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cell", help="a grid cell record of the subject")
    parser.add_argument("seeds", help="clean seeds, comma-separated")
    parser.add_argument("--ranking", default="target_margin", choices=sorted(TARGET_OBJECTIVES))
    parser.add_argument("--target", type=int, help="rank for this class, not the unlearned model's dominant one")
    parser.add_argument("--unlearn-seed", type=int, help="unlearn with this seed, not the clean seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    subject, oracle = subject_and_oracle(args.cell)
    model = subject["run"].model.eval()
    for seed, clean in clean_sets(subject, args.seeds):
        unlearn_seed = seed if args.unlearn_seed is None else args.unlearn_seed
        unlearned, summary, _ = RNP(seed=unlearn_seed).unlearn(model, clean, torch.device("cpu"))
        scores, target = target_gradient(unlearned.eval(), clean, objective=TARGET_OBJECTIVES[args.ranking],
                                         target=args.target)
        order = scores.order()
        print(f"clean seed {seed}: unlearned in {summary['steps']} steps, target class {target['class']} "
              f"({100 * target['share']:.1f}% of the unlearned model's clean predictions)")
        first = [f"{scores.layer_names[int(scores.layers[i])]}.{int(scores.channels[i])}" for i in order[:10].tolist()]
        print("first channels:", ", ".join(first))
        print("k  clean-set acc  CA    ASR   (ORACLE: CA, ASR on 1,000 test images)")
        for k in PREFIXES:
            pruned = copy.deepcopy(model)
            prune_channels(pruned, scores, order[:k])
            clean_accuracy = 100 * float(accuracy(predict(pruned, clean), clean.labels))
            ca, asr = oracle(pruned)
            print(f"{k:<3}{clean_accuracy:>13.1f}  {ca:>5.1f} {asr:>5.1f}", flush=True)


if __name__ == "__main__":
    main()
