"""What every removal defense is: ``Defense(**settings).fit(model, clean_data) -> DefenseResult``.

A defense sees only the suspect model and the defender's clean images; it never sees test
labels or poisoned data. The input model is never modified: the result holds a new model.
Each defense keeps its hyperparameters in one dataclass (``config_class``) whose defaults are
its paper's; keyword settings override single fields, from Python and from the CLI alike.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from rnp.data.images import ImageSet, as_image_set
from rnp.errors import RnpError
from rnp.metrics.backdoor import accuracy
from rnp.models.checks import check_finite_weights, check_logits
from rnp.models.probes import eval_mode
from rnp.training.evaluate import predict
from rnp.utils import model_device

MIN_CLEAN_IMAGES = 10
# A purified model whose clean-set accuracy is at most chance level plus this is flagged as
# collapsed (when it was above that before the defense).
CHANCE_MARGIN = 0.05

logger = logging.getLogger(__name__)


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
    implement :meth:`purify`, which :meth:`fit` wraps with the checks every defense shares.
    ``Defense(config)`` takes a whole config, ``Defense(**settings)`` the defaults with some
    fields overridden; unknown settings are an error.
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
        ``(image, label)`` pairs, see :func:`rnp.data.as_image_set`), then judges the outcome.

        ``report["warnings"]`` lists every warning of the run, each also logged once on the
        ``rnp.defenses.base`` logger (Python prints it on stderr unless logging is configured):
        those a stage wrote in the report, a model that predicts one class for every clean image,
        and a defense that brought clean-set accuracy down to chance level. A purified model with
        non-finite weights (a diverged defense) is an :class:`RnpError`.
        """
        clean = as_image_set(clean_data)
        result = self.purify(model, clean)
        check_finite_weights(result.model, f"{self.name} diverged: its purified model")
        found = stage_warnings(result.report) + outcome_warnings(model, result.model, clean)
        result.report["warnings"] = found
        for message in found:
            logger.warning(message)
        return result

    def purify(self, model: nn.Module, clean_data) -> DefenseResult:
        """The defense itself, implemented by each subclass; :meth:`fit` runs it and adds the
        checks every defense shares."""
        raise NotImplementedError

    def base_report(self, clean: ImageSet, timer: "StageTimer", config=None) -> dict:
        """The report fields every defense shares: method, settings (``config`` when given: the
        settings as they ran, precision resolved for the device), clean-set size, seconds."""
        return {"method": self.name, "config": dataclasses.asdict(config or self.config),
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

    Checks, before any work, that the model's weights are finite, that the clean set is large
    enough, and that on two clean images the model outputs finite class scores that its labels fit.
    """
    if not isinstance(model, nn.Module):
        raise RnpError(f"expected a torch.nn.Module, got {type(model).__name__}")
    check_finite_weights(model)
    clean = as_image_set(clean_data)
    if len(clean) < MIN_CLEAN_IMAGES:
        raise RnpError(f"the clean set has {len(clean)} images; at least {MIN_CLEAN_IMAGES} "
                       "are needed (RNP's default is 500)")
    device = model_device(model)
    working = copy.deepcopy(model)
    with torch.no_grad(), eval_mode(working):
        try:
            outputs = working(clean.images[:2].float().div(255).to(device))
        except RuntimeError as error:
            raise RnpError(f"the model cannot take the clean images of shape "
                           f"{tuple(clean.images.shape[1:])}: {str(error).splitlines()[0]}") from None
    check_logits(outputs)
    top = int(clean.labels.max())
    if top >= outputs.shape[1]:
        raise RnpError(f"the clean set has label {top} but the model has only {outputs.shape[1]} "
                       "outputs")
    return working, clean, device


def stage_warnings(report: dict) -> list[str]:
    """The warnings a defense wrote in its report: a ``"warning"`` at the top level or in one of
    its sections (e.g. RNP's ``unlearning`` and ``pruning``)."""
    found = [report["warning"]] if isinstance(report.get("warning"), str) else []
    return found + [value["warning"] for value in report.values()
                    if isinstance(value, dict) and isinstance(value.get("warning"), str)]


def outcome_warnings(model: nn.Module, purified: nn.Module, clean: ImageSet) -> list[str]:
    """Warnings about a degenerate outcome, judged on the defender's clean images (the only
    labelled data a defense has): a model that already predicts one class for all of them, and
    a purified model whose accuracy on them fell to within ``CHANCE_MARGIN`` of chance level."""
    before = predict(model, clean, device=model_device(model))
    accuracy_before = accuracy(before, clean.labels)
    after = accuracy(predict(purified, clean, device=model_device(purified)), clean.labels)
    found = []
    if len(before.unique()) == 1:
        label = int(before[0])
        name = clean.classes[label] if label < clean.num_classes else str(label)
        found.append(f"the model predicts class {name!r} for all {len(clean)} clean images before "
                     "the defense: it looks broken or untrained, so the defense's result means little")
    chance = 1 / clean.num_classes
    if after <= chance + CHANCE_MARGIN < accuracy_before:
        found.append(f"the defense brought clean-set accuracy down to {after:.1%} from "
                     f"{accuracy_before:.1%}, chance level being {chance:.1%}: "
                     "the purified model has lost its clean function")
    return found
