"""Adversarial Neuron Pruning (ANP).

Wu and Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021
(arXiv 2110.14430); authors' code: github.com/csdongxian/ANP_backdoor.

A backdoored network collapses (towards the target class) under small adversarial changes of
its neurons; a clean one does not. ANP gives every BatchNorm neuron ``k`` a mask ``m_k`` in
[0, 1] and two perturbations in [-eps, eps]: ``delta_k`` on the scale and ``xi_k`` on the shift,
so the perturbed neuron computes ``(m_k + delta_k) gamma_k x_hat + (1 + xi_k) beta_k``. Each
iteration, on one clean mini-batch:

1. draw ``delta`` and ``xi`` uniformly in [-eps, eps] and take ``steps`` signed-gradient ascent
   steps on the cross-entropy of the perturbed network;
2. take one SGD step on the masks for
   ``alpha * CE(masked network) + (1 - alpha) * CE(masked and perturbed network)``,
   then clip the masks to [0, 1].

Neurons whose mask ends low are the ones the network needed only to stay robust to the
perturbation, the backdoor's; their BatchNorm scale is set to zero in the original model
(shift and running statistics kept, as the authors' pruning script does).

Defaults (``ANPConfig``) are the paper's experimental settings and the authors' scripts': 2000
iterations of batch 128 on the clean set with random crop and flip, mask SGD with constant
learning rate 0.2 and momentum 0.9, eps 0.4, one perturbation step of size eps / steps,
alpha 0.2, pruning by threshold 0.2 (rule "number" prunes a fixed count instead).

Deviations:

- The paper constrains the perturbations to [-eps, eps]; the authors' code does not clip them
  after the ascent step, so with one step of size eps they reach up to 2 eps. We project onto
  [-eps, eps] as the paper states; ``project_perturbation=False`` gives the code's behaviour.
- Masks and perturbations are attached with ``torch.nn.utils.parametrize`` to layers found by
  type, so any model works; the authors replace the model's BatchNorm class instead. Models
  without BatchNorm get the same treatment on LayerNorm, convolution or linear channels
  (``mask_layers``, see :mod:`rnp.defenses.masks`): mask and ``delta`` on each output channel's
  weights, ``xi`` on its bias. The paper only evaluates BatchNorm networks.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from rnp.defenses.base import DefenseResult, RemovalDefense, StageTimer, prepare_inputs
from rnp.defenses.masks import ChannelScores, maskable_layers, parse_layer_kinds, prune_channels
from rnp.errors import RnpError
from rnp.training.loop import StepInfo, run_epoch
from rnp.training.precision import PrecisionFields, grad_scaler, model_layout
from rnp.utils import check_config, generator_for, progress_bar, resolve_precision

PRUNE_RULES = ("threshold", "number")


@dataclass
class ANPConfig(PrecisionFields):
    """Every ANP hyperparameter; defaults are the paper's / the authors' code's."""

    iterations: int = 2000
    """Mini-batches of mask optimisation (paper, code --nb-iter: 2000)."""
    batch_size: int = 128
    """Clean images per batch (paper, code --batch-size)."""
    augment: bool = True
    """Random crop (padding 4) and horizontal flip of the clean set (code)."""
    lr: float = 0.2
    """Constant learning rate of the masks (paper, code --lr)."""
    momentum: float = 0.9
    """SGD momentum of the masks (paper, code)."""
    eps: float = 0.4
    """Perturbation budget; 0 turns the perturbation off (paper, code --anp-eps)."""
    steps: int = 1
    """Signed-gradient ascent steps on the perturbations per iteration (code --anp-steps)."""
    step_scale: float = 1.0
    """The ascent step is eps / steps (the noise optimiser's lr in the code) times this."""
    project_perturbation: bool = True
    """Clip the perturbations to [-eps, eps] (paper); False: no clipping (code)."""
    alpha: float = 0.2
    """Weight of the unperturbed loss (paper, code --anp-alpha)."""
    prune_by: str = "threshold"
    """Pruning rule: threshold or number (code prune_neuron_cifar.py --pruning-by, default
    threshold)."""
    threshold: float = 0.2
    """Rule 'threshold': prune masks <= this (paper: 0.2)."""
    prune_number: int = 20
    """Rule 'number': prune this many channels (no single published value; the code's recipe steps
    by 20)."""
    mask_layers: str = "auto"
    """Layers that carry masks: auto or a comma list of batchnorm, layernorm, conv, linear (paper:
    batchnorm)."""
    seed: int = 0
    """Seeds the batch order and the perturbations."""

    def __post_init__(self):
        check_config(self)
        if self.prune_by not in PRUNE_RULES:
            raise RnpError(f"prune_by must be one of {', '.join(PRUNE_RULES)}, got {self.prune_by!r}")
        if self.steps < 1:
            raise RnpError("steps must be positive")
        if self.eps < 0 or self.step_scale <= 0:
            raise RnpError("eps must be >= 0 and step_scale positive")
        if not 0 <= self.alpha <= 1 or not 0 <= self.threshold <= 1:
            raise RnpError("alpha and threshold must lie in [0, 1]")
        if self.prune_number < 0:
            raise RnpError("prune_number must be >= 0")
        parse_layer_kinds(self.mask_layers)

    @property
    def ascent_step(self) -> float:
        """The size of one signed-gradient step on the perturbations."""
        return self.step_scale * self.eps / self.steps


