"""Two-Stage Backdoor Defense (TSBD).

Lin, Liu, Wei, Li and Xiong, "Unveiling and Mitigating Backdoor Vulnerabilities based on
Unlearning Weight Changes and Backdoor Activeness", NeurIPS 2024 (arXiv 2405.20291). The
authors' release is a BackdoorBench defense (github.com/linweiii/TSBD: ``tsbd.py`` and
``tsbd/config.yaml``), read for values only. Two observations drive it: the channels whose
weights move most while the model unlearns the clean images (gradient ascent, as in RNP's
first stage) tend to be the ones that move when unlearning the poisoned images, so they can
be found without poisoned data; and a backdoored model's neurons are more *active* (larger
gradient norms) than a clean model's, so plain fine-tuning readily revives the backdoor.

1. *NWC-based backdoor reinitialisation*: unlearn a copy of the model on the clean images until
   its clean accuracy is at most ``clean_threshold`` (:meth:`rnp.defenses.rnp.RNP.unlearn`
   with TSBD's settings). A channel's Neuron Weight Change (NWC) is the L1 norm of the change of
   its weights, ``sum |w_unlearned - w_original|``. The ``neuron_fraction`` of the channels with
   the largest NWC, ranked over all scored layers together, are selected; among all their
   weights, the ``weight_fraction`` with the largest change (the release's weight ratio ``m``)
   are set to zero in the ORIGINAL model.
2. *Activeness-aware fine-tuning*: fine-tune the reinitialised model on the clean images with a
   gradient-norm penalty, by the first-order scheme of Zhao, Zhang and Hu ("Penalizing Gradient
   Norm for Efficiently Improving Generalization in Deep Learning", ICML 2022): each step
   descends ``(1 - alpha) g(w) + alpha g(w + radius * g/|g|)``, the cross-entropy gradient at
   the weights and at the weights moved ``radius`` along it, which approximates the gradient of
   ``CE + alpha * radius * |g|``. As in the release, ``g/|g|`` is normalised per parameter
   tensor, so the norm penalised is the sum of the tensors' gradient norms.

Defaults are the release's config and code (CIFAR-10, PreAct-ResNet18): unlearning by SGD with
learning rate 1e-4 and momentum 0.9, batch 256, until clean accuracy is at most 10% (at most
1000 epochs); convolution weights scored, the shortcut 1x1 convolutions left out; weight ratio
m = 0.7; fine-tuning by SGD with learning rate 0.01, momentum 0.9, constant, 20 epochs, batch
256; r = 0.05, alpha = 0.7; neither optimiser has weight decay; crop and flip on the clean
images in both stages. The neuron ratio ``n`` could not be read from the paper when this was
written, and the release sweeps it (0.01 to 0.9) rather than fixing it: ``neuron_fraction`` =
0.15 is our choice within that sweep, not checked against the paper.

Deviations: (1) unlearning stops on the running accuracy of the epoch's batches (RNP's
per-epoch check), where the release evaluates the model in eval mode after each epoch; (2)
exactly ``weight_fraction`` of the selected weights are zeroed (equal changes in layer and
position order), where the release zeroes every weight at or above the threshold change; (3)
BatchNorm running statistics are updated by the step's first forward pass, where the release
updates them with an extra forward pass after each step (the penalty's perturbed pass leaves
them alone in both); (4) the release's fine-tuning loop runs ``ft_epoch + 1`` = 21 epochs, this
one ``epochs``; (5) batches are shuffled in both stages (the package's one loop), where the
release's clean loader keeps a fixed order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from rnp.data.images import ImageSet
from rnp.defenses.base import DefenseResult, RemovalDefense, StageTimer, prepare_inputs
from rnp.defenses.finetune import FineTuneFields, clean_accuracy, epoch_rows, fine_tune
from rnp.defenses.masks import ChannelScores, maskable_layers, parse_layer_kinds
from rnp.defenses.rnp import RNP, RNPConfig
from rnp.errors import RnpError
from rnp.training.precision import model_layout
from rnp.utils import resolve_precision


@dataclass
class TSBDConfig(FineTuneFields):
    """Every TSBD hyperparameter. (release): github.com/linweiii/TSBD, config.yaml and tsbd.py.

    The inherited SGD fields are stage 2's fine-tuning; ``batch_size``, ``augment``,
    ``weight_decay`` and ``seed`` serve both stages.
    """

    epochs: int = 20
    """Epochs of activeness-aware fine-tuning, stage 2 (release ft_epoch)."""
    batch_size: int = 256
    """Clean images per step of unlearning and of fine-tuning (release)."""
    lr: float = 0.01
    """Constant SGD learning rate of the fine-tuning (release lr_ft; its scheduler is never
    built)."""
    momentum: float = 0.9
    """SGD momentum of the fine-tuning (release)."""
    weight_decay: float = 0.0
    """SGD weight decay of unlearning and fine-tuning (release: neither optimiser is given one)."""
    augment: bool = True
    """Random crop (padding 4) and horizontal flip of the clean images in both stages (release:
    the clean set carries the training transform)."""
    seed: int = 0
    """Seeds the batch order and augmentation of unlearning and fine-tuning."""
    unlearn_lr: float = 1e-4
    """Learning rate of the unlearning SGD, stage 1 (release lr_un)."""
    unlearn_momentum: float = 0.9
    """Momentum of the unlearning SGD (release)."""
    unlearn_epochs: int = 1000
    """Most epochs of unlearning (release epochs)."""
    clean_threshold: float = 0.1
    """Unlearning stops once the epoch's clean accuracy is at most this (release: 0.10)."""
    reinit_layers: str = "conv"
    """Layers whose output channels are scored by NWC and reinitialised: a comma list of conv,
    batchnorm, layernorm, linear, or auto (release layer_type: conv)."""
    skip_shortcuts: bool = True
    """Leave out layers whose name contains 'shortcut', the 1x1 projections of residual models
    (release)."""
    neuron_fraction: float = 0.15
    """Share of all scored channels, those of largest NWC, that are reinitialised (paper's n; value
    not found in the paper, the release sweeps 0.01-0.9; chosen)."""
    weight_fraction: float = 0.7
    """Share of the selected channels' weights, those that changed most, set to zero (release m)."""
    radius: float = 0.05
    """Step along the normalised gradient to the second gradient of the penalty (release r)."""
    alpha: float = 0.7
    """Weight of the second gradient: each step descends (1 - alpha) g(w) + alpha g(w + radius
    g/|g|) (release)."""

    def __post_init__(self):
        super().__post_init__()
        parse_layer_kinds(self.reinit_layers)
        if not 0 <= self.clean_threshold <= 1:
            raise RnpError(f"clean_threshold must lie in [0, 1], got {self.clean_threshold!r}")
        if self.radius <= 0:
            raise RnpError(f"radius must be positive, got {self.radius!r}")
        if not 0 <= self.alpha <= 1:
            raise RnpError(f"alpha must lie in [0, 1], got {self.alpha!r}")


