"""``rnp inspect`` and ``rnp scan-data``: what RNP's unlearned model reveals about a model and
about its training data. Each calls the detection API, then writes JSON, Markdown, figures (PNG
and SVG, with their data as CSV) and the recovered triggers' picture."""

from __future__ import annotations

import dataclasses
import math
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
from rnp.detection.collapse import detect_backdoor
from rnp.detection.exposure import Exposure, detect_backdoored_model, detect_target_label, expose
from rnp.detection.poisoned_samples import StripConfig
from rnp.detection.sample_scan import SCAN_DETECTORS, SampleScanConfig, scan_samples
from rnp.detection.trigger_recovery import recover_on_both, trigger_tiles, true_trigger_mask
from rnp.errors import RnpError
from rnp.io.checkpoint import save_checkpoint
from rnp.io import plots
from rnp.io.figures import image_grid, save_png, side_by_side
from rnp.io.files import read_json, write_json, write_text
from rnp.io.tables import render_table, write_csv
from rnp.metrics.collapse import Calibration, calibrate
from rnp.metrics.detection import auroc, false_alarm_interval, positives_mask, share_above, threshold_at_fpr
from rnp.runs.folder import load_run
from rnp.runs.outputs import prepare_output_dir, remove_previous_outputs
from rnp.utils import fits_seed, resolve_device

UNLEARN_FIELDS = ("batch_size", "augment", "unlearn_lr", "unlearn_momentum", "unlearn_weight_decay",
                  "unlearn_milestones", "unlearn_gamma", "unlearn_epochs", "clean_threshold",
                  "stop_check", "seed")
"""The RNP settings that shape the exposure (the unlearning stage); ``rnp inspect`` and
``rnp scan-data`` take these as options."""

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
        if isinstance(threshold, Calibration):
            report["collapse"].update(references=threshold.references, false_alarm_interval=list(
                false_alarm_interval(threshold.references, threshold.fpr)))
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
    unlearning = _unlearning_config(args)
    settings = SampleScanConfig(detectors=tuple(args.detectors or SCAN_DETECTORS), folds=args.folds,
                                false_positive_rate=args.fpr, strip=StripConfig(overlays=args.strip_overlays),
                                seed=unlearning.seed)
    out = _output_dir(args)
    subject = _subject(args)
    if len(subject.clean) < 2 * settings.folds:
        raise RnpError(f"scan-data scores your clean images in {settings.folds} folds of 2 or more: "
                       f"give --clean-size {2 * settings.folds} or more")
    data, known = _scanned_data(args, subject)
    chosen = torch.arange(len(data))
    if args.samples and args.samples < len(data):
        chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.sample_seed))[:args.samples]
        chosen = chosen.sort().values
        data = data.subset(chosen)
        known = None if known is None else known[chosen]
    scan = scan_samples(subject.model, data, subject.clean, settings, unlearning=unlearning,
                        device=subject.device)
    report = {"scored": len(data), "poisoned_known": known is not None, "clean_set": subject.clean_record,
              "folds": settings.folds, "detectors": {}}
    columns = {"index": chosen.tolist(), "label": data.labels.tolist()}
    if known is not None:
        columns["poisoned"] = known.int().tolist()
        report["poisoned"] = int(known.sum())
    rate, panels = settings.false_positive_rate, {}
    for name in settings.detectors:
        scores, references = scan.scores[name], scan.reference_scores[name]
        flags = _flags(scores, threshold_at_fpr(references, rate), rate, references, known)
        report["detectors"][name] = {"seconds": scan.seconds[name], **flags}
        panels[f"scores_{name}"] = _histograms(name, scores, known)
        columns[name] = [f"{float(s):.9g}" for s in scores]  # 9 digits: float32 exactly
    per_class = torch.bincount(data.labels[scan.flagged], minlength=len(subject.classes))
    report["combined"] = {"seconds": sum(scan.seconds.values()),
                          **_flags(scan.combined, scan.threshold, rate, scan.combined_reference, known),
                          "flagged_per_class": per_class.tolist()}
    panels["scores_combined"] = _histograms("combined (Fisher, decades)", scan.combined, known)
    columns["combined"] = [f"{float(s):.9g}" for s in scan.combined]
    columns["flagged"] = scan.flagged.int().tolist()
    if args.force:
        remove_previous_outputs(out)
    write_csv(out / "scores.csv", list(columns), zip(*columns.values()))
    _write_figures(panels, out)
    write_json(out / "report.json", report)
    summary = _scan_summary(report, subject.classes)
    write_text(out / "summary.md", summary)
    print(summary)
    print(f"outputs: {out}")
    return 0


def _histograms(title: str, scores: torch.Tensor, known: torch.Tensor | None) -> plots.Figure:
    groups = ({"clean": scores[~known], "poisoned": scores[known]} if known is not None and known.any()
              and not known.all() else {"all samples": scores})
    return plots.Figure([plots.Histograms(groups, title=title, xlabel="score (higher = more suspicious)")])


