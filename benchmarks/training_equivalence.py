"""Does this checkout train the same models as another revision? (a check before reusing subjects)

Cached benchmark subjects are keyed on the fingerprint of the training code
(:func:`rnp.runs.fingerprint.training_fingerprint`), so any edit to it, a docstring or a moved
helper included, would retrain every subject (hours each). This script trains small canary
subjects with both revisions, through the stable ``rnp train`` command, one process per
revision: every attack of the suite plus a clean model, width 4, one epoch on 200 images of the
packaged demo data (the costly attacks with fewer generator steps), in float32 and in bfloat16
with channels-last. It compares the trained tensors and the poisoned indices bit for bit. When
all match, it prints the line that declares the two fingerprints equivalent in
:data:`rnp.runs.fingerprint.EQUIVALENT_TRAINING_CODE`, so the cache reuses the older subjects;
when any differs it says which and exits with status 1. When only some attacks differ, it also
prints that entry with the :data:`rnp.runs.fingerprint.RETRAINED_ATTACKS` line that retrains
those attacks' subjects and keeps the others'.

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
CHEAP = {"input_aware": ["--trigger", "mask_epochs=1", "--trigger", "generator_width=8"],
         "lira": ["--trigger", "generator_width=8"], "label_consistent": ["--trigger", "steps=2"]}
"""Attack settings that keep a canary cheap: the code paths run, only fewer steps or channels."""
PER_CLASS = (20, 5)
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
    entry = f'"{this["code"]}": ("{old["code"]}",)'
    if not differing:
        print(f"equivalent: add to EQUIVALENT_TRAINING_CODE: {entry}")
        return
    print("differ: " + ", ".join(differing))
    retrained = sorted({name.split("/")[0] for name in differing})
    if len(retrained) == len(ATTACKS):
        print("every attack differs -> every subject must be retrained")
        sys.exit(1)
    print(f"equivalent except for {', '.join(retrained)}: add to EQUIVALENT_TRAINING_CODE: {entry}, "
          f'and to RETRAINED_ATTACKS: "{this["code"]}": {tuple(retrained)!r}')
    sys.exit(1)


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
    """Trains every canary with the code under ``src`` in one child process (its ``--worker``
    mode, which imports that code); its training fingerprint and the canaries' hashes."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, __file__, "--worker", str(data), str(out)], env=env, check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.splitlines()[-1])


def worker(data: str, out: str) -> None:
    """Trains the canaries with the ``rnp`` on this process's path and prints their hashes."""
    import torch
    from safetensors.torch import load_file

    from rnp.cli.main import main as rnp
    try:
        from rnp.runs.fingerprint import training_fingerprint
    except ImportError:  # before the run-folder code moved to rnp.runs
        from rnp.bench.fingerprint import training_fingerprint
    torch.set_num_threads(1)
    hashes = {}
    for mode, flags in MODES.items():
        for attack in ATTACKS:
            run = Path(out) / f"{attack}-{mode}"
            extra = [*CHEAP.get(attack, []),
                     *(["--reference-run", str(Path(out) / f"none-{mode}")] if attack == "label_consistent" else [])]
            code = rnp(["train", "--data", data, "--attack", attack, "--width", "4", "--epochs", "1",
                        "--batch-size", "50", "--quiet", "--device", "cpu", "--cache-dir", str(Path(out) / "cache"),
                        "--out", str(run), *flags, *extra])
            if code:
                raise SystemExit(f"canary {attack}/{mode} failed")
            tensors = load_file(run / "model.safetensors")
            digest = hashlib.sha256((run / "poisoned_indices.txt").read_bytes())
            for name in sorted(tensors):
                digest.update(name.encode() + str(tensors[name].dtype).encode() + tensors[name].numpy().tobytes())
            hashes[f"{attack}/{mode}"] = digest.hexdigest()
    print(json.dumps({"code": training_fingerprint(), "hashes": hashes}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:4])
    else:
        main()
