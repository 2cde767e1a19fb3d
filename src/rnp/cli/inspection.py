"""``rnp inspect`` and ``rnp scan-data``: what RNP's unlearned model reveals about a model and
about its training data. Each calls the detection API, then writes JSON, Markdown, figures (PNG
and SVG, with their data as CSV) and the recovered triggers' picture."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

from rnp.cli.inputs import input_paths, outside_model
from rnp.cli.options import config_overrides
from rnp.data.clean_subset import select_clean_subset
from rnp.data.images import ImageSet
from rnp.data.sources import load_dataset
from rnp.defenses import RNPConfig
from rnp.defenses.trigger_reverse import TriggerReverseConfig
from rnp.detection.collapse import Calibration, calibrate, detect_backdoor
from rnp.detection.exposure import Exposure, detect_backdoored_model, detect_target_label, expose
from rnp.detection.poisoned_samples import SAMPLE_DETECTORS, Strip, StripConfig
from rnp.detection.trigger_recovery import recover_on_both, trigger_tiles, true_trigger_mask
from rnp.errors import RnpError
from rnp.io.checkpoint import save_checkpoint
from rnp.io import plots
from rnp.io.figures import image_grid, save_png, side_by_side
from rnp.io.files import read_json, write_json, write_text
from rnp.io.tables import render_table, write_csv
from rnp.metrics.detection import auroc, positives_mask, share_above, threshold_at_fpr, tpr_at_fpr
from rnp.runs.folder import load_run
from rnp.runs.outputs import prepare_output_dir, remove_previous_outputs
from rnp.utils import fits_seed, generator_for, resolve_device

UNLEARN_FIELDS = ("batch_size", "augment", "unlearn_lr", "unlearn_momentum", "unlearn_weight_decay",
                  "unlearn_milestones", "unlearn_gamma", "unlearn_epochs", "clean_threshold",
                  "stop_check", "seed")
"""The RNP settings that shape the exposure (the unlearning stage); ``rnp inspect`` and
``rnp scan-data`` take these as options."""

FLAG_FALSE_POSITIVE_RATE = 0.05
"""Threshold of the flagged samples: at most this share of the held-out clean images
(:data:`CALIBRATION_SHARE`) score above it."""

CALIBRATION_SHARE = 0.2
"""Share of the defender's clean images ``scan-data`` holds out to set the flagging threshold on
(at least one image, and at least one left): the unlearning and every detector's clean
reference see only the rest. Scores of the very images the unlearning pushed down would set the
threshold where fresh clean images cross it far more often than the rate promises."""

CALIBRATED_DETECTORS = ("unlearned", "loss", "strip")
"""Detectors whose score on clean images is a fair reference for a threshold (STRIP's own
rule); AC and SS score a sample against the rest of its class, which a clean set alone is not."""


def inspect(args) -> int:
    out = _output_dir(args)
    subject = _subject(args)
    if args.target is not None and not 0 <= args.target < len(subject.classes):
        raise RnpError(f"--target {args.target}: the model has {len(subject.classes)} classes "
                       f"(0 to {len(subject.classes) - 1})")
    threshold = _map_threshold(args)
    exposure = _expose(args, subject)
    label = detect_target_label(exposure, threshold=args.label_threshold)
    verdict = detect_backdoored_model(exposure, threshold=args.variance_threshold)
    report = {"exposure": {"unlearning_steps": exposure.unlearning["steps"],
                           "final_clean_accuracy": exposure.unlearning["final_accuracy"],
                           "seconds": exposure.seconds},
              "label_detection": label.to_dict(), "model_detection": verdict.to_dict(),
              "clean_set": subject.clean_record}
    if args.runs:
        start, config = time.perf_counter(), _unlearning_config(args)
        found = detect_backdoor(subject.model, subject.clean, threshold, runs=args.runs, subset=args.run_subset,
                                config=config, seed=config.seed, progress=not args.quiet)
        report["collapse"] = {**found.to_dict(), "runs": args.runs, "subset": args.run_subset,
                              "seconds": time.perf_counter() - start}
    classes = len(subject.classes)
    figure = plots.Figure([
        plots.Bars(subject.classes, verdict.shares, title="Clean images predicted as each class, unlearned model",
                   ylabel="share of clean images", highlight=label.target, highlight_label="detected target",
                   reference=1 / classes, reference_label=f"chance (1/{classes})"),
        plots.Lines(_drift_series(exposure, subject.classes), title="Predictions during unlearning",
                    xlabel="unlearning step", ylabel="share of the batch",
                    highlight=subject.classes[label.candidate])])
    if args.force:
        remove_previous_outputs(out)
    _write_figures({"predictions": figure}, out)
    if not args.no_trigger:
        target = label.candidate if args.target is None else args.target
        report["trigger_recovery"] = _recover(args, subject, exposure, target, out)
    write_json(out / "report.json", report)
    write_text(out / "summary.md", _inspect_summary(report, subject.classes))
    print(_inspect_summary(report, subject.classes))
    print(f"outputs: {out}")
    return 0


def scan_data(args) -> int:
    if args.samples is not None and args.samples < 1:
        raise RnpError(f"--samples must be at least 1, got {args.samples}")
    if not fits_seed(args.sample_seed):
        raise RnpError(f"--sample-seed must be a 64-bit integer, got {args.sample_seed}")
    strip_config = StripConfig(overlays=args.strip_overlays)  # checked even when STRIP is not run
    out = _output_dir(args)
    subject, calibration = _split_clean(_subject(args), args.clean_seed)
    data, known = _scanned_data(args, subject)
    chosen = torch.arange(len(data))
    if args.samples and args.samples < len(data):
        chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.sample_seed))[:args.samples]
        chosen = chosen.sort().values
        data = data.subset(chosen)
        known = None if known is None else known[chosen]
    names = args.detectors or list(SAMPLE_DETECTORS)
    unknown = sorted(set(names) - set(SAMPLE_DETECTORS))
    if unknown:
        raise RnpError(f"unknown detector {unknown[0]!r}; choose from {', '.join(SAMPLE_DETECTORS)}")
    exposure = _expose(args, subject) if "unlearned" in names else None
    report = {"scored": len(data), "poisoned_known": known is not None, "detectors": {},
              "clean_set": subject.clean_record}
    columns = {"index": chosen.tolist(), "label": data.labels.tolist()}
    if known is not None:
        columns["poisoned"] = known.int().tolist()
        report["poisoned"] = int(known.sum())
    panels = []
    for name in names:
        detector = Strip(strip_config) if name == "strip" else SAMPLE_DETECTORS[name]()
        extra = {"exposure": exposure} if name == "unlearned" else {}
        start = time.perf_counter()
        scores = detector.score(subject.model, data, subject.clean, device=subject.device, **extra)
        entry = {"seconds": time.perf_counter() - start}
        if name in CALIBRATED_DETECTORS:
            held_out = detector.score(subject.model, calibration, subject.clean, device=subject.device, **extra)
            entry.update(_flags(scores, held_out, known))
        if known is not None and 0 < int(known.sum()) < len(known):
            entry.update(auroc=auroc(scores, known), tpr_at_5_fpr=tpr_at_fpr(scores, known, 0.05))
            groups = {"clean": scores[~known], "poisoned": scores[known]}
        else:
            groups = {"all samples": scores}
        panels.append(plots.Figure([plots.Histograms(groups, title=name, xlabel="score (higher = more suspicious)")]))
        report["detectors"][name] = entry
        columns[name] = [f"{float(s):.9g}" for s in scores]  # 9 digits: float32 exactly
    if args.force:
        remove_previous_outputs(out)
    write_csv(out / "scores.csv", list(columns), zip(*columns.values()))
    _write_figures({f"scores_{name}": panel for name, panel in zip(names, panels)}, out)
    write_json(out / "report.json", report)
    write_text(out / "summary.md", _scan_summary(report))
    print(_scan_summary(report))
    print(f"outputs: {out}")
    return 0


def _write_figures(figures: dict[str, plots.Figure], out: Path) -> None:
    """Writes each figure as ``out/<stem>.png``, ``.svg`` and ``.csv``; without matplotlib only
    the CSVs, and one line on stderr says how to get the images."""
    drawn = [plots.write_figure(figure, out / stem) for stem, figure in figures.items()]
    if not all(drawn):
        print(f"note: {plots.MISSING_MATPLOTLIB}", file=sys.stderr)


def _output_dir(args) -> Path:
    """``--out``, checked before any work (see :func:`prepare_output_dir`), as are the settings."""
    _check_settings(args)
    return prepare_output_dir(args.out, input_paths(args), force=args.force)


def _check_settings(args) -> None:
    """Builds the unlearning and trigger-search settings up front, so that a bad value is
    refused before any work, also where the command would not use it (``scan-data`` without
    the unlearned detector, ``inspect --no-trigger``)."""
    RNPConfig(**config_overrides(args, RNPConfig))
    TriggerReverseConfig(**config_overrides(args, TriggerReverseConfig, prefix="trigger-"))


@dataclasses.dataclass
class _Subject:
    """What both commands work on: the model (on ``device``), its classes, the defender's clean
    images (and how they were drawn), the test split and the run folder if any."""

    model: torch.nn.Module
    classes: list[str]
    clean: ImageSet
    clean_record: dict
    test: ImageSet
    run: object
    device: torch.device


def _subject(args) -> _Subject:
    """The model, its clean images and test split, from ``--run`` or ``--model`` + ``--data``."""
    device = resolve_device(args.device)
    if bool(args.run) == bool(args.data):
        raise RnpError("give either --run DIR, or --model FILE with --data SPEC")
    if args.data and not args.model:
        raise RnpError("--data needs --model FILE (the model to inspect)")
    if args.run:
        run = load_run(args.run, cache_dir=args.cache_dir, model_file=args.model)
        model, data = run.model, run.data
        pool, exclude = run.clean_pool()
    else:
        run = None
        data = load_dataset(args.data, cache_dir=args.cache_dir)
        model, _ = outside_model(args, data)
        pool, exclude = data.train, None
    clean, indices = select_clean_subset(pool, args.clean_size, seed=args.clean_seed, exclude=exclude)
    return _Subject(model.to(device).eval(), list(data.train.classes), clean,
                    {"size": len(clean), "seed": args.clean_seed}, data.test, run, device)


def _expose(args, subject: "_Subject") -> Exposure:
    """RNP's unlearning of the subject's model on its clean images, with the given settings."""
    return expose(subject.model, subject.clean, _unlearning_config(args), progress=not args.quiet)


def _unlearning_config(args) -> RNPConfig:
    return RNPConfig(**config_overrides(args, RNPConfig))


def _map_threshold(args) -> float | Calibration:
    """``--map-threshold``, or the threshold that the map agreements in ``--clean-reports``
    (reports of known-clean models) set at ``--fpr``; checked before any unlearning runs."""
    if args.runs < 0:
        raise RnpError(f"--runs must be 0 or more, got {args.runs}")
    if not 0 < args.run_subset <= 1:
        raise RnpError(f"--run-subset is a share of the clean images in (0, 1], got {args.run_subset}")
    if not args.clean_reports:
        return args.map_threshold
    if not args.runs:
        raise RnpError("--clean-reports sets the threshold of the repeated unlearnings; --runs 0 skips them")
    if not 0 <= args.fpr <= 1:
        raise RnpError(f"--fpr must be a rate in [0, 1], got {args.fpr}")
    agreements = []
    for path in args.clean_reports:
        collapse = read_json(path).get("collapse")
        agreement = collapse.get("agreement") if isinstance(collapse, dict) else None
        if isinstance(agreement, bool) or not isinstance(agreement, (int, float)) or not 0 <= agreement <= 1:
            raise RnpError(f"{path}: not a report of `rnp inspect` with repeated unlearnings "
                           "(no collapse agreement in [0, 1])")
        agreements.append(float(agreement))
    return calibrate(agreements, args.fpr)


def _drift_series(exposure: Exposure, classes: list[str]) -> dict[str, list[float]]:
    counts = exposure.prediction_counts.double()
    shares = counts / counts.sum(1, keepdim=True)
    return {name: shares[:, i].tolist() for i, name in enumerate(classes)}


def _recover(args, subject: _Subject, exposure: Exposure, target: int, out: Path) -> dict:
    config = TriggerReverseConfig(**config_overrides(args, TriggerReverseConfig, prefix="trigger-"))
    comparison = recover_on_both(exposure, target, config, seed=args.trigger_seed, progress=not args.quiet)
    evaluation_images = subject.test.subset(torch.arange(0, len(subject.test), max(1, len(subject.test) // 1000)))
    true_mask = None
    if subject.run is not None and subject.run.attack is not None:
        true_mask = true_trigger_mask(subject.run.attack, evaluation_images)
    evaluation = comparison.evaluate(evaluation_images, true_mask)
    recovered = image_grid(trigger_tiles(comparison), scale=4, columns=3,
                           title=f"Triggers recovered for class {target}")
    panels = [recovered] if true_mask is None else [
        image_grid([("true trigger pixels", true_mask)], scale=4, title="Attack"), recovered]
    save_png(side_by_side(panels), out / "triggers.png")
    save_checkpoint(out / "triggers.safetensors",
                    {f"{name}_{part}": getattr(trigger, part).contiguous()
                     for name, trigger in comparison.triggers.items() for part in ("mask", "pattern")})
    return evaluation.to_dict()


def _inspect_summary(report: dict, classes: list[str]) -> str:
    label, verdict = report["label_detection"], report["model_detection"]
    named = (f"class {label['target']} ({classes[label['target']]})" if label["target"] is not None
             else f"none stands out (top candidate {label['candidate']})")
    if label["target"] is not None and not verdict["backdoored"]:
        named += " (but the model does not look backdoored: on clean models the label alone often fires)"
    lines = ["# rnp inspect", ""]
    if "collapse" in report:
        lines += _collapse_words(report["collapse"], classes) + ["", "One unlearning on all the clean images:", ""]
    lines += [f"- backdoored: **{'yes' if verdict['backdoored'] else 'no'}** (variance of class shares "
              f"{verdict['score']:.4f}, threshold {verdict['threshold']})",
              f"- target label: **{named}**, confidence {label['confidence']:.2f} (threshold {label['threshold']})",
              f"- unlearning: {report['exposure']['unlearning_steps']} steps, "
              f"{report['exposure']['seconds']:.1f} s"]
    trigger = report.get("trigger_recovery")
    if trigger:
        rows = [["model", "mask L1", "IoU", "success on original", "steps", "seconds"]]
        for name, row in trigger["models"].items():
            rows.append([name, f"{row['norm']:.1f}", "-" if row["iou"] is None else f"{row['iou']:.2f}",
                         f"{100 * row['success']:.1f}%", str(row["steps"]), f"{row['seconds']:.1f}"])
        lines += ["", f"Trigger recovery for class {trigger['target']}:", "", render_table(rows, markdown=True)]
    return "\n".join(lines) + "\n"


def _collapse_words(found: dict, classes: list[str]) -> list[str]:
    """The verdict of the repeated unlearnings, what it rests on, and what to conclude."""
    comparison = (f"map agreement {found['agreement']:.2f}, {'above' if found['backdoored'] else 'at most'} "
                  f"the threshold {found['threshold']:.2f}; {found['runs']} unlearnings, {found['seconds']:.0f} s")
    if found["kind"] == "all-to-one":
        target = found["target"]
        head = (f"- verdict: **backdoored, target class {target} ({classes[target]})**: the unlearnings, each on "
                f"another part of your clean images, send them to the same class ({comparison}).")
        advice = (f"Treat the model as backdoored with target {classes[target]}: do not deploy it as it is; "
                  "purify it (`rnp defend`) and inspect the result again.")
    elif found["kind"] == "all-to-all":
        moves = ", ".join(f"{classes[y]} -> {classes[c]}" for y, c in enumerate(found["consensus"]) if c is not None)
        head = (f"- verdict: **backdoored, all-to-all**: the unlearnings agree on a map between classes "
                f"({moves}) rather than on one target ({comparison}).")
        advice = "Treat the model as backdoored: do not deploy it as it is; purify it (`rnp defend`)."
    else:
        head = (f"- verdict: **no backdoor found**: unlearnings on different parts of your clean images do not "
                f"send them to the same classes ({comparison}).")
        advice = ("This is evidence, not proof: a backdoor this test misses leaves the same picture. "
                  "The single-unlearning scores below are weaker evidence (they fire on clean models).")
    if found["false_alarm_bound"] is None:
        rate = ("The threshold was fixed on development models (PreAct-ResNet18, CIFAR-10) and promises no "
                "false-positive rate on yours: run `rnp inspect` on models you know to be clean and pass their "
                "report.json files with --clean-reports to set one.")
    else:
        rate = (f"The threshold was set from models you know to be clean: a clean model like them is called "
                f"backdoored with chance at most {100 * found['false_alarm_bound']:.1f}%.")
    return [head, f"- {advice}", f"- {rate}"]


def _split_clean(subject: _Subject, seed: int) -> tuple[_Subject, ImageSet]:
    """The subject with the unlearning part of its clean set, and the held-out part the flagging
    thresholds are calibrated on (:data:`CALIBRATION_SHARE`, a seeded draw)."""
    clean = subject.clean
    if len(clean) < 2:
        raise RnpError("scan-data holds some clean images out of the unlearning to calibrate its "
                       "threshold on; give --clean-size 2 or more")
    held = min(len(clean) - 1, max(1, round(CALIBRATION_SHARE * len(clean))))
    order = torch.randperm(len(clean), generator=generator_for(seed, "calibration"))
    record = {**subject.clean_record, "unlearning": len(clean) - held, "calibration": held}
    return (dataclasses.replace(subject, clean=clean.subset(order[held:].sort().values), clean_record=record),
            clean.subset(order[:held].sort().values))


def _flags(scores: torch.Tensor, held_out: torch.Tensor, known: torch.Tensor | None) -> dict:
    """The threshold at which at most :data:`FLAG_FALSE_POSITIVE_RATE` of the held-out clean
    images' scores lie above, the scanned samples it flags, and the false-positive rate it
    realises, measured: on the held-out images (at most the rate; less when they are few or tied)
    and on the scanned samples known to be clean (None when no poisoned indices are known)."""
    threshold = threshold_at_fpr(held_out, FLAG_FALSE_POSITIVE_RATE)
    flagged = scores.double() > threshold  # compared as the threshold was set: exactly
    clean = None if known is None or bool(known.all()) else scores[~known]
    return {"threshold": threshold, "flagged": int(flagged.sum()), "target_fpr": FLAG_FALSE_POSITIVE_RATE,
            "fpr_held_out": share_above(held_out, threshold),
            "fpr_scanned_clean": None if clean is None else share_above(clean, threshold)}


def _scan_summary(report: dict) -> str:
    rows = [["detector", "AUROC", "TPR @ 5% FPR", "flagged", "FPR held-out", "FPR scanned clean", "seconds"]]
    for name, entry in report["detectors"].items():
        rows.append([name, f"{entry['auroc']:.3f}" if "auroc" in entry else "-",
                     f"{entry['tpr_at_5_fpr']:.3f}" if "tpr_at_5_fpr" in entry else "-",
                     str(entry.get("flagged", "-")), _share(entry.get("fpr_held_out")),
                     _share(entry.get("fpr_scanned_clean")), f"{entry['seconds']:.1f}"])
    known = (f", {report['poisoned']} known poisoned" if report["poisoned_known"] else
             "; no poisoned indices known, so no AUROC")
    clean = report["clean_set"]
    calibration = (f"Flagged: above a threshold set on {clean['calibration']} held-out clean images (the "
                   f"unlearning used the other {clean['unlearning']}), at most "
                   f"{100 * FLAG_FALSE_POSITIVE_RATE:g}% of them above it; the false-positive rates it "
                   "realises are measured on those images and on the scanned samples known clean.")
    return (f"# rnp scan-data\n\n{report['scored']} samples scored{known}.\n\n{render_table(rows, markdown=True)}\n\n"
            f"{calibration}\n")


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _scanned_data(args, subject: _Subject) -> tuple[ImageSet, torch.Tensor | None]:
    """The training set to scan and which of its samples are poisoned, when known."""
    run = subject.run
    if run is not None:
        poisoned = run.poisoned_train(cache_dir=args.cache_dir)
        return poisoned.data, positives_mask(poisoned.poisoned_indices, len(poisoned.data))
    data = load_dataset(args.data, cache_dir=args.cache_dir).train
    if not args.poisoned_indices:
        return data, None
    try:
        indices = [int(line) for line in Path(args.poisoned_indices).read_text().split()]
    except ValueError:
        raise RnpError(f"{args.poisoned_indices}: expected one integer per line") from None
    return data, positives_mask(indices, len(data))

