"""The report's study sections, each rendered only when the records hold what it shows:

- **subjects**: each subject's accuracy and what training it cost, where records keep that;
- **attack properties** (grid key ``attack_properties``): does each backdoor take hold;
- **spread over seeds**: mean ± standard deviation per subject and defense row, where a grid
  has several seeds or ``clean_seeds``;
- **each clean set**: ASR and CA drop on every clean set of the rows that ran on several, where
  a mean would hide the one set on which a defense failed;
- **defenses side by side**: CA, ASR and DER after each defense, subject by defense;
- **RNP's ranking** (``prune_counts``): the oracle's CA / ASR after pruning the first k
  channels in RNP's pruning order (its ``ranking``), per RNP setting;
- **exposure** (``exposure``): target label, model score, trigger recovery, sample detection;
- **label runs** (``label_runs``): the class each of several unlearnings drifted to.

Percentages are computed from the records' fractions, nothing is re-measured.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

import torch

from rnp.metrics.collapse import MAP_AGREEMENT_THRESHOLD, BackdoorVerdict, collapse_map, judge
from rnp.io.tables import render_table
from rnp.metrics.detection import auroc

ASR_BAR, CA_DROP_BAR = 0.90, 0.03
"""A backdoor takes hold when its ASR is at least 90% and it costs at most 3 points of clean
accuracy against its clean twin."""

SAMPLE_DETECTORS = ("unlearned", "loss", "ac", "ss", "strip")


def study_sections(records: list[dict]) -> list[str]:
    """Every study section the records fill, in a fixed order."""
    ok = [r for r in records if r["status"] == "ok"]
    sections = (subjects_table(ok), attack_table(ok), seeds_table(ok), clean_set_tables(ok), pivot_tables(ok),
                ranking_table(ok), exposure_tables(ok), label_runs_table(ok))
    return [section for section in sections if section]


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _spread(values, scale: float = 100.0) -> str:
    values = [scale * v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _subject_name(label: dict, many_models: bool) -> str:
    return f"{label['attack']} ({label['model']})" if many_models else label["attack"]


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def subjects_table(records: list[dict]) -> str:
    """Each subject's CA and ASR and the hours its training took (wall clock over every session,
    and processor hours), on which processor with how many threads, where the records keep the
    cost (``subject_training``; "-" for a subject whose records predate it)."""
    if not any(r.get("subject_training") for r in records):
        return ""
    subjects = {}
    for r in records:
        label = r["label"]
        key = (label["dataset"], label["model"], label["attack"], label.get("seed"))
        if r.get("subject_training") or key not in subjects:
            subjects[key] = r
    table = [["dataset", "model", "attack", "seed", "CA", "ASR", "training h", "processor h", "trained on"]]
    for (dataset, model, attack, seed), r in subjects.items():
        cost, machine = r.get("subject_training") or {}, r.get("subject_machine") or {}
        hours = ["-" if cost.get(k) is None else f"{cost[k] / 3600:.2f}" for k in ("seconds", "cpu_seconds")]
        threads = machine.get("threads")
        where = "-" if not machine.get("device_name") else (
            machine["device_name"] + ("" if threads is None else f", {threads} thread{'s' * (threads != 1)}"))
        table.append([dataset, model, attack, seed, _pct(r["before"]["clean_accuracy"]),
                      _pct(r["before"]["attack_success_rate"]), *hours, where])
    return "\n".join(["## Subjects", "",
                      "Each subject before any defense (%), and what training it cost: wall-clock hours "
                      "over every session it took, and the processor hours of its threads, which leave out "
                      "the time other work held the cores (-: not in its records).", "",
                      render_table(table, markdown=True)])


def attack_table(records: list[dict]) -> str:
    rows = [r for r in records if "attack_properties" in r]
    if not rows:
        return ""
    table = [["dataset", "model", "attack", "seed", "mode", "poisoning", "CA", "ASR", "RA", "clean twin CA",
              "CA drop", "takes hold", "attack fit s", "training s", "training CPU s"]]
    for r in rows:
        label, before, props = r["label"], r["before"], r["attack_properties"]
        twin = props["clean_twin_accuracy"]
        drop = None if twin is None else twin - before["clean_accuracy"]
        holds = "-" if drop is None else ("yes" if before["attack_success_rate"] >= ASR_BAR
                                          and drop <= CA_DROP_BAR else "**no**")
        train, cpu = (_seconds(props.get(key)) for key in ("train_seconds", "train_cpu_seconds"))
        table.append([label["dataset"], label["model"], label["attack"], label["seed"], props["mode"],
                      props["poisoning"], _pct(before["clean_accuracy"]), _pct(before["attack_success_rate"]),
                      _pct(before["robust_accuracy"]), _pct(twin), "-" if drop is None else f"{100 * drop:+.1f}",
                      holds, f"{props['prepare_seconds']:.0f}", train, cpu])
    return "\n".join(["## Attack properties", "",
                      f"The undefended subjects. The backdoor takes hold when ASR >= {100 * ASR_BAR:.0f}% and CA "
                      f"drops at most {100 * CA_DROP_BAR:.0f} points below the clean twin (same model and "
                      "training, no attack). Training seconds are wall-clock over every session it took; "
                      "CPU seconds are the processor time of its threads, which leaves out the time "
                      "other work held the cores (-: not recorded by the code that trained it).", "",
                      render_table(table, markdown=True)])


def _groups(records: list[dict]) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for r in records:
        label = r["label"]
        groups[(label["dataset"], label["model"], label["attack"], label["defense"])].append(r)
    return groups


def seeds_table(records: list[dict]) -> str:
    """Mean ± sd per subject and defense row, over the cells that differ only in a seed."""
    groups = _groups(records)
    if all(len(rows) < 2 for rows in groups.values()):
        return ""
    table = [["dataset", "model", "attack", "defense", "cells", "CA", "ASR", "RA", "DER", "pruned",
              "stage seconds", "seconds"]]
    for (dataset, model, attack, defense), rows in groups.items():
        stages = sorted({s for r in rows for s in r["stages"]})
        stage_text = " / ".join(f"{s} {_spread([r['stages'].get(s) for r in rows], 1.0)}" for s in stages) or "-"
        table.append([dataset, model, attack, defense, len(rows),
                      *(_spread([r["after"][m] for r in rows])
                        for m in ("clean_accuracy", "attack_success_rate", "robust_accuracy")),
                      _spread([r["der"] for r in rows]), _spread([r["summary"].get("pruned") for r in rows], 1.0),
                      stage_text, _spread([r["seconds"] for r in rows], 1.0)])
    return "\n".join(["## Spread over seeds", "",
                      "Mean ± standard deviation over the seeds (subject seeds and clean-set seeds), in % "
                      "(pruned: channels; seconds: the defense alone, per stage where it has stages).", "",
                      render_table(table, markdown=True)])


def clean_set_tables(records: list[dict]) -> str:
    """ASR and CA drop after each defense on each of its clean sets, subject x defense, for the
    defense rows (not ``none``) that ran on at least two: a mean over the sets would hide the one
    on which a defense failed. A cell lists its sets in clean-seed order and names them when
    they are not the table's usual ones."""
    cells, subject_seeds = defaultdict(dict), defaultdict(set)
    many_models = len({r["label"]["model"] for r in records}) > 1
    for r in records:
        subject_seeds[_subject_name(r["label"], many_models)].add(r["label"].get("seed"))
    for r in records:
        label = r["label"]
        if label.get("clean_seed") is not None and label["defense"] != "none":
            subject = _subject_name(label, many_models)
            if len(subject_seeds[subject]) > 1:
                subject += f" seed {label.get('seed')}"
            cells[(subject, label["defense"])][label["clean_seed"]] = r
    cells = {key: dict(sorted(sets.items())) for key, sets in cells.items() if len(sets) > 1}
    if not cells:
        return ""
    usual = statistics.mode(tuple(sets) for sets in cells.values())
    defenses = list(dict.fromkeys(defense for _, defense in cells))
    subjects = list(dict.fromkeys(subject for subject, _ in cells))
    sections = ["## Each clean set",
                f"The rows that ran on several clean sets, each set apart (clean sets "
                f"{' / '.join(map(str, usual))} unless a cell names its own)."]
    for title, value in (("ASR after each defense (%)", lambda r: r["after"]["attack_success_rate"]),
                         ("CA drop (points: CA before minus after)",
                          lambda r: r["before"]["clean_accuracy"] - r["after"]["clean_accuracy"])):
        table = [["attack", *defenses]]
        for subject in subjects:
            row = [subject]
            for defense in defenses:
                sets = cells.get((subject, defense), {})
                text = " / ".join(_pct(value(r)) for r in sets.values())
                row.append(text if tuple(sets) == usual or not sets
                           else f"{text} (sets {', '.join(map(str, sets))})")
            table.append(row)
        sections.append(f"{title}:\n\n" + render_table(table, markdown=True))
    return "\n\n".join(sections)


