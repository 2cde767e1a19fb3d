"""A grid's report: ``results.csv`` (one row per cell), ``results.md`` (the cell table, the means
per defense, RNP's cost against its floor, the study sections of :mod:`rnp.bench.sections`,
optionally the published numbers beside ours) and figures, each as PNG, SVG and its data as CSV
(DER per defense and attack, RNP's pruning curves and ranking, RNP's mask values, the exposure's
model scores).

Every percentage is computed from the records, which hold fractions; nothing is re-measured.
``results.md`` says which code computed the records (the cells' package fingerprints, the
subjects' training fingerprints) and warns when they mix.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from pathlib import Path

from rnp.bench.comparison import cell_group, comparison_table
from rnp.bench.grid import NO_DEFENSE
from rnp.bench.published import SOURCES
from rnp.bench.sections import study_sections
from rnp.io.plots import Bars, Figure, Histograms, Lines, write_figure
from rnp.io.files import write_text
from rnp.io.tables import csv_text, render_table

METRICS = (("CA", "clean_accuracy"), ("ASR", "attack_success_rate"), ("RA", "robust_accuracy"))
RNP_STAGES = ("unlearn", "recover", "prune")
"""The stages every RNP run has; the cost table names any other (a repair, a target search) after them."""


def write_report(records: list[dict], out, *, title: str, compare: bool = False, reference: str = "rnp",
                 development: tuple[str, ...] = ()) -> str:
    """Writes the report files into ``out`` and returns the Markdown text. Without matplotlib
    the figures are only their CSVs (see :func:`rnp.io.plots.write_figure`). ``reference`` and
    ``development`` shape the comparison of defenses (:mod:`rnp.bench.comparison`)."""
    out = Path(out)
    write_text(out / "results.csv", results_csv(records))
    text = markdown(records, title=title, compare=compare, reference=reference, development=development)
    write_text(out / "results.md", text)
    for stem, figure in figures(records).items():
        write_figure(figure, out / stem)
    return text


def _ok(records: list[dict]) -> list[dict]:
    return [r for r in records if r["status"] == "ok"]


def _seed(label: dict) -> str:
    """The subject's seed, and the clean set's where the grid has ``clean_seeds``."""
    return str(label["seed"]) + (f", clean {label['clean_seed']}" if "clean_seed" in label else "")


def _retuning_epochs(records: list[dict]) -> list[str]:
    epochs = {e for r in records for e in r.get("retuning", {}).get("asr", {})}
    return sorted(epochs, key=int)


def _recalibration_columns(records: list[dict]) -> list[str]:
    """CA and ASR after re-estimating BatchNorm statistics, where any cell measured them."""
    return ["CA", "ASR"] if any("recalibrated" in r for r in records) else []


def _recalibrated(record: dict, short: str):
    """The cell's metric ``short`` (CA or ASR) after recalibration, None where not measured."""
    measured = record.get("recalibrated", {})
    return measured.get(dict(METRICS)[short]) if measured.get("status") == "ok" else None


def _rnp_seconds(records: list[dict]) -> dict[tuple, float]:
    """RNP's seconds per subject, clean set and machine: a defense's seconds compare with RNP's
    on the same cells measured on the same processor with as many threads (records from before
    processor names were kept count as one machine)."""
    return {(cell_group(r), _machine(r)): r["seconds"] for r in _ok(records) if r["label"]["defense"] == "rnp"}


