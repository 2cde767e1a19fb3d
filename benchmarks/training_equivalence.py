"""Does this checkout train the same models as another revision? (a check before reusing subjects)

Cached benchmark subjects are keyed on the fingerprint of the training code
(:func:`rnp.runs.fingerprint.training_fingerprint`), so any edit to it, a docstring or a moved
helper included, would retrain every subject (hours each). This script trains small canary
subjects with both revisions, through the stable ``rnp train`` command, in separate processes:
every attack of the suite plus a clean model, width 4, one epoch on 500 images of the packaged
demo data, in float32 and in bfloat16 with channels-last. It compares the trained tensors and
the poisoned indices bit for bit. When all match, it prints the line that declares the two
fingerprints equivalent in :data:`rnp.runs.fingerprint.EQUIVALENT_TRAINING_CODE`, so the cache
reuses the older subjects; when any differs it says which, and the subjects must be retrained.

    python benchmarks/training_equivalence.py --against d6c0cd7
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = ("none", "badnets", "blend", "trojan", "sig", "wanet", "input_aware", "lira",
           "low_frequency", "bpp", "adaptive_blend", "label_consistent")
MODES = {"fp32": ["--amp", "off"], "bf16-cl": ["--amp", "on", "--channels-last"]}
FINGERPRINT = ("try:\n from rnp.runs.fingerprint import training_fingerprint\n"
               "except ImportError:\n from rnp.bench.fingerprint import training_fingerprint\n"
               "print(training_fingerprint())")
"""Prints a checkout's training fingerprint (its module moved from rnp.bench to rnp.runs)."""
PER_CLASS = (50, 10)
"""Canary training and test images per class, taken from the packaged demo data."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", required=True, help="git revision to compare this checkout with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = canary_data(scratch / "canary.zip")
        other = scratch / "other"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(other), args.against],
                       check=True)
        try:
            results = {name: train_canaries(src, data, scratch / name)
                       for name, src in (("this", ROOT / "src"), (args.against, other / "src"))}
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=True)
    this, old = results["this"], results[args.against]
    differing = sorted(k for k in this["hashes"] if this["hashes"][k] != old["hashes"].get(k))
    print(f"training code: this checkout {this['code']}, {args.against} {old['code']}")
    print(f"{len(this['hashes']) - len(differing)} of {len(this['hashes'])} canaries identical")
    if differing:
        print("differ: " + ", ".join(differing) + " -> subjects must be retrained")
        sys.exit(1)
    print(f'equivalent: add to EQUIVALENT_TRAINING_CODE: "{this["code"]}": ("{old["code"]}",)')


def canary_data(path: Path) -> Path:
    """A small image-folder zip: the first images of each class of the packaged demo data."""
    demo = ROOT / "src" / "rnp" / "data" / "demo" / "cifar10-demo.zip"
    taken: dict[tuple[str, str], int] = {}
    with zipfile.ZipFile(demo) as source, zipfile.ZipFile(path, "w") as target:
        for name in sorted(source.namelist()):
            parts = name.split("/")
            if len(parts) < 3 or not parts[-1]:
                continue
            split, label = parts[-3], parts[-2]
            limit = PER_CLASS[0] if split == "train" else PER_CLASS[1]
            if taken.get((split, label), 0) < limit:
                taken[(split, label)] = taken.get((split, label), 0) + 1
                target.writestr("/".join(parts[-3:]), source.read(name))
    return path


def train_canaries(src: Path, data: Path, out: Path) -> dict:
    """Trains every canary with the code under ``src``; their tensor and poisoned-index hashes."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    code = subprocess.run([sys.executable, "-c", FINGERPRINT], env=env, check=True, capture_output=True,
                          text=True).stdout.strip()
    hashes = {}
    for mode, flags in MODES.items():
        for attack in ATTACKS:
            run = out / f"{attack}-{mode}"
            extra = ["--reference-run", str(out / f"none-{mode}")] if attack == "label_consistent" else []
            subprocess.run([sys.executable, "-m", "rnp.cli.main", "train", "--data", str(data), "--attack", attack,
                            "--width", "4", "--epochs", "1", "--batch-size", "50", "--quiet", "--device", "cpu",
                            "--cache-dir", str(out / "cache"), "--out", str(run), *flags, *extra],
                           env=env, check=True, capture_output=True)
            hashes[f"{attack}/{mode}"] = run_hash(run, env)
    return {"code": code, "hashes": hashes}


def run_hash(run: Path, env: dict) -> str:
    """The sha256 of a run's trained tensors (names, dtypes, values) and its poisoned indices."""
    script = ("import hashlib,sys; from safetensors.torch import load_file; t=load_file(sys.argv[1]); "
              "h=hashlib.sha256(); [h.update(k.encode()+str(t[k].dtype).encode()+t[k].numpy().tobytes()) "
              "for k in sorted(t)]; print(h.hexdigest())")
    tensors = subprocess.run([sys.executable, "-c", script, str(run / "model.safetensors")], env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
    indices = hashlib.sha256((run / "poisoned_indices.txt").read_bytes()).hexdigest()
    return json.dumps([tensors, indices])


if __name__ == "__main__":
    main()
