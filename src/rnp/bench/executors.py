"""Where a grid's cells run: in this process, or as tasks on a Ray cluster.

An executor takes the cells to compute and two picklable functions, ``prepare(subject) ->
run_dir`` (find or train the backdoored model) and ``execute(cell, run_dir[, control_dir]) ->
record`` (``control_dir``: the cell's clean control subject, when it has one), and
yields ``(cell, record)`` as cells finish, or ``(cell, error)`` for a cell that failed with an
input error (:class:`RnpError`), or whose Ray worker or node was lost. The caller writes the
records, so results are gathered the same way whichever executor ran them, each cell once. Anything
else (a bug, Ctrl-C) stops the run; finished cells are already on disk and a rerun resumes.
"""

from __future__ import annotations

import re

from collections.abc import Callable, Iterator

from rnp.bench.grid import Cell, Subject
from rnp.errors import RnpError

Outcome = tuple[Cell, "dict | RnpError"]


class LocalExecutor:
    """Runs every cell in this process, one after another, subject by subject."""

    name = "local"

    def run(self, cells: list[Cell], prepare: Callable[[Subject], str],
            execute: Callable[..., dict]) -> Iterator[Outcome]:
        run_dirs: dict[str, str | RnpError] = {}

        def run_dir(subject: Subject) -> str | RnpError:
            if subject.key not in run_dirs:
                try:
                    run_dirs[subject.key] = prepare(subject)
                except RnpError as error:
                    run_dirs[subject.key] = error
            return run_dirs[subject.key]

        for cell in cells:
            dirs = [run_dir(subject) for subject in _subjects(cell)]
            failed = next((d for d in dirs if isinstance(d, RnpError)), None)
            if failed is not None:
                yield cell, failed
                continue
            try:
                yield cell, execute(cell, *dirs)
            except RnpError as error:
                yield cell, error


class RayExecutor:
    """Each subject is one Ray task and each cell another, which waits for its subject's task;
    records come back to this process as cells finish.

    ``address`` is a running cluster's (``ray start --head`` prints it; "auto" finds one),
    None starts a local Ray instance. ``cpus`` and ``gpus`` are the resources each task asks for.
    The cache and data paths must be reachable from every worker (a shared filesystem).
    ``retries`` is how many times Ray reruns a task whose worker or node died (never one that
    raised); a cell still lost after them is a failed cell, which the next run computes again.
    Tasks are named ``prepare LABEL`` and ``cell KEY``, in Ray's tools and process titles.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, cpus: float = 1, gpus: float = 0, retries: int = 1):
        self.address, self.cpus, self.gpus, self.retries = address, cpus, gpus, retries

    def run(self, cells: list[Cell], prepare: Callable[[Subject], str],
            execute: Callable[..., dict]) -> Iterator[Outcome]:
        try:
            import ray
        except ImportError:
            raise RnpError("--executor ray needs Ray: pip install 'rnp[ray]'") from None
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        try:
            options = {"num_cpus": self.cpus, "num_gpus": self.gpus, "max_retries": self.retries}
            task = ray.remote(**options)(_call)
            subjects, pending = {}, {}
            for cell in cells:
                for subject in _subjects(cell):
                    if subject.key not in subjects:
                        subjects[subject.key] = task.options(name=f"prepare {subject.label}").remote(
                            prepare, subject)
                needs = [subjects[s.key] for s in _subjects(cell)]
                pending[task.options(name=f"cell {cell.key}").remote(execute, cell, *needs)] = cell
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                cell = pending.pop(done[0])
                try:
                    yield cell, ray.get(done[0])
                except RnpError as error:  # Ray re-raises a task's error as a subclass of its type
                    last_line = str(error).strip().splitlines()[-1]
                    yield cell, RnpError(re.sub(r"^[\w.]*RnpError: ", "", last_line))
                except ray.exceptions.RayError as error:
                    if isinstance(error, ray.exceptions.RayTaskError):  # the cell's own bug
                        raise
                    yield cell, RnpError(f"lost on the Ray cluster ({type(error).__name__}: "
                                         f"{str(error).splitlines()[0]})")
        finally:
            if started:
                ray.shutdown()


def _subjects(cell: Cell) -> list[Subject]:
    """The subjects a cell needs prepared: its own, then its control's if it has one."""
    return [cell.subject] + ([cell.control] if cell.control is not None else [])


def _call(function, *args):
    """A Ray task body: ``function(*args)`` (Ray's decorator takes only plain functions, and
    resolves a finished task's result passed as an argument before the call)."""
    return function(*args)


EXECUTORS = {"local": LocalExecutor, "ray": RayExecutor}
