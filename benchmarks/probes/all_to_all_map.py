"""Issue 16 probe: does the all-to-all backdoor leave its label map in the repeated unlearnings,
and can a test that does not know the map find it?

Reads the confusion matrices that the label-runs grids store in their records (no model is
loaded) and prints, per record, over the runs' mean row-normalised confusion with the diagonal
removed (where each label's mistakes go):

- ``shift``: the share of a label's mistakes that go to the next label, over the share an
  average other class gets (1: no preference), the all-to-all map's own direction. It knows the
  map: an ORACLE view that chooses nothing.
- ``derangement``: the best one-to-one map of labels to other labels (a permutation with no
  fixed point, exact by dynamic programming over subsets), scored by the mean share it keeps:
  high when every label errs towards its own class, whatever the map.
- ``asymmetry``: ``sum |L - L^T| / sum (L + L^T)`` of the same shares divided by each class's
  mean share (so the class every run drifts to does not dominate): semantic confusions run
  both ways (cat and dog), a map like ``y -> y + 1`` one way.

Usage (from the repository root): ``python benchmarks/probes/all_to_all_map.py
'benchmarks/results/label-runs-w16/cells/*.json'``
"""

import argparse
import glob
import json

import torch


def mistakes(confusions: torch.Tensor) -> torch.Tensor:
    """Where each label's mistakes go: the runs' mean row-normalised confusion, diagonal removed,
    rows renormalised."""
    mean = (confusions / confusions.sum(2, keepdim=True)).mean(0)
    mean.fill_diagonal_(0)
    return mean / mean.sum(1, keepdim=True)


def best_derangement(weights: torch.Tensor) -> float:
    """The largest mean weight of a permutation without fixed points (exact, over subsets)."""
    n = len(weights)
    best = {0: 0.0}
    for mask in range(1 << n):
        if mask not in best:
            continue
        row = bin(mask).count("1")
        if row == n:
            continue
        for col in range(n):
            if col != row and not mask >> col & 1:
                value = best[mask] + float(weights[row, col])
                if value > best.get(mask | 1 << col, -1.0):
                    best[mask | 1 << col] = value
    return best[(1 << n) - 1] / n


def statistics(confusions: torch.Tensor) -> dict:
    shares = mistakes(confusions)
    n = len(shares)
    following = torch.tensor([float(shares[y, (y + 1) % n]) for y in range(n)])
    lift = shares / (shares.sum(0, keepdim=True) / (n - 1)).clamp_min(1e-12)
    lift.fill_diagonal_(0)
    return {"shift": float(following.mean() * (n - 1)), "derangement": best_derangement(shares),
            "asymmetry": float((lift - lift.T).abs().sum() / (lift + lift.T).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("records", nargs="+", help="label-runs cell records (glob patterns)")
    args = parser.parse_args()
    rows = []
    for path in sorted(p for pattern in args.records for p in glob.glob(pattern)):
        record = json.load(open(path))
        runs = (record.get("label_runs") or {}).get("runs")
        if not runs:
            continue
        label = record["label"]
        confusions = torch.tensor([run["confusion"] for run in runs], dtype=torch.float64)
        rows.append((label["attack"] != "clean", label["attack"], label["seed"], label["clean_seed"],
                     statistics(confusions)))
    print(f"{'subject':24} seed clean  shift (ORACLE)  derangement  asymmetry")
    for _, attack, seed, clean_seed, found in sorted(rows, key=lambda r: r[:4]):
        print(f"{attack:24} {seed:4} {clean_seed:5}  {found['shift']:14.2f}  {found['derangement']:11.3f}"
              f"  {found['asymmetry']:9.3f}")


if __name__ == "__main__":
    main()
