"""Running one grid cell: find (or train) its subject, defend it, measure, return the record.

Both functions are plain and picklable, so an executor can run them in this process or ship
them to a Ray worker. A record is JSON-ready and holds everything needed to rerun the cell
exactly (the cell's full description with the package's code fingerprint, the training-code
fingerprint of the subject it defended, the data checksum, the torch version, the device)
besides the results.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import statistics
import time
from datetime import datetime, timezone

import torch

from rnp.bench.cost import optimisation_floor, rnp_floor_images
from rnp.bench.grid import NO_DEFENSE, Cell, Subject
from rnp.bench.measurements import attack_properties, measure_exposure, measure_label_runs, training_cost
from rnp.bench.memory import PeakMemory
from rnp.bench.recalibration import running_statistics_layers, recalibrated
from rnp.bench.retuning import retune, retuning_set
from rnp.bench.subjects import cached_subject, subject_code
from rnp.data.clean_subset import select_clean_subset
from rnp.defenses import DEFENSES, DefenseResult
from rnp.defenses.masks import channels_pruned
from rnp.defenses.rnp import threshold_sweep
from rnp.errors import RnpError
from rnp.io.files import read_json
from rnp.metrics import BackdoorMetrics, der, evaluate_backdoor
from rnp.metrics.backdoor import accuracy
from rnp.runs.folder import METRICS_FILE, MODEL_FILE, load_model, load_run, read_run_info
from rnp.runs.machine import machine
from rnp.training.evaluate import predict
from rnp.utils import generator_for

logger = logging.getLogger(__name__)


def prepare_subject(subject: Subject, cache: str, *, data_cache: str | None = None, device="cpu",
                    progress: bool = False, train: bool = True, log=logger.info) -> str:
    """The subject's run folder in ``cache``, trained first if it is not there yet (the log
    lines, why it trains included, name the subject); with ``train=False``, raises
    :class:`rnp.bench.subjects.SubjectNotTrained` instead of training."""
    name = f"{subject.dataset} {subject.arch}-w{subject.width} {subject.label} seed {subject.seed}"
    run_dir = cached_subject(cache, subject.data_spec, subject.build_attack(), arch=subject.arch,
                             width=subject.width, config=subject.train_config(), cache_dir=data_cache,
                             device=device, progress=progress, train=train,
                             log=lambda line: log(f"{name}: {line}"))
    return str(run_dir)


def run_cell(cell: Cell, run_dir: str, control_dir: str | None = None, *, data_cache: str | None = None,
             device="cpu", threads: int | None = None) -> dict:
    """Defends the cell's subject and returns the cell's record. ``control_dir`` is the run of
    the cell's clean control subject (:attr:`Cell.control`), re-tuned beside the defended model
    and the clean twin whose accuracy the attack properties compare with."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    subject = _load_subject(run_dir, data_cache, cell.subject.data_spec)
    model = subject["run"].model.to(device)
    clean, indices = select_clean_subset(subject["pool"], cell.clean_size, seed=cell.seed,
                                         exclude=subject["exclude"])
    before = subject["before"]
    record = {"key": cell.key, "cell": cell.describe(), "label": _labels(cell),
              "data_spec": cell.subject.data_spec, "subject_run": run_dir, "subject_code": subject_code(run_dir),
              "subject_weights": _digest(model), "subject_machine": subject["machine"],
              "subject_training": subject["training"],
              "clean_indices": indices.tolist(), "environment": machine(device),
              "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "before": before.to_dict()}
    try:
        with PeakMemory(device) as peak:
            runs = [_timed_defense(cell, model, clean, device) for _ in range(cell.repeats)]
    except RnpError as error:  # the defense does not apply to this model (e.g. CLP without BN)
        return {**record, "status": "not_applicable", "error": str(error)}
    result = runs[0][0]
    seconds = statistics.median(s for _, s, _ in runs)
    after = evaluate_backdoor(result.model, subject["run"].data.test, subject["triggered"], device=device)
    record.update(status="ok", after=after.to_dict(),
                  der=der(before, after) if before.attack_success_rate is not None else None,
                  seconds=seconds, stages=_median_stages([r for r, _, _ in runs]),
                  peak_memory_mb=peak.megabytes, memory_kind=peak.kind, summary=report_summary(result.report))
    if cell.repeats > 1:
        record["repeats"] = {"seconds": [s for _, s, _ in runs],
                             "agree": len({_digest(r.model) for r, _, _ in runs}) == 1}
    if cell.defense == "rnp":
        record["rnp"] = _rnp_details(cell, result, subject, device)
        if cell.cost_floor:
            record["rnp"].update(floor_seconds=statistics.median(f for _, _, f in runs),
                                 floor_ratio=statistics.median(s / f for _, s, f in runs),
                                 floor_precision=result.report["config"].get("amp", "off"))
    if cell.measures_subject:
        record.update(_subject_measurements(cell, model, clean, subject, control_dir))
    if cell.retuning is not None:
        control = _load_model(control_dir).to(device) if control_dir else None
        record["retuning"] = _retuning(cell, result.model, subject, control)
    if cell.recalibration:
        record["recalibrated"] = _recalibrated(result.model, clean, subject, device)
    return record


def _timed_defense(cell: Cell, model, clean, device) -> tuple[DefenseResult, float, float | None]:
    """One run of the cell's defense: its result, its seconds, and for RNP (unless the cell
    skips it) the seconds of its optimisation floor, timed right after it on the same model."""
    start = time.perf_counter()
    result = _defend(cell, model, clean)
    seconds = time.perf_counter() - start
    floor = None
    if cell.defense == "rnp" and cell.cost_floor:
        config = result.report["config"]
        floor = optimisation_floor(model, clean, images=rnp_floor_images(result), batch_size=config["batch_size"],
                                   device=device, amp=config.get("amp", "off"),
                                   channels_last=config.get("channels_last", False))
    return result, seconds, floor


def _median_stages(results: list[DefenseResult]) -> dict:
    return {stage: statistics.median(r.timings[stage] for r in results) for stage in results[0].timings}


def _digest(model) -> str:
    """A model's weights, hashed: repeats of a cell must agree on them, and the cells of one
    subject must rest on the same trained weights (a subject retrained elsewhere may differ)."""
    sha = hashlib.sha256()
    for tensor in model.state_dict().values():
        sha.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:16]


