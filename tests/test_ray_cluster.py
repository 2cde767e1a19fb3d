"""``rnp bench --executor ray`` on a real two-node Ray cluster: a worker killed mid-grid loses
no record and duplicates none, and a rerun computes only what is missing.

Both nodes run on this machine, each started with ``ray start --block`` (one CPU, its own temp
folder, token authentication with a token of this test), so the test stops exactly the Ray
processes it started (``ray stop`` would stop every Ray instance on the machine). The grid
(one tiny subject, two cells) runs in a driver subprocess, as ``rnp bench`` would; the test
kills the worker running a cell on the second node, then the worker running that cell's one
retry, so the cell is lost: the run must report it as failed and keep the other cell, and
the rerun must compute that cell alone.

Select it with ``pytest -m ray_cluster``. It costs 15 to 20 s of CPU (Ray's daemons, and the
two drivers and each new worker importing torch), so its wall time is mostly how much CPU it
gets: 47 s on one core shared with a few other jobs, 2 to 2.5 minutes beside four busy ones.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import write_dataset

RAY = Path(sys.executable).with_name("ray")
pytestmark = [pytest.mark.ray_cluster,
              pytest.mark.skipif(not RAY.exists(), reason="needs Ray: pip install 'rnp[ray]'")]
GRID = {"name": "cluster", "models": [{"arch": "preact_resnet18", "width": 4}],
        "train": {"epochs": 1, "batch_size": 16}, "attacks": ["badnets"], "seeds": [0],
        # long enough (a few seconds a cell) for the test to catch a worker running one
        "defenses": {"ft": {"epochs": 100, "batch_size": 16},
                     "rnp": {"unlearn_epochs": 3, "recover_epochs": 150, "batch_size": 16}},
        "clean_size": 40, "curve_images": 10}
DRIVER = """
import json, sys
from rnp.bench import runner
from rnp.bench.grid import load_grid

grid, out, cache, data_cache, address = sys.argv[1:]
writes, write = [], runner.write_json
runner.write_json = lambda path, record: writes.append(record["key"]) or write(path, record)
run = runner.run_grid(load_grid(grid), out, cache=cache, data_cache=data_cache, executor="ray",
                      threads=1, ray_address=address)
print(json.dumps({"computed": run.computed, "failures": run.failures, "writes": writes}))
"""
"""The driver: ``run_grid`` on the cluster, reporting which records it wrote, in order."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def children(pid: int) -> list[int]:
    """The processes that any thread of ``pid`` started (the raylet starts workers from threads)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # the thread or process ended
            pass
    return found


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        todo += (new := children(todo.pop()))
        found += new
    return found


def title(pid: int) -> str:
    """A process's command line: a Ray worker sets it to ``ray::TASK NAME`` while it runs a task."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


class Node:
    """One ``ray start --block`` process: the node lives while it does."""

    def __init__(self, folder: Path, args: list[str], env: dict):
        folder.mkdir(parents=True)
        self.log = folder / "ray-start.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([str(RAY), "start", "--block", f"--temp-dir={folder}",
                                             "--node-ip-address=127.0.0.1", "--num-cpus=1",
                                             f"--dashboard-agent-listen-port={free_port()}",
                                             "--object-store-memory=100000000", "--include-log-monitor=false",
                                             "--disable-usage-stats", *args],
                                            stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_started(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"ray start failed:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stops ``ray start`` (which stops its node), then kills whatever of the node is left:
        only processes this node started (still under the same title, so never a process that
        reused a freed pid), never another Ray instance on the machine."""
        left = {pid: title(pid) for pid in descendants(self.process.pid)}
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for pid, was in left.items():
            if was and title(pid) == was:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def cluster():
    """A head node and a second node, both on this machine: (address, [head, second], env).
    Their temp folder is short: Ray's socket paths in it must stay under 108 characters."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    root = Path(tempfile.mkdtemp(prefix="rnp-ray-"))
    nodes = []
    try:
        nodes.append(Node(root / "head", ["--head", f"--port={port}", "--include-dashboard=false",
                                          f"--dashboard-port={free_port()}"], env))
        nodes[0].wait_started()
        nodes.append(Node(root / "second", [f"--address=127.0.0.1:{port}"], env))
        nodes[1].wait_started()
        yield f"127.0.0.1:{port}", nodes, env
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


class Driver:
    """``run_grid`` on the cluster in a subprocess (its log goes to a file, so no pipe fills);
    leaving its ``with`` block kills it if it still runs."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log, self.killed = log, []
        with open(log, "w") as handle:
            self.process = subprocess.Popen([sys.executable, "-c", DRIVER, *args], env=env, text=True,
                                            stdout=subprocess.PIPE, stderr=handle)

    def kill_cell_worker(self, roots: list[int], key: str = "", timeout: float = 300) -> str:
        """Waits until a worker under one of ``roots`` runs a cell (``key``'s, if given),
        SIGKILLs it and returns the cell's key. A killed worker keeps its title a moment, so
        the workers killed before are passed over."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            for pid in (pid for root in roots for pid in descendants(root) if pid not in self.killed):
                running = title(pid)
                if running.startswith(f"ray::cell {key}"):
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                    return running.split()[1]
            time.sleep(0.05)
        raise AssertionError(f"no worker ran cell {key or '(any)'} before the grid ended or {timeout} s:\n"
                             f"{self.tail()}")

    def result(self) -> dict:
        """What the driver printed: the cells it computed, those that failed, the records it wrote."""
        out, _ = self.process.communicate(timeout=600)
        assert self.process.returncode == 0, self.tail()
        return json.loads(out.strip().splitlines()[-1])

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def __enter__(self) -> "Driver":
        return self

    def __exit__(self, *failure) -> None:
        self.process.kill()
        self.process.wait()


def records(out: Path) -> dict[str, str]:
    """Every file in the cells folder, by name: the raw text of each record."""
    return {path.name: path.read_text() for path in (out / "cells").iterdir()}


def test_a_killed_worker_loses_no_record_and_a_rerun_computes_only_what_is_missing(cluster, tmp_path):
    address, (head, second), env = cluster
    data = write_dataset(tmp_path / "data", classes=3, n_train=90, n_test=30)
    grid = tmp_path / "grid.yaml"
    grid.write_text(json.dumps({**GRID, "datasets": {"tiny": str(data)}}))
    out = tmp_path / "out"
    args = [str(grid), str(out), str(tmp_path / "models"), str(tmp_path / "data-cache"), address]

    with Driver(args, env, tmp_path / "first.log") as driver:
        key = driver.kill_cell_worker([second.process.pid])
        driver.kill_cell_worker([head.process.pid, second.process.pid], key)  # its one retry
        run = driver.result()
    assert list(run["failures"]) == [key] and "WorkerCrashedError" in run["failures"][key]
    assert len(run["computed"]) == 1 and run["writes"] == run["computed"]  # each record written once
    kept = records(out)
    assert set(kept) == {f"{run['computed'][0]}.json"}  # the lost cell left no partial record
    for name, text in kept.items():
        record = json.loads(text)
        assert f"{record['key']}.json" == name and record["status"] == "ok" and "after" in record

    with Driver(args, env, tmp_path / "rerun.log") as driver:
        rerun = driver.result()
    # (cell keys hash the code of src/rnp: an edit to it between the runs makes new cells)
    assert rerun == {"computed": [key], "failures": {}, "writes": [key]}
    final = records(out)
    assert set(final) == {*kept, f"{key}.json"} and all(final[name] == kept[name] for name in kept)
    assert {json.loads(text)["label"]["defense"] for text in final.values()} == {"ft", "rnp"}
