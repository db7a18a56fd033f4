"""``tools/compile_gpu_kernels.py``: the check that every Triton kernel bcekit launches compiles for real
GPU targets (CI runs all of it from ``.ci/run``, beside the test suite; here, a sample end to end and the
rules that make it fail)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

TOOL = Path(__file__).resolve().parents[2] / "tools" / "compile_gpu_kernels.py"


def _tool():
    spec = importlib.util.spec_from_file_location("compile_gpu_kernels", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports neither triton nor bcekit: those come with main()
    return module


def test_a_sample_compiles_for_sm_90_and_sm_80_without_float64(tmp_path: Path) -> None:
    environment = {**os.environ}
    environment.pop("TRITON_INTERPRET", None)
    output = tmp_path / "compile.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--targets",
            "90",
            "80",
            "--sample",
            "6",
            "--jobs",
            "2",
            "--json",
            str(output),
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["failures"] == []
    results = report["results"]
    assert {r["target"] for r in results} == {"sm_90", "sm_80"} and len(results) == 12
    assert all(r["status"] == "compiled" for r in results)
    for result in results:
        assert result["instructions"] > 0 and result["registers"] > 0 and result["local_bytes"] == 0
        if result["dtype"] != "float64":
            assert result["f64_instructions"] == 0 and result["f32_instructions"] > 0
    assert "| sm_90 | 6 | 0 | 0 | 0 |" in completed.stdout


class _Point:
    def __init__(self, point: tuple) -> None:
        self.point = point

    def space(self) -> tuple:
        return self.point


def _result(**changes) -> dict:
    result = {
        "target": "sm_90",
        "kernel": "_bce_kernel",
        "dtype": "float32",
        "LOGITS": True,
        "W_MODE": 0,
        "P_MODE": 0,
        "G_MODE": 0,
        "INDEX64": False,
        "status": "compiled",
        "instructions": 100,
        "f64_instructions": 0,
        "f32_instructions": 50,
        "registers": 64,
        "local_bytes": 0,
        "compile_s": 0.5,
    }
    return {**result, **changes}


def test_what_makes_the_check_fail() -> None:
    tool = _tool()
    everything = [_Point(point) for point in tool.expected_space()]
    _, failures = tool.summarise([_result()], everything)
    assert failures == []
    _, failures = tool.summarise(
        [_result(status="error", error="CompilationError: at 3:4\nmore")], everything
    )
    assert failures == ["compile error: sm_90 _bce_kernel float32 LOGITS=True W_MODE=0 P_MODE=0 G_MODE=0 "
                        "INDEX64=False: CompilationError: at 3:4"]  # fmt: skip
    _, failures = tool.summarise([_result(f64_instructions=3)], everything)
    assert len(failures) == 1 and failures[0].startswith("3 float64 instructions")
    _, failures = tool.summarise([_result(dtype="float64", f64_instructions=300)], everything)
    assert failures == []  # float64 kernels compute in float64
    _, failures = tool.summarise([_result()], everything[1:])
    assert len(failures) == 1 and failures[0].startswith("not reached through the public API")
    _, failures = tool.summarise([_result(status="unsupported", error="ptxas: sm_120")], everything)
    assert failures == []  # a target the installed Triton cannot compile for


def test_ptx_instructions_are_counted_by_type() -> None:
    ptx = """
.visible .entry kernel(
    .param .u64 x
)
{
    .reg .f32 %f<4>;
    ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];
    mul.rn.f32 %f1, %f2, %f3;
    @%p1 fma.rn.f32 %f1, %f2, %f3, %f1;
    cvt.f64.f32 %fd1, %f1;
    add.rn.f64 %fd2, %fd1, %fd1;
    ret;
}
"""
    counts = _tool()._ptx_counts(ptx)
    assert counts == {"instructions": 6, "f64_instructions": 2, "f32_instructions": 3}


def test_the_compile_time_space_has_every_combination() -> None:
    space = _tool().expected_space()
    logits = {p for p in space if p[0] == "_bce_kernel" and p[2]}
    probabilities = {p for p in space if p[0] == "_bce_kernel" and not p[2]}
    assert len(logits) == 4 * 5 * 5 * 3 and len(probabilities) == 4 * 5 * 3
    assert {p for p in space if p[0] == "_scale_kernel"} == {
        ("_scale_kernel", "float32"),
        ("_scale_kernel", "float64"),
    }