def pivot_tables(records: list[dict]) -> str:
    """CA, ASR and DER after each defense as subject x defense grids (means over seeds), where
    the records hold at least two defenses besides ``none``."""
    defenses = list(dict.fromkeys(r["label"]["defense"] for r in records))
    if len([d for d in defenses if d != "none"]) < 2:
        return ""
    many_models = len({r["label"]["model"] for r in records}) > 1
    cells = defaultdict(list)
    for r in records:
        cells[(_subject_name(r["label"], many_models), r["label"]["defense"])].append(r)
    subjects = list(dict.fromkeys(name for name, _ in cells))
    sections = ["## Defenses side by side"]
    for title, value in (("ASR", lambda r: r["after"]["attack_success_rate"]),
                         ("CA", lambda r: r["after"]["clean_accuracy"]), ("DER", lambda r: r["der"])):
        table = [["attack", *defenses]]
        for subject in subjects:
            table.append([subject, *(_pct(_mean([value(r) for r in cells[(subject, d)]]))
                                     if cells.get((subject, d)) else "" for d in defenses)])
        sections.append(f"{title} after each defense (%, mean over seeds):\n\n" + render_table(table, markdown=True))
    return "\n\n".join(sections)


def ranking_table(records: list[dict]) -> str:
    """RNP's oracle ranking per subject and RNP setting: what pruning its first k channels does."""
    rows = [r for r in records if r.get("rnp", {}).get("prefix_curve")]
    if not rows:
        return ""
    counts = [p["count"] for p in rows[0]["rnp"]["prefix_curve"]]
    table = [["model", "attack", "RNP setting", "cells", "masks = 0", "pruned", "CA", "ASR",
              *(f"ASR@{k}" for k in counts), *(f"CA@{k}" for k in counts), "seconds"]]
    for (_, model, attack, defense), group in _groups(rows).items():
        curves = [{p["count"]: p for p in r["rnp"]["prefix_curve"]} for r in group]
        zeros = _mean([sum(1 for m in r["rnp"]["masks"] if m == 0) for r in group])
        masks = len(group[0]["rnp"]["masks"])
        table.append([model, attack, defense, len(group), f"{zeros:.1f} of {masks}",
                      _spread([r["summary"].get("pruned") for r in group], 1.0),
                      _spread([r["after"]["clean_accuracy"] for r in group]),
                      _spread([r["after"]["attack_success_rate"] for r in group]),
                      *(_spread([c[k]["attack_success_rate"] for c in curves if k in c]) for k in counts),
                      *(_spread([c[k]["clean_accuracy"] for c in curves if k in c]) for k in counts),
                      _spread([r["seconds"] for r in group], 1.0)])
    return "\n".join(["## RNP's ranking of the channels (oracle analysis)", "",
                      "CA and ASR (%) after pruning the first k channels in RNP's pruning order, on the "
                      f"{rows[0]['rnp']['curve_kind'].removeprefix('oracle analysis on ')} of the pruning "
                      "curve: test data a defender does not have; it judges the ranking and chooses nothing. "
                      "Mean ± sd over seeds.", "", render_table(table, markdown=True)])


