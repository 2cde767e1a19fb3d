"""The GPU quick grid (``benchmarks/grids/gpu-quick.yaml``, run by ``benchmarks/gpu_quick.sh``)
end to end on the CPU with tiny settings: the tiny dataset, width 4, one epoch, one clean seed,
fast RNP. The numbers are meaningless; what is checked is that the file's subjects, defense rows
and records are what the GPU run will produce, so the path works the day a GPU is lent."""

from __future__ import annotations

from pathlib import Path

import yaml

from rnp.cli.main import main

from helpers import write_dataset
from test_bench_grid import RNP_FAST, records, write_grid
from test_cli import _environment  # noqa: F401 (autouse fixture: private cache, one thread)

GRID = Path(__file__).resolve().parents[1] / "benchmarks" / "grids" / "gpu-quick.yaml"


def test_the_gpu_quick_grid_runs_on_the_cpu_with_tiny_settings(tmp_path):
    raw = yaml.safe_load(GRID.read_text())
    data = write_dataset(tmp_path / "data", classes=3, n_train=90, n_test=30)
    raw.update(datasets={"tiny": str(data)}, models=[{**m, "width": 4} for m in raw["models"]],
               train={**raw["train"], "epochs": 1}, clean_seeds=raw["clean_seeds"][:1], clean_size=20,
               curve_images=0, output=str(tmp_path / "out"), cache=str(tmp_path / "models"),
               data_cache=str(tmp_path / "decoded"))
    raw["defenses"] = {name: {**settings, **RNP_FAST} if name != "none" else settings
                       for name, settings in raw["defenses"].items()}
    grid = write_grid(tmp_path / "gpu-quick.yaml", raw)
    assert main(["bench", str(grid), "--device", "cpu", "--quiet"]) == 0
    cells = records(tmp_path / "out")
    assert sorted((r["label"]["attack"], r["label"]["defense"]) for r in cells) == [
        (attack, defense) for attack in ("badnets", "blend") for defense in ("none", "rnp", "rnp (paper)")]
    assert all(r["status"] == "ok" and r["label"]["model"] == "resnet18-w4" for r in cells)
    assert (tmp_path / "out" / "results.md").exists()
