"""Issue 15 probe, item 4: why RNP's orders miss the backdoor on a model without BatchNorm.

The reading to test (docs/method/limits.md): without BatchNorm a channel's scale is not
normalised away, so unlearning's gradient ascent inflates a few channels, and the masks and the
first-order margin gradient follow that inflation instead of the backdoor. For one clean seed
(which also seeds RNP, as in the grid's cells) it prints, per masked channel (the convolution
outputs), the root mean square of its output on the clean images in the original model and in
the unlearned one (their ratio is the channel's inflation), and ORACLE quantities from test data
a defender does not have, which explain and choose nothing:

- the backdoor channels: the mean output on 1,000 triggered test images minus that on 1,000
  clean test images in the original model, over the channel's clean RMS (``trigger shift``);
- the channels' one-at-a-time effect: ASR and CA on 300 triggered and 300 clean test images
  with only that channel pruned, ordered by ASR drop minus CA drop (``single ablation``);
- CA / ASR on 1,000 test images after pruning the first k channels of each order: RNP's
  default (target margin), the trigger shift, the single ablation, the margin over the
  inflation, and the weight change of unlearning (relative, per channel).

Usage (a record of the subject's grid cell names the subject; run from the repository root):

    OMP_NUM_THREADS=1 PYTHONPATH=benchmarks/probes python benchmarks/probes/no_batchnorm.py CELL.json 0
"""

import argparse
import copy

import torch
from oracle import clean_sets, subject_and_oracle

from rnp.data.loader import iterate_batches
from rnp.defenses.masks import prune_channels
from rnp.defenses.rnp import RNP
from rnp.defenses.rnp_options import target_gradient
from rnp.training.evaluate import predict

COUNTS = (1, 2, 5, 10, 20, 40)


def channel_statistics(model, layers, data, batch_size=250):
    """Per channel of each layer (concatenated in the scores' order): mean and root mean square
    of its output over ``data``'s images and positions."""
    modules = dict(model.named_modules())
    sums = {name: [0.0, 0.0, 0] for name in layers}

    def hook(name):
        def record(_, __, output):
            out = output.detach().float()
            sums[name][0] = sums[name][0] + out.sum((0, 2, 3))
            sums[name][1] = sums[name][1] + out.pow(2).sum((0, 2, 3))
            sums[name][2] += out.shape[0] * out.shape[2] * out.shape[3]
        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
    model.eval()
    with torch.no_grad():
        for images, _ in iterate_batches(data, batch_size):
            model(images)
    for handle in handles:
        handle.remove()
    mean = torch.cat([sums[name][0] / sums[name][2] for name in layers])
    rms = torch.cat([(sums[name][1] / sums[name][2]).sqrt() for name in layers])
    return mean, rms


def weight_change(original, unlearned, layers):
    """Per channel: the norm of the filter's change in unlearning over the filter's norm."""
    before, after = dict(original.named_modules()), dict(unlearned.named_modules())
    changes = []
    for name in layers:
        w0, w1 = before[name].weight.detach().flatten(1), after[name].weight.detach().flatten(1)
        changes.append((w1 - w0).norm(dim=1) / w0.norm(dim=1).clamp_min(1e-12))
    return torch.cat(changes)


def single_ablation(model, scores, clean, triggered, targets):
    """Per channel: (ASR drop - CA drop) with that channel alone pruned, on the given images."""
    def rates(m):
        return (float((predict(m, triggered) == targets).float().mean()),
                float((predict(m, clean) == clean.labels).float().mean()))

    asr, ca = rates(model)
    effect = torch.empty(len(scores))
    for index in range(len(scores)):
        pruned_asr, pruned_ca = rates(prune_channels(copy.deepcopy(model), scores, [index]).eval())
        effect[index] = (asr - pruned_asr) - (ca - pruned_ca)
    return effect