def exposure_tables(records: list[dict]) -> str:
    rows = [r for r in records if "exposure" in r]
    if not rows:
        return ""
    attacked = [r for r in rows if "trigger" in r["exposure"]]
    sections = ["## What the unlearned model exposes", _label_table(rows), _model_score_table(rows)]
    if attacked:
        sections += [_trigger_table(attacked), _samples_table(attacked)]
    scanned = [r for r in attacked if "nc_scan" in r["exposure"]]
    if scanned:
        sections.append(_nc_scan_table(scanned))
    cleansed = [r for r in attacked if "cleansing" in r["exposure"]]
    if cleansed:
        sections.append(_cleansing_table(cleansed))
    return "\n\n".join(sections)


def _subject(r: dict) -> str:
    label = r["label"]
    return f"{label['attack']} seed {label['seed']}"


def _label_table(rows: list[dict]) -> str:
    table = [["subject", "target named", "label confidence", "variance score", "unlearning steps",
              "exposure seconds"]]
    for r in rows:
        e = r["exposure"]
        named, true = e["label"]["target"], e["true_target"]
        if not e["backdoored"]:
            found = "none (right)" if named is None else f"{named} (false alarm)"
        elif true is None:
            found = "none (right: all-to-all)" if named is None else f"{named} (all-to-all)"
        else:
            found = "right" if named == true else "none" if named is None else f"wrong ({named})"
        table.append([_subject(r), found, f"{e['label']['confidence']:.2f}", f"{e['model_detection']['score']:.4f}",
                      e["unlearning_steps"], f"{e['seconds']:.0f}"])
    return ("Target label named from the unlearning drift, and EBYD's score:\n\n"
            + render_table(table, markdown=True))


