"""Worker processes for the ``torch.distributed`` tests: one fresh interpreter per rank, each running
``_worker(rank, world, rendezvous, result_path)`` from the test file, which writes its results as JSON.

The workers never block a test run: the parent kills them after ``timeout_s`` and fails the test with
what they printed, as it does when one exits with an error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

_CODE = (
    "import runpy, sys; "
    "runpy.run_path(sys.argv[1])['_worker'](int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])"
)


def launch(test_file: str, folder: Path, world: int, rendezvous: str, timeout_s: float) -> list[dict]:
    """Run ``test_file``'s ``_worker`` on ``world`` ranks (gloo on this machine's loopback, one OpenMP
    thread each); their JSON results by rank, or a test failure with their output."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the test file imports this module, from the folder pytest's configuration puts on the path
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), env.get("PYTHONPATH")) if p)
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # the group stays on this machine's loopback
    processes, logs = [], []
    for rank in range(world):
        log = open(folder / f"rank{rank}.log", "w+")  # closed below
        argv = [
            str(Path(test_file).resolve()),
            str(rank),
            str(world),
            rendezvous,
            str(folder / f"rank{rank}.json"),
        ]
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", _CODE, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=folder,
                env=env,
            )
        )
        logs.append(log)
    deadline = time.monotonic() + timeout_s
    timed_out = False
    try:
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        output = []
        for rank, log in enumerate(logs):
            log.seek(0)
            output.append(f"--- rank {rank} (exit status {processes[rank].returncode}) ---\n{log.read()}")
            log.close()
    report = "\n".join(output)
    if timed_out:
        pytest.fail(f"the workers did not finish within {timeout_s} s\n{report}")
    failed = [rank for rank, process in enumerate(processes) if process.returncode != 0]
    if failed:
        pytest.fail(f"rank(s) {failed} failed\n{report}")
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world)]
