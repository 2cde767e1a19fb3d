"""Issue 14 probe: has a subject's backdoor taken hold yet, before its training ends?

A subject takes hours to train; a clean-label attack may never take hold (label-consistent did
not at width 16 under the current training code: ASR 1.2%). This reads the model weights of an
unfinished run's last epoch checkpoint and measures CA and ASR on a seeded subset of the test
images, so a failing subject can be stopped early; an attack that learns its trigger while the
classifier trains (Input-Aware, LIRA) takes it from the same checkpoint. Test data is used: it judges a subject, it
chooses nothing a defender would. Usage (from the repository root, on a run folder of the cache):

    OMP_NUM_THREADS=1 python benchmarks/probes/checkpoint_asr.py ~/.cache/rnp/zoo/KEY --images 2000
"""

import argparse
from pathlib import Path

import torch

from rnp.attacks import attack_from_spec
from rnp.data import load_dataset
from rnp.io.checkpoint import load_checkpoint
from rnp.metrics.backdoor import evaluate_backdoor
from rnp.models import build_model
from rnp.runs.folder import load_weights, read_run_info
from rnp.utils import generator_for

CHECKPOINT = "checkpoint.safetensors"
HOOK = "hook."
OPTIMIZER_SLOTS = "optimizer."
RANDOM_STATES = {"rng", "generator"}


def generator_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trigger generators' weights in a checkpoint's training-hook state (Input-Aware's G and
    M, LIRA's T), named as the attack's artefacts are: the hook's state without its optimiser
    slots and random-generator states (a plain ``generator`` key is one; ``generator.*`` are
    LIRA's weights)."""
    state = {k.removeprefix(HOOK): v for k, v in tensors.items() if k.startswith(HOOK)}
    return {k: v for k, v in state.items() if not k.startswith(OPTIMIZER_SLOTS) and k not in RANDOM_STATES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a run folder whose training has not finished")
    parser.add_argument("--images", type=int, default=2000, help="test images to measure on")
    parser.add_argument("--cache-dir", default=None, help="the decoded-dataset cache")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = read_run_info(args.run)
    tensors, metadata = load_checkpoint(args.run / CHECKPOINT)
    model = build_model(**info["model"])
    load_weights(model, {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
                 args.run / CHECKPOINT)
    test = load_dataset(info["dataset"]["spec"], cache_dir=args.cache_dir).test
    test = test.subset(torch.randperm(len(test), generator=generator_for(0, "checkpoint-probe"))[:args.images])
    attack = attack_from_spec(info["attack"], generator_weights(tensors)) if info.get("attack") else None
    metrics = evaluate_backdoor(model.eval(), test, attack.triggered_test(test) if attack else None)
    history = metadata.get("history", [])
    print(f"epoch {len(history)}: train accuracy {100 * history[-1]['accuracy']:.1f}%" if history else "epoch 0")
    print(f"CA {100 * metrics.clean_accuracy:.1f}%"
          + (f", ASR {100 * metrics.attack_success_rate:.1f}% on {args.images} test images" if attack else ""))


if __name__ == "__main__":
    main()
