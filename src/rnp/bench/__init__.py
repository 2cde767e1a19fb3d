"""Benchmarks: grids of attacks x defenses x seeds (:func:`load_grid`, :func:`run_grid`,
:func:`write_report`), the test subjects they train once and cache, the re-tuning attack,
RNP's cost floor, and what an undefended cell measures about its subject (attack properties,
exposure)."""

from rnp.bench.cost import optimisation_floor, rnp_floor_images
from rnp.bench.grid import Grid, load_grid, parse_grid
from rnp.bench.report import write_report
from rnp.bench.retuning import RetuningConfig, retune
from rnp.bench.runner import GridRun, run_grid

__all__ = ["Grid", "GridRun", "RetuningConfig", "load_grid", "optimisation_floor", "parse_grid",
           "retune", "rnp_floor_images", "run_grid", "write_report"]
