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
from rnp.io.files import write_json, write_text
from rnp.io.runs import MODEL_FILE, save_model

REPORT_FILE = "report.json"
MASKS_FILE = "masks.csv"
SWEEP_FILE = "sweep.csv"
ARTIFACTS_FILE = "artifacts.safetensors"


def prepare_output_dir(out, inputs=()) -> Path:
    """Refuses an output folder that would overwrite an input file or another tool's files."""
    out = Path(out)
    resolved = {Path(p).resolve() for p in inputs if p}
    for name in (MODEL_FILE, REPORT_FILE, MASKS_FILE, SWEEP_FILE, ARTIFACTS_FILE):
        if (out / name).resolve() in resolved:
            raise RnpError(f"{out / name} is an input; choose another --out")
    if out.exists() and not out.is_dir():
        raise RnpError(f"{out} exists and is not a folder")
    return out


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
        lines = [",".join(columns)] + [",".join(_cell(row.get(c)) for c in columns) for row in sweep]
        write_text(out / SWEEP_FILE, "\n".join(lines) + "\n")
    write_json(out / REPORT_FILE, report)


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.6f}" if isinstance(value, float) else str(value)