def _subject_measurements(cell: Cell, model, clean, subject: dict, control_dir: str | None) -> dict:
    """The undefended cell's measurements of its subject (:mod:`rnp.bench.measurements`)."""
    run, found = subject["run"], {}
    if cell.attack_properties and run.attack is not None:
        twin = read_json(f"{control_dir}/{METRICS_FILE}") if control_dir else None
        found["attack_properties"] = attack_properties(run, read_json(f"{run.path}/{METRICS_FILE}"), twin)
    if cell.exposure is not None:
        poisoned = _poisoned_train(subject) if run.attack is not None else None
        found["exposure"] = measure_exposure(run, model, clean, poisoned, cell.exposure, seed=cell.seed)
    if cell.label_runs is not None:
        found["label_runs"] = measure_label_runs(run, model, clean, cell.label_runs, seed=cell.seed)
    return found


def _poisoned_train(subject: dict):
    """The subject's training set as it was trained on, rebuilt once per subject."""
    cache = subject["poisoned_train"]
    if "set" not in cache:
        cache["set"] = subject["run"].poisoned_train(cache_dir=subject["data_cache"])
    return cache["set"]


def _defend(cell: Cell, model, clean) -> DefenseResult:
    if cell.defense == NO_DEFENSE:
        return DefenseResult(model, {"method": NO_DEFENSE})
    return DEFENSES[cell.defense](cell.defense_config()).fit(model, clean)


def _load_model(run_dir: str):
    """A run folder's model alone (the control's data is the cell's subject's, already loaded)."""
    return load_model(read_run_info(run_dir)["model"], f"{run_dir}/{MODEL_FILE}")


@functools.lru_cache(maxsize=1)
def _load_subject(run_dir: str, data_cache: str | None, data_spec: str) -> dict:
    """The loaded run, its data read from where the grid says it lies now, and what every cell
    of it needs; kept while cells of one subject follow each other."""
    run = load_run(run_dir, cache_dir=data_cache, data_spec=data_spec)
    metrics = read_json(f"{run_dir}/{METRICS_FILE}")
    before = BackdoorMetrics(**{k: metrics.get(k) for k in BackdoorMetrics.__dataclass_fields__})
    pool, exclude = run.clean_pool()
    return {"run": run, "triggered": run.triggered_test(), "before": before, "pool": pool,
            "machine": metrics.get("machine"), "training": training_cost(metrics),
            "exclude": exclude, "data_cache": data_cache, "poisoned_train": {}}


