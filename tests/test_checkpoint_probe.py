"""``benchmarks/probes/checkpoint_asr.py``: an unfinished run's learned trigger, read back from
its epoch checkpoint, is the trigger the attack applies."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import tiny_cnn, tiny_image_set

from rnp.attacks import ATTACKS, attack_from_spec
from rnp.attacks.input_aware import InputAware
from rnp.attacks.lira import Lira
from rnp.io.checkpoint import load_checkpoint
from rnp.training import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

PROBE = Path(__file__).parents[1] / "benchmarks" / "probes" / "checkpoint_asr.py"
K = 3


def probe_module():
    spec = importlib.util.spec_from_file_location("checkpoint_asr", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def input_aware() -> InputAware:
    attack = InputAware(generator_width=8, mask_epochs=1, mask_batch_size=4, poison_rate=0.2, cross_rate=0.2)
    attack.prepare(tiny_image_set(n=48, num_classes=K, size=16, seed=3))
    return attack


def lira() -> Lira:
    return Lira(generator_width=4, eps=0.05, generator_lr=1e-2, joint_fraction=1.0)


@pytest.mark.parametrize("name, make", [("input_aware", input_aware), ("lira", lira)])
def test_generator_weights_from_a_checkpoint_rebuild_the_attacks_trigger(name, make, tmp_path, monkeypatch):
    monkeypatch.setitem(ATTACKS, name, type(make()))
    attack, checkpoint = make(), tmp_path / "checkpoint.safetensors"
    train(tiny_cnn(num_classes=K, batch_norm=True), tiny_image_set(n=40, num_classes=K, size=16, seed=3),
          TrainConfig(epochs=1, batch_size=5, lr=0.05, augment=False), checkpoint=checkpoint,
          progress=False, hook=attack.training_hook(K))
    tensors, _ = load_checkpoint(checkpoint)
    rebuilt = attack_from_spec(attack.spec(), probe_module().generator_weights(tensors))
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rebuilt.apply_trigger(images), attack.apply_trigger(images))