class TSBD(RemovalDefense):
    """Two-Stage Backdoor Defense: ``TSBD(**config).fit(model, clean_data)``; fields of
    :class:`TSBDConfig`.

    The report holds the unlearning's per-epoch loss and accuracy, every reinitialised channel
    (layer, index, NWC, weights zeroed), the fine-tuning's per-epoch loss, accuracy and penalty,
    the clean-set accuracy before, after stage 1 and after stage 2, and the seconds per stage. The
    artefacts are the NWC of every scored channel (``nwc``, written as ``nwc.csv`` by the CLI),
    the ``unlearned_model`` and the ``reinitialized_model`` (after stage 1).
    """

    name = "tsbd"
    summary = ("Two-Stage Backdoor Defense: zero the weights that clean unlearning changed most, "
               "then fine-tune with a gradient-norm penalty (Lin et al., NeurIPS 2024)")
    config_class = TSBDConfig

    def purify(self, model: nn.Module, clean_data) -> DefenseResult:
        working, clean, device = prepare_inputs(model, clean_data)
        cfg = resolve_precision(self.config, device)
        layers = scored_layers(working, cfg.reinit_layers, cfg.skip_shortcuts)
        timer = StageTimer()
        before = clean_accuracy(working, clean, device)
        with timer.stage("unlearn"):
            unlearned, unlearning = self.unlearn(working, clean, device)
        with timer.stage("reinitialize"):
            scores = neuron_weight_changes(working, unlearned, layers)
            selected = largest_channels(scores, cfg.neuron_fraction)
            zeroed = zero_largest_changes(working, unlearned, scores, selected, cfg.weight_fraction)
            reinitialized = _frozen_copy(working)
            after_reinit = clean_accuracy(working, clean, device)
        with timer.stage("fine_tune"), model_layout(working, cfg.channels_last):
            penalty = GradientNormPenalty(working, cfg.radius, cfg.alpha)
            history = fine_tune(working, clean, **cfg.schedule(), seed=cfg.seed, purpose="tsbd-finetune",
                                penalty=penalty, progress=self.progress, device=device, mixed=cfg.amp == "on")
        report = {**self.base_report(clean, timer, cfg),
                  "unlearning": unlearning,
                  "reinitialization": _reinit_summary(scores, selected, zeroed, cfg),
                  "fine_tuning": [{**row, "penalty": value} for row, value in
                                  zip(epoch_rows(history, cfg.lr, cfg.milestones, cfg.gamma),
                                      penalty.epoch_means(history))],
                  "clean_accuracy_before": before,
                  "clean_accuracy_after_reinitialization": after_reinit,
                  "clean_accuracy_after": clean_accuracy(working, clean, device)}
        artifacts = {"nwc": scores, "unlearned_model": unlearned, "reinitialized_model": reinitialized}
        return DefenseResult(working, report, artifacts, dict(timer.seconds))

    def unlearn(self, original: nn.Module, clean: ImageSet, device) -> tuple[nn.Module, dict]:
        """Stage 1's gradient ascent: RNP's unlearning routine with TSBD's settings (constant
        learning rate, stop checked per epoch, this config's precision).
        Returns the unlearned copy and its per-epoch summary (RNP's per-step trajectory left out)."""
        cfg = self.config
        settings = RNPConfig(batch_size=cfg.batch_size, augment=cfg.augment, unlearn_lr=cfg.unlearn_lr,
                             unlearn_momentum=cfg.unlearn_momentum, unlearn_weight_decay=cfg.weight_decay,
                             unlearn_milestones=(), unlearn_epochs=cfg.unlearn_epochs,
                             clean_threshold=cfg.clean_threshold, stop_check="epoch", seed=cfg.seed,
                             amp=cfg.amp, channels_last=cfg.channels_last)
        unlearned, summary, _ = RNP(settings, progress=self.progress).unlearn(original, clean, device)
        summary.pop("per_step")
        return unlearned.eval(), summary