def _model_score_table(rows: list[dict]) -> str:
    """AUROC over clean and backdoored subjects, and accuracy at the fixed thresholds, of both
    model-level scores."""
    positives = torch.tensor([r["exposure"]["backdoored"] for r in rows])
    both = 0 < int(positives.sum()) < len(positives)
    table = [["score", "clean models", "backdoored models", "AUROC", "accuracy at threshold", "threshold"]]
    for name, key, field in (("variance of class shares (EBYD)", "model_detection", "score"),
                             ("target-label confidence", "label", "confidence")):
        scores = torch.tensor([r["exposure"][key][field] for r in rows], dtype=torch.float64)
        threshold = rows[0]["exposure"][key]["threshold"]
        value = f"{auroc(scores, positives):.3f}" if both else "- (needs clean and backdoored)"
        correct = float(((scores > threshold) == positives).float().mean())
        table.append([name, int((~positives).sum()), int(positives.sum()), value, f"{100 * correct:.1f}%",
                      threshold])
    return "Backdoored-model detection over these subjects:\n\n" + render_table(table, markdown=True)


def _trigger_table(rows: list[dict]) -> str:
    table = [["subject", "class searched", "mask L1", "IoU", "IoU, any trained placement", "mass on trigger",
              "success on original %", "seconds"]]

    def pair(u, o, digits=2):
        return "-" if u is None else f"{u:.{digits}f} / {o:.{digits}f}"

    for r in rows:
        t = r["exposure"]["trigger"]
        u, o = t["models"]["unlearned"], t["models"]["original"]
        table.append([_subject(r), t["target"], pair(u["norm"], o["norm"], 1), pair(u["iou"], o["iou"]),
                      pair(u.get("placed_iou"), o.get("placed_iou")), pair(u["mass_on_trigger"], o["mass_on_trigger"]),
                      pair(100 * u["success"], 100 * o["success"], 1), pair(u["seconds"], o["seconds"], 0)])
    return ("Neural Cleanse's search for the named class, on the unlearned / the original model:\n\n"
            + render_table(table, markdown=True))


