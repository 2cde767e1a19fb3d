"""What RNP's unlearned model exposes, on every CIFAR-10 subject: target label, backdoored-model
score, trigger recovery and poisoned-sample detection, each against the usual method.

Subjects are the cached models of ``attacks_cifar10.py`` (PreAct-ResNet18 width 16, 10 epochs,
target 0, each attack at its default rate) plus clean models of several seeds, so the
backdoored-model score gets an AUROC over clean and backdoored models. Per subject, with the
same 500 clean training images (seed 0) for every task:

1. *Exposure*: RNP's unlearning stage (defaults), timed.
2. *Target label*: the class the clean predictions drift to (right or wrong; confidence).
3. *Model detection*: EBYD's variance of the unlearned model's class shares (and the label
   confidence as a second score).
4. *Trigger recovery* for the named class, Neural Cleanse's search with the same budget and
   seed on the unlearned and on the original model: mask L1 norm, IoU with the true trigger
   (patch attacks), the recovered trigger's success on the original model (every 10th test image),
   search steps and seconds.
5. *Poisoned-sample detection* on a seeded random subset of the poisoned training set
   (``--samples``): AUROC and TPR at 5% FPR of the unlearned model's margin against the original
   model's loss, Activation Clustering, Spectral Signatures and STRIP (``--strip-overlays``).
6. *Cleansing* (``--cleanse SUBJECT ...``): the training samples the unlearned model flags
   (threshold: 5% false positives on the defender's clean images) are dropped and the model
   retrained with the subject's recipe; CA / ASR next to the subject's.

Each subject is one JSON file in ``--out``, written when it finishes; a finished subject is
never recomputed, so an interrupted run resumes. ``--table-only`` prints the tables.

    python benchmarks/exposure_cifar10.py --threads 1 --subjects clean:0 clean:1 badnets blend
    python benchmarks/exposure_cifar10.py --threads 1 --subjects --cleanse badnets blend wanet
    python benchmarks/exposure_cifar10.py --table-only --markdown exposure.md

The tables end with Fine-Pruning against ``fp_rnp`` (FP ranked by RNP's masks), read from the
cells of ``defenses_cifar10.py --defenses fp fp_rnp`` (``--defense-results``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from rnp.attacks import ATTACKS
from rnp.bench.subjects import cached_subject
from rnp.bench.suite import suite_attack
from rnp.data import select_clean_subset
from rnp.detection.exposure import detect_backdoored_model, detect_target_label, expose
from rnp.detection.poisoned_samples import SAMPLE_DETECTORS, Strip, StripConfig, UnlearnedMargin
from rnp.detection.trigger_recovery import recover_on_both, true_trigger_mask
from rnp.detection.trigger_reverse import TriggerReverseConfig
from rnp.io.files import write_json
from rnp.io.runs import load_run
from rnp.metrics import evaluate_backdoor
from rnp.metrics.detection import auroc, positives_mask, threshold_at_fpr, tpr_at_fpr
from rnp.models import build_model
from rnp.training import TrainConfig, train

TRIGGER_BUDGET = {"steps": 120, "samples_per_step": 64}
"""Neural Cleanse's search budget on this CPU (its release: 1,000 steps of 1,000 images), the
same as the defense benchmark's."""

DEFAULT_SUBJECTS = (*(f"clean:{seed}" for seed in range(5)),
                    *sorted(set(ATTACKS) - {"adaptive_blend"}), "adaptive_blend@0.03", "badnets:all2all")