def scored_layers(model: nn.Module, kinds: str, skip_shortcuts: bool) -> list[tuple[str, nn.Module]]:
    """The layers whose channels TSBD scores: those of the given kinds (see
    :func:`rnp.defenses.masks.maskable_layers`), without the shortcuts when asked."""
    layers = maskable_layers(model, kinds)
    kept = [(name, module) for name, module in layers if not (skip_shortcuts and "shortcut" in name)]
    if not kept:
        raise RnpError(f"every {kinds} layer of the model is a shortcut; use --no-skip-shortcuts")
    return kept


@torch.no_grad()
def neuron_weight_changes(original: nn.Module, unlearned: nn.Module,
                          layers: list[tuple[str, nn.Module]]) -> ChannelScores:
    """The NWC of every output channel of ``layers`` (modules of ``original``): the L1 norm of
    the change of its weights between ``original`` and ``unlearned`` (a copy of it)."""
    changed = dict(unlearned.named_modules())
    values = [(changed[name].weight - module.weight).abs().reshape(len(module.weight), -1).sum(1).cpu()
              for name, module in layers]
    return ChannelScores(tuple(name for name, _ in layers), tuple(len(v) for v in values),
                         torch.cat(values).float())


def largest_channels(scores: ChannelScores, fraction: float) -> torch.Tensor:
    """Indices into ``scores`` of the ``int(fraction * len(scores))`` largest values, largest
    first (equal values in layer order)."""
    order = torch.sort(scores.values, descending=True, stable=True).indices
    return order[:int(fraction * len(scores))]


