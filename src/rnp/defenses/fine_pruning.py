"""Fine-Pruning (FP).

Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep
Neural Networks", RAID 2018 (arXiv 1805.12185). A backdoor tends to live in neurons that clean
inputs leave dormant. FP

1. records, over the defender's clean images, the mean activation of every channel of the
   network's LAST convolutional layer;
2. prunes channels in increasing order of that activation, one at a time, checking the
   clean accuracy after each, and stops before the accuracy has fallen by more than the
   allowed drop (the paper: 4 percentage points) -- a rule that uses the clean set only;
3. fine-tunes the pruned model on the clean set, the pruned channels held at zero.

What is measured and pruned, on any ``nn.Module``:

- *The last convolutional layer* is the last ``nn.Conv2d`` in registration order
  (``named_modules``); ``layer`` names another. In a residual network that is the second
  convolution of the last block's residual branch (PreAct-ResNet18: ``layer4.1.conv2``). Its
  output is added to the block's shortcut, so pruning a channel removes only the branch's
  contribution to that channel; the shortcut still carries it. (A block whose projection
  shortcut is registered after its convolutions would make that 1x1 shortcut the last conv;
  name the layer then.)
- *The activation* is the paper's: the output after the nonlinearity, where one follows the
  convolution directly (the convolution sits in an ``nn.Sequential`` whose next modules are
  normalisation layers and then an activation, as in VGG); the channel's value is the mean
  over images and positions. In a pre-activation network nothing follows the last conv but
  the residual addition, and the ReLU after the sum acts on shortcut + branch, which pruning
  the conv cannot remove; so FP measures the convolution's own output there, as its mean
  absolute value: a channel whose output stays near zero on clean images is the dormant
  neuron the paper prunes first. After a ReLU the absolute value changes nothing, so one
  statistic covers both cases. The report names the module measured.
- *Pruning* zeroes the conv's output-channel weights (``prune_channels``; a conv bias, if
  any, is kept). During fine-tuning the zeroed weights are re-zeroed after every step, so the
  pruned channels stay pruned, as in the paper.

Precision (``amp``, ``channels_last``; :mod:`rnp.training.precision`): the accuracy checks
and the fine-tuning run in mixed precision where "auto" says so; the activations are measured
in float32.

Defaults (``FPConfig``): allowed drop 0.04 and no cap on the pruned fraction (paper); the
fine-tuning recipe is FT's (see :mod:`rnp.defenses.finetune`), because the paper gives none
for CIFAR-size networks. ``prune_step`` > 1 checks the accuracy only every that many channels,
to bound the cost on wide layers (the paper checks after every channel).

Deviations: the paper checks the drop on a held-out validation set; the defender here has one
clean set, used both for the stopping rule and for fine-tuning. When the conv is followed by
BatchNorm, a zeroed channel makes that BatchNorm output a constant instead of zero (its shift
minus the normalised running mean); the accuracy check sees this, as it sees any pruning.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from rnp.data.images import ImageSet
from rnp.data.loader import iterate_batches
from rnp.defenses.base import DefenseResult, RemovalDefense, StageTimer, prepare_inputs
from rnp.defenses.finetune import FineTuneFields, clean_accuracy, epoch_rows, fine_tune
from rnp.defenses.masks import ChannelScores, prune_channels
from rnp.errors import RnpError
from rnp.models.probes import capture_activations, eval_mode
from rnp.training.precision import model_layout
from rnp.utils import resolve_precision

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
               nn.SiLU, nn.Mish, nn.Hardswish, nn.Softplus)
NORMALISATIONS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                  nn.GroupNorm, nn.LocalResponseNorm)


@dataclass
class FPConfig(FineTuneFields):
    """Every Fine-Pruning hyperparameter; the fine-tuning fields are FT's defaults."""

    layer: str = ""
    """The convolution to prune, by module name; empty: the last nn.Conv2d (paper)."""
    allowed_drop: float = 0.04
    """Stop before clean-set accuracy falls by more than this (paper: 4 points)."""
    max_prune_fraction: float = 1.0
    """Never prune more than this share of the layer's channels (paper: no cap besides the accuracy
    rule)."""
    prune_step: int = 1
    """Channels pruned between accuracy checks (paper: 1, checked after every channel)."""

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.allowed_drop <= 1 or not 0 < self.max_prune_fraction <= 1:
            raise RnpError("allowed_drop must lie in [0, 1] and max_prune_fraction in (0, 1]")
        if self.prune_step < 1:
            raise RnpError("prune_step must be positive")


