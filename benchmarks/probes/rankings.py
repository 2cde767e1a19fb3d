"""Issue 15 probe on one width-32 subject: three channel rankings and their ORACLE pruning curves.

For each clean seed (which also seeds RNP): A, RNP's defaults (masks on every BatchNorm); B, the
same unlearned model recovered with ``mask_skip_last``; C, a first-order attribution: the
gradient of the unlearned model's mean log-probability of its dominant class with respect to
per-channel masks (the channels whose removal would lower it most come first). Each line gives
the first five channels and (k, CA, ASR) after pruning the first k in the original model, on
1,000 test images: test data a defender does not have, so this judges rankings and chooses
nothing. Usage (a record of the subject's grid cell names the subject):

    OMP_NUM_THREADS=1 python benchmarks/probes/rankings.py CELL.json 0,1,2
"""

import sys
import copy
import time
import torch

import rnp.defenses.rnp as R
from rnp.defenses.masks import MaskSet, ChannelScores
from oracle import subject_and_oracle
from rnp.data.clean_subset import select_clean_subset
from rnp.training.evaluate import predict

torch.set_num_threads(1)

cell_file, seeds = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
S, ev = subject_and_oracle(cell_file)
model = S["run"].model.eval()


def curve(scores, order, ks=(1, 2, 5, 10, 20, 40)):
    out = []
    for k in ks:
        m = copy.deepcopy(model)
        R.prune_channels(m, scores, order[:k])
        out.append((k,) + ev(m))
    return out


def names(scores, order, n=5):
    return [
        (scores.layer_names[int(scores.layers[i])], int(scores.channels[i]), round(float(scores.values[i]), 3))
        for i in order[:n]
    ]


for seed in seeds:
    clean, _ = select_clean_subset(S["pool"], 500, seed=seed, exclude=S["exclude"])
    t = time.time()
    d = R.RNP(amp="on", seed=seed)
    res = d.fit(model, clean)
    U = res.unlearned_model
    sc = res.masks
    order = sc.order()
    print(
        f"== seed {seed}: defaults pruned {res.report['pruning']['pruned']} after {ev(res.model)}; unlearned clean acc",
        res.report["unlearning"]["final_accuracy"],
        res.report["unlearning"]["steps"],
        flush=True,
    )
    print(" A all-BN top", names(sc, order), curve(sc, order), flush=True)
    sc2, push2 = R.RNP(amp="on", seed=seed, mask_skip_last=True).recover(U, clean, torch.device("cpu"))
    o2 = sc2.order(push2)
    print(" B no-last top", names(sc2, o2), curve(sc2, o2), flush=True)
    # C: attribution of the sink class on U
    Uc = copy.deepcopy(U).eval().requires_grad_(False)
    ms = MaskSet(Uc)
    with torch.no_grad():
        sink = int(torch.bincount(predict(U, clean), minlength=10).argmax())
    logp = torch.log_softmax(Uc(clean.images.float() / 255), 1)[:, sink].mean()
    logp.backward()
    grad = ms.flat_grad()
    sc3 = ChannelScores(sc.layer_names, sc.sizes, -grad)  # low = removing lowers log p(sink) most
    o3 = sc3.order()
    with torch.no_grad():
        print(
            " unlearned model: sink share",
            round(float((predict(U, clean) == sink).float().mean()), 2),
            "CA/ASR of U",
            ev(U),
        )
    print(" C sink-attr (sink", sink, ") top", names(sc3, o3), curve(sc3, o3), f"{time.time() - t:.0f}s", flush=True)
