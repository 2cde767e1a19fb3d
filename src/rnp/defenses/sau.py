"""Shared Adversarial Unlearning (SAU).

Wei, Zhang, Zha and Wu, "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning
Shared Adversarial Examples", NeurIPS 2023 (arXiv 2307.10562). The authors' PyTorch release is
part of BackdoorBench (``defense/sau.py``, ``config/defense/sau/config.yaml``).

A trigger is an input perturbation that sends the backdoored model to one label, so the
backdoor risk of a purified model is bounded by its risk on *shared adversarial examples*
(SAEs): perturbed clean images that the purified model and the original backdoored model both
send to the same wrong label. SAU alternates, per batch of the defender's clean images:

1. *Maximise* (PGD in an Lp ball around each image, both models frozen): ascend
   ``beta_1 * L_adv - beta_2 * JS``, where ``L_adv`` is the cross-entropy of each model on the
   images it does not yet misclassify (prediction unchanged from the clean image) and ``JS`` the
   Jensen-Shannon divergence between the two models' predictions on the images that are not yet
   shared adversarial. The perturbation starts at ``+epsilon`` on every pixel (``init max``) and
   stops early once every image is an SAE.
2. *Minimise* (one optimiser step on the purified model):
   ``lambda_1 * CE(clean) + lambda_2 * CE(perturbed) + lambda_3 * L_sar``, where ``L_sar`` sums
   ``-log(1 - p(y_bd | x + delta))`` over the images whose perturbed version the backdoored
   model gets wrong (label ``y_bd``, different from its label for the clean image), divided
   by the batch size: the purified model is taught not to share the backdoored model's answer.

Defaults are the release's config (``config/defense/sau/config.yaml``): 100 epochs
(``n_rounds``), batch 256, Adam lr 1e-4, betas (0.9, 0.999), no weight decay, L_inf ball of
radius 0.2 in [0, 1] pixel space, 5 PGD steps of size 0.2 (signed gradient), ``init max``,
beta_1 = 0.01, beta_2 = 1, lambda_1 = 1, lambda_2 = 0, lambda_3 = 1, one update per batch,
BatchNorm kept in eval mode during updates (``train_mode`` off), and no augmentation of the
clean set (the release loads it with the test transform). The release builds a cosine
schedule but never steps it, so the learning rate is constant; so is ours.

Deviations, each small: (1) perturbed images are clamped to [0, 1] (models here take [0, 1]
images; the release leaves them unclamped and calls clamping optional); (2) ``L_sar`` is computed
as ``logsumexp(other logits) - logsumexp(all logits)``, which is exact and stable, where the
release clamps probabilities to [0.001, 0.999]; (3) PGD stops *before* a step once every image
is shared, where the release takes that step and then stops; (4) the L2 ball uses the standard
normalised-gradient step, where the release takes signed steps for every norm; (5) the model's
predictions on the clean images are computed once per batch rather than at every PGD step
(they do not change during PGD).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnp.data.images import ImageSet
from rnp.data.loader import iterate_batches
from rnp.defenses.base import DefenseResult, RemovalDefense, StageTimer, prepare_inputs
from rnp.errors import RnpError
from rnp.metrics import accuracy
from rnp.training.evaluate import predict
from rnp.training.precision import PrecisionFields, autocast, backward_and_step, grad_scaler, model_layout
from rnp.utils import check_config, generator_for, progress_bar, resolve_precision, uses_amp

NORMS = ("linf", "l2")
INITS = ("max", "zero")


@dataclass
class SAUConfig(PrecisionFields):
    """Every SAU hyperparameter. (release): BackdoorBench config/defense/sau/config.yaml."""

    epochs: int = 100
    """Epochs of unlearning (release n_rounds)."""
    batch_size: int = 256
    """Clean images per batch (release)."""
    lr: float = 1e-4
    """Constant Adam learning rate (release; its cosine schedule is never stepped)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's betas (release)."""
    weight_decay: float = 0.0
    """Adam weight decay (release wd)."""
    augment: bool = False
    """Crop and flip the clean set (release: off, it loads the clean set with the test
    transform)."""
    norm: str = "linf"
    """Norm of the perturbation ball: linf (release norm_type) or l2."""
    epsilon: float = 0.2
    """Radius of the ball in [0, 1] pixel units (release trigger_norm)."""
    step_size: float = 0.2
    """PGD step size (release adv_lr)."""
    pgd_steps: int = 5
    """PGD steps (release adv_steps)."""
    pgd_init: str = "max"
    """PGD start: 'max' puts +epsilon on every pixel (release); 'zero'."""
    beta_1: float = 0.01
    """Weight of the adversarial term in the maximisation (release)."""
    beta_2: float = 1.0
    """Weight of the sharing (JS) term in the maximisation (release)."""
    lambda_1: float = 1.0
    """Weight of the clean cross-entropy (release lmd_1)."""
    lambda_2: float = 0.0
    """Weight of the cross-entropy on perturbed images, plain adversarial training; off (release
    lmd_2)."""
    lambda_3: float = 1.0
    """Weight of the shared adversarial risk (release lmd_3)."""
    updates_per_batch: int = 1
    """Model updates per batch (release outer_steps)."""
    train_batchnorm: bool = False
    """Update BatchNorm statistics during the updates (release train_mode: off, frozen)."""
    seed: int = 0
    """Seeds the batch order (and augmentation, if on)."""

    def __post_init__(self):
        check_config(self)
        for name, value, choices in (("norm", self.norm, NORMS), ("pgd_init", self.pgd_init, INITS)):
            if value not in choices:
                raise RnpError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        if self.updates_per_batch < 1:
            raise RnpError(f"updates_per_batch must be at least 1, got {self.updates_per_batch!r}")
        if self.pgd_steps < 0:
            raise RnpError(f"pgd_steps must be an integer >= 0, got {self.pgd_steps!r}")
        if self.epsilon < 0 or self.step_size < 0:
            raise RnpError("epsilon and step_size must be >= 0")
        weights = (self.beta_1, self.beta_2, self.lambda_1, self.lambda_2, self.lambda_3)
        if any(w < 0 for w in weights):
            raise RnpError("beta_1, beta_2 and lambda_1..3 must be >= 0")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise RnpError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")