def results_csv(records: list[dict]) -> str:
    """One row per cell, metrics as fractions, seconds and megabytes as measured."""
    epochs = _retuning_epochs(records)
    recalibration = _recalibration_columns(records)
    rnp = _rnp_seconds(records)
    columns = ["key", "dataset", "model", "attack", "seed", "clean_seed", "defense", "status",
               "ca_before", "asr_before", "ra_before", "ca", "asr", "ra", "der", "seconds",
               "seconds_over_rnp", "peak_memory_mb", "memory_kind", "pruned",
               "floor_seconds", "rnp_over_floor", *[f"retuned_asr_{e}" for e in epochs],
               *[f"recalibrated_{m.lower()}" for m in recalibration]]
    rows = []
    for r in records:
        row = {"key": r["key"], **r["label"], "status": r["status"]}
        for short, name in METRICS:
            row[f"{short.lower()}_before"] = r["before"][name]
        if r["status"] == "ok":
            row.update({short.lower(): r["after"][name] for short, name in METRICS})
            rnp_seconds = rnp.get((cell_group(r), _machine(r))) if r["label"]["defense"] != NO_DEFENSE else None
            row.update(der=r["der"], seconds=round(r["seconds"], 3), peak_memory_mb=round(r["peak_memory_mb"], 1),
                       memory_kind=r["memory_kind"], pruned=r["summary"].get("pruned"),
                       seconds_over_rnp=round(r["seconds"] / rnp_seconds, 3) if rnp_seconds else None)
            cost = r.get("rnp", {})
            row.update(floor_seconds=cost.get("floor_seconds"), rnp_over_floor=cost.get("floor_ratio"))
            for epoch, value in r.get("retuning", {}).get("asr", {}).items():
                row[f"retuned_asr_{epoch}"] = value
            for short in recalibration:
                row[f"recalibrated_{short.lower()}"] = _recalibrated(r, short)
        rows.append([row.get(column) for column in columns])
    return csv_text(columns, rows)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown(records: list[dict], *, title: str, compare: bool = False, reference: str = "rnp",
             development: tuple[str, ...] = ()) -> str:
    """The cell table, the means per defense, the defenses against ``reference`` on the same
    cells, RNP's cost, and (``compare``) published numbers."""
    epochs = _retuning_epochs(records)
    recalibration = _recalibration_columns(records)
    rows = [["dataset", "model", "attack", "seed", "defense", "CA", "ASR", "RA", "DER", "seconds", "peak MB",
             *[f"ASR after {e} ep." for e in epochs], *[f"{m} recalibrated" for m in recalibration]]]
    for r in records:
        label, before = r["label"], r["before"]
        head = [label["dataset"], label["model"], label["attack"], _seed(label), label["defense"]]
        if r["status"] != "ok":
            rows.append([*head, f"n/a: {r['error']}", *[""] * (5 + len(epochs) + len(recalibration))])
            continue
        after = r["after"]
        metrics = [f"{_pct(before[n])} -> {_pct(after[n])}" for _, n in METRICS]
        asr = r.get("retuning", {}).get("asr", {})
        rows.append([*head, *metrics, _pct(r["der"]), f"{r['seconds']:.1f}", f"{r['peak_memory_mb']:.0f}",
                     *[_pct(asr.get(e)) for e in epochs], *[_pct(_recalibrated(r, m)) for m in recalibration]])
    lines = [f"# {title}", "", f"{len(records)} cells. CA / ASR / RA / DER in %, before -> after; "
             "seconds: the defense alone; peak MB: " + _memory_kinds(records) + ".", "",
             code_note(records), "", render_table(rows, markdown=True), "",
             means_table(records, epochs, recalibration)]
    comparison = comparison_table(records, reference=reference, development=development)
    if comparison:
        lines += ["", comparison]
    cost = cost_table(records)
    if cost:
        lines += ["", cost]
    for section in study_sections(records):
        lines += ["", section]
    if compare:
        lines += ["", compare_table(records)]
    return "\n".join(lines) + "\n"