def last_conv(model: nn.Module, name: str = "") -> tuple[str, nn.Conv2d]:
    """The model's last ``nn.Conv2d`` in registration order, or the one called ``name``."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        found = Counter(type(m).__name__ for m in model.modules() if not list(m.children()))
        kinds = ", ".join(f"{kind} x{count}" for kind, count in found.most_common()) or "none"
        raise RnpError("Fine-Pruning prunes the last convolutional layer, but the model has no "
                       f"torch.nn.Conv2d (layer types found: {kinds})")
    if not name:
        return convs[-1]
    named = dict(convs)
    if name not in named:
        raise RnpError(f"layer {name!r} is not an nn.Conv2d of the model; its convolutions are: "
                       f"{', '.join(n for n, _ in convs[-8:])}{' (last 8)' if len(convs) > 8 else ''}")
    return name, named[name]


def activation_site(model: nn.Module, conv_name: str) -> str:
    """The module whose output FP measures for the conv ``conv_name``: the activation that
    follows it directly (after normalisation layers) inside an ``nn.Sequential``, else the
    conv itself. An activation module used more than once is not taken, since its hook would
    also see its other uses."""
    parent_name, _, child = conv_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, nn.Sequential):
        names = [n for n, _ in parent.named_children()]
        for name in names[names.index(child) + 1:]:
            module = parent.get_submodule(name)
            if isinstance(module, NORMALISATIONS):
                continue
            uses = sum(m is module for _, m in model.named_modules(remove_duplicate=False))
            if isinstance(module, ACTIVATIONS) and uses == 1:
                return f"{parent_name}.{name}" if parent_name else name
            break
    return conv_name


@torch.no_grad()
def mean_activations(model: nn.Module, site: str, clean: ImageSet, *, batch_size: int,
                     device) -> torch.Tensor:
    """Per channel, the mean absolute output of module ``site`` over all clean images and
    positions, with the model in eval mode."""
    totals, counts = [], []

    def record(name: str, output: torch.Tensor) -> None:
        flat = output.detach().abs().transpose(0, 1).reshape(output.shape[1], -1)
        totals.append(flat.double().sum(1).cpu())
        counts.append(flat.shape[1])

    with eval_mode(model), capture_activations({site: model.get_submodule(site)}, record):
        for images, _ in iterate_batches(clean, batch_size, device=device):
            model(images)
    return (torch.stack(totals).sum(0) / sum(counts)).float()


class FP(RemovalDefense):
    """Fine-Pruning: ``FP(**config).fit(model, clean_data)``; fields of :class:`FPConfig`.

    The result's report has the pruning decision (``pruning``: rule, count, the pruned
    channels with their mean activations, the clean accuracy at every count checked) and the
    fine-tuning trajectory; artifacts hold the activations (a ChannelScores), the pruning
    order and the pruned model before fine-tuning.
    """

    name = "fp"
    summary = ("Fine-Pruning: prune the last conv layer's dormant channels, then fine-tune "
               "(Liu, Dolan-Gavitt, Garg, RAID 2018)")
    config_class = FPConfig
    ranking_stage = "activations"

    def purify(self, model: nn.Module, clean_data) -> DefenseResult:
        working, clean, device = prepare_inputs(model, clean_data)
        cfg = resolve_precision(self.config, device)
        mixed = cfg.amp == "on"
        timer = StageTimer()
        with timer.stage(self.ranking_stage):
            scores, order, ranking = self.rank(working, clean, device)
        with timer.stage("prune"):
            count, selection = self.choose_count(working, clean, scores, order, device, mixed)
            pruned = order[:count]
            prune_channels(working, scores, pruned)
            pruned_model = copy.deepcopy(working)
        with timer.stage("fine_tune"), model_layout(working, cfg.channels_last):
            history = fine_tune(working, clean, **cfg.schedule(), seed=cfg.seed, purpose="fp",
                                after_step=lambda info: self.keep_pruned(working, scores, pruned),
                                progress=self.progress, device=device, mixed=mixed)
        rows = scores.rows()
        report = {
            **self.base_report(clean, timer, cfg),
            "pruning": {**selection, "pruned": count, "total_channels": len(scores), **ranking,
                        "channels": [dict(zip(("layer", "channel", "value"), rows[int(i)]))
                                     for i in pruned]},
            "fine_tuning": epoch_rows(history, cfg.lr, cfg.milestones, cfg.gamma),
            "clean_accuracy_after": clean_accuracy(working, clean, device),
        }
        artifacts = {self.ranking_stage: scores, "order": order, "pruned_model": pruned_model}
        return DefenseResult(working, report, artifacts, dict(timer.seconds))

    def rank(self, model: nn.Module, clean: ImageSet, device) -> tuple[ChannelScores, torch.Tensor, dict]:
        """The channels FP may prune, their scores and the pruning order (lowest first), with
        what the report should say about where they come from: the last conv's mean
        activation on the clean images."""
        layer, conv = last_conv(model, self.config.layer)
        site = activation_site(model, layer)
        values = mean_activations(model, site, clean, batch_size=self.config.batch_size, device=device)
        scores = ChannelScores((layer,), (conv.out_channels,), values)
        return scores, scores.order(), {"layer": layer, "measured_at": site}

    @staticmethod
    def keep_pruned(model: nn.Module, scores: ChannelScores, pruned: torch.Tensor) -> bool:
        """``after_step`` of the fine-tuning: zero the pruned channels again; never stops."""
        prune_channels(model, scores, pruned)
        return False

    def choose_count(self, model: nn.Module, clean: ImageSet, scores: ChannelScores,
                     order: torch.Tensor, device, mixed: bool = False) -> tuple[int, dict]:
        """How many channels, in activation order, to prune: prune ``prune_step`` more at a
        time on a copy and stop before the clean accuracy falls below the unpruned accuracy
        minus ``allowed_drop``, or at ``max_prune_fraction`` of the channels. The accuracies
        are computed in mixed precision when ``mixed`` (the check after every channel is most
        of FP's time)."""
        cfg = self.config
        probe = copy.deepcopy(model)
        base = clean_accuracy(probe, clean, device, mixed)
        limit = math.floor(cfg.max_prune_fraction * len(scores) + 1e-9)
        floor = base - cfg.allowed_drop - 1e-9
        count, evaluated, stopped_by = 0, {0: base}, "max_prune_fraction"
        while count < limit:
            step = min(count + cfg.prune_step, limit)
            prune_channels(probe, scores, order[count:step])
            evaluated[step] = clean_accuracy(probe, clean, device, mixed)
            if evaluated[step] < floor:
                stopped_by = "accuracy"
                break
            count = step
        return count, {"rule": "accuracy_drop", "allowed_drop": cfg.allowed_drop,
                       "max_prune_fraction": cfg.max_prune_fraction, "stopped_by": stopped_by,
                       "clean_accuracy_before": base, "clean_accuracy_after_pruning": evaluated[count],
                       "evaluated": {str(k): v for k, v in evaluated.items()}}
