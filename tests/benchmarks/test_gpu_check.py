"""``python -m benchmarks.gpu --check --dry-run``: every section of the GPU check, run end to end on CPU
tensors (Triton's interpreter runs bcekit's kernels), so that none of its code waits for a GPU to be tested.

The command runs in a subprocess from the repository root, as it is run by hand; its numbers mean nothing
here, only that every section ran and passed, wrote its record into ``gpu_check.json`` and its row into the
printed table. A section that raised or failed shows in the JSON and in the exit status, which these tests
read before anything else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = (
    "environment",
    "parity",
    "accuracy",
    "compile",
    "cuda_graph",
    "no_sync",
    "autocast",
    "benchmark",
    "linear",
)


def _check(out: Path, *arguments: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the dry check into ``out``; returns the process and the JSON it wrote."""
    environment = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "benchmarks.gpu", "--check", "--dry-run", "--out", str(out), *arguments]
    completed = subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600, check=False
    )
    report = out / "gpu_check.json"
    assert report.exists(), f"no {report}; exit status {completed.returncode}:\n{completed.stderr[-5000:]}"
    return completed, json.loads(report.read_text())


def _problems(result: dict) -> dict[str, object]:
    """What went wrong in each section that did not pass: its failures, or its traceback."""
    return {
        name: record["failures"] or record["error"] or record["skipped"]
        for name, record in result["sections"].items()
        if record["status"] != "passed"
    }


def test_dry_run_passes_every_section(tmp_path: Path) -> None:
    completed, result = _check(tmp_path)
    assert {name: record["status"] for name, record in result["sections"].items()} == dict.fromkeys(
        SECTIONS, "passed"
    ), _problems(result)
    assert completed.returncode == 0, completed.stderr[-5000:]
    assert result["status"] == "passed" and result["dry_run"] is True
    table = completed.stdout
    assert "DRY RUN" in table
    for name in SECTIONS:
        assert f"| {name} | passed |" in table, f"no row for section {name!r} in the table:\n{table}"
    for block in ("**benchmark**", "**target**", "**linear**", "**max ulp**", "**best block**"):
        assert block in table
    benchmark = result["sections"]["benchmark"]
    assert len(benchmark["rows"]) == 12 and all(row["bcekit"] for row in benchmark["rows"])
    assert set(benchmark["sweep"]["best"]) == {"float32", "bfloat16"}
    assert result["sections"]["parity"]["kernel_launches"] > 0


def test_a_spent_budget_skips_cells_and_fails_the_exit_status(tmp_path: Path) -> None:
    """With no budget, a section's cells are recorded as skipped, the section as skipped, and the check
    exits with status 1: a section that ran nothing has not passed."""
    completed, result = _check(tmp_path, "--budget-s", "0", "--sections", "parity")
    assert completed.returncode == 1, completed.stderr[-5000:]
    parity = result["sections"]["parity"]
    assert list(result["sections"]) == ["parity"] and parity["status"] == "skipped", _problems(result)
    assert parity["skipped"] and all(entry.endswith(": skipped: budget") for entry in parity["skipped"])
    assert "| parity | skipped |" in completed.stdout
