"""Issue 15 probe: does the unlearning's stop (batch accuracy) change what RNP with
``mask_skip_last`` ranks first? Prints, per clean seed and stop, the unlearned model's clean-set
accuracy and dominant-class share, the auto rule's result and an ORACLE pruning curve (1,000
test images; judges, chooses nothing). Usage:

    OMP_NUM_THREADS=1 python benchmarks/probes/unlearning_stop.py CELL.json 1 0.2,0.3,0.4
"""

import sys
import copy
import time
import torch

import rnp.defenses.rnp as R
from oracle import subject_and_oracle
from rnp.data.clean_subset import select_clean_subset
from rnp.metrics.backdoor import accuracy
from rnp.training.evaluate import predict

torch.set_num_threads(1)

cell_file, seeds, thresholds = (
    sys.argv[1],
    [int(s) for s in sys.argv[2].split(",")],
    [float(t) for t in sys.argv[3].split(",")],
)
S, ev = subject_and_oracle(cell_file)
model = S["run"].model.eval()


for seed in seeds:
    clean, _ = select_clean_subset(S["pool"], 500, seed=seed, exclude=S["exclude"])
    for th in thresholds:
        t = time.time()
        res = R.RNP(amp="on", seed=seed, mask_skip_last=True, clean_threshold=th).fit(model, clean)
        sc = res.masks
        order = sc.order()
        U = res.unlearned_model
        sink = int(torch.bincount(predict(U, clean), minlength=10).argmax())
        share = float((predict(U, clean) == sink).float().mean())
        curve = []
        for k in (1, 2, 5, 10, 20, 40):
            m = copy.deepcopy(model)
            R.prune_channels(m, sc, order[:k])
            curve.append((k,) + ev(m))
        u = res.report["unlearning"]
        clean_acc = float(accuracy(predict(U, clean), clean.labels))
        top = [(sc.layer_names[int(sc.layers[i])], int(sc.channels[i])) for i in order[:3]]
        print(
            f"seed {seed} stop {th}: steps {u['steps']} last-batch acc {u['final_accuracy']:.3f}; "
            f"U clean-set acc {clean_acc:.3f} sink {sink} share {share:.2f}; "
            f"auto {res.report['pruning']['pruned']} -> {ev(res.model)}; top {top}; curve {curve}; "
            f"{time.time() - t:.0f}s",
            flush=True,
        )
