"""``rnp bench GRID.yaml [GRID.yaml ...]``: the benchmark grid command (a thin layer over
:mod:`rnp.bench`). Several grids run (or, with ``--report-only``, re-render) one after another,
each into its own output folder: ``rnp bench --report-only benchmarks/grids/*.yaml`` rewrites
every published table from the committed records."""

from __future__ import annotations

import sys
from pathlib import Path

from rnp.bench.grid import load_grid
from rnp.bench.report import write_report
from rnp.bench.runner import finished_records, run_grid
from rnp.errors import RnpError
from rnp.io import plots
from rnp.io.files import check_output_path
from rnp.utils import resolve_device


def bench(args) -> int:
    if len(args.grid) > 1 and args.out:
        raise RnpError("--out names one grid's results folder: give a single grid with it "
                       "(several grids write to their own 'output')")
    grids = [load_grid(path) for path in args.grid]  # every file checked before any work
    return max(_bench(grid, path, args) for grid, path in zip(grids, args.grid))


def _bench(grid, path: str, args) -> int:
    out = check_output_path(args.out or grid.output or Path("bench-results") / grid.name, [path], folder=True)
    cache = args.cache or grid.cache or str(out / "models")
    data_cache = args.cache_dir or grid.data_cache
    if args.report_only:
        records = finished_records(grid, out, data_cache, str(resolve_device(args.device)))
        if not records:
            raise RnpError(f"{out}: no finished cell of the grid {path} yet; run it without --report-only")
        failures = {}
    else:
        device = resolve_device(args.device)
        log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
        run = run_grid(grid, out, cache=cache, data_cache=data_cache, executor=args.executor,
                       device=str(device), threads=args.threads, ray_address=args.ray_address,
                       defenses=args.defenses, subjects=args.subjects, trained_only=args.trained_only,
                       keep_older=args.keep_older,
                       progress=not args.quiet, log=log)
        records, failures = run.records, run.failures
        skipped = f", {len(run.skipped)} skipped (subject not trained yet)" if run.skipped else ""
        print(f"{len(run.computed)} cells computed, {len(records) - len(run.computed)} reused, "
              f"{len(failures)} failed{skipped}, in {run.seconds:.0f} s", file=sys.stderr)
        if args.defenses or args.subjects:  # the report covers the whole grid, not the part run
            records = finished_records(grid, out, data_cache, str(device))
    text = write_report(records, out, title=f"Benchmark grid {grid.name}", compare=args.compare,
                        reference=grid.reference, development=grid.development)
    print(text)
    print(f"results: {out / 'results.csv'}, {out / 'results.md'}, cells in {out / 'cells'}", file=sys.stderr)
    if not plots.available():
        print(f"note: {plots.MISSING_MATPLOTLIB}", file=sys.stderr)
    for key, message in failures.items():
        print(f"rnp: cell {key} failed: {message}", file=sys.stderr)
    return 1 if failures else 0