@torch.no_grad()
def zero_largest_changes(model: nn.Module, unlearned: nn.Module, scores: ChannelScores,
                         channels: torch.Tensor, fraction: float) -> list[int]:
    """Zeroes in ``model``, in place, ``int(fraction * n)`` of the ``n`` weights of the given
    channels (indices into ``scores``): those whose value differs most from ``unlearned``'s,
    over all the channels together. Returns how many weights of each channel were zeroed."""
    modules, changed = dict(model.named_modules()), dict(unlearned.named_modules())
    rows = []
    for index in channels.tolist():
        name = scores.layer_names[int(scores.layers[index])]
        position = int(scores.channels[index])
        weight = modules[name].weight[position]
        rows.append((weight, (changed[name].weight[position] - weight).abs().flatten()))
    if not rows:
        return []
    changes = torch.cat([change for _, change in rows])
    chosen = torch.zeros_like(changes, dtype=torch.bool)
    chosen[torch.sort(changes, descending=True, stable=True).indices[:int(fraction * len(changes))]] = True
    counts, start = [], 0
    for weight, change in rows:
        mask = chosen[start:start + len(change)]
        weight.masked_fill_(mask.view_as(weight), 0.0)
        counts.append(int(mask.sum()))
        start += len(change)
    return counts


class GradientNormPenalty:
    """The activeness-aware term for :func:`rnp.training.loop.run_epoch`'s ``penalty``.

    Returns ``alpha * (CE(w + radius * g/|g|) - CE(w))``, with ``g`` the cross-entropy gradient
    of the batch held constant and normalised per parameter tensor; added to the step's
    cross-entropy, its gradient makes the update ``(1 - alpha) g(w) + alpha g(w + radius g/|g|)``.
    Its value, about ``alpha * radius * |g|``, is kept per step. The perturbed pass uses copies
    of the buffers, so BatchNorm statistics move once per step.
    """

    def __init__(self, model: nn.Module, radius: float, alpha: float):
        self.model, self.radius, self.alpha = model, radius, alpha
        self.values: list[float] = []

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        names, params = zip(*[(n, p) for n, p in self.model.named_parameters() if p.requires_grad])
        loss = F.cross_entropy(logits, labels)
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        moved = {name: param + self.radius * grad / grad.norm().clamp_min(1e-12)
                 for name, param, grad in zip(names, params, grads) if grad is not None}
        buffers = {name: buffer.clone() for name, buffer in self.model.named_buffers()}
        shifted = functional_call(self.model, {**buffers, **moved}, (images,))
        term = self.alpha * (F.cross_entropy(shifted, labels) - loss)
        self.values.append(float(term.detach()))
        return term

    def epoch_means(self, history) -> list[float]:
        """The mean penalty of each epoch of ``history`` (the EpochStats of the fine-tuning)."""
        means, start = [], 0
        for stats in history:
            steps = self.values[start:start + stats.steps]
            means.append(sum(steps) / max(len(steps), 1))
            start += stats.steps
        return means


def _reinit_summary(scores: ChannelScores, selected: torch.Tensor, zeroed: list[int],
                    cfg: TSBDConfig) -> dict:
    layers, positions = scores.layers, scores.channels
    summary = {"layers": len(scores.layer_names), "total_channels": len(scores),
               "reinitialized": len(selected), "weights_zeroed": sum(zeroed),
               "nwc_mean": float(scores.values.mean()),
               "channels": [{"layer": scores.layer_names[int(layers[i])], "channel": int(positions[i]),
                             "nwc": float(scores.values[i]), "weights_zeroed": count}
                            for i, count in zip(selected.tolist(), zeroed)]}
    if not len(selected):
        summary["warning"] = (f"neuron_fraction {cfg.neuron_fraction} of {len(scores)} channels selects "
                              "none: no weight was reinitialised, only fine-tuning ran")
    return summary


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` kept as an artefact: eval mode, no gradients."""
    return copy.deepcopy(model).eval().requires_grad_(False)
