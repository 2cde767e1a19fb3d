"""``rnp bench``: run a grid's missing cells, keep every finished one, write the report.

The output folder holds ``cells/<key>.json`` (one record per finished cell, written atomically
the moment the cell ends) and the report files of :mod:`rnp.bench.report`. A rerun computes
only the cells whose record is missing: cells of an interrupted run, or cells a changed
setting or a code change made new. Backdoored models live in the cache, trained once per full
spec and training code (:mod:`rnp.bench.subjects` says when it trains one, and why).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from rnp.bench.cells import prepare_subject, run_cell
from rnp.bench.executors import EXECUTORS
from rnp.bench.grid import Cell, Grid
from rnp.bench.subjects import SubjectNotTrained
from rnp.data.sources import load_dataset
from rnp.errors import RnpError
from rnp.io.files import read_json, write_json
from rnp.progress import format_duration
from rnp.runs.fingerprint import package_fingerprint, training_fingerprint

CELLS_FOLDER = "cells"

logger = logging.getLogger(__name__)


@dataclass
class GridRun:
    """What one ``rnp bench`` call did: this grid's records, which cells it computed, which
    failed (cell key -> message), which it skipped because their subject is not trained yet
    (``trained_only``), and its wall-clock seconds."""

    records: list[dict]
    computed: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def cell_path(out, key: str) -> Path:
    return Path(out) / CELLS_FOLDER / f"{key}.json"


def grid_cells(grid: Grid, data_cache: str | None = None, device: str = "cpu") -> list[Cell]:
    """The grid's cells on ``device``, keyed with each dataset's checksum (decoding each dataset
    once)."""
    checksums = {name: load_dataset(spec, cache_dir=data_cache).checksum
                 for name, spec in grid.datasets.items()}
    return grid.cells(checksums, device)


def finished_records(grid: Grid, out, data_cache: str | None = None, device: str = "cpu") -> list[dict]:
    """The records in ``out`` of the grid's cells on ``device``, in grid order, without running
    anything (on a CPU with native bfloat16, "auto" cells are bfloat16 ones).
    A cell whose record this code has not computed takes the record of the same cell computed
    by other code (same description but for the package fingerprint and version), so the
    committed records re-render after any code change; the report's code note says when the
    records mix code."""
    return list(_records(grid_cells(grid, data_cache, device), out, older=True).values())


def _records(cells: list[Cell], out, *, older: bool) -> dict[str, dict]:
    """The records in ``out`` of those ``cells`` that have one, by cell key in the cells' order;
    with ``older``, a cell without a record of this code takes one of the same settings
    computed by other code: the one started last (records from before ``started_at`` existed
    count as earliest, among themselves in file-name order)."""
    by_setting = {}
    if older:
        for path in sorted((Path(out) / CELLS_FOLDER).glob("*.json")):
            record = read_json(path)
            setting = _setting_key(record["cell"])
            if setting not in by_setting or _started(record) > _started(by_setting[setting]):
                by_setting[setting] = record
    records = {}
    for cell in cells:
        path = cell_path(out, cell.key)
        record = read_json(path) if path.exists() else by_setting.get(_setting_key(cell.describe()))
        if record is not None:
            records[cell.key] = record
    return records


def _started(record: dict) -> str:
    return record.get("started_at", "")  # ISO 8601 in UTC: text order is time order


def _setting_key(description: dict) -> str:
    """A cell's description without what names the code that computed it."""
    return json.dumps({k: v for k, v in description.items() if k not in ("code", "rnp_version")},
                      sort_keys=True, default=str)