def _nc_scan_table(rows: list[dict]) -> str:
    """The exposure's one search on the original model against Neural Cleanse's scan of every
    class at the same budget: the class each picks, its trigger's success and IoU, seconds."""
    table = [["subject", "true target", "exposure: class / success % / IoU / placed IoU / s",
              "NC: flagged / class / success % / IoU / placed IoU / s", "NC time / exposure time"]]

    def iou(value):
        return "-" if value is None else f"{value:.2f}"

    for r in rows:
        e = r["exposure"]
        t, scan = e["trigger"], e["nc_scan"]
        o = t["models"]["original"]
        searched = o["seconds"] + e["seconds"]  # the exposure's search plus the unlearning that picked its class
        flagged = ",".join(map(str, scan["flagged"])) or "none"
        table.append([_subject(r), "-" if e["true_target"] is None else e["true_target"],
                      f"{t['target']} / {100 * o['success']:.1f} / {iou(o['iou'])} / {iou(o.get('placed_iou'))} / "
                      f"{searched:.0f}",
                      f"{flagged} / {scan['candidate']} / {100 * scan['success']:.1f} / {iou(scan['iou'])} / "
                      f"{iou(scan.get('placed_iou'))} / {scan['seconds']:.0f}", f"{scan['seconds'] / searched:.1f}"])
    return ("Trigger recovery guided by the exposure (one search, for the class the unlearning named, on the "
            "original model; its seconds include the unlearning) against Neural Cleanse's scan of every class "
            "(same budget, float32; flagged: anomaly index above 2; class: the smallest trigger; placed IoU: the "
            "best over the shifted and mirrored copies training showed, rnp.detection.placed_iou; '-' in records "
            "older than it):\n\n"
            + render_table(table, markdown=True))


def _samples_table(rows: list[dict]) -> str:
    table = [["subject", "poisoned / scored", *SAMPLE_DETECTORS]]
    aurocs, seconds = defaultdict(list), defaultdict(list)
    for r in rows:
        samples = r["exposure"]["samples"]
        found = samples["detectors"]
        for name, d in found.items():
            aurocs[name].append(d["auroc"])
            seconds[name].append(d["seconds"])
        table.append([_subject(r), f"{samples['poisoned']} / {samples['scored']}",
                      *(f"{found[n]['auroc']:.3f} / {found[n]['tpr_at_5_fpr']:.2f}" if n in found else "-"
                        for n in SAMPLE_DETECTORS)])
    for title, values, digits in (("mean AUROC", aurocs, 3), ("mean seconds", seconds, 0)):
        table.append([title, "", *(f"{statistics.mean(values[n]):.{digits}f}" if values[n] else "-"
                                   for n in SAMPLE_DETECTORS)])
    text = "Poisoned-sample detection (AUROC / TPR at 5% FPR):\n\n" + render_table(table, markdown=True)
    scanned = [r for r in rows if "scan" in r["exposure"]["samples"]]
    return text + ("\n\n" + _scan_table(scanned) if scanned else "")


def _scan_table(rows: list[dict]) -> str:
    """The combined scan: AUROC, the flag's catch and the false-positive rate it realises."""
    table = [["subject", "AUROC", "flagged", "poisoned caught", "FPR on scanned clean (target)", "seconds"]]
    for r in rows:
        s = r["exposure"]["samples"]["scan"]
        table.append([_subject(r), f"{s['auroc']:.3f}", s["flagged"], f"{100 * s['tpr']:.1f}%",
                      f"{100 * s['fpr_scanned_clean']:.1f}% ({100 * s['target_fpr']:g}%)", f"{s['seconds']:.0f}"])
    scans = [r["exposure"]["samples"]["scan"] for r in rows]
    table.append(["mean", f"{statistics.mean(s['auroc'] for s in scans):.3f}", "", "",
                  f"{100 * statistics.mean(s['fpr_scanned_clean'] for s in scans):.1f}%",
                  f"{statistics.mean(s['seconds'] for s in scans):.0f}"])
    first = scans[0]
    return (f"Combined scan ({', '.join(first['detectors'])}; conformal p-values against the "
            f"{first['references']} clean images, cross-fitted in {first['folds']} folds; flag threshold set "
            "on the clean images alone):\n\n" + render_table(table, markdown=True))