def code_note(records: list[dict]) -> str:
    """Which code computed the records: the package fingerprints of the cells and the training
    fingerprints of their subjects, with a warning when either mixes or a subject's training
    code is not known for sure (trained before fingerprints, and adopted); the processors that
    computed them (seconds compare only within one); and a warning when the cells of one subject
    rest on different trained weights (retrained elsewhere: bfloat16 kernels differ between
    processors)."""
    cells = Counter(r["cell"].get("code") or "unknown" for r in records)
    subjects = Counter(_subject_code(r) for r in records)
    processors = Counter(_processor(r) for r in records)
    text = (f"Code: cells by package {_counted(cells)}; subjects by training code {_counted(subjects)}. "
            f"Processors: {_counted(processors)}.")
    if len(cells) > 1 or len(subjects) > 1 or any("unknown" in k or "adopted" in k for k in subjects):
        text = ("**Warning: these records mix code versions or rest on subjects whose training code "
                "is not recorded**; rows from different code may not compare. " + text)
    retrained = _retrained_subjects(records)
    if retrained:
        text += (f" **Warning: the cells of {', '.join(retrained)} rest on different trained weights** "
                 "(their hashes or the undefended CA / ASR differ: the subject was retrained, e.g. on "
                 "another processor); their rows may not compare.")
    return text


def _retrained_subjects(records: list[dict]) -> list[str]:
    """The subjects (cache folder names) whose records disagree on the trained weights: on their
    hash, or, where some record is from before the hash, on the undefended model's CA and ASR,
    which every record keeps (a retrained model that matches those to the last image is
    unlikely). Records that all carry the same hash agree, whatever their CA and ASR say (an
    evaluation by other code can change those)."""
    digests, befores, unhashed = defaultdict(set), defaultdict(set), set()
    for record in records:
        if "subject_run" not in record:
            continue
        name = Path(record["subject_run"]).name
        if record.get("subject_weights"):
            digests[name].add(record["subject_weights"])
        else:
            unhashed.add(name)
        before = record.get("before") or {}
        if "clean_accuracy" in before:
            befores[name].add((before["clean_accuracy"], before.get("attack_success_rate")))
    return sorted(name for name in digests.keys() | befores.keys()
                  if len(digests[name]) > 1 or (name in unhashed and len(befores[name]) > 1))


def _processor(record: dict) -> str:
    """Where the cell ran: the CPU's or GPU's name. Records from before CPU names were kept say
    only the architecture (x86_64) on a CPU, which names no processor."""
    environment = record.get("environment") or {}
    if environment.get("device", "cpu").startswith("cpu") and "cpu_capability" not in environment:
        return "not recorded"
    return environment.get("device_name") or "not recorded"


def _machine(record: dict) -> tuple:
    """The processor and threads a cell's seconds were measured with."""
    return _processor(record), (record.get("environment") or {}).get("threads")


def _subject_code(record: dict) -> str:
    code = record.get("subject_code") or {}
    name = code.get("training_code") or "unknown"
    return f"{name} (adopted, trained before fingerprints)" if code.get("adopted") else name


def _counted(counts: Counter) -> str:
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{name} ({n} cells)" for name, n in counts.most_common())


def _memory_kinds(records: list[dict]) -> str:
    kinds = sorted({r["memory_kind"] for r in _ok(records)})
    return ", ".join(kinds) or "-"


def means_table(records: list[dict], epochs: list[str], recalibration: list[str] = ()) -> str:
    """Means per defense over its cells, with each defense's seconds over RNP's on the same
    subject and clean set, on the same machine (mean of those ratios), and the re-tuning and
    recalibration columns the cells measured."""
    rnp = _rnp_seconds(records)
    by_defense = defaultdict(list)
    for r in _ok(records):
        by_defense[r["label"]["defense"]].append(r)
    table = [["defense", "cells", "CA", "ASR", "RA", "DER", "seconds", "x RNP time", "peak MB",
              *[f"ASR after {e} ep." for e in epochs], *[f"{m} recalibrated" for m in recalibration]]]
    for defense, rows in by_defense.items():
        def mean(values):
            values = [v for v in values if v is not None]
            return statistics.mean(values) if values else None

        ratios = [r["seconds"] / rnp[(cell_group(r), _machine(r))] for r in rows
                  if rnp.get((cell_group(r), _machine(r))) and defense != NO_DEFENSE]
        ratio = f"{statistics.mean(ratios):.2f}" if ratios else "-"
        asr = [_pct(mean([r.get("retuning", {}).get("asr", {}).get(e) for r in rows])) for e in epochs]
        table.append([defense, len(rows), *[_pct(mean([r["after"][n] for r in rows])) for _, n in METRICS],
                      _pct(mean([r["der"] for r in rows])), f"{mean([r['seconds'] for r in rows]):.1f}", ratio,
                      f"{mean([r['peak_memory_mb'] for r in rows]):.0f}", *asr,
                      *[_pct(mean([_recalibrated(r, m) for r in rows])) for m in recalibration]])
    controls = [r["retuning"]["control_asr"] for r in _ok(records) if "control_asr" in r.get("retuning", {})]
    if controls:
        asr = [_pct(statistics.mean(c[e] for c in controls if e in c)) for e in epochs]
        table.append(["clean model (re-tuning control)", len(controls), *["-"] * 7, *asr,
                      *["-"] * len(recalibration)])
    return "Means per defense:\n\n" + render_table(table, markdown=True)