"""Five clean seeds; every attack at its default rate except Adaptive-Blend, whose 0.3% leaves no
working backdoor in 10 epochs (ASR 1.7%, see the attack benchmark), at 3%; BadNets all-to-all."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/cifar10/cifar10-jpeg.zip")
    parser.add_argument("--cache", default="benchmarks/cache")
    parser.add_argument("--out", default="benchmarks/results/exposure", help="one JSON file per subject")
    parser.add_argument("--subjects", nargs="*", default=list(DEFAULT_SUBJECTS),
                        help="clean:SEED, an attack name, ATTACK@RATE or ATTACK:all2all")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--clean-size", type=int, default=500)
    parser.add_argument("--samples", type=int, default=5000, help="training samples scored per subject")
    parser.add_argument("--strip-overlays", type=int, default=20, help="STRIP's N (paper: 100)")
    parser.add_argument("--cleanse", nargs="*", default=[], help="subjects to cleanse and retrain")
    parser.add_argument("--threads", type=int, help="torch threads (1 per job when jobs run side by side)")
    parser.add_argument("--defense-results", default="benchmarks/results/defenses",
                        help="cells of defenses_cifar10.py, for the fp vs fp_rnp table")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--markdown", help="also write the tables to this markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not args.table_only:
        for subject in args.subjects:
            path = out / f"{_safe(subject)}.json"
            if not path.exists():
                write_json(path, measure(args, subject))
        for subject in args.cleanse:
            path = out / f"{_safe(subject)}__cleansed.json"
            if not path.exists():
                write_json(path, cleanse(args, subject))
    cells = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    if not cells:
        sys.exit(f"no results in {out}")
    text = tables(cells) + "\n\n" + guided_pruning_table(Path(args.defense_results))
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


def load_subject(args, subject: str):
    """The run folder of ``subject``: ``clean:SEED``, ``ATTACK``, ``ATTACK@RATE`` or ``ATTACK:all2all``."""
    seed, attack = 0, None
    if subject.startswith("clean:"):
        seed = int(subject.split(":", 1)[1])
    else:
        name, _, mode = subject.partition(":")
        name, _, rate = name.partition("@")
        params = {"poison_rate": float(rate)} if rate else {}
        if mode:
            params["mode"] = mode
        attack = suite_attack(name, **params)

    def log(line: str) -> None:
        print(f"[{subject}] {line}", file=sys.stderr, flush=True)

    run_dir = cached_subject(args.cache, args.data, attack, config=TrainConfig(epochs=args.epochs, seed=seed),
                             cache_dir=Path(args.cache) / "data", progress=False, log=log)
    return load_run(run_dir, cache_dir=Path(args.cache) / "data"), log


def exposed_subject(args, subject: str):
    """The subject's run, its log function, the defender's 500 clean images (seed 0) and the
    exposure RNP's unlearning makes from them."""
    run, log = load_subject(args, subject)
    pool, exclude = run.clean_pool()
    clean, _ = select_clean_subset(pool, args.clean_size, seed=0, exclude=exclude)
    return run, log, clean, expose(run.model, clean)


def measure(args, subject: str) -> dict:
    run, log, clean, exposure = exposed_subject(args, subject)
    label, model_score = detect_target_label(exposure), detect_backdoored_model(exposure)
    attack = run.attack
    cell = {"subject": subject, "backdoored": attack is not None,
            "attack": attack.spec() if attack else None,
            "true_target": attack.target if attack is not None and attack.mode == "all2one" else None,
            "exposure_seconds": exposure.seconds, "unlearning_steps": exposure.unlearning["steps"],
            "label": label.to_dict(), "model_detection": model_score.to_dict()}
    log(f"label {label.candidate} ({label.confidence:.2f}), variance {model_score.score:.4f}")
    if attack is None:
        return cell
    cell["trigger"] = recover_trigger(run, exposure, label.candidate)
    log(f"trigger: {cell['trigger']}")
    cell["samples"] = detect_samples(args, run, exposure, clean)
    log(f"samples: {cell['samples']}")
    return cell


def recover_trigger(run, exposure, target: int) -> dict:
    test = run.data.test.subset(torch.arange(0, len(run.data.test), 10))  # every class
    true_mask = true_trigger_mask(run.attack, test)
    comparison = recover_on_both(exposure, target, TriggerReverseConfig(**TRIGGER_BUDGET), seed=0)
    return comparison.evaluate(test, true_mask).to_dict()


def detect_samples(args, run, exposure, clean) -> dict:
    """AUROC / TPR@5%FPR of every sample detector on a seeded subset of the poisoned training set."""
    poisoned = run.poisoned_train(cache_dir=Path(args.cache) / "data")
    flags = positives_mask(poisoned.poisoned_indices, len(poisoned.data))
    chosen = torch.randperm(len(poisoned.data), generator=torch.Generator().manual_seed(0))[:args.samples]
    data, positives = poisoned.data.subset(chosen), flags[chosen]
    result = {"scored": len(data), "poisoned": int(positives.sum()), "detectors": {}}
    if not 0 < int(positives.sum()) < len(data):
        result["note"] = "no poisoned sample in the static training set (the attack poisons on the fly)"
        return result
    detectors = {name: cls() for name, cls in SAMPLE_DETECTORS.items()}
    detectors["strip"] = Strip(StripConfig(overlays=args.strip_overlays))
    for name, detector in detectors.items():
        start = time.perf_counter()
        extra = {"exposure": exposure} if name == "unlearned" else {}
        scores = detector.score(run.model, data, clean, **extra)
        result["detectors"][name] = {"auroc": auroc(scores, positives),
                                     "tpr_at_5_fpr": tpr_at_fpr(scores, positives, 0.05),
                                     "seconds": time.perf_counter() - start}
    return result