def _rnp_details(cell: Cell, result, subject: dict, device) -> dict:
    """Mask values (for histograms) and the pruning curve: test CA and ASR on a seeded subset
    of ``curve_images`` test images after pruning at each mask threshold. The curve is an
    ORACLE ANALYSIS: it uses test labels and triggered test images, which a defender does not
    have, and chooses nothing. ``selection`` is what the pruning rule saw and chose from (the
    auto rule's clean accuracy at each prefix it evaluated) and the channels it pruned, so that
    a record can say how close a rule's decision was without rerunning it."""
    pruning = result.report["pruning"]
    details = {"masks": [round(float(v), 4) for v in result.masks.values], "pruned": pruning["pruned"],
               "selection": {k: v for k, v in pruning.items() if k not in ("pruned", "total_channels")}}
    if cell.curve_images:
        test, triggered = subject["run"].data.test, subject["triggered"].data
        generator = generator_for(cell.subject.seed, "pruning-curve")
        test_pick = torch.randperm(len(test), generator=generator)[:cell.curve_images]
        trig_pick = torch.randperm(len(triggered), generator=generator)[:cell.curve_images]
        test_subset, triggered_subset = test.subset(test_pick), triggered.subset(trig_pick)
        target_labels = subject["triggered"].target_labels[trig_pick]

        def oracle(model) -> dict:
            return {"clean_accuracy": accuracy(predict(model, test_subset, device=device), test_subset.labels),
                    "attack_success_rate": accuracy(predict(model, triggered_subset, device=device),
                                                    target_labels)}

        details["curve"] = threshold_sweep(result, oracle)
        details["curve_kind"] = f"oracle analysis on {len(test_pick)} test images"
        if cell.prune_counts:
            details["prefix_curve"] = [_pruned_first(result, count, oracle) for count in cell.prune_counts]
    return details


def _pruned_first(result, count: int, oracle) -> dict:
    """The oracle's CA and ASR after pruning the first ``count`` channels in RNP's pruning order
    (its ``ranking``: how well it ranks the backdoor channels, whatever the pruning rule chose)."""
    original, masks, order = (result.artifacts[k] for k in ("original_model", "masks", "order"))
    with channels_pruned(original, masks, order[:count]) as pruned:
        return {"count": count, **oracle(pruned)}


def _recalibrated(model, clean, subject: dict, device) -> dict:
    """CA / ASR / RA after re-estimating the model's BatchNorm statistics on the clean set, or
    why the measurement does not apply."""
    if not running_statistics_layers(model):
        return {"status": "not_applicable", "reason": "the model has no BatchNorm running statistics"}
    metrics = evaluate_backdoor(recalibrated(model, clean), subject["run"].data.test, subject["triggered"],
                                device=device)
    return {"status": "ok", **metrics.to_dict()}


def _retuning(cell: Cell, model, subject: dict, control=None) -> dict:
    """ASR after each retuning epoch, or why the measurement does not apply; with a ``control``
    model (clean), its ASR after the same retuning too."""
    config = copy.copy(cell.retuning)
    config.seed = cell.subject.seed
    run = subject["run"]
    rate = len(run.poisoned_indices) / len(run.data.train)
    try:
        data, poisoned = retuning_set(_poisoned_train(subject), config, rate)
    except RnpError as error:
        return {"error": str(error)}
    asr = retune(model, data, subject["triggered"], config)
    result = {"asr": {str(k): v for k, v in asr.items()}, "images": len(data), "poisoned": poisoned}
    if control is not None:
        result["control_asr"] = {str(k): v for k, v in retune(control, data, subject["triggered"], config).items()}
    return result


def report_summary(report: dict) -> dict:
    """The few report fields worth keeping in a record: what was pruned or flagged, and for RNP's
    target-gradient order the class the unlearned model collapsed onto and its share."""
    keep = {}
    if "pruning" in report:
        keep["pruned"] = report["pruning"].get("pruned")
    if "ranking" in report:
        keep["ranking"] = report["ranking"]
    for key in ("flagged", "flagged_classes"):
        if key in report:
            keep["flagged"] = report[key]
    return keep


def _labels(cell: Cell) -> dict:
    """The short names the tables print."""
    subject = cell.subject
    return {"dataset": subject.dataset, "model": f"{subject.arch}-w{subject.width}",
            "attack": subject.label, "seed": subject.seed, "defense": cell.name or cell.defense,
            **({"clean_seed": cell.clean_seed} if cell.clean_seed is not None else {})}