def cost_table(records: list[dict]) -> str:
    """RNP's seconds against its optimisation floor, where the cells measured it (every RNP row:
    the defaults, the paper preset, other precisions)."""
    rows = [r for r in _ok(records) if r.get("cell", {}).get("defense", r["label"]["defense"]) == "rnp"
            and "floor_seconds" in r.get("rnp", {})]
    if not rows:
        return ""
    table = [["attack", "seed", "defense", "RNP seconds", "unlearn / recover / prune; other stages",
              "floor seconds", "floor amp", "RNP / floor", "runs"]]
    for r in rows:
        stages = " / ".join(f"{r['stages'].get(s, 0):.1f}" for s in RNP_STAGES)
        stages += "".join(f"; {s} {seconds:.1f}" for s, seconds in r["stages"].items() if s not in RNP_STAGES)
        table.append([r["label"]["attack"], _seed(r["label"]), r["label"]["defense"], f"{r['seconds']:.1f}", stages,
                      f"{r['rnp']['floor_seconds']:.1f}", r["rnp"].get("floor_precision", "off"),
                      f"{r['rnp']['floor_ratio']:.2f}", _runs(r)])
    return ("RNP's cost against its floor (the same number of forward+backward passes of plain "
            "training, timed in the same cell on the same model; floor amp 'on': in RNP's mixed precision "
            "and layout, 'off': float32, as every floor before 2026-12-06 was):\n\n"
            + render_table(table, markdown=True))


def _runs(record: dict) -> str:
    """How many runs the cost row is the median of, and whether they gave the same model."""
    repeats = record.get("repeats")
    if not repeats:
        return "1"
    return f"{len(repeats['seconds'])} (median; {'same' if repeats['agree'] else '**different**'} model)"


def compare_table(records: list[dict]) -> str:
    """Our mean CA / ASR beside every published cell with the same defense and attack. Published
    cells are each attack at its own parameters (all-to-one), so only our subjects without attack
    parameters match them: BadNets all-to-all must not be averaged into BadNets. What differs
    between the two settings is listed once under the table and referenced by letter."""
    ours = defaultdict(list)
    for r in _ok(records):
        if not r["cell"]["subject"].get("attack_params"):
            ours[(r["label"]["defense"], r["cell"]["subject"]["attack"])].append(r)
    rows, notes = [], {}
    for source in SOURCES:
        for defense, cells in source["cells"].items():
            for attack, (ca, asr) in cells.items():
                matching = ours.get((defense, attack))
                if not matching:
                    continue
                metric = source["setting"].get("ca_metric", "clean_accuracy")
                mean_ca = statistics.mean(r["after"][metric] for r in matching)
                mean_asr = statistics.mean(r["after"]["attack_success_rate"] for r in matching)
                differs = f"{source['source']}: " + _differences(matching[0], source["setting"])
                letter = notes.setdefault(differs, chr(ord("a") + len(notes)))
                extra = source["notes"].get(defense)
                rows.append([defense, attack, f"{_pct(mean_ca)} / {_pct(mean_asr)}", f"{ca:.1f} / {asr:.1f}",
                             f"[{letter}]{f' {extra}' if extra else ''}"])
    header = ["defense", "attack", "ours", "published", "source and what differs"]
    title = "Published numbers beside ours (CA / ASR after the defense, %):\n\n"
    if not rows:
        unmatched = ["-"] * 4 + ["no published cell matches this grid's defenses and attacks"]
        return title + render_table([header, unmatched], markdown=True)
    return "\n".join([title + render_table([header, *rows], markdown=True), "",
                      *[f"[{letter}] {text}" for text, letter in notes.items()]])