def cleanse(args, subject: str) -> dict:
    """Drops the training samples the unlearned model flags and retrains with the subject's recipe."""
    run, log, clean, exposure = exposed_subject(args, subject)
    poisoned = run.poisoned_train(cache_dir=Path(args.cache) / "data")
    scorer = UnlearnedMargin()
    start = time.perf_counter()
    scores = scorer.score(run.model, poisoned.data, exposure=exposure)
    threshold = threshold_at_fpr(scorer.score(run.model, clean, exposure=exposure), 0.05)
    flagged = scores > threshold
    scoring_seconds = time.perf_counter() - start
    positives = positives_mask(poisoned.poisoned_indices, len(poisoned.data))
    keep = (~flagged).nonzero().squeeze(1)
    log(f"flagged {int(flagged.sum())} of {len(flagged)}; retraining on {len(keep)}")
    config = TrainConfig(**run.info["train"])
    torch.manual_seed(config.seed)
    model = build_model(**run.info["model"])
    start = time.perf_counter()
    train(model, poisoned.data.subset(keep), config, progress=False)
    triggered = run.triggered_test()
    return {"subject": subject, "cleansed": True, "flagged": int(flagged.sum()),
            "flagged_poisoned": int((flagged & positives).sum()), "poisoned": int(positives.sum()),
            "false_positive_rate": float((flagged & ~positives).sum() / (~positives).sum()),
            "threshold": threshold, "scoring_seconds": scoring_seconds,
            "retrain_seconds": time.perf_counter() - start,
            "before": evaluate_backdoor(run.model, run.data.test, triggered).to_dict(),
            "after": evaluate_backdoor(model, run.data.test, triggered).to_dict()}


def tables(cells: list[dict]) -> str:
    subjects = [c for c in cells if not c.get("cleansed")]
    attacked = [c for c in subjects if c.get("trigger")]
    sections = [detection_table(subjects), model_detection_table(subjects),
                trigger_table(attacked), samples_table(attacked)]
    cleansed = [c for c in cells if c.get("cleansed")]
    if cleansed:
        sections.append(cleansing_table(cleansed))
    return "\n\n".join(sections)


def detection_table(subjects: list[dict]) -> str:
    lines = ["| subject | target named | label confidence | variance score | unlearning steps | "
             "exposure seconds |", "|---|---|---|---|---|---|"]
    for c in subjects:
        label, true = c["label"], c["true_target"]
        if not c["backdoored"]:
            found = "none (right)" if label["target"] is None else f"{label['target']} (false alarm)"
        elif true is None:
            found = "none (right: all-to-all)" if label["target"] is None else f"{label['target']} (all-to-all)"
        else:
            found = ("right" if label["target"] == true else "none" if label["target"] is None
                     else f"wrong ({label['target']})")
        lines.append(f"| {c['subject']} | {found} | {label['confidence']:.2f} | "
                     f"{c['model_detection']['score']:.4f} | {c['unlearning_steps']} | "
                     f"{c['exposure_seconds']:.0f} |")
    return "\n".join(lines)


def trigger_table(attacked: list[dict]) -> str:
    lines = ["| subject | class searched | mask L1 (unlearned / original) | IoU | mass on trigger | "
             "success on original % | seconds |", "|---|---|---|---|---|---|---|"]

    def pair(u, o, fmt):
        return "-" if u is None else f"{fmt(u)} / {fmt(o)}"

    for c in attacked:
        t = c["trigger"]
        u, o = t["models"]["unlearned"], t["models"]["original"]
        lines.append(f"| {c['subject']} | {t['target']} | {u['norm']:.1f} / {o['norm']:.1f} | "
                     f"{pair(u['iou'], o['iou'], lambda v: f'{v:.2f}')} | "
                     f"{pair(u['mass_on_trigger'], o['mass_on_trigger'], lambda v: f'{v:.2f}')} | "
                     f"{100 * u['success']:.1f} / {100 * o['success']:.1f} | "
                     f"{u['seconds']:.0f} / {o['seconds']:.0f} |")
    return "\n".join(lines)