def spearman(a, b):
    ranks = [torch.argsort(torch.argsort(x)).float() for x in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cell", help="a grid cell record of the subject")
    parser.add_argument("seed", help="the clean set's seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    subject, oracle = subject_and_oracle(args.cell)
    model = subject["run"].model.eval()
    test, triggered = subject["run"].data.test, subject["triggered"].data
    pick = torch.randperm(len(triggered), generator=torch.Generator().manual_seed(0))[:1000]
    for seed, clean in clean_sets(subject, args.seed):
        result = RNP(seed=seed).fit(model, clean)
        scores, order = result.masks, result.artifacts["order"]
        layers = list(scores.layer_names)
        unlearned = result.unlearned_model
        _, rms = channel_statistics(model, layers, clean)
        _, rms_unlearned = channel_statistics(unlearned, layers, clean)
        inflation = rms_unlearned / rms.clamp_min(1e-12)
        clean_mean, _ = channel_statistics(model, layers, test.subset(pick))
        trigger_mean, _ = channel_statistics(model, layers, triggered.subset(pick))
        shift = (trigger_mean - clean_mean).abs() / rms.clamp_min(1e-12)
        margin = result.report.get("ranking", {})
        print(f"clean seed {seed}: {len(scores)} channels; RNP pruned {result.report['pruning']['pruned']}, "
              f"dominant class {margin.get('class')} on {margin.get('share')} of the clean set")
        quantiles = torch.quantile(inflation, torch.tensor([0.1, 0.5, 0.9, 0.99]))
        print("inflation (unlearned / original RMS) quantiles 10/50/90/99%: "
              + ", ".join(f"{q:.2f}" for q in quantiles.tolist()) + f"; max {inflation.max():.2f}")
        position = torch.empty_like(order)
        position[order] = torch.arange(len(order))
        shift_order = torch.argsort(shift, descending=True)
        print("first 10 of the default order (layer:channel, inflation percentile, trigger-shift rank):")
        inflation_rank = torch.argsort(torch.argsort(inflation)).float() / (len(inflation) - 1)
        shift_rank = torch.argsort(torch.argsort(-shift))
        print("  " + "  ".join(f"{scores.layers[i]}:{scores.channels[i]} {100 * inflation_rank[i]:.0f}% "
                               f"#{shift_rank[i]}" for i in order[:10].tolist()))
        print(f"  Spearman(default score rank, inflation) {spearman(-position.float(), inflation):.2f}; "
              f"Spearman(trigger shift, inflation) {spearman(shift, inflation):.2f}")
        print("  top 10 trigger-shift channels sit at positions "
              + ", ".join(str(int(position[i])) for i in shift_order[:10]) + " of the default order")
        change = weight_change(model, unlearned, layers)
        ranking, _ = target_gradient(unlearned, clean, objective="margin")
        few = torch.randperm(len(test), generator=torch.Generator().manual_seed(1))[:300]
        effect = single_ablation(model, scores, test.subset(few), triggered.subset(pick[:300]),
                                 subject["triggered"].target_labels[pick[:300]])
        best = torch.argsort(effect, descending=True)
        print("single ablation (ORACLE), best 10 (layer:channel ASR drop - CA drop): "
              + "  ".join(f"{scores.layers[i]}:{scores.channels[i]} {100 * effect[i]:.1f}" for i in best[:10].tolist()))
        orders = {"default (target margin)": order, "trigger shift (ORACLE)": shift_order,
                  "single ablation (ORACLE)": best,
                  "weight change": torch.argsort(change, descending=True),
                  "margin / inflation": torch.argsort(ranking.values / inflation)}
        print("ORACLE CA / ASR after pruning the first k: k = " + ", ".join(map(str, COUNTS)))
        for name, ranked in orders.items():
            cells = [oracle(prune_channels(copy.deepcopy(model), scores, ranked[:k]).eval()) for k in COUNTS]
            print(f"  {name}: " + "  ".join(f"{ca}/{asr}" for ca, asr in cells), flush=True)


if __name__ == "__main__":
    main()