def _differences(record: dict, setting: dict) -> str:
    subject = record["cell"]["subject"]
    parts = []
    if (subject["arch"], subject["width"]) != (setting["arch"], setting["width"]):
        parts.append(f"model: ours {subject['arch']} width {subject['width']}, "
                     f"theirs {setting['arch']} width {setting['width']}")
    if "jpeg" in record.get("data_spec", "").lower():
        parts.append(f"data: ours the JPEG copy of CIFAR-10, theirs {setting['data']}")
    rate = record["cell"]["attack_spec"].get("poison_rate")
    theirs = setting.get("poison_rate", 0.1)
    if rate is not None and theirs is None:
        parts.append(f"poisoning: ours {100 * rate:g}%, theirs not stated with the table")
    elif rate is not None and abs(rate - theirs) > 1e-9:
        parts.append(f"poisoning: ours {100 * rate:g}%, theirs {100 * theirs:g}%")
    epochs = record["cell"]["train_config"]["epochs"]
    parts.append(f"epochs: ours {epochs}" + (f", theirs {setting['epochs']}" if "epochs" in setting else ""))
    ours = f"{record['cell']['clean_size']} images"
    if ours != setting["clean_set"]:
        parts.append(f"clean set: ours {ours}, theirs {setting['clean_set']}")
    if setting.get("ca_metric") == "clean_accuracy_non_target":
        parts.append("CA of both on the 9,000 non-target test images")
    return "; ".join(parts)


def figures(records: list[dict]) -> dict[str, Figure]:
    """The report's figures by file stem; a figure with nothing to show is left out."""
    found = {}
    ok = _ok(records)
    defended = [r for r in ok if r["label"]["defense"] != "none" and r["der"] is not None]
    subjects = defaultdict(list)  # a subject up to its seed: the seeds are a bar's values
    for r in defended:
        subjects[_name(r, defended, keys=("model", "dataset"))].append(r)
    panels = []
    for name in sorted(subjects):
        by_defense = defaultdict(list)
        for r in subjects[name]:
            by_defense[r["label"]["defense"]].append(100 * r["der"])
        panels.append(Bars(list(by_defense), list(by_defense.values()), title=f"DER per defense: {name}",
                           ylabel="DER (%)", reference=50.0, reference_label="no change (DER 50%)",
                           spread_label="smallest to largest over seeds"))
    if panels:
        found["der"] = Figure(panels, columns=3)
    rnp = [r for r in ok if r.get("cell", {}).get("defense", r["label"]["defense"]) == "rnp"]  # every RNP row
    curves = [r for r in rnp if r["rnp"].get("curve")]
    if curves:
        found["rnp_pruning_curve"] = Figure(_pruning_curves(curves),
                                            title="RNP pruning curves (oracle analysis: test images)", columns=3)
    if rnp:
        found["rnp_masks"] = Figure(_mask_histograms(rnp), columns=3)
    ranked = [r for r in rnp if r["rnp"].get("prefix_curve")]
    if ranked:
        found["rnp_ranking"] = Figure([
            Lines({"ASR": [100 * p["attack_success_rate"] for p in r["rnp"]["prefix_curve"]],
                   "CA": [100 * p["clean_accuracy"] for p in r["rnp"]["prefix_curve"]]},
                  x=[p["count"] for p in r["rnp"]["prefix_curve"]],
                  title=f"RNP ranking: {_name(r, ranked, RANKING_KEYS)}, {r['label']['defense']} (oracle analysis)",
                  xlabel="channels pruned in RNP's order", ylabel="% of test subset")
            for r in ranked], columns=3)
    exposed = [r for r in ok if "exposure" in r]
    if exposed:
        found["exposure_scores"] = Figure([Bars(
            [f"{r['label']['attack']} s{r['label']['seed']}" for r in exposed],
            [r["exposure"]["model_detection"]["score"] for r in exposed],
            title="EBYD variance score of the unlearned model", ylabel="variance of class shares",
            reference=exposed[0]["exposure"]["model_detection"]["threshold"],
            reference_label="flag threshold")])
    return found