def _cleansing_table(rows: list[dict]) -> str:
    table = [["subject", "flagged", "poisoned caught", "false positives", "before CA / ASR", "retrained CA / ASR",
              "retrain seconds"]]
    for r in rows:
        c, before = r["exposure"]["cleansing"], r["before"]
        table.append([_subject(r), c["flagged"], f"{c['flagged_poisoned']} of {c['poisoned']}",
                      f"{100 * c['false_positive_rate']:.1f}%",
                      f"{_pct(before['clean_accuracy'])} / {_pct(before['attack_success_rate'])}",
                      f"{_pct(c['after']['clean_accuracy'])} / {_pct(c['after']['attack_success_rate'])}",
                      f"{c['retrain_seconds']:.0f}"])
    return ("Cleansing: the samples the unlearned model flags dropped, the model retrained:\n\n"
            + render_table(table, markdown=True))


def label_runs_table(records: list[dict]) -> str:
    """Per subject: the class each repeated unlearning drifted to, how many runs agree on the
    most frequent one, its drift share, and the steps the runs took."""
    rows = [r for r in records if "label_runs" in r]
    if not rows:
        return ""
    table = [["subject", "clean seed", "true target", "run classes", "most frequent (runs)",
              "its drift share", "top drift share per run", "steps", "map agreement", "verdict"]]
    tally = {"clean": [0, 0], "all-to-one": [0, 0], "all-to-all": [0, 0]}  # right, judged
    for r in rows:
        found, runs = r["label_runs"], r["label_runs"]["runs"]
        classes = [run["candidate"] for run in runs]
        verdict = judge(collapse_map([run["confusion"] for run in runs]))
        mode = max(set(classes), key=lambda c: (classes.count(c), -c))
        top = [max(run["drift_shares"]) for run in runs]
        steps = [run["steps"] for run in runs]
        truth = ("all-to-all" if found["mode"] == "all2all" else str(found["true_target"])) \
            if found["backdoored"] else "clean"
        kind = "clean" if not found["backdoored"] else "all-to-all" if found["mode"] == "all2all" else "all-to-one"
        tally[kind][0] += verdict.kind == kind and verdict.target == found["true_target"]
        tally[kind][1] += 1
        table.append([_subject(r), r["label"].get("clean_seed", "-"), truth, " ".join(map(str, classes)),
                      f"{mode} ({classes.count(mode)}/{len(classes)})",
                      _share_spread([run["drift_shares"][mode] for run in runs]),
                      f"{min(top):.2f}-{max(top):.2f}", f"{min(steps)}-{max(steps)}",
                      f"{verdict.agreement:.2f}", _verdict_words(verdict)])
    return "\n".join(["## Label over repeated unlearnings", "",
                      "Each run unlearns on a random part of the clean set with its own seed; its class is "
                      "the one its predictions drifted to most. Drift shares are fractions of the predictions "
                      "(mean ± sd over the runs). The map agreement is the share of the clean images, over all "
                      "runs, predicted as the class most runs send their label to; the verdict calls the model "
                      f"backdoored above {MAP_AGREEMENT_THRESHOLD} (rnp.metrics.collapse, fixed on the "
                      "development subjects), computed here from the records' confusion matrices.", "",
                      render_table(table, markdown=True), "", _verdict_tally(tally)])


def _verdict_tally(tally: dict[str, list[int]]) -> str:
    """How many verdicts were right, per kind of model: clean ones called clean, all-to-one
    backdoors named with their target, all-to-all ones called all-to-all."""
    words = {"clean": "on clean models, called clean", "all-to-one": "on all-to-one backdoors, named with the target",
             "all-to-all": "on all-to-all backdoors, called all-to-all"}
    parts = [f"{right} of {judged} {words[kind]}" for kind, (right, judged) in tally.items() if judged]
    return "Verdicts right, one per subject and clean set: " + "; ".join(parts) + "."


def _verdict_words(verdict: BackdoorVerdict) -> str:
    if verdict.kind == "all-to-one":
        return f"all-to-one, target {verdict.target}"
    return verdict.kind


def _share_spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"