def run_grid(grid: Grid, out, *, cache, data_cache: str | None = None, executor: str = "local",
             device: str = "cpu", threads: int | None = None, ray_address: str | None = None,
             defenses: list[str] | None = None, subjects: list[str] | None = None,
             trained_only: bool = False, keep_older: bool = False, progress: bool = True,
             log=None) -> GridRun:
    """Computes the missing cells of ``grid`` into ``out`` and returns all of its records.

    ``defenses`` (row names, e.g. ``["none"]``) runs only those rows, ``subjects`` (subject
    labels as the report prints them, e.g. ``["trojan", "clean"]``) only those subjects, in that
    order (a subject half trained can go first), so that two training processes can share out a
    grid's subjects; ``keep_older`` counts a cell
    as done when older code computed one with the same settings (the report's code note then
    lists every record's code), instead of recomputing it with this code; ``trained_only`` trains
    nothing and skips the cells whose subject the cache does not hold finished. Together they
    let one process train a grid's subjects (``defenses=["none"]``) while another defends those
    already trained (``trained_only``). ``progress`` shows the training bars of the local
    executor. ``log(line)`` reports progress (default: the ``rnp.bench.runner`` logger, at INFO)."""
    log = log or logger.info
    start = time.perf_counter()
    cells = grid_cells(grid, data_cache, device)
    if defenses is not None:
        rows = {cell.name or cell.defense for cell in cells}
        unknown = sorted(set(defenses) - rows)
        if unknown:
            raise RnpError(f"grid {grid.name} has no defense row {unknown[0]!r}; its rows: {', '.join(sorted(rows))}")
        cells = [cell for cell in cells if (cell.name or cell.defense) in defenses]
    if subjects is not None:
        labels = {cell.subject.label for cell in cells}
        unknown = sorted(set(subjects) - labels)
        if unknown:
            raise RnpError(f"grid {grid.name} has no subject {unknown[0]!r}; its subjects: {', '.join(sorted(labels))}")
        cells = [cell for cell in cells if cell.subject.label in subjects]
        cells.sort(key=lambda cell: subjects.index(cell.subject.label))  # stable: grid order within one
    done = _records(cells, out, older=keep_older)
    todo = [cell for cell in cells if cell.key not in done]
    log(f"{grid.name}: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run "
        f"({executor} executor; code {package_fingerprint()}, training code {training_fingerprint()})")
    if executor not in EXECUTORS:
        raise RnpError(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    if executor == "ray":  # one core per task unless told otherwise, and the GPU when cells use one
        threads = threads or 1
        runner = EXECUTORS[executor](ray_address, cpus=threads, gpus=1 if device.startswith("cuda") else 0)
    else:
        runner = EXECUTORS[executor]()
    prepare = functools.partial(prepare_subject, cache=str(cache), data_cache=data_cache, device=device,
                                progress=progress and executor == "local", train=not trained_only, log=log)
    execute = functools.partial(run_cell, data_cache=data_cache, device=device, threads=threads)
    result = GridRun(records=[])
    cells_start = time.perf_counter()
    for number, (cell, outcome) in enumerate(runner.run(todo, prepare, execute), start=1):
        where = f"[{number}/{len(todo)}] {cell.subject.label} / {cell.name or cell.defense}"
        left = _time_left(time.perf_counter() - cells_start, number, len(todo))
        if isinstance(outcome, SubjectNotTrained):
            result.skipped.append(cell.key)
            continue
        if isinstance(outcome, RnpError):
            result.failures[cell.key] = str(outcome)
            log(f"{where}: failed: {outcome}{left}")
            continue
        write_json(cell_path(out, cell.key), outcome)
        result.computed.append(cell.key)
        log(f"{where}: {_brief(outcome)}{left}")
    if result.skipped:
        log(f"{len(result.skipped)} cells skipped: their subjects are not trained yet (trained only)")
    result.records = list(_records(cells, out, older=keep_older).values())
    result.seconds = time.perf_counter() - start
    return result


def _time_left(seconds: float, done: int, total: int) -> str:
    """The estimated time the grid's remaining cells take, at the mean pace of the cells done
    (which includes training their subjects; later cells often reuse those)."""
    if done >= total:
        return ""
    rest = total - done
    return (f"; estimated {format_duration(seconds / done * rest)} for the {rest} cells left "
            f"(at {seconds / done:.0f} s/cell so far)")


def _brief(record: dict) -> str:
    if record["status"] != "ok":
        return f"not applicable: {record['error']}"
    after = record["after"]
    if record["der"] is None:  # a clean subject
        return f"CA {after['clean_accuracy']:.3f} ({record['seconds']:.1f} s)"
    return (f"CA {after['clean_accuracy']:.3f} ASR {after['attack_success_rate']:.3f} "
            f"RA {after['robust_accuracy']:.3f} DER {record['der']:.3f} ({record['seconds']:.1f} s)")