class SAU(RemovalDefense):
    """Shared Adversarial Unlearning: ``SAU(**config).fit(model, clean_data)``.

    The result holds the purified model and a report with per-epoch losses, the share of
    perturbed images that fooled the backdoored model and that were shared adversarial, and
    the seconds per epoch.
    """

    name = "sau"
    summary = ("Shared Adversarial Unlearning: unlearn adversarial examples shared with the "
               "backdoored model (Wei et al., NeurIPS 2023)")
    config_class = SAUConfig

    def purify(self, model: nn.Module, clean_data) -> DefenseResult:
        working, clean, device = prepare_inputs(model, clean_data)
        cfg = resolve_precision(self.config, device)
        timer = StageTimer()
        reference = _frozen_copy(working)
        with (timer.stage("unlearn"), model_layout(working, cfg.channels_last),
              model_layout(reference, cfg.channels_last)):
            epochs = self.unlearn(working, reference, clean, device)
        with timer.stage("evaluate"):
            working.eval()
            clean_accuracy = accuracy(predict(working, clean, device=device), clean.labels)
        report = {**self.base_report(clean, timer, cfg), "epochs": epochs,
                  "clean_set_accuracy_after": clean_accuracy,
                  "seconds_per_epoch": sum(e["seconds"] for e in epochs) / len(epochs)}
        return DefenseResult(working, report, {"reference_model": reference}, dict(timer.seconds))

    def unlearn(self, model: nn.Module, reference: nn.Module, clean: ImageSet, device) -> list[dict]:
        """Runs SAU's epochs on ``model`` in place, in mixed precision where ``amp`` says so;
        returns one summary per epoch."""
        cfg = self.config
        scaler = grad_scaler(uses_amp(cfg.amp, device), device)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas,
                                     weight_decay=cfg.weight_decay)
        generator = generator_for(cfg.seed, "sau-batches")
        steps = math.ceil(len(clean) / cfg.batch_size)
        epochs = []
        with progress_bar(cfg.epochs * steps, "sau", self.progress,
                          detail=f"{cfg.epochs} epochs x {steps} steps") as bar:
            for epoch in range(cfg.epochs):
                start, totals = time.perf_counter(), {}
                for images, labels in iterate_batches(clean, cfg.batch_size, shuffle=True,
                                                      augment=cfg.augment, generator=generator,
                                                      device=device):
                    for key, value in self.step(model, reference, optimizer, images, labels, scaler).items():
                        totals[key] = totals.get(key, 0.0) + value * len(labels)
                    bar.update(1)
                epochs.append({"epoch": epoch + 1, **{k: v / len(clean) for k, v in totals.items()},
                               "seconds": time.perf_counter() - start})
        model.eval()
        return epochs

    def step(self, model: nn.Module, reference: nn.Module, optimizer, images: torch.Tensor,
             labels: torch.Tensor, scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
        """One batch: craft shared adversarial perturbations, then update the model on them.
        With a gradient ``scaler`` every pass runs under autocast (logits come back as float32)
        and the update goes through the scaler."""
        cfg = self.config
        mixed = scaler is not None
        model.eval()
        with torch.no_grad(), autocast(mixed, images.device):
            clean_pred_ref = reference(images).argmax(1)
            clean_pred = model(images).argmax(1)
        delta = self.shared_perturbation(model, reference, images, labels, clean_pred, clean_pred_ref, mixed)
        perturbed = images + delta
        with torch.no_grad(), autocast(mixed, images.device):
            logits_ref = reference(perturbed).float()
        pred_ref = logits_ref.argmax(1)
        fooled_ref = (pred_ref != labels) & (pred_ref != clean_pred_ref)
        for _ in range(cfg.updates_per_batch):
            model.train(cfg.train_batchnorm)
            with autocast(mixed, images.device):
                logits, logits_adv = model(torch.cat([images, perturbed])).float().split(len(labels))
            model.eval()
            shared = fooled_ref & (logits_adv.argmax(1) == pred_ref)
            loss_clean = F.cross_entropy(logits, labels)
            loss_adv = F.cross_entropy(logits_adv, labels)
            loss_sar = shared_adversarial_risk(logits_adv, pred_ref, fooled_ref)
            loss = cfg.lambda_1 * loss_clean + cfg.lambda_2 * loss_adv + cfg.lambda_3 * loss_sar
            optimizer.zero_grad(set_to_none=True)
            backward_and_step(loss, optimizer, scaler)
        return {"loss_clean": loss_clean.item(), "loss_adversarial": loss_adv.item(),
                "loss_shared": loss_sar.item(), "clean_accuracy": accuracy(logits.argmax(1), labels),
                "fooled_backdoored": float(fooled_ref.float().mean()),
                "shared_adversarial": float(shared.float().mean())}

    def shared_perturbation(self, model: nn.Module, reference: nn.Module, images: torch.Tensor,
                            labels: torch.Tensor, clean_pred: torch.Tensor,
                            clean_pred_ref: torch.Tensor, mixed: bool = False) -> torch.Tensor:
        """PGD for shared adversarial examples: a perturbation in the ball (and keeping images
        in [0, 1]) that makes both models leave their clean prediction for the same label; the
        models' passes under autocast when ``mixed``."""
        cfg = self.config
        delta = self._project(torch.full_like(images, cfg.epsilon if cfg.pgd_init == "max" else 0.0), images)
        for _ in range(cfg.pgd_steps):
            delta.requires_grad_(True)
            with autocast(mixed, images.device):
                logits, logits_ref = model(images + delta).float(), reference(images + delta).float()
            pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
            keep, keep_ref = pred == clean_pred, pred_ref == clean_pred_ref
            not_shared = keep | keep_ref | (pred != pred_ref)
            if not not_shared.any():
                break
            adversarial = (F.cross_entropy(logits, labels, reduction="none") * keep
                           + F.cross_entropy(logits_ref, labels, reduction="none") * keep_ref).sum() / 2
            divergence = (jensen_shannon(logits, logits_ref) * not_shared).sum()
            objective = (cfg.beta_1 * adversarial - cfg.beta_2 * divergence) / len(labels)
            grad, = torch.autograd.grad(objective, delta)
            delta = self._project(delta.detach() + cfg.step_size * self._direction(grad), images)
        return delta.detach()

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        """Steepest ascent direction of unit norm: sign for L_inf, normalised gradient for L2."""
        if self.config.norm == "linf":
            return grad.sign()
        return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))

    def _project(self, delta: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Onto the epsilon ball, then so that ``images + delta`` stays in [0, 1] (which only
        shrinks each coordinate, so the result stays in the ball)."""
        eps = self.config.epsilon
        if self.config.norm == "linf":
            delta = delta.clamp(-eps, eps)
        else:
            norms = delta.flatten(1).norm(dim=1).view(-1, *[1] * (delta.dim() - 1))
            delta = delta * (eps / norms.clamp_min(1e-12)).clamp(max=1.0)
        return (images + delta).clamp(0, 1) - images


def jensen_shannon(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence between the two softmax distributions."""
    log_a, log_b = F.log_softmax(logits_a, 1), F.log_softmax(logits_b, 1)
    log_mix = torch.logsumexp(torch.stack([log_a, log_b]), 0) - math.log(2)
    return 0.5 * ((log_a.exp() * (log_a - log_mix)).sum(1) + (log_b.exp() * (log_b - log_mix)).sum(1))


def shared_adversarial_risk(logits: torch.Tensor, labels_bd: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
    """``sum over masked samples of -log(1 - p(labels_bd))``, divided by the batch size: low
    when the model does not give the backdoored model's label to the perturbed images."""
    chosen = F.one_hot(labels_bd, logits.shape[1]).bool()
    log_rest = torch.logsumexp(logits.masked_fill(chosen, -math.inf), 1) - torch.logsumexp(logits, 1)
    return -(log_rest * mask).sum() / len(logits)


def _frozen_copy(model: nn.Module) -> nn.Module:
    """The backdoored model as SAU's fixed reference: eval mode, no gradients."""
    return copy.deepcopy(model).eval().requires_grad_(False)