def _per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (one per output channel, the first dimension) shaped to broadcast over ``like``."""
    return values.view(-1, *[1] * (like.dim() - 1))


class PerturbedScale(nn.Module):
    """Parametrization ``weight -> weight * (mask + delta)`` per output channel (dim 0).

    ``delta`` counts only while ``perturbed`` is set; the mask starts at 1, delta at 0.
    """

    def __init__(self, num_channels: int):
        super().__init__()
        self.mask = nn.Parameter(torch.ones(num_channels))
        self.delta = nn.Parameter(torch.zeros(num_channels), requires_grad=False)
        self.perturbed = False

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        factor = self.mask + self.delta if self.perturbed else self.mask
        return weight * _per_channel(factor, weight)


class PerturbedShift(nn.Module):
    """Parametrization ``bias -> bias * (1 + xi)``, ``xi`` counting only while ``perturbed``."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.xi = nn.Parameter(torch.zeros(num_channels), requires_grad=False)
        self.perturbed = False

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return bias * _per_channel(1 + self.xi, bias) if self.perturbed else bias


class NeuronPerturbations:
    """ANP's masks and perturbations on a model's channels of the given layer kinds
    (:func:`maskable_layers`; "auto" is BatchNorm when the model has it, as in the paper).

    Each layer gets a mask and a scale perturbation on its weight's output channels and, when it
    has a bias, a shift perturbation. The mask must enter as ``mask + delta``, not
    ``mask * (1 + delta)``: a neuron whose mask reached 0 is still perturbed. That is why this
    does not chain onto :class:`MaskSet`, whose parametrization hands the next one only the
    product ``weight * mask``.
    """

    def __init__(self, model: nn.Module, kinds="auto"):
        self.layers = maskable_layers(model, kinds)
        self.scales, self.shifts = [], []
        for _, module in self.layers:
            channels = module.weight.shape[0]
            scale = PerturbedScale(channels).to(module.weight)
            parametrize.register_parametrization(module, "weight", scale)
            self.scales.append(scale)
            if module.bias is not None:
                shift = PerturbedShift(channels).to(module.bias)
                parametrize.register_parametrization(module, "bias", shift)
                self.shifts.append(shift)

    @property
    def masks(self) -> list[nn.Parameter]:
        return [scale.mask for scale in self.scales]

    @property
    def perturbations(self) -> list[nn.Parameter]:
        return [scale.delta for scale in self.scales] + [shift.xi for shift in self.shifts]

    @contextmanager
    def perturbed(self):
        """Within the block the network computes with its perturbations."""
        for part in self.scales + self.shifts:
            part.perturbed = True
        try:
            yield
        finally:
            for part in self.scales + self.shifts:
                part.perturbed = False

    @torch.no_grad()
    def randomise_(self, eps: float, generator: torch.Generator) -> None:
        """Draws every perturbation uniformly from [-eps, eps] (the ascent's random start)."""
        for value in self.perturbations:
            draw = torch.rand(value.shape, generator=generator, dtype=value.dtype)
            value.copy_((2 * draw - 1).mul_(eps))

    @torch.no_grad()
    def ascend_(self, grads, step: float, bound: float | None) -> None:
        """One signed-gradient ascent step, then projection onto [-bound, bound] if given."""
        for value, grad in zip(self.perturbations, grads):
            value.add_(grad.sign(), alpha=step)
            if bound is not None:
                value.clamp_(-bound, bound)

    @torch.no_grad()
    def clamp_masks_(self) -> None:
        for mask in self.masks:
            mask.clamp_(0.0, 1.0)

    def scores(self) -> ChannelScores:
        return ChannelScores(tuple(name for name, _ in self.layers),
                             tuple(len(mask) for mask in self.masks),
                             torch.cat([mask.detach().cpu().clone() for mask in self.masks]))


class ANPResult(DefenseResult):
    """A :class:`DefenseResult` with ANP's masks as an attribute."""

    @property
    def masks(self) -> ChannelScores:
        """The learned mask of every masked channel (BatchNorm neurons by default)."""
        return self.artifacts["masks"]


