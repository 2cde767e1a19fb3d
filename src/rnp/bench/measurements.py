"""What an undefended cell measures about its subject, when the grid asks: the attack's
properties (``attack_properties``), what RNP's unlearned model exposes (``exposure``) and where
repeated unlearnings drift (``label_runs``).

- **Attack properties**: how the attack poisons (mode, rate, in words), the seconds spent
  fitting it and training the subject, and the clean accuracy of its clean twin (the same
  model trained the same way without the attack), so a table can say whether the backdoor
  took hold without costing clean accuracy.
- **Exposure** (:mod:`rnp.detection`): RNP's unlearning stage on the cell's clean set, the
  target label it names, EBYD's backdoored-model score, Neural Cleanse's trigger search on the
  unlearned and the original model with the same budget (scored on every 10th test image), and
  every poisoned-sample detector on a seeded subset of the poisoned training set. A clean
  subject (attack ``none``) gets the first three, which give the model score its clean side.
  With ``cleanse``, the training samples the unlearned model flags (threshold: 5% false
  positives on the defender's clean images) are dropped and the model is retrained with the
  subject's recipe (as long as training the subject: a grid of its own).
- **Label runs** (:func:`rnp.detection.expose_runs`): ``runs`` unlearnings, each on a random
  ``subset`` share of the cell's clean set with its own seed, in the precision ``amp``; per run
  the class the predictions drifted to, the drift shares, the steps, and the unlearned model's
  predictions on the whole clean set (shares and confusion matrix). Raw material for a label
  and model verdict whose false alarms are measured on many clean subjects (issue 16).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from rnp.attacks import PoisonedSet
from rnp.data.images import ImageSet
from rnp.defenses.neural_cleanse import NeuralCleanse
from rnp.detection import (SAMPLE_DETECTORS, Strip, TriggerReverseConfig, collapse_map, detect_backdoored_model,
                           detect_target_label, expose, expose_runs, flag_classes, judge, mask_iou, placed_iou,
                           recover_on_both, run_summaries, trigger_success, true_trigger_mask)
from rnp.detection.poisoned_samples import StripConfig, UnlearnedMargin
from rnp.detection.sample_scan import SampleScanConfig, scan_samples
from rnp.detection.trigger_recovery import is_patch_trigger
from rnp.errors import RnpError
from rnp.metrics import auroc, evaluate_backdoor, positives_mask, threshold_at_fpr, tpr_at_fpr
from rnp.models import build_model
from rnp.runs.folder import config_from_dict
from rnp.training import TrainConfig, train
from rnp.utils import model_device


@dataclass
class ExposureConfig:
    """The exposure measurement's budget (grid key ``exposure``)."""

    samples: int = 5000  # poisoned-training images scored by each sample detector
    strip_overlays: int = 20  # STRIP's N (paper: 100)
    trigger_steps: int = 120  # Neural Cleanse's search steps (release: 1000)
    trigger_samples_per_step: int = 64  # images per search step (release: 1000)
    cleanse: bool = False  # drop the flagged training samples and retrain the subject
    nc_scan: bool = field(default=False, metadata={"omit": False})  # also Neural Cleanse's scan of every class

    def __post_init__(self):
        for name in ("cleanse", "nc_scan"):
            if not isinstance(getattr(self, name), bool):
                raise RnpError(f"{name} takes true or false (unquoted), got {getattr(self, name)!r}")
        for name in ("samples", "strip_overlays", "trigger_steps", "trigger_samples_per_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RnpError(f"{name} takes integers >= 1, got {value!r}")


@dataclass
class LabelRunsConfig:
    """Repeated unlearnings of the subject (grid key ``label_runs``)."""

    runs: int = 8  # unlearnings, seeds clean_seed, clean_seed + 1, ...
    subset: float = 0.5  # share of the clean set each unlearning draws
    amp: str = "on"  # RNP's precision: "on" (bfloat16 autocast on the CPU) or "off"

    def __post_init__(self):
        if isinstance(self.runs, bool) or not isinstance(self.runs, int) or self.runs < 1:
            raise RnpError(f"runs takes integers >= 1, got {self.runs!r}")
        if isinstance(self.subset, bool) or not isinstance(self.subset, (int, float)) or not 0 < self.subset <= 1:
            raise RnpError(f"subset takes a share in (0, 1], got {self.subset!r}")
        if self.amp not in ("on", "off"):
            raise RnpError(f"amp takes 'on' or 'off', got {self.amp!r}")


def measure_label_runs(run, model, clean: ImageSet, config: LabelRunsConfig, *, seed: int) -> dict:
    """Where ``config.runs`` unlearnings of ``model`` drift, the verdict of their collapse map
    (:func:`rnp.detection.collapse.judge` at its default threshold), and the subject's truth."""
    attack = run.attack
    exposures = expose_runs(model, clean, config.runs, config.subset, seed=seed, amp=config.amp)
    runs = run_summaries(exposures, clean)
    return {"backdoored": attack is not None, "mode": attack.mode if attack is not None else None,
            "true_target": attack.target if attack is not None and attack.mode == "all2one" else None,
            "runs": runs, "verdict": judge(collapse_map([r["confusion"] for r in runs])).to_dict()}


def training_cost(metrics: dict) -> dict:
    """What training a subject cost, from its run's metrics: wall-clock seconds over every
    session it took and the processor seconds of its threads (None where the code that trained
    it did not record them)."""
    return {"seconds": metrics.get("train_seconds") or metrics.get("train_seconds_this_session"),
            "cpu_seconds": metrics.get("train_cpu_seconds")}


def attack_properties(run, metrics: dict, clean_twin_metrics: dict | None) -> dict:
    """The attack's poisoning, fitting and training seconds (from the subject's run folder; the
    processor seconds too, where every epoch recorded them), and its clean twin's clean accuracy."""
    spec = run.info["attack"]
    return {"mode": spec.get("mode", "all2one"), "poison_rate": spec.get("poison_rate"),
            "poisoning": run.attack.describe_poisoning(),
            "prepare_seconds": metrics.get("attack_prepare_seconds", 0.0),
            **{f"train_{key}": value for key, value in training_cost(metrics).items()},
            "clean_twin_accuracy": clean_twin_metrics["clean_accuracy"] if clean_twin_metrics else None}


def measure_exposure(run, model, clean: ImageSet, poisoned: PoisonedSet | None, config: ExposureConfig,
                     *, seed: int) -> dict:
    """The exposure of ``model`` (the subject's, on its device) from the ``clean`` images;
    ``poisoned`` is the subject's training set as it was trained on (None for a clean subject)."""
    exposure = expose(model, clean, amp="off")  # float32, as before amp existed: its key has no amp
    label, score = detect_target_label(exposure), detect_backdoored_model(exposure)
    attack = run.attack
    result = {"backdoored": attack is not None,
              "true_target": attack.target if attack is not None and attack.mode == "all2one" else None,
              "seconds": exposure.seconds, "unlearning_steps": exposure.unlearning["steps"],
              "label": label.to_dict(), "model_detection": score.to_dict()}
    if attack is None:
        return result
    test = run.data.test.subset(torch.arange(0, len(run.data.test), 10))
    budget = TriggerReverseConfig(steps=config.trigger_steps, samples_per_step=config.trigger_samples_per_step)
    comparison = recover_on_both(exposure, label.candidate, budget, seed=seed)
    true_mask = true_trigger_mask(attack, test)
    result["trigger"] = comparison.evaluate(test, true_mask).to_dict()
    if config.nc_scan:
        result["nc_scan"] = _nc_scan(model, exposure.clean, budget, test, true_mask, seed)
    result["samples"] = _detect_samples(model, exposure, clean, poisoned, config, seed)
    if config.cleanse:
        result["cleansing"] = _cleanse(run, model, exposure, clean, poisoned)
    return result


def _nc_scan(model, clean: ImageSet, budget: TriggerReverseConfig, test: ImageSet, true_mask: torch.Tensor,
             seed: int) -> dict:
    """Neural Cleanse as published: the search of every class on the original model, at the
    exposure search's budget and precision (float32), the classes its MAD rule flags, and the
    trigger of its most suspicious class (the smallest) scored like the exposure's."""
    scanner = NeuralCleanse(**dataclasses.asdict(budget), seed=seed, amp="off")
    start = time.perf_counter()
    triggers = scanner.reverse(model, clean, model_device(model))
    seconds = time.perf_counter() - start
    norms = [trigger.norm for trigger in triggers]
    candidate = min(range(len(norms)), key=norms.__getitem__)
    trigger, patch = triggers[candidate], is_patch_trigger(true_mask)
    return {"candidate": candidate, "flagged": flag_classes(norms, scanner.config.anomaly_threshold),
            "norms": norms, "seconds": seconds, "norm": trigger.norm,
            "iou": mask_iou(trigger.mask, true_mask) if patch else None,
            "placed_iou": placed_iou(trigger.mask, true_mask) if patch else None,
            "success": trigger_success(model, test, trigger.mask, trigger.pattern, candidate)}


def _cleanse(run, model, exposure, clean: ImageSet, poisoned: PoisonedSet) -> dict:
    """Retrains the subject's model, with its recipe and seed, on the training samples the
    unlearned model does not flag; the flagging's counts and the retrained model's metrics."""
    scorer = UnlearnedMargin()
    start = time.perf_counter()
    scores = scorer.score(model, poisoned.data, exposure=exposure)
    threshold = threshold_at_fpr(scorer.score(model, clean, exposure=exposure), 0.05)
    flagged = scores > threshold
    scoring_seconds = time.perf_counter() - start
    positives = positives_mask(poisoned.poisoned_indices, len(poisoned.data))
    config = config_from_dict(TrainConfig, run.info["train"])
    torch.manual_seed(config.seed)
    retrained = build_model(**run.info["model"])
    device = next(model.parameters()).device
    start = time.perf_counter()
    train(retrained, poisoned.data.subset((~flagged).nonzero().squeeze(1)), config, progress=False, device=device)
    after = evaluate_backdoor(retrained, run.data.test, run.triggered_test(), device=device)
    return {"flagged": int(flagged.sum()), "flagged_poisoned": int((flagged & positives).sum()),
            "poisoned": int(positives.sum()),
            "false_positive_rate": float((flagged & ~positives).sum() / (~positives).sum()),
            "threshold": threshold, "scoring_seconds": scoring_seconds,
            "retrain_seconds": time.perf_counter() - start, "after": after.to_dict()}


def _detect_samples(model, exposure, clean: ImageSet, poisoned: PoisonedSet, config: ExposureConfig,
                    seed: int) -> dict:
    """AUROC, TPR at 5% FPR and seconds of every sample detector on a seeded subset."""
    flags = positives_mask(poisoned.poisoned_indices, len(poisoned.data))
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(poisoned.data), generator=generator)[:config.samples]
    data, positives = poisoned.data.subset(chosen), flags[chosen]
    result = {"scored": len(data), "poisoned": int(positives.sum()), "detectors": {}}
    if not 0 < int(positives.sum()) < len(data):
        result["note"] = "no poisoned sample in the scored subset (the attack may poison on the fly)"
        return result
    detectors = {name: cls() for name, cls in SAMPLE_DETECTORS.items()}
    detectors["strip"] = Strip(StripConfig(overlays=config.strip_overlays))
    for name, detector in detectors.items():
        start = time.perf_counter()
        extra = {"exposure": exposure} if name == "unlearned" else {}
        scores = detector.score(model, data, clean, **extra)
        result["detectors"][name] = {"auroc": auroc(scores, positives),
                                     "tpr_at_5_fpr": tpr_at_fpr(scores, positives, 0.05),
                                     "seconds": time.perf_counter() - start}
    result["scan"] = _scan(model, data, clean, positives, config, seed)
    return result


def _scan(model, data: ImageSet, clean: ImageSet, positives: torch.Tensor, config: ExposureConfig,
          seed: int) -> dict:
    """The combined, calibrated flag of :func:`scan_samples`: its AUROC, the samples it flags,
    and the false-positive rate it realises on the scanned samples known to be clean."""
    settings = SampleScanConfig(strip=StripConfig(overlays=config.strip_overlays), seed=seed)
    scan = scan_samples(model, data, clean, settings)
    return {"detectors": list(settings.detectors), "folds": settings.folds, "references": scan.references,
            "auroc": auroc(scan.combined, positives), "tpr_at_5_fpr": tpr_at_fpr(scan.combined, positives, 0.05),
            "target_fpr": settings.false_positive_rate, "threshold": scan.threshold,
            "flagged": int(scan.flagged.sum()), "flagged_poisoned": int((scan.flagged & positives).sum()),
            "fpr_scanned_clean": float(scan.flagged[~positives].double().mean()),
            "tpr": float(scan.flagged[positives].double().mean()),
            "detector_auroc": {name: auroc(scores, positives) for name, scores in scan.scores.items()},
            "seconds": sum(scan.seconds.values())}
