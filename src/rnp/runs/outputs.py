"""Writing a defense's outputs: the purified model, its per-channel scores, its tensors, the
sweep and the report.

Every defense's artefacts are written the same way: each :class:`ChannelScores` (RNP's and
ANP's masks, CLP's bounds, FP's activations) as ``<name>.csv``, and every plain tensor (NC's
recovered triggers, I-BAU's perturbations) into ``artifacts.safetensors`` under its name.
Models and other objects stay in memory only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rnp.defenses.base import DefenseResult
from rnp.defenses.masks import ChannelScores
from rnp.errors import RnpError
from rnp.io.checkpoint import save_checkpoint
from rnp.io.files import check_output_path, write_json, write_text
from rnp.io.plots import CSV_HEADER as FIGURE_CSV_HEADER, FORMATS as FIGURE_FORMATS
from rnp.io.tables import write_csv
from rnp.runs.folder import METRICS_FILE, MODEL_FILE, RUN_FILE, save_model

REPORT_FILE = "report.json"
MASKS_FILE = "masks.csv"
SWEEP_FILE = "sweep.csv"
ARTIFACTS_FILE = "artifacts.safetensors"
SCORES_HEADER = "layer,channel,value"
"""First line of every :class:`ChannelScores` CSV, which is how ``--force`` knows one."""

OUTPUT_FILES = (MODEL_FILE, REPORT_FILE, MASKS_FILE, SWEEP_FILE, ARTIFACTS_FILE, METRICS_FILE,
                "summary.md", "scores.csv", *(f"predictions.{suffix}" for suffix in FIGURE_FORMATS),
                "triggers.png", "triggers.safetensors")
"""The fixed names ``rnp defend``, ``inspect`` and ``scan-data`` (and ``rnp evaluate`` beside a
purified model) write in an output folder; with ``--force`` these are replaced."""


def prepare_output_dir(out, inputs=(), *, force: bool = False) -> Path:
    """Checks an output folder before any work: it may not replace, hold or lie inside an input,
    hold a training run, or be unwritable; a non-empty one is refused unless ``force``, and
    then :func:`remove_previous_outputs` clears rnp's files just before the new ones are written."""
    out = check_output_path(out, inputs, folder=True)
    if (out / RUN_FILE).exists():
        raise RnpError(f"{out} holds a training run; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise RnpError(f"{out} is not empty; choose another --out, or give --force to replace "
                       "the files rnp wrote there")
    return out


def remove_previous_outputs(out) -> None:
    """Deletes the files an earlier ``rnp defend``, ``inspect`` or ``scan-data`` wrote in ``out``,
    so no file of another method is left beside the new ones: the names in
    :data:`OUTPUT_FILES`, the images of ``scores_*`` figures, and CSVs of channel scores or of a
    figure's data (first line :data:`SCORES_HEADER` or :data:`rnp.io.plots.CSV_HEADER`).
    Everything else in ``out`` (the user's files, sub-folders) is kept."""
    out = Path(out)
    if out.is_dir():
        for path in list(out.iterdir()):
            if path.is_file() and _rnp_output(path):
                path.unlink()


def _rnp_output(path: Path) -> bool:
    if path.name in OUTPUT_FILES or (path.name.startswith("scores_") and path.suffix[1:] in FIGURE_FORMATS):
        return True
    if path.suffix != ".csv":
        return False
    with path.open(errors="replace") as handle:
        return handle.readline().rstrip("\r\n") in (SCORES_HEADER, FIGURE_CSV_HEADER)


def write_defense_outputs(out, result: DefenseResult, model_spec: dict | None, report: dict,
                          sweep: list[dict] | None = None) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out / MODEL_FILE, result.model, model_spec or {})
    tensors = {}
    for name, value in result.artifacts.items():
        if isinstance(value, ChannelScores):
            write_text(out / f"{name}.csv", value.to_csv())
        elif isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu().contiguous()
    if tensors:
        save_checkpoint(out / ARTIFACTS_FILE, tensors)
    if sweep:
        columns = list(sweep[0])
        write_csv(out / SWEEP_FILE, columns, [[_cell(row.get(c)) for c in columns] for row in sweep])
    write_json(out / REPORT_FILE, report)


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.6f}" if isinstance(value, float) else str(value)
