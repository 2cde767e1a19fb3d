"""What every removal defense is: ``Defense(**settings).fit(model, clean_data) -> DefenseResult``.

A defense sees only the suspect model and the defender's clean images; it never sees test
labels or poisoned data. The input model is never modified: the result holds a new model.
Each defense keeps its hyperparameters in one dataclass (``config_class``) whose defaults are
its paper's; keyword settings override single fields, from Python and from the CLI alike.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from rnp.data.images import ImageSet, as_image_set
from rnp.errors import RnpError
from rnp.utils import model_device

MIN_CLEAN_IMAGES = 10


@dataclass(eq=False)
class DefenseResult:
    """The purified model, the defense's artefacts, its report, and seconds per stage."""

    model: nn.Module
    report: dict
    artifacts: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class RemovalDefense:
    """Base class of removal defenses.

    Subclasses set ``name`` (the registry and CLI key), ``summary`` (one line for
    ``rnp defend --list``), ``config_class`` (a dataclass of every hyperparameter) and
    implement :meth:`fit`. ``Defense(config)`` takes a whole config, ``Defense(**settings)``
    the defaults with some fields overridden; unknown settings are an error.
    """

    name: str = ""
    summary: str = ""
    config_class: type | None = None

    def __init__(self, config=None, *, progress: bool = False, **overrides):
        if config is not None and overrides:
            raise RnpError("give either a config or keyword settings, not both")
        if config is None:
            config = self.config_class(**self.check_settings(overrides))
        elif not isinstance(config, self.config_class):
            raise RnpError(f"{self.name} takes a {self.config_class.__name__}, "
                           f"got {type(config).__name__}")
        self.config = config
        self.progress = progress

    @classmethod
    def check_settings(cls, settings: dict) -> dict:
        """``settings`` unchanged if every key is a field of ``config_class``; else RnpError."""
        known = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise RnpError(f"{cls.name} has no setting {', '.join(map(repr, unknown))}; "
                           f"its settings are: {', '.join(sorted(known))}")
        return settings

    def fit(self, model: nn.Module, clean_data) -> DefenseResult:
        """Purifies a copy of ``model`` using only ``clean_data`` (an ImageSet or a dataset of
        ``(image, label)`` pairs)."""
        raise NotImplementedError

    def base_report(self, clean: ImageSet, timer: "StageTimer") -> dict:
        """The report fields every defense shares: method, settings, clean-set size, seconds."""
        return {"method": self.name, "config": dataclasses.asdict(self.config),
                "clean_images": len(clean), "seconds": dict(timer.seconds)}


class StageTimer:
    """Collects wall-clock seconds per named stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def prepare_inputs(model: nn.Module, clean_data) -> tuple[nn.Module, ImageSet, torch.device]:
    """A private copy of the model, the clean data as an ImageSet, and the model's device.

    Checks that the clean set is large enough and that its labels fit the model's outputs.
    """
    if not isinstance(model, nn.Module):
        raise RnpError(f"expected a torch.nn.Module, got {type(model).__name__}")
    clean = as_image_set(clean_data)
    if len(clean) < MIN_CLEAN_IMAGES:
        raise RnpError(f"the clean set has {len(clean)} images; at least {MIN_CLEAN_IMAGES} "
                       "are needed (RNP's default is 500)")
    device = model_device(model)
    working = copy.deepcopy(model)
    with torch.no_grad():
        was_training = working.training
        working.eval()
        try:
            outputs = working(clean.images[:2].float().div(255).to(device))
        except RuntimeError as error:
            raise RnpError(f"the model cannot take the clean images of shape "
                           f"{tuple(clean.images.shape[1:])}: {str(error).splitlines()[0]}") from None
        working.train(was_training)
    if outputs.dim() != 2:
        raise RnpError(f"the model must output class scores (N, classes), got {tuple(outputs.shape)}")
    top = int(clean.labels.max())
    if top >= outputs.shape[1]:
        raise RnpError(f"the clean set has label {top} but the model has only {outputs.shape[1]} "
                       "outputs")
    return working, clean, device
