"""Looking into a model from outside: eval mode for the length of a block, and the activations
chosen modules produce, without changing the model or leaving hooks behind."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Puts ``model`` in eval mode for the block and restores its train/eval mode afterwards,
    also when the block raises. Only the model's own flag is remembered: ``model.train(flag)``
    sets every submodule alike, as the training loop does."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def capture_activations(modules: Mapping[str, nn.Module], record: Callable[[str, torch.Tensor], None], *,
                        inputs: bool = False):
    """Calls ``record(name, tensor)`` on every forward pass through each of ``modules`` (names to
    modules) during the block: ``tensor`` is the module's output, or with ``inputs`` its first
    input. ``record`` decides what to keep (the latest map, a running sum, every batch); the
    tensors keep their autograd graph, so a loss may be built on them. The hooks are removed on
    exit."""
    handles = []
    try:
        for name, module in modules.items():
            if inputs:
                handles.append(module.register_forward_pre_hook(functools.partial(_on_input, record, name)))
            else:
                handles.append(module.register_forward_hook(functools.partial(_on_output, record, name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _on_input(record, name: str, module: nn.Module, args: tuple) -> None:
    record(name, args[0])  # returns None, so the module's inputs stay as they are


def _on_output(record, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    record(name, output)
