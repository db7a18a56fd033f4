"""CPU speed, side by side in one process: bcekit vs torch eager vs torch.compile vs NumPy vs the floor.

Run from the repository root::

    python -m benchmarks.cpu [--min-log2 10] [--max-log2 26] [--step 1] [--budget 1.0] [--min-repeats 3]
                             [--max-repeats 200] [--memory-log2 24] [--targets soft]
                             [--out benchmarks/results]
    python -m benchmarks.cpu --matrix [--shapes 64x16,256x128,1024x1024] [--budget 1.0] [--out DIR]

What is timed. For each loss (logits, probabilities), dtype (float32, bfloat16), pass (forward,
forward+backward) and size 2^k (``--min-log2`` to ``--max-log2``), every contender runs once as a warm-up
(which is also where torch.compile compiles), then all contenders run in rounds, two calls each per round
of which the second is timed, until each has ``--min-repeats`` timed runs and the rounds have taken
``--budget`` seconds per contender, or ``--max-repeats`` rounds; each contender's median is reported.
Interleaving the contenders makes a slow spell of a shared machine weigh on all of them alike, so the ratios
stay fair; the untimed call keeps one contender's leftovers (cache contents, spinning OpenMP threads) from
being billed to the next. Small sizes thus
get many runs and the biggest ones (~1 s a call) only a few, which keeps a default run (2^10..2^26, all
17 sizes) near 10-15 minutes on a 2-core machine. Torch uses ``torch.set_num_threads(os.cpu_count())``
threads, set once at start-up for every contender (bcekit's kernels follow ``torch.get_num_threads()``
for tensors); NumPy's composition is single-threaded, as NumPy's ufuncs are.

* forward (``fwd``): ``loss = f(x, y)`` under ``torch.no_grad()``.
* forward+backward (``fwd+bwd``) models a training step, the same for every contender:
  ``loss = f(leaf, y); loss.backward(); leaf.grad = None`` (as ``optimizer.zero_grad(set_to_none=True)``
  does), so allocating and freeing the gradient is part of every step's cost.
* bcekit: ``bcekit.torch.binary_cross_entropy[_with_logits]``; torch eager: the same calls of
  ``torch.nn.functional``; torch.compile: those calls compiled per (loss, dtype, pass) with
  ``dynamic=True, fullgraph=True``: a few compilations serve all sizes (Inductor guards size ranges, e.g.
  ``n <= 4096``). Dynamo's recompile limit is raised to 64 and ``fail_on_recompile_limit_hit`` is set, so
  a recompile storm raises instead of silently falling back to eager; the number of graphs Dynamo compiled
  per panel is printed and recorded in the JSON (``compiled_graphs``).
* NumPy: the textbook composition, float32 only (NumPy has no bfloat16): logits
  ``max(x, 0) - x y + log1p(exp(-|x|))``, gradient ``(sigmoid(x) - y) / n``; probabilities
  ``-(y max(log x, -100) + (1 - y) max(log1p(-x), -100))``, gradient ``(x - y) / max(x (1 - x), 1e-12) / n``.
  Forward computes the mean loss; forward+backward the mean loss and a freshly allocated gradient.
* floor: the least memory traffic any implementation needs. Forward: ``torch.dot(x, y)``, a reduction that
  reads input and target once and writes nothing (the same call for float32 and bfloat16: torch's CPU dot
  handles both). Forward+backward: ``torch.add(x, y, out=g)`` into a preallocated ``g``: reads input and
  target and writes a gradient-sized output, as any fused forward+backward must (the floor does not
  allocate its output; the contenders do, see above).

Inputs: logits ``x ~ N(0, 1)``, probabilities ``sigmoid`` of those; targets (``--targets``) ``soft``,
uniform in [0, 1) (the default: every element needs both logarithms of the probability loss), or ``hard``,
0 or 1 with equal odds (labels as most classifiers have them; bcekit's probability loss then takes its
product form, ``src/cpp/fast_kernel.h``).

Per-call overhead: the n = 1024 row (2^10) is also printed on its own, in microseconds.

Peak extra memory of a step (``--memory-log2``, default 2^24; 0 skips it). For each (loss, dtype) and each
contender, a fresh ``python`` subprocess runs two forward+backward steps at 2^16 elements (imports, thread
pool, compilation for torch.compile: one-time costs that must not count), builds the inputs (and the leaf)
at the measured size, resets the kernel's high-water mark of its resident set (writing ``5`` to
``/proc/self/clear_refs``), reads the resident set (``VmRSS``), runs two steps and reads the high-water mark
(``VmHWM``, ``/proc/self/status``). The difference is the steps' peak memory beyond the inputs and whatever
was already resident, in MiB and as a multiple of the gradient's size (n times the item size): the ideal is
1x, the gradient only. The baseline is taken before the first step at that size, so memory a contender
keeps between steps (a buffer cache, say) counts; it is also shown on its own ("retained": ``VmRSS`` after
the steps minus before). Where ``clear_refs`` cannot be written, the child reads
``getrusage(RUSAGE_SELF).ru_maxrss`` instead (an upper bound where the warm-up peaked higher), and says so.
Only pages actually touched count, as in any RSS measurement; tensors of 2^24 elements are far above
glibc's mmap threshold, so their pages come and go with each allocation.

Outputs: Markdown tables (milliseconds and the ratios torch eager / bcekit, torch.compile / bcekit and
bcekit / floor) per (loss, dtype, pass), the machine description, ``cpu.json`` and ``cpu.png`` (time per
element against size, log-log, one panel per (loss, dtype, pass)) in ``--out``.

Option matrix (``--matrix``): what each option of the losses costs in a training step, at shapes N x C
(``--shapes``) where the options' broadcasting is real. For each shape and row, the forward+backward step
above (float32, hard targets, logits ``x ~ N(0, 1)``, probabilities ``sigmoid`` of those, ``mean``) of
bcekit, torch eager and torch.compile, interleaved in rounds as above (``--budget`` seconds per contender
per cell, default 1.0: thousands of steps at 64x16, a hundred or more at 1024x1024; the default matrix
takes about 2 minutes on 2 cores, 3 where Inductor's on-disk cache is cold: torch.compile's 27
compilations then take some 75 s).

* rows: logits plain, ``pos_weight`` (C,), ``weight`` (C,), ``weight`` (N, 1), ``label_smoothing=0.1``,
  ``ignore_index=-1.0`` (no target is -1, so nothing is ignored: what is timed is the cost of having the
  option on); probabilities plain, ``weight`` (C,), ``weight`` (N, 1). Weights are fixed tensors in
  [0.5, 1.5) from a seeded generator, the same on both sides.
* torch eager: the same ``torch.nn.functional`` calls. torch has neither option for these losses, so for
  those its side is the composition an engineer would write: smoothing
  ``F.binary_cross_entropy_with_logits(x, y * (1 - s) + s / 2)``; ignoring ``mask = y != ignore;``
  ``(F.binary_cross_entropy_with_logits(x, y, reduction="none") * mask).sum() / mask.sum()``.
* torch.compile: that torch function compiled per (row, shape) after ``torch._dynamo.reset()``,
  ``dynamic=False, fullgraph=True``: one graph each, specialised to its shape, the best case for Inductor.
  The warm-up call compiles, so compile time is not timed, and compiles in this process
  (``compile_threads = 1``): a pool of compile workers would still be starting up during the timed rounds.
* each cell: best and median in µs. The ratios eager / bcekit, compile / bcekit and the option cost
  (bcekit's row over bcekit's plain row of the same loss and shape) are headlined by the best, as the
  project's targets are stated ("best of many runs": on a shared machine the least disturbed run is the
  closest to what the code costs), the median follows in brackets.

Output: one Markdown table per shape, the machine description and ``matrix.json`` in ``--out`` (no NumPy,
floor, memory or plot).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import bcekit._native
from benchmarks._common import (
    DTYPES,
    LOSSES,
    PASSES,
    compile_loss,
    configure_dynamo,
    functions,
    panel_summary,
    plot,
    write_results,
)

Runner = Callable[[], object]

CONTENDERS = ("bcekit", "torch eager", "torch.compile", "numpy", "floor")
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red")


def _set_threads() -> int:
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable cpus": usable,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "bcekit ISA": bcekit._native.ISA,
        "torch threads": torch.get_num_threads(),
        "load average (1, 5, 15 min)": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def _inputs(
    loss: str, dtype: torch.dtype, n: int, hard: bool = False, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=generator)
    if loss == "probabilities":
        x = torch.sigmoid(x)
    y = torch.rand(n, generator=generator)
    return x.to(dtype), (torch.round(y) if hard else y).to(dtype)


def _torch_runner(function: Callable, x: torch.Tensor, y: torch.Tensor, leaf: torch.Tensor | None) -> Runner:
    if leaf is None:

        def forward() -> object:
            with torch.no_grad():
                return function(x, y)

        return forward

    def step() -> object:
        loss = function(leaf, y)
        loss.backward()
        leaf.grad = None  # optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def _numpy_runner(x: np.ndarray, y: np.ndarray, backward: bool, logits: bool) -> Runner:
    def run() -> object:
        if logits:
            loss = np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
            grad = (1 / (1 + np.exp(-x)) - y) / x.size if backward else None
        else:
            loss = -np.mean(y * np.maximum(np.log(x), -100) + (1 - y) * np.maximum(np.log1p(-x), -100))
            grad = (x - y) / np.maximum(x * (1 - x), 1e-12) / x.size if backward else None
        return loss, grad

    return run


def _floor_runner(x: torch.Tensor, y: torch.Tensor, backward: bool) -> Runner:
    if not backward:
        return lambda: torch.dot(x, y)
    out = torch.empty_like(x)
    return lambda: torch.add(x, y, out=out)


def _runners(
    loss: str, dtype: torch.dtype, backward: bool, x: torch.Tensor, y: torch.Tensor, compiled: Callable
) -> dict[str, Runner]:
    ours_fn, torch_fn = functions(loss)
    leaf = x.detach().clone().requires_grad_() if backward else None
    runners = {
        "bcekit": _torch_runner(ours_fn, x, y, leaf),
        "torch eager": _torch_runner(torch_fn, x, y, leaf),
        "torch.compile": _torch_runner(compiled, x, y, leaf),
    }
    if dtype == torch.float32:
        runners["numpy"] = _numpy_runner(x.numpy(), y.numpy(), backward, loss == "logits")
    runners["floor"] = _floor_runner(x, y, backward)
    return runners


def _time_rounds(
    runners: dict[str, Runner], budget: float, min_repeats: int, max_repeats: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """``({name: its timed runs, seconds}, {name: its warm-up, seconds})``. Each runner runs once as a
    warm-up, then all run in rounds until every one has min_repeats timed runs and the rounds have taken
    ``budget`` seconds per runner, or max_repeats rounds. In a round each runner is called twice in a row
    and only the second call is timed: the first settles what the previous contender left behind (its
    data in the caches, its spinning OpenMP threads), which would otherwise be billed to whoever runs
    next. Interleaving puts a contender's runs among the others', so a slow spell of the machine (a busy
    neighbour on a shared host) weighs on all alike and the ratios stay fair; timing one contender after
    another would charge it to whoever ran then."""
    warm_up = {}
    for name, run in runners.items():
        start = time.perf_counter()
        run()  # warm-up (and compilation for torch.compile)
        warm_up[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in runners}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_repeats and (
        rounds < min_repeats or time.perf_counter() - start < budget * len(runners)
    ):
        for name, run in runners.items():
            run()
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return times, warm_up


def _time_interleaved(
    runners: dict[str, Runner], budget: float, min_repeats: int, max_repeats: int
) -> dict[str, tuple[float, int, float]]:
    """``{name: (median ms, runs, warm-up seconds)}``, timed by :func:`_time_rounds`."""
    times, warm_up = _time_rounds(runners, budget, min_repeats, max_repeats)
    return {name: (statistics.median(t) * 1e3, len(t), warm_up[name]) for name, t in times.items()}


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b is not None else "-"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}" if value < 100 else f"{value:.1f}"


TABLE_HEAD = (
    f"| n | {' | '.join(CONTENDERS)} | eager / bcekit | compile / bcekit | bcekit / floor |\n"
    + "|---:" * (len(CONTENDERS) + 4)
    + "|"
)


def _format_row(row: dict) -> str:
    times = " | ".join(_ms(row.get(c)) for c in CONTENDERS)
    ratios = " | ".join(
        (
            _ratio(row.get("torch eager"), row["bcekit"]),
            _ratio(row.get("torch.compile"), row["bcekit"]),
            _ratio(row["bcekit"], row.get("floor")),
        )
    )
    return f"| 2^{row['n'].bit_length() - 1} | {times} | {ratios} |"


def measure(
    log2s: list[int], budget: float, min_repeats: int, max_repeats: int, hard: bool
) -> tuple[list, list]:
    rows, panels = [], []
    for loss in LOSSES:
        _, torch_fn = functions(loss)
        for dtype_name, dtype in DTYPES.items():
            for pass_ in PASSES:
                backward = pass_ == "fwd+bwd"
                torch._dynamo.reset()  # one fresh compilation per panel, shared by all its sizes
                graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                compiled = compile_loss(torch_fn)
                print(f"\n### {loss}, {dtype_name}, {pass_} (ms, median)\n\n{TABLE_HEAD}", flush=True)
                panel_start, compile_warm_up = time.perf_counter(), None
                for log2 in log2s:
                    x, y = _inputs(loss, dtype, 1 << log2, hard)
                    row = {"loss": loss, "dtype": dtype_name, "pass": pass_, "n": 1 << log2, "runs": {}}
                    timed = _time_interleaved(
                        _runners(loss, dtype, backward, x, y, compiled), budget, min_repeats, max_repeats
                    )
                    for name, (median, runs, warm_up) in timed.items():
                        row[name], row["runs"][name] = median, runs
                        if name == "torch.compile" and compile_warm_up is None:
                            compile_warm_up = warm_up
                    rows.append(row)
                    print(_format_row(row), flush=True)
                    del x, y
                    gc.collect()
                panels.append(
                    panel_summary(loss, dtype_name, pass_, graphs_before, compile_warm_up, panel_start)
                )
    return rows, panels


# The targets of issue 3, for float32 at 2^24 (forward+backward, mean) and the per-call overhead at 2^10.
TARGETS = (
    ("faster than torch eager", "torch eager", ">=", 10.0),
    ("faster than torch.compile", "torch.compile", ">=", 3.0),
    ("time relative to the floor", "floor", "<=", 2.5),
)


def _targets_table(rows: list[dict], targets: str) -> str:
    """The issue's targets against this run: at 2^24 (or the largest size measured, if smaller), float32
    forward+backward, the three ratios per loss; at 2^10 forward+backward, bcekit against torch eager."""
    lines = [
        f"### Targets (float32, forward+backward, mean, {targets} targets)\n",
        "| loss | n | target | required | measured | met |",
        "|---|---|---|---|---:|---|",
    ]
    for loss in LOSSES:
        cells = [r for r in rows if r["loss"] == loss and r["dtype"] == "float32" and r["pass"] == "fwd+bwd"]
        if not cells:
            continue
        big = max((r for r in cells if r["n"] <= 1 << 24), key=lambda r: r["n"], default=None)
        if big is not None:
            for label, other, sense, bound in TARGETS:
                if other not in big:
                    continue
                ratio = big[other] / big["bcekit"] if sense == ">=" else big["bcekit"] / big[other]
                met = ratio >= bound if sense == ">=" else ratio <= bound
                lines.append(
                    f"| {loss} | 2^{big['n'].bit_length() - 1} | {label} | {sense} {bound:g}x | "
                    f"{ratio:.2f}x | {'yes' if met else 'no'} |"
                )
        small = next((r for r in cells if r["n"] == 1024), None)
        if small is not None:
            ours, theirs = small["bcekit"] * 1e3, small["torch eager"] * 1e3
            lines.append(
                f"| {loss} | 2^10 | per-call time, bcekit vs torch eager | <= eager | "
                f"{ours:.1f} vs {theirs:.1f} µs | {'yes' if ours <= theirs else 'no'} |"
            )
    return "\n".join(lines) if len(lines) > 3 else ""


def _overhead_table(rows: list[dict]) -> str:
    selected = [r for r in rows if r["n"] == 1024]
    if not selected:
        return ""
    lines = [
        "### n = 1024: per-call overhead (µs, median)\n",
        f"| loss | dtype | pass | {' | '.join(CONTENDERS)} |",
        "|---" * 3 + "|---:" * len(CONTENDERS) + "|",
    ]
    for r in selected:
        cells = " | ".join("-" if c not in r else f"{r[c] * 1e3:.1f}" for c in CONTENDERS)
        lines.append(f"| {r['loss']} | {r['dtype']} | {r['pass']} | {cells} |")
    return "\n".join(lines)


# --- peak extra memory of a forward+backward step, one fresh subprocess per contender ---------------------


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _memory_child(loss: str, dtype_name: str, contender: str, log2: int) -> None:
    """Runs in a fresh interpreter; prints one JSON line with the steps' peak extra resident memory."""
    _set_threads()
    configure_dynamo()
    dtype, n = DTYPES[dtype_name], 1 << log2
    _, torch_fn = functions(loss)
    compiled = compile_loss(torch_fn) if contender == "torch.compile" else None
    x, y = _inputs(loss, dtype, 1 << 16)  # warm-up at a small size: imports, thread pool, compilation
    step = _runners(loss, dtype, True, x, y, compiled)[contender]
    for _ in range(2):
        step()
    del x, y, step
    x, y = _inputs(loss, dtype, n)
    step = _runners(loss, dtype, True, x, y, compiled)[contender]
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (an upper bound: includes the warm-up's peak if higher)"
    rss_before = _proc_status_kib("VmRSS")
    for _ in range(2):
        step()
    if method.startswith("VmHWM"):
        peak_kib = _proc_status_kib("VmHWM")
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    retained_kib = _proc_status_kib("VmRSS") - rss_before
    result = {"peak_extra_kib": peak_kib - rss_before, "retained_kib": retained_kib, "method": method}
    print(json.dumps(result))


def measure_memory(log2: int) -> list[dict]:
    results = []
    for loss in LOSSES:
        for dtype_name, dtype in DTYPES.items():
            gradient_bytes = (1 << log2) * torch.empty((), dtype=dtype).element_size()
            for contender in CONTENDERS:
                if contender == "numpy" and dtype != torch.float32:
                    continue
                code = (
                    "from benchmarks.cpu import _memory_child; "
                    f"_memory_child({loss!r}, {dtype_name!r}, {contender!r}, {log2})"
                )
                done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
                if done.returncode != 0:
                    failed = f"{loss}, {dtype_name}, {contender}"
                    raise RuntimeError(f"memory child {failed} failed:\n{done.stderr}")
                child = json.loads(done.stdout.strip().splitlines()[-1])
                extra, retained = child["peak_extra_kib"] * 1024, child["retained_kib"] * 1024
                result = {
                    "loss": loss,
                    "dtype": dtype_name,
                    "contender": contender,
                    "n": 1 << log2,
                    "peak_extra_mib": extra / 2**20,
                    "gradient_mib": gradient_bytes / 2**20,
                    "multiple_of_gradient": extra / gradient_bytes,
                    "retained_mib": retained / 2**20,
                    "method": child["method"],
                }
                results.append(result)
                print(
                    f"| {loss} | {dtype_name} | {contender} | {result['peak_extra_mib']:.1f} | "
                    f"{result['multiple_of_gradient']:.2f} | {result['retained_mib']:.1f} |",
                    flush=True,
                )
    return results


# --- option matrix: a training step per (shape, loss, option) ---------------------------------------------

MATRIX_CONTENDERS = ("bcekit", "torch eager", "torch.compile")
MATRIX_SHAPES = "64x16,256x128,1024x1024"
SMOOTHING, IGNORE = 0.1, -1.0
MATRIX_ROWS = (
    ("logits", "plain"),
    ("logits", "pos_weight (C,)"),
    ("logits", "weight (C,)"),
    ("logits", "weight (N, 1)"),
    ("logits", f"label_smoothing={SMOOTHING}"),
    ("logits", f"ignore_index={IGNORE}"),
    ("probabilities", "plain"),
    ("probabilities", "weight (C,)"),
    ("probabilities", "weight (N, 1)"),
)

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"64x16,256x128"`` -> ``[(64, 16), (256, 128)]``."""
    shapes = []
    for item in text.split(","):
        n, c = (int(v) for v in item.strip().lower().split("x"))
        shapes.append((n, c))
    return shapes


@dataclass(frozen=True)
class MatrixCase:
    """One row of the matrix at one shape: its inputs and each side's loss as a function of ``(x, y)``."""

    loss: str
    option: str
    x: torch.Tensor
    y: torch.Tensor
    bcekit: Loss
    eager: Loss


def _matrix_pair(loss: str, option: str, n: int, c: int, generator: torch.Generator) -> tuple[Loss, Loss]:
    """``(bcekit's loss, torch's equivalent)`` for a row; the weights are fixed tensors in [0.5, 1.5)."""
    ours_fn, torch_fn = functions(loss)
    if option == "plain":
        return ours_fn, torch_fn
    if option.startswith("label_smoothing"):

        def smoothed(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch_fn(x, y * (1 - SMOOTHING) + SMOOTHING / 2)

        return lambda x, y: ours_fn(x, y, label_smoothing=SMOOTHING), smoothed
    if option.startswith("ignore_index"):

        def ignoring(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            mask = y != IGNORE
            return (torch_fn(x, y, reduction="none") * mask).sum() / mask.sum()

        return lambda x, y: ours_fn(x, y, ignore_index=IGNORE), ignoring
    name, shape = option.split(" ", 1)  # "weight (C,)", "pos_weight (N, 1)"
    tensor = torch.rand((c,) if shape == "(C,)" else (n, 1), generator=generator) + 0.5

    def ours(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ours_fn(x, y, **{name: tensor})

    def eager(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch_fn(x, y, **{name: tensor})

    return ours, eager


def matrix_cases(n: int, c: int, seed: int = 0) -> list[MatrixCase]:
    """Every row at shape ``(n, c)``: float32, hard 0/1 targets; the rows of a loss share its inputs."""
    inputs = {
        loss: tuple(t.reshape(n, c) for t in _inputs(loss, torch.float32, n * c, hard=True, seed=seed))
        for loss in LOSSES
    }
    generator = torch.Generator().manual_seed(seed + 1)
    return [
        MatrixCase(loss, option, *inputs[loss], *_matrix_pair(loss, option, n, c, generator))
        for loss, option in MATRIX_ROWS
    ]


def _us(value: float) -> str:
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _pair(values: dict | None) -> str:
    """``"best (median)"`` of a ratio, or ``-``."""
    return "-" if values is None else f"{values['min']:.2f} ({values['median']:.2f})"


MATRIX_HEAD = (
    f"| loss | option | {' | '.join(MATRIX_CONTENDERS)} | eager / bcekit | compile / bcekit | option cost "
    "| runs |\n|---|---" + "|---:" * (len(MATRIX_CONTENDERS) + 4) + "|"
)


def _matrix_line(row: dict) -> str:
    times = " | ".join(
        f"{_us(row['us'][c]['min'])} / {_us(row['us'][c]['median'])}" if c in row["us"] else "-"
        for c in MATRIX_CONTENDERS
    )
    ratios = " | ".join(
        _pair(row.get(key)) for key in ("eager_over_bcekit", "compile_over_bcekit", "option_cost")
    )
    return f"| {row['loss']} | {row['option']} | {times} | {ratios} | {row['us']['bcekit']['runs']} |"


def _over(a: dict | None, b: dict) -> dict | None:
    return None if a is None else {k: a[k] / b[k] for k in ("min", "median")}


def measure_matrix(
    shapes: list[tuple[int, int]],
    budget: float,
    min_repeats: int,
    max_repeats: int,
    contenders: tuple[str, ...] = MATRIX_CONTENDERS,
) -> list[dict]:
    """One row per (shape, loss, option): each contender's training step in µs (best, median, runs) and the
    ratios eager / bcekit, compile / bcekit and option cost (bcekit's time over its plain row's), each as
    best and median. The contenders run interleaved per cell, by :func:`_time_rounds`."""
    rows = []
    for n, c in shapes:
        print(
            f"\n### {n}x{c} (N x C, {n * c} elements): training step, float32, hard targets, mean; "
            "µs best / median; ratios best (median)\n\n" + MATRIX_HEAD,
            flush=True,
        )
        plain: dict[str, dict] = {}
        for case in matrix_cases(n, c):
            leaf = case.x.detach().clone().requires_grad_()
            functions_ = {"bcekit": case.bcekit, "torch eager": case.eager}
            graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            if "torch.compile" in contenders:
                torch._dynamo.reset()  # one compilation per (row, shape), shape-specialised
                functions_["torch.compile"] = torch.compile(case.eager, dynamic=False, fullgraph=True)
            runners = {name: _torch_runner(functions_[name], case.x, case.y, leaf) for name in contenders}
            times, warm_up = _time_rounds(runners, budget, min_repeats, max_repeats)
            us = {
                name: {
                    "min": min(t) * 1e6,
                    "median": statistics.median(t) * 1e6,
                    "runs": len(t),
                    "warm_up_s": round(warm_up[name], 3),
                }
                for name, t in times.items()
            }
            if case.option == "plain":
                plain[case.loss] = us["bcekit"]
            row = {
                "shape": f"{n}x{c}",
                "n": n,
                "c": c,
                "loss": case.loss,
                "option": case.option,
                "us": us,
                "eager_over_bcekit": _over(us.get("torch eager"), us["bcekit"]),
                "compile_over_bcekit": _over(us.get("torch.compile"), us["bcekit"]),
                "option_cost": _over(us["bcekit"], plain[case.loss]),
                "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before,
            }
            rows.append(row)
            print(_matrix_line(row), flush=True)
        gc.collect()
    return rows


def matrix_main(arguments: argparse.Namespace, info: dict, started: float) -> None:
    shapes = parse_shapes(arguments.shapes)
    # Compile in this process: a pool of compile workers would start importing torch in the background
    # during the first cell's timed rounds and bill its CPU time to whichever contender runs then.
    torch._inductor.config.compile_threads = 1
    print(
        f"\ntorch.set_num_threads(os.cpu_count()) = {torch.get_num_threads()} for every contender. "
        f"Option matrix: one training step per cell, at least {arguments.min_repeats} runs and "
        f"{arguments.budget} s per contender per cell, at most {arguments.max_repeats} runs; torch.compile "
        "compiled once per (row, shape), dynamic=False, fullgraph=True, compile time excluded.",
        flush=True,
    )
    rows = measure_matrix(shapes, arguments.budget, arguments.min_repeats, arguments.max_repeats)
    wall = write_results(arguments, info, started, "matrix", rows=rows)
    print(f"\nwrote {arguments.out / 'matrix.json'}; wall time {wall:.0f} s")


# --- plot ------------------------------------------------------------------------------------------------


def _subtitle(info: dict) -> str:
    return f"{info['cpu model']} ({info['machine']}), {info['torch threads']} threads, torch {info['torch']}"


def replot(path: Path) -> None:
    """Redraw ``cpu.png`` beside a saved ``cpu.json`` without measuring again."""
    data = json.loads(path.read_text())
    if isinstance(data, list):  # the older format: rows only
        plot(data, path.with_suffix(".png"), CONTENDERS, COLORS, "bcekit CPU benchmark")
    else:
        plot(
            data["rows"],
            path.with_suffix(".png"),
            CONTENDERS,
            COLORS,
            "bcekit CPU benchmark",
            _subtitle(data["machine"]),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-log2", type=int, default=10)
    parser.add_argument("--max-log2", type=int, default=26)
    parser.add_argument("--step", type=int, default=1, help="step between exponents (default 1)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timed runs per cell, at least")
    parser.add_argument("--min-repeats", type=int, help="default 3; --matrix: 5")
    parser.add_argument("--max-repeats", type=int, help="default 200; --matrix: 100000")
    parser.add_argument(
        "--memory-log2", type=int, default=24, help="size 2^k of the peak-memory measurement; 0 skips it"
    )
    parser.add_argument(
        "--targets", choices=("soft", "hard"), default="soft", help="uniform in [0, 1) or 0/1 labels"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--matrix", action="store_true", help="the option matrix instead: a training step per (shape, option)"
    )
    parser.add_argument(
        "--shapes", default=MATRIX_SHAPES, help=f"--matrix: N x C shapes (default {MATRIX_SHAPES})"
    )
    arguments = parser.parse_args()
    matrix = arguments.matrix
    defaults = (5, 100_000) if matrix else (3, 200)  # --matrix: its small shapes need thousands of runs
    for name, default in zip(("min_repeats", "max_repeats"), defaults, strict=True):
        if getattr(arguments, name) is None:
            setattr(arguments, name, default)
    # Each JSON records its own mode's settings only (write_results writes them all).
    unused = ("min_log2", "max_log2", "step", "memory_log2", "targets") if matrix else ("shapes",)
    for name in (*unused, "matrix"):
        delattr(arguments, name)

    started = time.perf_counter()
    threads = _set_threads()
    configure_dynamo()
    info = machine()
    print("## Machine\n")
    for key, value in info.items():
        print(f"- {key}: {value}")
    if matrix:
        matrix_main(arguments, info, started)
        return
    print(
        f"\ntorch.set_num_threads(os.cpu_count()) = {threads} for every contender (NumPy: single-threaded). "
        f"Milliseconds, median of runs after a warm-up: at least {arguments.min_repeats} runs and "
        f"{arguments.budget} s per cell, at most {arguments.max_repeats} runs. Targets: {arguments.targets}.",
        flush=True,
    )
    log2s = list(range(arguments.min_log2, arguments.max_log2 + 1, arguments.step))
    hard = arguments.targets == "hard"
    rows, panels = measure(log2s, arguments.budget, arguments.min_repeats, arguments.max_repeats, hard)
    overhead = _overhead_table(rows)
    if overhead:
        print(f"\n{overhead}")
    targets = _targets_table(rows, arguments.targets)
    if targets:
        print(f"\n{targets}")

    memory = []
    if arguments.memory_log2 > 0:
        print(
            f"\n### Peak extra memory of one forward+backward step, n = 2^{arguments.memory_log2} "
            "(fresh subprocess per contender)\n\n"
            "| loss | dtype | contender | peak extra MiB | × gradient | retained MiB |\n"
            "|---|---|---|---:|---:|---:|",
            flush=True,
        )
        memory = measure_memory(arguments.memory_log2)
        methods = sorted({m["method"] for m in memory})
        print(f"\nmethod: {', '.join(methods)}; gradient = n × item size")

    wall = write_results(arguments, info, started, "cpu", panels=panels, rows=rows, memory=memory)
    plot(rows, arguments.out / "cpu.png", CONTENDERS, COLORS, "bcekit CPU benchmark", _subtitle(info))
    print(f"\nwrote {arguments.out / 'cpu.json'} and {arguments.out / 'cpu.png'}; wall time {wall:.0f} s")


if __name__ == "__main__":
    main()