def _flags(scores: torch.Tensor, threshold: float, rate: float, references: torch.Tensor,
           known: torch.Tensor | None) -> dict:
    """The samples a threshold set at ``rate`` flags and the false-positive rates it realises:
    on the clean references it was set on (at most the rate; less when they are few or tied), the
    95% interval of its rate on clean samples exchangeable with them (the draw of the references
    alone moves it), and on the scanned samples known to be clean (None when no poisoned indices
    are known); with known poison, the AUROC and the share of it flagged."""
    flagged = scores.double() > threshold  # compared as the threshold was set: exactly
    entry = {"threshold": threshold, "flagged": int(flagged.sum()), "target_fpr": rate,
             "fpr_references": share_above(references, threshold),
             "fpr_interval": list(false_alarm_interval(len(references), rate)), "fpr_scanned_clean": None}
    if known is not None and not bool(known.all()):
        entry["fpr_scanned_clean"] = share_above(scores[~known], threshold)
    if known is not None and 0 < int(known.sum()) < len(known):
        entry.update(auroc=auroc(scores, known), tpr=share_above(scores[known], threshold))
    return entry


def _scan_summary(report: dict, classes: list[str]) -> str:
    rows = [["detector", "AUROC", "flagged", "poisoned flagged", "FPR references", "FPR scanned clean", "seconds"]]
    for name, entry in [*report["detectors"].items(), ("combined", report["combined"])]:
        rows.append([name, f"{entry['auroc']:.3f}" if "auroc" in entry else "-", str(entry["flagged"]),
                     _share(entry.get("tpr")), _share(entry["fpr_references"]), _share(entry["fpr_scanned_clean"]),
                     f"{entry['seconds']:.1f}"])
    known = (f", {report['poisoned']} known poisoned" if report["poisoned_known"] else
             "; no poisoned indices known, so no AUROC")
    clean, rate = report["clean_set"], report["combined"]["target_fpr"]
    method = (f"Each detector also scored your {clean['size']} clean images as if they were training samples "
              f"(the unlearning and STRIP's overlays cross-fitted in {report['folds']} folds, so none is scored "
              f"by a model that learned from it). Each threshold flags {100 * rate:g}% of those clean scores; "
              "`combined` joins the detectors' p-values against them (Fisher) and `flagged` in scores.csv is its "
              "flag.")
    low, high = report["combined"]["fpr_interval"]
    spread = (f"A threshold set on {clean['size']} clean images realises its rate only up to the draw of those "
              f"images: on clean samples like them it flags between {100 * low:.1f}% and {100 * high:.1f}% "
              f"(95% of draws): a realised rate anywhere in that range (`FPR scanned clean`, when the poisoned "
              "samples are known) is chance, not a fault of the scan.")
    return (f"# rnp scan-data\n\n{report['scored']} samples scored{known}.\n\n{render_table(rows, markdown=True)}\n\n"
            + "\n".join(_scan_verdict(report, classes)) + f"\n\n{method} {spread}\n")


def _scan_verdict(report: dict, classes: list[str]) -> list[str]:
    """What the combined flag says about the scanned data, in words: whether it flags more
    samples than its false-positive rate explains, and where they sit."""
    combined, scored, clean = report["combined"], report["scored"], report["clean_set"]["size"]
    rate, flagged = combined["target_fpr"], combined["flagged"]
    allowance = excess_allowance(scored, clean, rate)
    share = f"{flagged} of {scored} samples ({100 * flagged / scored:.1f}%)"
    if flagged <= allowance:
        return [f"- verdict: **no sign of poisoning**: {share} flagged, no more than a {100 * rate:g}% false-positive "
                f"rate explains (up to {allowance} with the sampling error of {clean} clean images).",
                "- This is evidence, not proof: poison that every detector scores like clean images goes unflagged."]
    per_class = combined["flagged_per_class"]
    ranked = sorted(range(len(per_class)), key=per_class.__getitem__, reverse=True)
    where = ", ".join(f"{classes[c]} {per_class[c]}" for c in ranked[:3])
    return [f"- verdict: **poisoned samples likely**: {share} flagged, beyond the {allowance} a {100 * rate:g}% "
            f"false-positive rate explains; about {flagged - round(rate * scored)} more than expected.",
            f"- Flagged samples by label (most first): {where}. One label far ahead is the usual picture of an "
            "all-to-one backdoor's target.",
            f"- Drop the flagged samples (`flagged` = 1 in scores.csv) before training again; about {100 * rate:g}% "
            "of the clean samples go with them."]


def excess_allowance(scored: int, references: int, rate: float) -> int:
    """How many of ``scored`` clean samples a threshold set at ``rate`` on ``references`` clean
    images may flag before the count says more than chance: the expected count plus three
    standard deviations of flagging ``scored`` samples (binomial) and of the threshold's own
    error from ``references`` images (the realised rate's spread, ``sqrt(rate (1 - rate) / n)``)."""
    spread = math.sqrt(scored * rate * (1 - rate) + scored ** 2 * rate * (1 - rate) / references)
    return math.ceil(rate * scored + 3 * spread)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


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
        rows = [["model", "mask L1", "IoU", "IoU, any trained placement", "success on original", "steps", "seconds"]]
        for name, row in trigger["models"].items():
            rows.append([name, f"{row['norm']:.1f}", _fraction(row["iou"]), _fraction(row["placed_iou"]),
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
        low, high = found["false_alarm_interval"]
        rate = (f"The threshold was set from {found['references']} models you know to be clean: a clean model like "
                f"them is called backdoored with chance at most {100 * found['false_alarm_bound']:.1f}%, averaged "
                f"over such sets of references; for this one set the rate lies between {100 * low:.1f}% and "
                f"{100 * high:.1f}% (95% of draws). More reference models narrow it.")
    return [head, f"- {advice}", f"- {rate}"]


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