class ANP(RemovalDefense):
    """Adversarial Neuron Pruning: ``ANP(**config).fit(model, clean_data)``.

    The result holds the pruned model, ``masks`` (a ChannelScores, also ``artifacts["masks"]``),
    the mask order and the original model (``artifacts["order"]``, ``["original_model"]``, as
    RNP's, so its threshold sweep applies), and a report with the optimisation trajectory.
    """

    name = "anp"
    summary = ("Adversarial Neuron Pruning: masks learned under adversarial neuron perturbations, "
               "prune low masks (Wu & Wang, NeurIPS 2021)")
    config_class = ANPConfig

    def purify(self, model: nn.Module, clean_data) -> ANPResult:
        original, clean, device = prepare_inputs(model, clean_data)
        timer = StageTimer()
        with timer.stage("optimize_masks"):
            scores, trajectory = self.optimize_masks(original, clean, device)
        with timer.stage("prune"):
            order = scores.order()
            count, rule = self.prune_count(scores)
            pruned = prune_channels(copy.deepcopy(original), scores, order[:count]).eval()
        rows = scores.rows()
        channels = [dict(zip(("layer", "channel", "value"), rows[i])) for i in order[:count].tolist()]
        report = {**self.base_report(clean, timer, resolve_precision(self.config, device)),
                  "mask_layers": _layer_summary(self.config.mask_layers, original, scores),
                  "optimization": _summarise(trajectory),
                  "pruning": {**rule, "pruned": count, "total_channels": len(scores),
                              "channels": channels}}
        artifacts = {"masks": scores, "order": order, "original_model": original}
        return ANPResult(pruned, report, artifacts, dict(timer.seconds))

    def optimize_masks(self, original: nn.Module, clean, device) -> tuple[ChannelScores, list[dict]]:
        """Learns the masks on a frozen copy of ``original``; returns them and, per iteration,
        the natural loss and accuracy and the perturbed loss on the batch. In mixed precision
        (``amp``) the perturbations' ascent runs under autocast too."""
        cfg = resolve_precision(self.config, device)
        model = copy.deepcopy(original).requires_grad_(False)
        scaler = grad_scaler(cfg.amp == "on", device)
        neurons = NeuronPerturbations(model, cfg.mask_layers)
        optimizer = torch.optim.SGD(neurons.masks, lr=cfg.lr, momentum=cfg.momentum)
        batches = generator_for(cfg.seed, "anp-batches")
        noise = generator_for(cfg.seed, "anp-perturbation")
        trajectory, perturbed_loss = [], []

        def robust_term(images, labels, logits):
            self.perturb(model, neurons, images, labels, noise)
            with neurons.perturbed():
                loss = F.cross_entropy(model(images), labels)
            perturbed_loss.append(float(loss.detach()))
            return (1 - cfg.alpha) * loss

        def after_step(info: StepInfo) -> bool:
            neurons.clamp_masks_()
            trajectory.append({"step": len(trajectory) + 1, "loss": info.loss, "accuracy": info.accuracy,
                               "perturbed_loss": perturbed_loss[-1] if perturbed_loss else None})
            return len(trajectory) >= cfg.iterations

        with (progress_bar(cfg.iterations, "anp", self.progress, detail=f"{cfg.iterations} iterations") as bar,
              model_layout(model, cfg.channels_last)):
            while len(trajectory) < cfg.iterations:
                run_epoch(model, clean, optimizer, batch_size=cfg.batch_size, generator=batches,
                          augment=cfg.augment, loss_scale=cfg.alpha,
                          penalty=robust_term if cfg.eps > 0 else None,
                          after_step=after_step, progress=bar, device=device, scaler=scaler)
        return neurons.scores(), trajectory

    def perturb(self, model: nn.Module, neurons: NeuronPerturbations, images, labels,
                generator: torch.Generator) -> None:
        """Step 1: random start in [-eps, eps], then ``steps`` signed ascent steps on the CE."""
        cfg = self.config
        neurons.randomise_(cfg.eps, generator)
        values = neurons.perturbations
        for value in values:
            value.requires_grad_(True)
        try:
            with neurons.perturbed():
                for _ in range(cfg.steps):
                    loss = F.cross_entropy(model(images), labels)
                    grads = torch.autograd.grad(loss, values)
                    neurons.ascend_(grads, cfg.ascent_step,
                                    cfg.eps if cfg.project_perturbation else None)
        finally:
            for value in values:
                value.requires_grad_(False)

    def prune_count(self, scores: ChannelScores) -> tuple[int, dict]:
        """How many channels, in ascending mask order, the rule prunes."""
        cfg = self.config
        if cfg.prune_by == "threshold":
            return int((scores.values <= cfg.threshold).sum()), {"rule": "threshold",
                                                                 "threshold": cfg.threshold}
        return min(cfg.prune_number, len(scores)), {"rule": "number"}


def _summarise(trajectory: list[dict]) -> dict:
    last = trajectory[-1]
    return {"iterations": len(trajectory), "final_loss": last["loss"],
            "final_accuracy": last["accuracy"], "final_perturbed_loss": last["perturbed_loss"],
            "per_step": trajectory}


def _layer_summary(setting: str, model: nn.Module, scores: ChannelScores) -> dict:
    kinds = {type(module).__name__ for name, module in model.named_modules() if name in scores.layer_names}
    return {"setting": setting, "layers": len(scores.sizes), "layer_types": sorted(kinds)}