def samples_table(attacked: list[dict]) -> str:
    names = ("unlearned", "loss", "ac", "ss", "strip")
    lines = ["| subject | poisoned / scored | " + " | ".join(f"{n} AUROC / TPR@5%" for n in names) + " |",
             "|" + "---|" * (len(names) + 2)]
    seconds = {n: [] for n in names}
    aurocs = {n: [] for n in names}
    for c in attacked:
        samples = c["samples"]
        det = samples["detectors"]
        if not det:
            lines.append(f"| {c['subject']} | 0 / {samples['scored']} | " + " | ".join("-" for _ in names)
                         + " |")
            continue
        for n in names:
            seconds[n].append(det[n]["seconds"])
            aurocs[n].append(det[n]["auroc"])
        lines.append(f"| {c['subject']} | {samples['poisoned']} / {samples['scored']} | " + " | ".join(
            f"{det[n]['auroc']:.3f} / {det[n]['tpr_at_5_fpr']:.2f}" for n in names) + " |")
    lines.append("| mean AUROC | | " + " | ".join(
        f"{sum(v) / len(v):.3f}" if v else "-" for v in aurocs.values()) + " |")
    lines.append("| mean seconds | | " + " | ".join(
        f"{sum(v) / len(v):.0f}" if v else "-" for v in seconds.values()) + " |")
    return "\n".join(lines)


def cleansing_table(cleansed: list[dict]) -> str:
    lines = ["| subject | flagged | poisoned caught | false positives | before CA / ASR | "
             "retrained CA / ASR | retrain seconds |", "|---|---|---|---|---|---|---|"]
    for c in cleansed:
        b, a = c["before"], c["after"]
        lines.append(f"| {c['subject']} | {c['flagged']} | {c['flagged_poisoned']} of {c['poisoned']} | "
                     f"{100 * c['false_positive_rate']:.1f}% | {100 * b['clean_accuracy']:.1f} / "
                     f"{100 * b['attack_success_rate']:.1f} | {100 * a['clean_accuracy']:.1f} / "
                     f"{100 * a['attack_success_rate']:.1f} | {c['retrain_seconds']:.0f} |")
    return "\n".join(lines)


def model_detection_table(subjects: list[dict]) -> str:
    """AUROC and accuracy at the fixed thresholds of both model-level scores."""
    positives = torch.tensor([c["backdoored"] for c in subjects])
    lines = ["| score | clean models | backdoored models | AUROC | accuracy at threshold | threshold |",
             "|---|---|---|---|---|---|"]
    for name, values, threshold in (
            ("variance of class shares (EBYD)", [c["model_detection"]["score"] for c in subjects],
             subjects[0]["model_detection"]["threshold"]),
            ("target-label confidence", [c["label"]["confidence"] for c in subjects],
             subjects[0]["label"]["threshold"])):
        scores = torch.tensor(values)
        value = auroc(scores, positives) if 0 < int(positives.sum()) < len(positives) else float("nan")
        correct = ((scores > threshold) == positives).float().mean()
        lines.append(f"| {name} | {int((~positives).sum())} | {int(positives.sum())} | {value:.3f} | "
                     f"{100 * float(correct):.1f}% | {threshold} |")
    return "\n".join(lines)


def guided_pruning_table(results: Path) -> str:
    """Fine-Pruning with its own ranking (``fp``) and with RNP's (``fp_rnp``), per attack, from
    the defense benchmark's cells (``defenses_cifar10.py --defenses fp fp_rnp``)."""
    cells = {}
    for path in results.glob("*__fp*.json"):
        cell = json.loads(path.read_text())
        if cell.get("arch") == "preact_resnet18" and "after" in cell:
            cells[(cell["subject"], cell["defense"])] = cell
    subjects = sorted({s for s, d in cells if d == "fp_rnp" and (s, "fp") in cells})
    lines = ["| attack | fp CA / ASR / DER | fp_rnp CA / ASR / DER | fp / fp_rnp pruned | fp / fp_rnp seconds |",
             "|---|---|---|---|---|"]

    def trio(cell):
        a = cell["after"]
        return f"{100 * a['clean_accuracy']:.1f} / {100 * a['attack_success_rate']:.1f} / {100 * cell['der']:.1f}"

    for subject in subjects:
        fp, guided = cells[(subject, "fp")], cells[(subject, "fp_rnp")]
        lines.append(f"| {subject} | {trio(fp)} | {trio(guided)} | {fp['summary'].get('pruned')} / "
                     f"{guided['summary'].get('pruned')} | {fp['seconds']:.0f} / {guided['seconds']:.0f} |")
    if subjects:
        means = [sum(cells[(s, d)][k] if k == "der" else cells[(s, d)]["after"][k] for s in subjects) / len(subjects)
                 for d in ("fp", "fp_rnp") for k in ("clean_accuracy", "attack_success_rate", "der")]
        lines.append(f"| mean | {100 * means[0]:.1f} / {100 * means[1]:.1f} / {100 * means[2]:.1f} | "
                     f"{100 * means[3]:.1f} / {100 * means[4]:.1f} / {100 * means[5]:.1f} | | |")
    return "\n".join(lines)


def _safe(subject: str) -> str:
    return subject.replace(":", "_").replace("@", "_at_")


if __name__ == "__main__":
    main()