RANKING_KEYS = ("model", "dataset", "seed", "clean_seed")
"""What tells RNP ranking panels apart besides the defense row, which their titles always name."""


def _pruning_curves(curves: list[dict]) -> list[Lines]:
    """A panel per subject and RNP row, with the ASR (solid) and CA (dashed) lines of each of its
    clean sets in the clean set's colour (one panel per run would bury three clean sets of a dozen
    rows in a figure nobody reads). Within a panel the runs differ only in their clean set, since
    a grid row's label is unique."""
    panels = defaultdict(list)
    for r in curves:
        thresholds = tuple(p["threshold"] for p in r["rnp"]["curve"])
        panels[_name(r, curves, ("model", "dataset", "seed", "defense")), thresholds].append(r)
    drawn = []
    for (name, thresholds), runs in panels.items():
        series, groups = {}, {}
        for measure, key in (("ASR", "attack_success_rate"), ("CA", "clean_accuracy")):
            for r in runs:
                run = f"clean set {r['label'].get('clean_seed')}"
                series_name = measure if len(runs) == 1 else f"{measure}, {run}"
                series[series_name] = [100 * p[key] for p in r["rnp"]["curve"]]
                groups[series_name] = run
        drawn.append(Lines(series, x=list(thresholds), title=name, groups=groups,
                           xlabel="mask threshold (prune channels with mask <= it)", ylabel="% of test subset"))
    return drawn


def _mask_histograms(rnp: list[dict]) -> list[Histograms]:
    """A panel per subject with a histogram per RNP row, its clean sets' masks pooled (one
    legend entry per run buried a grid's hundred-odd runs under a legend taller than the plot).
    Rows that recovered the same masks (they differ only in what they prune) share one
    histogram, named after all of them, rather than hide each other's line. The density axis is
    logarithmic: the few low masks, the channels a pruning order reaches first, would otherwise
    not show beside the peak at 1. Every histogram is named, even a panel's only one: its name
    is the list of rows it stands for."""
    panels = defaultdict(lambda: defaultdict(list))
    for r in rnp:
        panels[_name(r, rnp, ("model", "dataset", "seed"))][r["label"]["defense"]].append(r["rnp"]["masks"])
    figures = []
    for name, rows in panels.items():
        shared = defaultdict(list)
        for row, runs in rows.items():
            shared[tuple(m for masks in runs for m in masks)].append((row, len(runs)))
        figures.append(Histograms({_pooled(" = ".join(row for row, _ in names), names[0][1]): list(masks)
                                   for masks, names in shared.items()},
                                  title=f"RNP mask values: {name}", xlabel="mask value", log_density=True,
                                  legend=True))
    return figures


def _pooled(rows: str, runs: int) -> str:
    return rows if runs == 1 else f"{rows} ({runs} runs)"


def _name(record: dict, group: list[dict],
          keys: tuple[str, ...] = ("model", "dataset", "seed", "clean_seed", "defense")) -> str:
    """The attack, with those of ``keys`` (model, dataset, seed, clean seed, defense row) the
    group has several of, so that no two records of the group share a name."""
    label = record["label"]
    parts = [label["attack"]]
    for key in keys:
        if len({r["label"].get(key) for r in group}) > 1:
            parts.append(f"{key.replace('_', ' ')} {label.get(key)}")
    return ", ".join(map(str, parts))
