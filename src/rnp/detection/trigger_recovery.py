"""Trigger recovery on RNP's unlearned model compared with the original model.

Li, Lyu, Ma, Koren, Lyu, Li and Jiang, "Reconstructive Neuron Pruning for Backdoor Defense",
ICML 2023 (arXiv 2305.14876), state that the unlearned model of RNP's first stage (gradient
ascent on the defender's clean images, :func:`rnp.detection.exposure.expose`) improves trigger
recovery: its clean function is broken while the backdoor survives, so a trigger search on it
should meet less competition from clean features. This module measures that claim with Neural
Cleanse's search (Wang et al., IEEE S&P 2019; :func:`rnp.defenses.trigger_reverse.
reverse_engineer_trigger`), run with the same config and the same seeded random stream (same
initial mask and pattern, same batch order) on the unlearned and on the original model.

The paper publishes neither the protocol nor numbers for this comparison
(``../shared/docs/rnp-spec.md`` section 5), so the scores are ours:

- the mask's L1 norm (smaller is a more specific trigger, Neural Cleanse's own criterion);
- the IoU of the recovered mask with the true trigger, for patch triggers only
  (:func:`is_patch_trigger`; a whole-image blend has no region to overlap). The recovered soft
  mask is binarised by its ``k`` largest pixels, ``k`` the true trigger's area, so no threshold
  is chosen (:func:`mask_iou`). Neural Cleanse seeks the SMALLEST trigger, and it often
  recovers a few pixels of a patch that suffice to fire the backdoor; the ``k`` largest pixels
  then include near-zero ones off the patch and the IoU stays low although the mask is right.
  The share of the mask's L1 mass inside the true region (:func:`mask_mass_on_trigger`) is
  reported beside it and tells the two cases apart. Training with crops and flips shows the
  model the trigger shifted and mirrored too, so the search may recover one of those copies:
  :func:`placed_iou` is the best IoU over the placements training used;
- the recovered trigger's attack success on the ORIGINAL model over held-out images
  (:func:`trigger_success`). The original model is the one deployed; the unlearned model
  already sends most clean images to the target (its predictions collapse there during
  unlearning), so success measured on it would flatter triggers recovered on it;
- the steps the search ran, its wall-clock seconds, and whether it reached the success
  threshold.

That collapse has a consequence worth knowing: where the unlearned model predicts the target
for nearly all clean images, the search for that target succeeds with an (almost) empty mask,
and the trigger it returns reveals nothing. A near-zero norm with ``search_success`` 1 and a
``success`` on the original model no higher than without any trigger is that case.

Defaults: the search's are :class:`~rnp.defenses.trigger_reverse.TriggerReverseConfig`'s (the
Neural Cleanse release); nothing here adds a hyperparameter of its own except the documented
measurement choices above.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from rnp.attacks.base import Attack
from rnp.data.images import ImageSet, to_uint8
from rnp.defenses.trigger_reverse import (RecoveredTrigger, TriggerReverseConfig, apply_trigger,
                                          reverse_engineer_trigger)
from rnp.detection.exposure import Exposure
from rnp.errors import RnpError
from rnp.training.evaluate import predict
from rnp.utils import generator_for, model_device, progress_bar

MODELS = ("unlearned", "original")
"""The two models compared, in the order they are searched and reported."""

CHANGE_THRESHOLD = 1
"""A pixel counts as changed by the trigger when some channel moves by more than this many
uint8 levels (1/255), so rounding of a re-quantised image is not mistaken for the trigger."""

STAMP_CHUNK = 1024  # images stamped at once, bounding the float memory of trigger_success


def true_trigger_mask(attack: Attack, images: ImageSet, *, max_images: int = 256) -> torch.Tensor:
    """Where the attack's trigger lies: an (H, W) float map, each pixel's share of images in
    which :meth:`Attack.trigger_uint8` changes it (any channel by more than 1/255).

    Only images outside the target class are used for an all-to-one attack (those are the ones
    the trigger must move), the first ``max_images`` of them. A patch trigger gives about 1 on
    the patch and 0 elsewhere; a blend gives high shares over the whole image.
    """
    if max_images < 1:
        raise RnpError(f"max_images must be positive, got {max_images}")
    chosen = images.images
    if attack.mode == "all2one":
        chosen = chosen[images.labels != attack.target]
    chosen = chosen[:max_images]
    if not len(chosen):
        raise RnpError("no image outside the target class to apply the trigger to")
    difference = (attack.trigger_uint8(chosen).int() - chosen.int()).abs()
    changed = (difference > CHANGE_THRESHOLD).any(dim=1)
    return changed.float().mean(0)


def is_patch_trigger(true_mask: torch.Tensor, max_area: float = 0.25) -> bool:
    """Whether the trigger is a local patch: the pixels it changes in most images (share above
    0.5) are at least one and cover at most ``max_area`` of the image (BadNets, Trojan; not
    Blend or warping attacks, which touch the whole image)."""
    if not 0 < max_area <= 1:
        raise RnpError(f"max_area must lie in (0, 1], got {max_area}")
    region = _region(true_mask)
    return 0 < int(region.sum()) <= max_area * region.numel()


def mask_iou(recovered_mask: torch.Tensor, true_mask: torch.Tensor) -> float:
    """Intersection over union of a recovered soft mask with the true trigger region.

    The true mask is binarised at 0.5, giving ``k`` pixels. Rather than pick a threshold for the
    soft recovered mask (which would change the answer), its ``k`` largest pixels are taken, so
    the score only asks whether the mask's heaviest pixels sit on the trigger. Both sets then
    hold ``k`` pixels and the IoU is ``overlap / (2k - overlap)``: 1 when they coincide, 0 when
    disjoint. Ties are broken by row-major pixel order (a stable sort), so a flat mask gets a
    definite score.
    """
    recovered, region = _pair(recovered_mask, true_mask)
    k = int(region.sum())
    if k == 0:
        raise RnpError("the true mask has no pixel above 0.5")
    order = torch.sort(recovered.flatten(), descending=True, stable=True).indices
    overlap = int(region.flatten()[order[:k]].sum())
    return overlap / (2 * k - overlap)


def trained_placements(true_mask: torch.Tensor, shift: int = 4, flip: bool = True) -> list[torch.Tensor]:
    """The regions where training showed the trigger: the true region moved by up to ``shift``
    pixels along each axis and, with ``flip``, mirrored left to right, as the package's training
    augmentation (:func:`rnp.data.random_crop_flip`: a crop after 4 pixels of zero padding, then
    a horizontal flip of half the images) places it. Only placements that keep the whole region
    inside the image are listed, so a fragment at the border cannot pass for the trigger."""
    region = _region(true_mask)
    if not region.any():
        raise RnpError("the true mask has no pixel above 0.5")
    height, width = region.shape
    placements = []
    for base in (region, region.flip(1)) if flip else (region,):
        rows, cols = base.nonzero(as_tuple=True)
        for down in range(-shift, shift + 1):
            for right in range(-shift, shift + 1):
                if (0 <= int(rows.min()) + down and int(rows.max()) + down < height
                        and 0 <= int(cols.min()) + right and int(cols.max()) + right < width):
                    placements.append(base.roll((down, right), dims=(0, 1)))
    return placements


def placed_iou(recovered_mask: torch.Tensor, true_mask: torch.Tensor, shift: int = 4, flip: bool = True) -> float:
    """The best :func:`mask_iou` of the recovered mask over the :func:`trained_placements` of the
    true trigger. A model trained with crops and flips learns the trigger wherever training put
    it, and Neural Cleanse, which seeks the smallest trigger, may recover any of those copies:
    on the width-16 BadNets subject its mask sits on the mirror image of the bottom-right patch,
    in the bottom-left corner, which :func:`mask_iou` scores 0."""
    return max(mask_iou(recovered_mask, placement.float()) for placement in
               trained_placements(true_mask, shift, flip))


def mask_mass_on_trigger(recovered_mask: torch.Tensor, true_mask: torch.Tensor) -> float:
    """Share of the recovered mask's L1 mass that lies in the true trigger region (true mask
    above 0.5): 1 when the mask stamps only trigger pixels, whatever its size; about the region's
    share of the image for a mask spread evenly. Threshold-free, like :func:`mask_iou`."""
    recovered, region = _pair(recovered_mask, true_mask)
    total = float(recovered.abs().sum())
    if total == 0:
        raise RnpError("the recovered mask is all zero")
    return float(recovered[region].abs().sum()) / total


def trigger_success(model: nn.Module, data: ImageSet, mask: torch.Tensor, pattern: torch.Tensor,
                    target: int) -> float:
    """Share of the images of ``data`` not labelled ``target`` that ``model`` classifies as
    ``target`` once stamped with ``(1 - mask) * x + mask * pattern``.

    Stamped images are stored as uint8, as a triggered image file would be, and classified by
    :func:`~rnp.training.evaluate.predict` (the model's mode is restored, weights untouched).
    """
    _check_trigger(data, mask, pattern)
    source = data.images[data.labels != target]
    if not len(source):
        raise RnpError(f"every image is labelled {target}; no image to move to the target")
    mask, pattern = mask.detach().float().cpu(), pattern.detach().float().cpu()
    stamped = torch.cat([to_uint8(apply_trigger(source[i:i + STAMP_CHUNK].float() / 255, mask, pattern))
                         for i in range(0, len(source), STAMP_CHUNK)])
    labels = torch.full((len(stamped),), target, dtype=torch.long)
    predictions = predict(model, ImageSet(stamped, labels, data.classes), device=model_device(model))
    return float((predictions == target).float().mean())


@dataclass(frozen=True, eq=False)
class TriggerEvaluation:
    """Scores of the triggers recovered on each model (see the module docstring).

    ``rows[name]`` for ``name`` in :data:`MODELS` holds ``norm``, ``iou``, ``placed_iou`` and
    ``mass_on_trigger`` (all None unless the true trigger is a patch), ``success`` (on the
    original model over the evaluation images), ``search_success`` (on the defender's clean
    images during the search, on the searched model), ``reached_threshold``, ``steps`` and ``seconds``.
    """

    target: int
    patch_trigger: bool | None
    true_area: int | None
    evaluated_images: int
    config: dict
    seed: int
    rows: dict[str, dict]

    def to_dict(self) -> dict:
        return {"target": self.target, "patch_trigger": self.patch_trigger,
                "true_area": self.true_area, "evaluated_images": self.evaluated_images,
                "config": self.config, "seed": self.seed,
                "models": {name: dict(row) for name, row in self.rows.items()}}


@dataclass(frozen=True, eq=False)
class TriggerComparison:
    """The triggers recovered for ``target`` on the unlearned and the original model with the
    same ``config`` and ``seed``; ``seconds`` times each search; ``original`` is the model the
    recovered triggers are scored on."""

    target: int
    config: TriggerReverseConfig
    seed: int
    triggers: dict[str, RecoveredTrigger]
    seconds: dict[str, float]
    original: nn.Module

    def evaluate(self, data: ImageSet, true_mask: torch.Tensor | None = None) -> TriggerEvaluation:
        """Scores both triggers on ``data`` (held-out images, e.g. the test set); ``true_mask``
        (from :func:`true_trigger_mask`) adds the IoU when the trigger is a patch."""
        patch = None if true_mask is None else is_patch_trigger(true_mask)
        rows = {}
        for name in MODELS:
            trigger = self.triggers[name]
            rows[name] = {
                "norm": trigger.norm,
                "iou": mask_iou(trigger.mask, true_mask) if patch else None,
                "placed_iou": placed_iou(trigger.mask, true_mask) if patch else None,
                "mass_on_trigger": mask_mass_on_trigger(trigger.mask, true_mask) if patch else None,
                "success": trigger_success(self.original, data, trigger.mask, trigger.pattern,
                                           self.target),
                "search_success": trigger.attack_success,
                "reached_threshold": trigger.reached_threshold,
                "steps": trigger.steps,
                "seconds": self.seconds[name],
            }
        area = None if true_mask is None else int(_region(true_mask).sum())
        evaluated = int((data.labels != self.target).sum())
        return TriggerEvaluation(self.target, patch, area, evaluated,
                                 dataclasses.asdict(self.config), self.seed, rows)


def recover_on_both(exposure: Exposure, target: int, config: TriggerReverseConfig | None = None,
                    *, seed: int = 0, device=None, progress: bool = False) -> TriggerComparison:
    """Runs Neural Cleanse's search for ``target`` on ``exposure.unlearned`` and on
    ``exposure.original`` with the defender's clean images, the same ``config`` and a fresh
    generator from the same ``seed`` for each, so the two runs differ only in the model.

    ``device`` defaults to the original model's. Neither model is changed.
    """
    config = config or TriggerReverseConfig()
    device = device if device is not None else model_device(exposure.original)
    models = {"unlearned": exposure.unlearned, "original": exposure.original}
    triggers, seconds = {}, {}
    total = len(MODELS) * config.steps * config.batches_per_step
    with progress_bar(total, "trigger recovery", progress, unit="batch", bounded=config.early_stop,
                      detail=f"{len(MODELS)} models x {config.steps} steps x {config.batches_per_step} "
                             "batches") as bar:
        for name in MODELS:
            generator = generator_for(seed, f"trigger-recovery-{target}")
            start = time.perf_counter()
            triggers[name] = reverse_engineer_trigger(models[name], exposure.clean, target, config,
                                                      generator=generator, device=device,
                                                      progress=bar)
            seconds[name] = time.perf_counter() - start
            bar.skip((config.steps - triggers[name].steps) * config.batches_per_step)  # stopped early
    return TriggerComparison(target, config, seed, triggers, seconds, exposure.original)


def trigger_tiles(comparison: TriggerComparison,
                  true_mask: torch.Tensor | None = None) -> list[tuple[str, torch.Tensor]]:
    """Captioned tiles for :func:`rnp.io.figures.image_grid`: the true trigger mask (if given),
    then for each model its recovered mask, pattern and the stamped part ``mask * pattern``.
    Three tiles per model, so ``columns=3`` puts one model per row."""
    tiles = [] if true_mask is None else [("true mask", torch.as_tensor(true_mask).float())]
    for name in MODELS:
        trigger = comparison.triggers[name]
        tiles += [(f"{name}: mask", trigger.mask), (f"{name}: pattern", trigger.pattern),
                  (f"{name}: mask x pattern", trigger.mask[None] * trigger.pattern)]
    return tiles


def _region(true_mask: torch.Tensor) -> torch.Tensor:
    """The true trigger region: pixels changed in more than half of the images."""
    true_mask = torch.as_tensor(true_mask).detach().cpu()
    if true_mask.dim() != 2:
        raise RnpError(f"a trigger mask must be (H, W), got shape {tuple(true_mask.shape)}")
    return true_mask > 0.5


def _pair(recovered_mask: torch.Tensor, true_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recovered mask in float64 and the true region, checked to have the same (H, W)."""
    recovered, region = torch.as_tensor(recovered_mask).detach().cpu().double(), _region(true_mask)
    if recovered.shape != region.shape:
        raise RnpError(f"recovered mask {tuple(recovered.shape)} and true mask "
                       f"{tuple(region.shape)} differ in shape")
    return recovered, region


def _check_trigger(data: ImageSet, mask: torch.Tensor, pattern: torch.Tensor) -> None:
    channels, height, width = data.image_shape
    if tuple(mask.shape) != (height, width) or tuple(pattern.shape) != (channels, height, width):
        raise RnpError(f"mask {tuple(mask.shape)} and pattern {tuple(pattern.shape)} do not fit "
                       f"images of shape {(channels, height, width)}")
