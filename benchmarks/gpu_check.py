"""End-to-end check of bcekit's GPU path in one command: parity with torch, accuracy, torch.compile, CUDA
graphs, no host synchronisation, autocast, speed against torch and a bandwidth floor, the fused linear loss.

Run from the repository root on a machine with one NVIDIA GPU (nothing is downloaded at run time)::

    python -m benchmarks.gpu --check [--dry-run] [--out DIR] [--budget-s SECONDS] [--sections NAME ...]

(``python -m benchmarks.gpu_check`` takes the same arguments.) It writes ``gpu_check.json`` into ``--out``
(default ``benchmarks/results``; a temporary folder in a dry run), prints one Markdown table on stdout and
progress lines on stderr, and exits with status 0 only if every section it ran passed (1 otherwise, 2
without CUDA). ``--sections`` runs only the sections named (say, a rerun of those that failed).

Sections. Each is timed and runs in turn whatever the others did. A section is ``passed`` when every check
it ran held, ``failed`` when one did not (the JSON lists each failure), ``error`` when an exception escaped
it (its traceback is in the JSON), and ``skipped`` when its budget left it nothing to run. Within a
section each cell (a parity case, a benchmark cell, ...) catches its own exceptions as failures, so one bad
cell does not hide the rest.

* ``environment``: the device name, torch, CUDA and Triton versions, ``bcekit.torch._triton.describe()``.
  Fails when bcekit would not run its Triton kernels: Triton missing, or interpreted on a GPU (compiled in
  a dry run, where it must be interpreted).
* ``parity``: bcekit's two losses against torch's on the device, every dtype (float32, bfloat16, float16,
  float64), reduction, weight form (absent, ``()``, ``(C,)``, ``(N, 1)``, ``(N, C)``) and pos_weight form
  (absent, ``(C,)``, ``(N, 1)``), on a ``(257, 33)`` input (several programs of every dtype's block):
  the loss and its input and target gradients (``torch.autograd.grad``, grad_output 0.75 or, for
  ``'none'``, one value per element in [0.5, 1.5]), then the plain training step (``loss.backward()``,
  or ``loss.sum().backward()`` for ``'none'``, target not requiring a gradient: the fused pass). The
  reference is torch's own function in float64 on the same rounded inputs. An element passes when
  ``|got - ref| <= rtol * max(|ref|, floor * typical)`` (:data:`TOLERANCES`, per dtype), ``typical`` the
  median magnitude of the tensor's finite non-zero reference values (which the few huge gradients at
  exact 0 and 1 do not move): elements far below it, where torch's float64 loss or a float32 gradient
  cancels and float16 turns subnormal, get an absolute test. Where the reference rounded to the dtype is
  not finite (an overflow of float16), the result must be that same value. Every case must launch
  bcekit's kernels (else it took the composed path). The options: ``label_smoothing`` (torch's target
  ``y (1 - s) + s / 2``) and ``ignore_index`` (0, and NaN with NaN targets; torch's loss of the kept
  elements, the mean over their count, zero gradients on the others). Cases run in an order that covers
  every dtype, reduction and form of each loss first, then each option (the dtypes in turn), then every
  option with every dtype and the rest of the full product, so that a budget that runs out still leaves
  each form and option tested. Also the probability loss's range check: an input of 1.5 (and a target of
  -0.5) raises torch's error exactly once, at the call or at ``bcekit.torch.check_errors()``, a second
  ``check_errors()`` does not raise, and with ``set_sync_checks(True)`` the error raises at the call.
* ``accuracy``: float32 per-element losses of both losses on the device against mpmath
  (``tests/_reference.py``), max ulp error per loss; the contract is <= 4 ulp (targets in [0, 1],
  ``pos_weight >= 0``). 2000 points per loss: logits of magnitude log-uniform in [1e-30, 110] with both
  signs, half of them with a pos_weight uniform in [0, 4]; probabilities uniform, log-uniform down to 1e-38
  and 1 - log-uniform; targets 0, 1, 0.5 and uniform.
* ``compile``: a training step of both losses with a per-class weight (the forward compiled with
  ``torch.compile(fullgraph=True)``, its backward by AOTAutograd) against eager bcekit, twice on new data;
  then ``mode="reduce-overhead"`` (CUDA graphs) over four steps (``torch._dynamo.reset()`` between). The
  JSON records the graphs compiled and the steps inductor refused to run as CUDA graphs.
* ``cuda_graph``: each loss's forward and backward (``torch.autograd.grad`` into static outputs) captured
  in a ``torch.cuda.CUDAGraph`` after a warm-up on a side stream, replayed three times with new data
  copied into the static inputs, against eager bcekit on that data.
* ``no_sync``: a training step of each loss (mean, float32, a pos_weight for logits), warmed up once,
  under ``torch.cuda.set_sync_debug_mode("error")``: it must not synchronise; its results are checked after.
* ``autocast``: under ``torch.autocast("cuda", dtype=torch.bfloat16)``, bcekit's losses of bfloat16 inputs
  are float32 and match torch's float32 results (and their gradients).
* ``benchmark``: a training step ``loss = f(leaf, y); loss.backward(); leaf.grad = None`` (mean) of each
  loss, float32 and bfloat16, at 2^20, 2^24 and 2^28 elements: bcekit, torch eager, torch.compile (of
  torch's function, ``dynamic=False, fullgraph=True``) and the floor ``torch.add(x, y, out=g)``, which
  reads two tensors and writes one: the bytes of an ideal fused step. Timed as ``benchmarks/gpu.py`` does
  (its ``Backend``: CUDA events, a warm-up call, the median of samples of back-to-back calls lasting about
  1 ms). Ratios: ``bcekit / floor BW`` (floor time / bcekit time: the fraction of the floor's bandwidth),
  ``eager / bcekit``, ``compile / bcekit``. The targets, marked met or missed (they do not fail the
  section): ``bcekit / floor BW >= 0.85`` at 2^28, ``eager / bcekit >= 4`` and ``compile / bcekit >= 1.5``
  at 2^24. Then a sweep of ``bcekit.torch._triton.CONFIGS`` (block 512..4096 by warps 4, 8; restored after)
  at 2^28 and 2^24 for float32 and bfloat16, both losses; the best config per dtype is the one with the
  lowest mean time relative to the current config over the cells that one measured.
* ``linear``: ``bcekit.torch.linear_binary_cross_entropy_with_logits`` at N = 8192, D = 1024, C = 2^20,
  bfloat16, forward and backward, with a sparse COO target (8 labels per row, value 1: the function reads
  its stored entries only; the dense target alone would be 16 GiB), against the unfused
  ``F.binary_cross_entropy_with_logits(x @ W.T, y_dense)``: time and peak memory beyond what was allocated
  before (``torch.cuda.max_memory_allocated()``); ``OOM`` when the unfused step does not fit. The losses
  must agree (bfloat16's tolerance) and so must the input gradients (normwise, within 5%). Targets (met or
  missed): fused peak <= 10% of the unfused one, fused time <= 1.1x the unfused one.

Time budget. The sections' budgets (:data:`BUDGET_S`) add up to 7 minutes; ``--budget-s`` scales them to
another total. Time a section leaves unused goes to the next one, and time it overruns is taken from the
next (which keeps at least half its own), so the whole run keeps close to the total. A section starts no
new cell once its budget is spent and records the cells it left as ``skipped: budget`` (a cell that has
started runs to its end, so a section can overrun by one cell; Triton's and inductor's first compilations
are the slow cells). Compilation is kept to few graphs: one forward graph (and its backward) per mode in
``compile``, one per (loss, dtype, size) for the torch.compile contender.

Dry run (``--dry-run``): every section's code on CPU tensors at tiny sizes (the parity input ``(23, 47)``,
the covering and option cases only; 2^8, 2^9, 2^10 elements for the benchmark and two configs in its
sweep; the linear loss at N = 64, D = 16, C = 256), in under a minute on two cores: a check of the script,
whose numbers mean nothing.
Triton's interpreter runs the kernels (``TRITON_INTERPRET=1`` is set before Triton is imported; where it
was imported already, as ``python -m benchmarks.gpu`` does, the check reruns itself in a fresh process) on
CPU tensors, which ``bcekit.torch._kernel._TRITON_ON_CPU`` sends down the branch CUDA tensors take. Stand-ins
for what needs CUDA: ``time.perf_counter`` for events, the step run directly for a graph replay (the same
static-tensor copy-in and comparison), no sync debug mode, zero memory numbers, CPU autocast, plain
``torch.compile()`` for ``reduce-overhead``, and the ``aot_eager`` backend for the torch.compile
contender (dynamo and AOTAutograd without inductor's code generation, which the ``compile`` section runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # imported lazily: bcekit (and Triton) must come after TRITON_INTERPRET is set
    from benchmarks.gpu import Backend

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
#: Seconds per section on a GPU, 7 minutes in all; ``--budget-s`` scales them to its total.
BUDGET_S = {
    "environment": 5.0,
    "parity": 110.0,
    "accuracy": 20.0,
    "compile": 60.0,
    "cuda_graph": 15.0,
    "no_sync": 10.0,
    "autocast": 15.0,
    "benchmark": 150.0,
    "linear": 35.0,
}
#: The benchmark's main cells stop at this fraction of its budget; the block-size sweep gets the rest.
MAIN_CELLS_SHARE = 0.65

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
LOSSES = ("logits", "probabilities")
REDUCTIONS = ("none", "mean", "sum")
#: Weight shapes for an ``(N, C)`` input, by broadcast form (None: no weight).
WEIGHT_FORMS = ("absent", "scalar", "per-class", "per-row", "full")
POS_WEIGHT_FORMS = ("absent", "per-class", "per-row")
#: The bcekit-only options, each with the reduction it is checked with.
OPTIONS: tuple[tuple[tuple[tuple[str, float], ...], str], ...] = (
    ((("label_smoothing", 0.1),), "mean"),
    ((("ignore_index", 0.0),), "mean"),
    ((("ignore_index", math.nan),), "sum"),
    ((("label_smoothing", 0.1), ("ignore_index", 0.0)), "none"),
)
#: ``(rtol, floor)`` per dtype: an element passes when ``|got - ref| <= rtol * max(|ref|, floor * typical)``,
#: ``typical`` the median of the tensor's finite non-zero ``|ref|`` (:func:`compare`). rtol: float64 and
#: float32 a few rounding errors of the computation; half types a few ulp of the dtype (bfloat16's eps is
#: 2^-7, float16's 2^-10).
TOLERANCES = {
    "float64": (1e-12, 1e-2),
    "float32": (1e-5, 0.1),
    "bfloat16": (2e-2, 0.2),
    "float16": (4e-3, 0.25),
}
MAX_ULP = 4.0
GRAD_OUTPUT = 0.75
#: The performance targets: (ratio, where it is measured: the size's role, the target).
TARGETS = (
    ("bcekit / floor BW", "bandwidth", 0.85),
    ("eager / bcekit", "speed-up", 4.0),
    ("compile / bcekit", "speed-up", 1.5),
)
LINEAR_TARGETS = {"memory ratio": 0.10, "time ratio": 1.1}
CONTENDERS = ("bcekit", "torch eager", "torch.compile", "floor")
SWEEP_BLOCKS = (512, 1024, 2048, 4096)
SWEEP_WARPS = (4, 8)
NO_CUDA = (
    "benchmarks.gpu --check needs a CUDA GPU: torch.cuda.is_available() is False here (torch {version}, "
    "built with CUDA {cuda}). Run it on a machine with an NVIDIA GPU, or add --dry-run to check the script."
)

#: Failures a section prints on stderr (the JSON has them all).
PRINTED_FAILURES = 10

_started = time.perf_counter()


def progress(message: str) -> None:
    print(f"[gpu-check {time.perf_counter() - _started:6.1f} s] {message}", file=sys.stderr, flush=True)


# --- settings ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Sizes and timing of a run: the GPU's, or the dry run's tiny ones."""

    dry_run: bool
    out: Path
    budget_scale: float
    sections: tuple[str, ...]
    parity_shape: tuple[int, int]
    full_product: bool
    accuracy_points: int
    step_shape: tuple[int, int]  # compile, cuda_graph, no_sync, autocast
    #: benchmark sizes as log2: (small, where the speed-up targets are, where the bandwidth target is)
    benchmark_log2s: tuple[int, int, int]
    sweep_log2s: tuple[int, ...]
    sweep_configs: tuple[tuple[int, int], ...]
    cell_budget_s: float
    min_repeats: int
    max_repeats: int
    linear_shape: tuple[int, int, int]  # N, D, C
    labels_per_row: int

    @staticmethod
    def of(arguments: argparse.Namespace) -> Settings:
        dry = arguments.dry_run
        out = arguments.out
        if out is None:
            out = (
                Path(tempfile.mkdtemp(prefix="bcekit-gpu-check-dry-run-"))
                if dry
                else Path("benchmarks/results")
            )
        configs = tuple((block, warps) for block in SWEEP_BLOCKS for warps in SWEEP_WARPS)
        return Settings(
            dry_run=dry,
            out=out,
            budget_scale=arguments.budget_s / sum(BUDGET_S.values()),
            sections=tuple(s for s in SECTIONS if s in arguments.sections),
            parity_shape=(23, 47) if dry else (257, 33),
            full_product=not dry,
            accuracy_points=2000,
            step_shape=(41, 53) if dry else (257, 33),
            benchmark_log2s=(8, 9, 10) if dry else (20, 24, 28),
            sweep_log2s=(10,) if dry else (28, 24),
            sweep_configs=((512, 4), (2048, 8)) if dry else configs,
            cell_budget_s=0.0 if dry else 0.1,
            min_repeats=1 if dry else 5,
            max_repeats=1 if dry else 200,
            linear_shape=(64, 16, 256) if dry else (8192, 1024, 1 << 20),
            labels_per_row=4 if dry else 8,
        )


# --- where it runs: the GPU, or CPU stand-ins for --dry-run ----------------------------------------------


class Device:
    """``benchmarks.gpu.Backend`` (timing with CUDA events, synchronisation, memory statistics) and the other
    CUDA-only pieces the check needs, each with its CPU stand-in for ``--dry-run``."""

    def __init__(self, dry_run: bool) -> None:
        from benchmarks.gpu import Backend

        self.dry_run = dry_run
        self.backend: Backend = Backend(dry_run)
        self.device = self.backend.device

    def sync(self) -> None:
        self.backend.sync()

    def free(self) -> None:
        """``gc.collect()`` and the allocator's free blocks back (``Backend.free``): after a section, or a
        cell that raised (its traceback's frames hold its tensors)."""
        self.backend.free()

    def release(self) -> None:
        """The allocator's free blocks back, between cells. No ``gc.collect()``: a cell's tensors are freed
        when it is deleted (they are in no reference cycle), and a collection takes about 0.4 s once
        torch.compile has run (measured on the dry run's 2-core CPU), a cost per cell."""
        if not self.dry_run:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def time(self, run: Callable[[], object], settings: Settings) -> dict:
        return self.backend.time(run, settings.cell_budget_s, settings.min_repeats, settings.max_repeats)

    def memory_probe(self, step: Callable[[], object]) -> tuple[int, int]:
        """(peak bytes beyond those allocated before, bytes still left) of one step (0, 0 on CPU)."""
        return self.backend.memory_probe(step)

    def sync_debug_error(self) -> contextlib.AbstractContextManager:
        """Every host synchronisation raises inside (``torch.cuda.set_sync_debug_mode("error")``)."""
        return _sync_debug_error() if not self.dry_run else contextlib.nullcontext()

    def autocast(self) -> torch.autocast:
        return torch.autocast("cpu" if self.dry_run else "cuda", dtype=torch.bfloat16)

    def reduce_overhead(self) -> dict[str, str]:
        """torch.compile's arguments for CUDA graphs (nothing on CPU, which has none)."""
        return {} if self.dry_run else {"mode": "reduce-overhead"}

    def mark_step(self) -> None:
        """A new iteration for torch.compile's CUDA graphs (their outputs of the last one may be reused)."""
        if not self.dry_run:
            torch.compiler.cudagraph_mark_step_begin()

    def capture(
        self, step: Callable[[], tuple[Tensor, ...]]
    ) -> tuple[tuple[Tensor, ...], Callable[[], None]]:
        """``(static outputs, replay)`` of ``step`` captured in a CUDA graph after a warm-up on a side
        stream (torch's recipe); on CPU ``replay`` runs the step and copies its results into the outputs."""
        if self.dry_run:
            outputs = step()

            def replay() -> None:
                fresh = step()
                with torch.no_grad():
                    for static, new in zip(outputs, fresh, strict=True):
                        static.copy_(new)

            return outputs, replay
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = step()
        return outputs, graph.replay


@contextlib.contextmanager
def _sync_debug_error() -> Iterator[None]:
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


class Launches:
    """Counts the Triton kernel launches (``bcekit.torch._triton._launch``, which every launch goes
    through): a call that launched none took the composed path, not the kernels."""

    def __init__(self) -> None:
        from bcekit.torch import _triton

        self.count = 0
        self._module = _triton
        self._original = _triton._launch

        def counting(kernel, grid, *args: Any, **kwargs: Any) -> None:
            self.count += 1
            self._original(kernel, grid, *args, **kwargs)

        _triton._launch = counting

    def restore(self) -> None:
        self._module._launch = self._original


@dataclass
class Check:
    """What every section gets: the settings, the device, bcekit's torch module and the launch counter."""

    settings: Settings
    device: Device
    bce: Any
    launches: Launches

    @property
    def on(self) -> torch.device:
        return self.device.device


# --- sections: records, budgets -------------------------------------------------------------------------


class Section:
    """One section's record: its budget and the cells it skipped for it, its failures and its results."""

    def __init__(self, name: str, budget_s: float) -> None:
        self.name = name
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self.failures: list[str] = []
        self.skipped: list[str] = []
        self.cells = 0
        self.results: dict[str, Any] = {}
        self.summary = ""

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self, share: float = 1.0) -> bool:
        """Whether ``share`` of the budget is spent."""
        return self.elapsed() >= self.budget_s * share

    def cell(self, name: str, share: float = 1.0) -> bool:
        """Whether cell ``name`` may start (``share``: of the budget it may start within); a cell that may
        not is recorded as skipped."""
        if self.spent(share):
            self.skipped.append(f"{name}: skipped: budget")
            return False
        self.cells += 1
        return True

    def fail(self, message: str) -> None:
        self.failures.append(message)
        if len(self.failures) <= PRINTED_FAILURES:
            progress(f"{self.name}: FAILED {message}")
        elif len(self.failures) == PRINTED_FAILURES + 1:
            progress(f"{self.name}: more failures, not printed: see the JSON")

    def status(self, error: str | None) -> str:
        if error is not None:
            return "error"
        if self.failures:
            return "failed"
        return "skipped" if self.skipped and not self.cells else "passed"


def _cell_error(error: BaseException) -> str:
    from benchmarks.gpu import _error_text

    return _error_text(error)


def run_section(name: str, function: Callable[[Section, Check], None], check: Check, budget: float) -> dict:
    section = Section(name, budget)
    progress(f"{name}: start (budget {budget:.0f} s)")
    launches_before = check.launches.count
    error = None
    try:
        function(section, check)
    except Exception as exception:
        error = "".join(traceback.format_exception(exception)).strip()
        progress(f"{name}: ERROR {type(exception).__name__}: {exception}")
    finally:
        check.device.free()
    status = section.status(error)
    record = {
        "status": status,
        "wall_s": round(section.elapsed(), 2),
        "budget_s": round(budget, 1),
        "summary": section.summary,
        "cells": section.cells,
        "failures": section.failures,
        "skipped": section.skipped,
        "error": error,
        "kernel_launches": check.launches.count - launches_before,
        **section.results,
    }
    progress(f"{name}: {status} in {record['wall_s']:.1f} s")
    return record


# --- inputs and comparisons -----------------------------------------------------------------------------


def _data(
    loss: str, dtype: torch.dtype, shape: tuple[int, ...], seed: int, device: torch.device, nan_targets=False
) -> tuple[Tensor, Tensor]:
    """Inputs and targets: logits ~ N(0, 3^2) with some 0 and ±30, or probabilities uniform in (0, 1) with
    some exact 0 and 1; soft targets with a third exactly 0 or 1 (and some NaN with ``nan_targets``)."""
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    if loss == "logits":
        x = rng.normal(0.0, 3.0, n)
        x[::97] = 0.0
        x[5::89] = 30.0
        x[11::83] = -30.0
    else:
        x = rng.uniform(0.0, 1.0, n)
        x[::97] = 0.0
        x[5::89] = 1.0
    y = rng.random(n)
    y[::3] = np.round(y[::3])
    if nan_targets:
        y[1::7] = np.nan
    x, y = (torch.tensor(a.reshape(shape)).to(dtype).to(device) for a in (x, y))
    return x, y


_FORM_SHAPES: dict[str, Callable[[tuple[int, int]], tuple[int, ...] | None]] = {
    "absent": lambda shape: None,
    "scalar": lambda shape: (),
    "per-class": lambda shape: (shape[1],),
    "per-row": lambda shape: (shape[0], 1),
    "full": lambda shape: shape,
}


def _weight(form: str, shape: tuple[int, int], dtype: torch.dtype, seed: int, device) -> Tensor | None:
    size = _FORM_SHAPES[form](shape)
    if size is None:
        return None
    values = np.random.default_rng(seed).uniform(0.25, 2.0, size)
    return torch.tensor(values).to(dtype).to(device)


def compare(name: str, got: Tensor, ref: Tensor, dtype_name: str) -> tuple[float, str | None]:
    """``(worst error, failure or None)`` of ``got`` against the float64 reference ``ref``; the error of an
    element is ``|got - ref| / max(|ref|, floor * typical)``, to be at most rtol (:data:`TOLERANCES`;
    ``typical``: the median of the finite non-zero ``|ref|``).
    Where ``ref`` rounded to the dtype is not finite, ``got`` must be that value."""
    rtol, floor = TOLERANCES[dtype_name]
    got, ref = got.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    if got.shape != ref.shape:
        return math.inf, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    got, ref = got.reshape(-1), ref.reshape(-1)
    rounded = ref.to(DTYPES[dtype_name]).double()
    special = ~torch.isfinite(rounded)
    same = (got == rounded) | (got.isnan() & rounded.isnan())
    wrong = special & ~same
    if wrong.any():
        i = int(wrong.nonzero()[0])
        count = int(wrong.sum())
        return (
            math.inf,
            f"{name}: {count} non-finite values differ, e.g. [{i}] {got[i].item()} vs {ref[i].item()}",
        )
    finite = ~special
    g, r = got[finite], ref[finite]
    if not torch.isfinite(g).all():
        i = int((~torch.isfinite(g)).nonzero()[0])
        return math.inf, f"{name}: got {g[i].item()} where the reference is {r[i].item()}"
    if not r.numel():
        return 0.0, None
    magnitudes = r.abs()
    nonzero = magnitudes[magnitudes > 0]
    typical = nonzero.median() if nonzero.numel() else magnitudes.new_zeros(())
    denominator = torch.maximum(magnitudes, floor * typical)
    difference = (g - r).abs()
    error = torch.where(denominator > 0, difference / denominator, torch.where(difference > 0, math.inf, 0.0))
    worst = float(error.max())
    if worst > rtol:
        i = int(error.argmax())
        return worst, (
            f"{name}: relative error {worst:.3g} > {rtol:g} "
            f"(got {g[i].item():.17g}, expected {r[i].item():.17g})"
        )
    return worst, None


# --- environment ----------------------------------------------------------------------------------------


def section_environment(section: Section, check: Check) -> None:
    from bcekit.torch import _kernel, _triton
    from benchmarks.gpu import machine

    info = machine(check.device.backend)
    description = _triton.describe()
    kernel = getattr(_triton, "_bce_kernel", None)
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    info["device name"] = "CPU (dry run)" if check.settings.dry_run else torch.cuda.get_device_name()
    info["bcekit kernels interpreted"] = interpreted
    section.results |= {"machine": info, "triton_describe": description}
    if not description["available"]:
        section.fail("Triton is not importable: CUDA tensors would take bcekit's composed torch path")
    elif check.settings.dry_run and not (interpreted and _kernel._TRITON_ON_CPU):
        section.fail("dry run: the kernels are not interpreted, or CPU tensors do not take the Triton branch")
    elif not check.settings.dry_run and (interpreted or description["interpreting"]):
        section.fail("TRITON_INTERPRET=1 on a GPU: the kernels are interpreted, not compiled; unset it")
    section.summary = (
        f"{info['device name']}; torch {info['torch']}, CUDA {info['torch CUDA']}, Triton {info['triton']}"
    )


# --- parity ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParityCase:
    loss: str
    dtype: str
    reduction: str
    weight: str
    pos_weight: str = "absent"
    options: tuple[tuple[str, float], ...] = ()

    @property
    def name(self) -> str:
        parts = [self.loss, self.dtype, self.reduction, f"weight {self.weight}"]
        if self.loss == "logits":
            parts.append(f"pos_weight {self.pos_weight}")
        parts += [f"{k}={v}" for k, v in self.options]
        return ", ".join(parts)

    @property
    def keywords(self) -> dict[str, float]:
        return dict(self.options)

    @property
    def nan_targets(self) -> bool:
        value = self.keywords.get("ignore_index")
        return value is not None and math.isnan(value)


def parity_cases(full_product: bool) -> list[ParityCase]:
    """Each loss with every dtype, reduction, weight form and pos_weight form at least once, and with each
    option (the dtypes in turn); then (``full_product``) every option with every dtype and the rest of the
    product. Covered first, so that a spent budget still leaves every form and option tested."""
    cases = []
    for loss in LOSSES:
        for dtype in DTYPES:
            for j, weight in enumerate(WEIGHT_FORMS):
                pos = POS_WEIGHT_FORMS[j % len(POS_WEIGHT_FORMS)] if loss == "logits" else "absent"
                cases.append(ParityCase(loss, dtype, REDUCTIONS[j % len(REDUCTIONS)], weight, pos))
    pos_weight = {"logits": "per-row", "probabilities": "absent"}
    dtypes = list(DTYPES)
    for loss in LOSSES:
        for j, (options, reduction) in enumerate(OPTIONS):
            dtype = dtypes[j % len(dtypes)]
            cases.append(ParityCase(loss, dtype, reduction, "per-class", pos_weight[loss], options))
    if full_product:
        for loss in LOSSES:
            for dtype in DTYPES:
                for options, reduction in OPTIONS:
                    case = ParityCase(loss, dtype, reduction, "per-class", pos_weight[loss], options)
                    if case not in cases:
                        cases.append(case)
        for loss in LOSSES:
            for dtype in DTYPES:
                for reduction in REDUCTIONS:
                    for weight in WEIGHT_FORMS:
                        for pos in POS_WEIGHT_FORMS if loss == "logits" else ("absent",):
                            case = ParityCase(loss, dtype, reduction, weight, pos)
                            if case not in cases:
                                cases.append(case)
    return cases


def _reference(
    case: ParityCase, x: Tensor, y: Tensor, w: Tensor | None, p: Tensor | None, grad_output: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """torch's loss and its gradients in input and target, in float64, the options materialised: targets
    smoothed to ``y (1 - s) + s / 2``; ignored elements' losses dropped, the mean over the kept count, their
    gradients zero."""
    _, torch_fn = _functions(case.loss)
    x64 = x.detach().double().requires_grad_()
    y64 = y.detach().double().requires_grad_()
    options = case.keywords
    ignore = options.get("ignore_index")
    kept = None
    target = y64
    if ignore is not None:
        kept = ~(y64.isnan() if math.isnan(ignore) else y64 == ignore)
        target = torch.where(kept, y64, 0.0)  # any value in [0, 1]: the element's loss is dropped
    smoothing = options.get("label_smoothing", 0.0)
    if smoothing:
        target = target * (1.0 - smoothing) + smoothing / 2.0
    keywords: dict[str, Any] = {"weight": None if w is None else w.double(), "reduction": "none"}
    if case.loss == "logits":
        keywords["pos_weight"] = None if p is None else p.double()
    per_element = torch_fn(x64, target, **keywords)
    if kept is not None:
        per_element = torch.where(kept, per_element, 0.0)
    if case.reduction == "none":
        loss = per_element
    elif case.reduction == "sum":
        loss = per_element.sum()
    else:
        loss = per_element.sum() / (x64.numel() if kept is None else kept.sum())
    grad_x, grad_y = torch.autograd.grad(loss, (x64, y64), grad_output.double())
    if kept is not None:
        grad_x, grad_y = torch.where(kept, grad_x, 0.0), torch.where(kept, grad_y, 0.0)
    return loss.detach(), grad_x, grad_y


def _functions(loss: str) -> tuple[Callable, Callable]:
    from benchmarks._common import functions

    return functions(loss)


def _parity_case(case: ParityCase, check: Check, seed: int) -> tuple[float, list[str]]:
    """The worst error of a case's values and gradients, and its failures."""
    shape, device, dtype = check.settings.parity_shape, check.on, DTYPES[case.dtype]
    x, y = _data(case.loss, dtype, shape, seed, device, case.nan_targets)
    w = _weight(case.weight, shape, dtype, seed + 1, device)
    p = _weight(case.pos_weight, shape, dtype, seed + 2, device) if case.loss == "logits" else None
    ours_fn, _ = _functions(case.loss)
    keywords: dict[str, Any] = {"weight": w, "reduction": case.reduction, **case.keywords}
    if case.loss == "logits":
        keywords["pos_weight"] = p
    launches = check.launches.count
    results = []

    # the loss and both gradients, a grad_output other than 1
    leaf_x, leaf_y = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss = ours_fn(leaf_x, leaf_y, **keywords)
    if case.reduction == "none":
        rng = np.random.default_rng(seed + 3)
        grad_output = torch.tensor(rng.uniform(0.5, 1.5, shape)).to(loss.dtype).to(device)
    else:
        grad_output = torch.tensor(GRAD_OUTPUT, dtype=loss.dtype, device=device)
    grad_x, grad_y = torch.autograd.grad(loss, (leaf_x, leaf_y), grad_output)
    ref_loss, ref_x, ref_y = _reference(case, x, y, w, p, grad_output)
    results += [
        compare("loss", loss, ref_loss, case.dtype),
        compare("d/d input", grad_x, ref_x, case.dtype),
        compare("d/d target", grad_y, ref_y, case.dtype),
    ]
    if loss.dtype != dtype:
        results.append((math.inf, f"loss dtype {loss.dtype}, expected {dtype}"))

    # the training step: loss.backward() with the target not requiring a gradient (the fused pass)
    leaf = x.clone().requires_grad_()
    step_loss = ours_fn(leaf, y, **keywords)
    (step_loss.sum() if case.reduction == "none" else step_loss).backward()
    ones = torch.ones_like(grad_output)
    _, ref_step_x, _ = _reference(case, x, y, w, p, ones)
    results += [
        compare("loss (step)", step_loss, ref_loss, case.dtype),
        compare("d/d input (loss.backward())", leaf.grad, ref_step_x, case.dtype),
    ]
    if check.launches.count == launches:
        results.append((0.0, "no Triton kernel was launched: the call took bcekit's composed path"))
    worst = max(error for error, _ in results)
    return worst, [failure for _, failure in results if failure is not None]


def _range_check(check: Check) -> list[str]:
    """The probability loss's [0, 1] error: once per bad call, at the call or at check_errors(); at the
    call with synchronous checks. Returns the failures."""
    from bcekit.torch import _range_check as range_module

    bce, device = check.bce, check.on
    failures = []
    bce.check_errors()  # nothing pending from the cases before
    good_x = torch.full((3000,), 0.5, device=device)
    good_y = torch.full((3000,), 0.25, device=device)
    for what, bad_x, bad_y in (
        ("input", good_x.clone().index_fill_(0, torch.tensor([2500], device=device), 1.5), good_y),
        ("target", good_x, good_y.clone().index_fill_(0, torch.tensor([7], device=device), -0.5)),
    ):
        expected = f"all elements of {what} should be between 0 and 1"
        raised = []
        for where, call in (
            ("call", lambda x=bad_x, y=bad_y: bce.binary_cross_entropy(x, y)),
            ("check_errors()", bce.check_errors),
            ("second check_errors()", bce.check_errors),
        ):
            try:
                call()
            except RuntimeError as error:
                raised.append((where, str(error)))
        if [message for _, message in raised] != [expected] or raised[0][0] == "second check_errors()":
            failures.append(f"range check ({what}): expected {expected!r} once, got {raised}")
    was_sync = range_module.mode() == "sync"
    bce.set_sync_checks(True)
    try:
        bad = good_x.clone().index_fill_(0, torch.tensor([0], device=device), 1.5)
        try:
            bce.binary_cross_entropy(bad, good_y)
            failures.append("set_sync_checks(True): the bad input did not raise at the call")
        except RuntimeError as error:
            if str(error) != "all elements of input should be between 0 and 1":
                failures.append(f"set_sync_checks(True): raised {error!r}")
        try:
            bce.check_errors()
        except RuntimeError as error:
            failures.append(f"set_sync_checks(True): the error raised again at check_errors(): {error!r}")
    finally:
        bce.set_sync_checks(was_sync)
    return failures


def section_parity(section: Section, check: Check) -> None:
    cases = parity_cases(check.settings.full_product)
    worst: dict[str, float] = {}
    passed = failed = 0
    group = None
    for index, case in enumerate(cases):
        if (case.loss, case.dtype) != group:
            group = case.loss, case.dtype
            progress(f"parity: {case.loss}, {case.dtype} (case {index + 1} of {len(cases)})")
        if not section.cell(case.name):
            continue
        try:
            error, failures = _parity_case(case, check, seed=index)
        except Exception as exception:
            error, failures = math.inf, [_cell_error(exception)]
        key = f"{case.loss} {case.dtype}"
        worst[key] = max(worst.get(key, 0.0), error)
        if failures:
            failed += 1
            for failure in failures:
                section.fail(f"{case.name}: {failure}")
        else:
            passed += 1
    range_failures = _range_check(check) if section.cell("range check") else None
    for failure in range_failures or ():
        section.fail(failure)
    section.results |= {
        "cases": len(cases),
        "cases_passed": passed,
        "cases_failed": failed,
        "worst_relative_error": worst,
        "tolerances": {k: {"rtol": r, "floor": f} for k, (r, f) in TOLERANCES.items()},
        "range_check": "skipped: budget" if range_failures is None else range_failures or "passed",
    }
    if not check.settings.full_product:
        section.results["full_product"] = "dry run: the covering and option cases only"
    worst_ratio = max((e / TOLERANCES[k.split()[1]][0] for k, e in worst.items()), default=0.0)
    section.summary = (
        f"{passed}/{len(cases)} cases passed, {failed} failed, {len(section.skipped)} skipped; "
        f"worst error / rtol {worst_ratio:.2g}; range check "
        + ("skipped" if range_failures is None else "FAILED" if range_failures else "ok")
    )


# --- accuracy -------------------------------------------------------------------------------------------


def _accuracy_points(loss: str, n: int, rng: np.random.Generator) -> list[tuple[Any, ...]]:
    """Groups of (x, y, pos_weight or None) float64 arrays."""
    targets = rng.choice([0.0, 1.0, 0.5, -1.0], n)
    targets = np.where(targets < 0, rng.random(n), targets)  # -1 marks a uniform target
    if loss == "logits":
        x = rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-30.0, math.log10(110.0), n)
        half = n // 2
        return [(x[:half], targets[:half], None), (x[half:], targets[half:], rng.uniform(0.0, 4.0, n - half))]
    third = n // 3
    x = np.concatenate(
        [
            rng.random(third),
            10.0 ** -rng.uniform(0.0, 38.0, third),
            1.0 - 10.0 ** -rng.uniform(0.0, 8.0, n - 2 * third),
        ]
    )
    return [(x, targets, None)]


def section_accuracy(section: Section, check: Check) -> None:
    from tests._reference import bce_exact, logits_exact, ulp_error

    results = {}
    for loss in LOSSES:
        if not section.cell(loss):
            continue
        ours_fn, _ = _functions(loss)
        rng = np.random.default_rng([7, LOSSES.index(loss)])
        worst, where, count = 0.0, None, 0
        for x, y, p in _accuracy_points(loss, check.settings.accuracy_points, rng):
            x32, y32 = x.astype(np.float32), y.astype(np.float32)
            p32 = None if p is None else p.astype(np.float32)
            keywords = {"reduction": "none"}
            if p32 is not None:
                keywords["pos_weight"] = torch.from_numpy(p32).to(check.on)
            values = ours_fn(
                torch.from_numpy(x32).to(check.on), torch.from_numpy(y32).to(check.on), **keywords
            )
            for i, value in enumerate(values.cpu().tolist()):
                arguments = (float(x32[i]), float(y32[i]))
                if loss == "logits":
                    exact = logits_exact(*arguments, None if p32 is None else float(p32[i]))
                    arguments += (None if p32 is None else float(p32[i]),)
                else:
                    exact = bce_exact(*arguments)
                error = ulp_error(value, exact, np.float32)
                count += 1
                if error > worst or where is None:
                    worst, where = max(worst, error), arguments
        results[loss] = {"points": count, "max_ulp": worst, "worst_at": where, "contract_ulp": MAX_ULP}
        if worst > MAX_ULP:
            section.fail(f"{loss}: {worst:.2f} ulp > {MAX_ULP} at (x, y, pos_weight) = {where}")
    section.results["max_ulp"] = results
    section.summary = "; ".join(f"{k} {v['max_ulp']:.2f} ulp max" for k, v in results.items())


# --- compile --------------------------------------------------------------------------------------------


def _step_data(check: Check, seed: int) -> tuple[Tensor, ...]:
    """(logits, their targets, probabilities, their targets, a per-class weight), float32."""
    shape = check.settings.step_shape
    logits, logit_targets = _data("logits", torch.float32, shape, seed, check.on)
    probabilities, targets = _data("probabilities", torch.float32, shape, seed + 1, check.on)
    weight = _weight("per-class", shape, torch.float32, seed + 2, check.on)
    return logits, logit_targets, probabilities, targets, weight


def _make_step(bce: Any) -> Callable[..., tuple[Tensor, Tensor]]:
    def both_losses(logits, logit_targets, probabilities, targets, weight) -> tuple[Tensor, Tensor]:
        return (
            bce.binary_cross_entropy_with_logits(logits, logit_targets, weight=weight),
            bce.binary_cross_entropy(probabilities, targets, weight=weight),
        )

    return both_losses


def _train(step: Callable, data: tuple[Tensor, ...]) -> list[Tensor]:
    """One forward and backward of ``step``: [logits loss, probability loss, their input gradients]."""
    logits, logit_targets, probabilities, targets, weight = data
    logits, probabilities = logits.clone().requires_grad_(), probabilities.clone().requires_grad_()
    losses = step(logits, logit_targets, probabilities, targets, weight)
    torch.autograd.backward(list(losses))
    # clones: the outputs of torch.compile's CUDA graphs are overwritten by the next replay
    return [t.detach().clone() for t in (*losses, logits.grad, probabilities.grad)]


_TRAIN_NAMES = ("logits loss", "probability loss", "d logits loss / d input", "d probability loss / d input")


def _compare_all(section: Section, label: str, got: list[Tensor], expected: list[Tensor]) -> float:
    worst = 0.0
    for name, mine, theirs in zip(_TRAIN_NAMES, got, expected, strict=True):
        error, failure = compare(f"{label}: {name}", mine, theirs.double(), "float32")
        worst = max(worst, error)
        if failure:
            section.fail(failure)
    return worst


def section_compile(section: Section, check: Check) -> None:
    counters = torch._dynamo.utils.counters
    step = _make_step(check.bce)
    # reduce-overhead: the first step runs eagerly, the second records the CUDA graphs, the others replay them
    modes = (("fullgraph", {"fullgraph": True}, 2), ("reduce-overhead", check.device.reduce_overhead(), 4))
    for label, options, iterations in modes:
        if not section.cell(label):
            continue
        torch._dynamo.reset()
        graphs = counters["stats"]["unique_graphs"]
        skips = counters["inductor"]["cudagraph_skips"]
        record: dict[str, Any] = {"options": options, "iterations": iterations}
        try:
            compiled = torch.compile(step, **options)
            worst = 0.0
            start = time.perf_counter()
            for iteration in range(iterations):
                data = _step_data(check, seed=100 + iteration)
                check.device.mark_step()
                got = _train(compiled, data)
                if iteration == 0:
                    record["first_call_s"] = round(time.perf_counter() - start, 2)
                worst = max(
                    worst, _compare_all(section, f"{label}, step {iteration}", got, _train(step, data))
                )
            record |= {
                "worst_relative_error": worst,
                "graphs_compiled": counters["stats"]["unique_graphs"] - graphs,
                "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips,
            }
        except Exception as exception:
            record["error"] = _cell_error(exception)
            section.fail(f"{label}: {record['error']}")
        section.results[label] = record
    torch._dynamo.reset()
    if check.settings.dry_run:
        section.results["reduce-overhead"] = {
            **section.results.get("reduce-overhead", {}),
            "note": "dry run: plain torch.compile() (CPU tensors have no CUDA graphs)",
        }
    section.summary = "; ".join(
        f"{label}: "
        + ("error" if "error" in record else f"{record.get('graphs_compiled')} graph(s) compiled")
        for label, record in section.results.items()
        if "options" in record
    )


# --- CUDA graphs ----------------------------------------------------------------------------------------


def section_cuda_graph(section: Section, check: Check) -> None:
    shape, device = check.settings.step_shape, check.on
    bitwise = {}
    for loss in LOSSES:
        if not section.cell(loss):
            continue
        ours_fn, _ = _functions(loss)
        weight = _weight("per-class", shape, torch.float32, 1, device)
        x, y = _data(loss, torch.float32, shape, 10, device)
        static_x, static_y = x.clone().requires_grad_(), y.clone()

        def step(fn=ours_fn, sx=static_x, sy=static_y, w=weight) -> tuple[Tensor, Tensor]:
            value = fn(sx, sy, weight=w)
            (grad,) = torch.autograd.grad(value, (sx,))
            return value.detach(), grad

        try:
            (static_loss, static_grad), replay = check.device.capture(step)
            identical = True
            for replay_index in range(3):
                new_x, new_y = _data(loss, torch.float32, shape, 11 + replay_index, device)
                with torch.no_grad():
                    static_x.copy_(new_x)
                    static_y.copy_(new_y)
                replay()
                check.device.sync()
                leaf = new_x.clone().requires_grad_()
                expected = ours_fn(leaf, new_y, weight=weight)
                (expected_grad,) = torch.autograd.grad(expected, (leaf,))
                for name, mine, theirs in (
                    ("loss", static_loss, expected),
                    ("d/d input", static_grad, expected_grad),
                ):
                    _, failure = compare(
                        f"{loss}, replay {replay_index}: {name}", mine, theirs.double(), "float32"
                    )
                    if failure:
                        section.fail(failure)
                    identical &= bool(torch.equal(mine, theirs.detach()))
            bitwise[loss] = identical
        except Exception as exception:
            section.fail(f"{loss}: {_cell_error(exception)}")
    section.results["replays_bitwise_equal_to_eager"] = bitwise
    if check.settings.dry_run:
        section.results["note"] = "dry run: the step runs directly instead of a graph replay"
    section.summary = "3 replays per loss against eager" + (
        "; bitwise equal" if bitwise and all(bitwise.values()) else ""
    )


# --- no host synchronisation ----------------------------------------------------------------------------


def section_no_sync(section: Section, check: Check) -> None:
    shape, device = check.settings.step_shape, check.on
    for loss in LOSSES:
        if not section.cell(loss):
            continue
        ours_fn, torch_fn = _functions(loss)
        x, y = _data(loss, torch.float32, shape, 20, device)
        keywords = (
            {"pos_weight": _weight("per-class", shape, torch.float32, 21, device)} if loss == "logits" else {}
        )
        leaf = x.clone().requires_grad_()

        def step(fn=ours_fn, leaf=leaf, y=y, keywords=keywords) -> Tensor:
            value = fn(leaf, y, **keywords)
            value.backward()
            return value.detach()

        try:
            step()  # warm-up: Triton's compilation, the range check's counters
            leaf.grad = None
            check.device.sync()
            with check.device.sync_debug_error():
                value = step()
            check.device.sync()
            reference = x.double().requires_grad_()
            expected = torch_fn(reference, y.double(), **{k: v.double() for k, v in keywords.items()})
            expected.backward()
            for name, mine, theirs in (("loss", value, expected), ("d/d input", leaf.grad, reference.grad)):
                _, failure = compare(f"{loss}: {name}", mine, theirs, "float32")
                if failure:
                    section.fail(failure)
        except Exception as exception:
            section.fail(f"{loss}: {_cell_error(exception)}")
    if check.settings.dry_run:
        section.results["note"] = "dry run: no sync debug mode on CPU"
    section.summary = "forward + backward of each loss under set_sync_debug_mode('error')"


# --- autocast -------------------------------------------------------------------------------------------


def section_autocast(section: Section, check: Check) -> None:
    shape, device = check.settings.step_shape, check.on
    for loss in LOSSES:
        ours_fn, torch_fn = _functions(loss)
        for reduction in ("none", "mean"):
            if not section.cell(f"{loss}, {reduction}"):
                continue
            try:
                x, y = _data(loss, torch.bfloat16, shape, 30, device)
                weight = _weight("per-class", shape, torch.bfloat16, 31, device)
                leaf = x.clone().requires_grad_()
                with check.device.autocast():
                    value = ours_fn(leaf, y, weight=weight, reduction=reduction)
                grad_output = torch.full_like(value, GRAD_OUTPUT)
                (grad,) = torch.autograd.grad(value, (leaf,), grad_output)
                leaf32 = x.float().requires_grad_()
                expected = torch_fn(leaf32, y.float(), weight=weight.float(), reduction=reduction)
                (expected_grad,) = torch.autograd.grad(expected, (leaf32,), grad_output)
                if value.dtype != torch.float32:
                    section.fail(
                        f"{loss}, {reduction}: the loss is {value.dtype} under autocast, not float32"
                    )
                for name, mine, theirs, dtype in (
                    ("loss", value, expected, "float32"),
                    ("d/d input", grad, expected_grad, "bfloat16"),
                ):
                    _, failure = compare(f"{loss}, {reduction}: {name}", mine, theirs.double(), dtype)
                    if failure:
                        section.fail(failure)
            except Exception as exception:
                section.fail(f"{loss}, {reduction}: {_cell_error(exception)}")
    if check.settings.dry_run:
        section.results["note"] = "dry run: torch.autocast('cpu', dtype=torch.bfloat16)"
    section.summary = "bfloat16 inputs under autocast: float32 losses equal to torch's float32"


# --- benchmark ------------------------------------------------------------------------------------------


def _compile_torch(torch_fn: Callable, dry_run: bool) -> Callable:
    def loss_fn(x: Tensor, y: Tensor) -> Tensor:
        return torch_fn(x, y)

    backend = {"backend": "aot_eager"} if dry_run else {}
    return torch.compile(loss_fn, dynamic=False, fullgraph=True, **backend)


def _floor_runner(x: Tensor, y: Tensor) -> Callable[[], object]:
    """``torch.add(x, y, out=g)``: reads two tensors and writes one, the bytes of an ideal fused step."""
    out = torch.empty_like(x)
    return lambda: torch.add(x, y, out=out)


def _time_cell(check: Check, make_run: Callable[[], Callable[[], object]]) -> tuple[float | None, dict]:
    """(ms per step or None, timing or error) of one cell; frees what the cell made."""
    run = error = None
    try:
        run = make_run()
        timing = check.device.time(run, check.settings)
    except Exception as exception:
        error = _cell_error(exception)
    run = None
    if error is not None:
        check.device.free()  # the traceback is gone: what its frames held can be collected
        return None, {"error": error}
    check.device.release()
    return timing.pop("ms"), timing


def _derive(row: dict) -> None:
    ours, floor = row.get("bcekit"), row.get("floor")
    row["bcekit / floor BW"] = floor / ours if ours and floor else None
    row["eager / bcekit"] = row["torch eager"] / ours if ours and row.get("torch eager") else None
    row["compile / bcekit"] = row["torch.compile"] / ours if ours and row.get("torch.compile") else None


def _benchmark_cells(section: Section, check: Check) -> list[dict]:
    from benchmarks.gpu import _inputs, _loss_runner

    small, speed_up, bandwidth = check.settings.benchmark_log2s
    compiled = {}
    torch._dynamo.reset()
    rows: dict[tuple[str, str, int], dict] = {}
    for log2 in (speed_up, bandwidth, small):  # the targets' sizes first
        n = 1 << log2
        for loss in LOSSES:
            ours_fn, torch_fn = _functions(loss)
            for dtype_name in ("float32", "bfloat16"):
                row = rows.setdefault(
                    (loss, dtype_name, n),
                    {"loss": loss, "dtype": dtype_name, "n": n, "timing": {}, "errors": {}},
                )
                if section.spent(MAIN_CELLS_SHARE):  # not even the inputs: they are 1 GiB at 2^28
                    section.skipped += [
                        f"{loss}, {dtype_name}, 2^{log2}, {c}: skipped: budget" for c in CONTENDERS
                    ]
                    continue
                if (loss, dtype_name) not in compiled:
                    compiled[loss, dtype_name] = _compile_torch(torch_fn, check.settings.dry_run)
                x = y = None
                try:
                    x, y = _inputs(loss, DTYPES[dtype_name], n, check.on)
                    makers = {
                        "bcekit": lambda f=ours_fn, x=x, y=y: _loss_runner(f, x, y, True),
                        "torch eager": lambda f=torch_fn, x=x, y=y: _loss_runner(f, x, y, True),
                        "torch.compile": lambda f=compiled[loss, dtype_name], x=x, y=y: _loss_runner(
                            f, x, y, True
                        ),
                        "floor": lambda x=x, y=y: _floor_runner(x, y),
                    }
                    for contender, make_run in makers.items():
                        cell = f"{loss}, {dtype_name}, 2^{log2}, {contender}"
                        if not section.cell(cell, MAIN_CELLS_SHARE):
                            continue
                        ms, timing = _time_cell(check, make_run)
                        if ms is None:
                            row["errors"][contender] = timing["error"]
                            if timing["error"] != "OOM":
                                section.fail(f"{cell}: {timing['error']}")
                        else:
                            row[contender] = ms
                            row["timing"][contender] = timing
                except Exception as exception:
                    section.fail(f"{loss}, {dtype_name}, 2^{log2}: {_cell_error(exception)}")
                finally:
                    del x, y
                    check.device.release()
                _derive(row)
        progress(f"benchmark: 2^{log2} done")
    return sorted(rows.values(), key=lambda r: (LOSSES.index(r["loss"]), r["dtype"], r["n"]))


def _targets(rows: list[dict], settings: Settings) -> list[dict]:
    _, speed_up, bandwidth = settings.benchmark_log2s
    sizes = {"bandwidth": 1 << bandwidth, "speed-up": 1 << speed_up}
    results = []
    for ratio, role, target in TARGETS:
        for row in (r for r in rows if r["n"] == sizes[role]):
            value = row.get(ratio)
            verdict = "not measured" if value is None else "met" if value >= target else "missed"
            results.append(
                {
                    "target": f"{ratio} >= {target:g}",
                    "loss": row["loss"],
                    "dtype": row["dtype"],
                    "n": row["n"],
                    "value": value,
                    "verdict": verdict,
                }
            )
    return results


def _sweep(section: Section, check: Check) -> dict:
    """bcekit's step with each (block, warps) of ``_triton.CONFIGS`` (restored after): the cells, and the
    best config per dtype (lowest mean time relative to the current config over the cells that one has)."""
    from bcekit.torch import _triton
    from benchmarks.gpu import _inputs, _loss_runner

    original = dict(_triton.CONFIGS)
    cells: list[dict] = []
    try:
        for log2 in check.settings.sweep_log2s:
            for dtype_name in ("float32", "bfloat16"):
                dtype = DTYPES[dtype_name]
                configs = [
                    original[dtype],
                    *(c for c in check.settings.sweep_configs if c != original[dtype]),
                ]
                for loss in LOSSES:
                    ours_fn, _ = _functions(loss)
                    if section.spent():
                        section.skipped.append(f"sweep {loss}, {dtype_name}, 2^{log2}: skipped: budget")
                        continue
                    x = y = None
                    try:
                        x, y = _inputs(loss, dtype, 1 << log2, check.on)
                        for block, warps in configs:
                            cell = f"sweep {loss}, {dtype_name}, 2^{log2}, block {block}, {warps} warps"
                            if not section.cell(cell):
                                continue
                            _triton.CONFIGS[dtype] = (block, warps)
                            try:
                                ms, timing = _time_cell(
                                    check, lambda f=ours_fn, x=x, y=y: _loss_runner(f, x, y, True)
                                )
                            finally:
                                _triton.CONFIGS[dtype] = original[dtype]
                            cells.append(
                                {
                                    "loss": loss,
                                    "dtype": dtype_name,
                                    "n": 1 << log2,
                                    "block": block,
                                    "warps": warps,
                                }
                                | ({"ms": ms} if ms is not None else {"error": timing["error"]})
                            )
                    finally:
                        del x, y
                        check.device.release()
            progress(f"benchmark: sweep at 2^{log2} done")
    finally:
        _triton.CONFIGS.clear()
        _triton.CONFIGS.update(original)
    best = {}
    for dtype_name in ("float32", "bfloat16"):
        default = original[DTYPES[dtype_name]]
        mine = [c for c in cells if c["dtype"] == dtype_name and "ms" in c]
        baseline = {(c["loss"], c["n"]): c["ms"] for c in mine if (c["block"], c["warps"]) == default}
        scores = {}
        for config in {(c["block"], c["warps"]) for c in mine}:
            ratios = [
                c["ms"] / baseline[c["loss"], c["n"]]
                for c in mine
                if (c["block"], c["warps"]) == config and (c["loss"], c["n"]) in baseline
            ]
            if ratios and len(ratios) == len(baseline):
                scores[config] = statistics.fmean(ratios)
        if scores:
            config = min(scores, key=scores.__getitem__)
            best[dtype_name] = {
                "block": config[0],
                "warps": config[1],
                "time_vs_current": scores[config],
                "current": list(default),
                "scores": {f"{b}x{w}": s for (b, w), s in sorted(scores.items())},
            }
    return {"cells": cells, "best": best}


def section_benchmark(section: Section, check: Check) -> None:
    rows = _benchmark_cells(section, check)
    targets = _targets(rows, check.settings)
    sweep = _sweep(section, check)
    section.results |= {"rows": rows, "targets": targets, "sweep": sweep}
    if check.settings.dry_run:
        section.results["note"] = "dry run: CPU tensors, perf_counter, the aot_eager torch.compile backend"
    met = sum(t["verdict"] == "met" for t in targets)
    section.summary = f"{len(rows)} rows; targets met {met}/{len(targets)}; best blocks " + ", ".join(
        f"{k} {v['block']}x{v['warps']}" for k, v in sweep["best"].items()
    )


# --- fused linear + BCE ---------------------------------------------------------------------------------


def _sparse_target(rows: int, labels: int, per_row: int, dtype: torch.dtype, device) -> Tensor:
    """A COO ``(rows, labels)`` target of ``per_row`` distinct labels per row (one in each of ``per_row``
    equal stripes of the labels), value 1."""
    generator = torch.Generator(device=device).manual_seed(3)
    stripe = labels // per_row
    columns = torch.randint(0, stripe, (rows, per_row), generator=generator, device=device)
    columns += torch.arange(per_row, device=device) * stripe
    indices = torch.stack([torch.arange(rows, device=device).repeat_interleave(per_row), columns.reshape(-1)])
    values = torch.ones(rows * per_row, dtype=dtype, device=device)
    return torch.sparse_coo_tensor(indices, values, (rows, labels), check_invariants=True).coalesce()


def _linear_measure(check: Check, loss_of: Callable[[], Tensor], leaves: tuple[Tensor, Tensor]) -> dict:
    """A training step of ``loss_of``: its loss and input gradient once, its time and its peak memory."""

    def step() -> Tensor:
        loss = loss_of()
        loss.backward()
        for leaf in leaves:
            leaf.grad = None
        return loss

    x, weight = leaves
    loss = loss_of()
    loss.backward()
    record: dict[str, Any] = {"loss": float(loss.detach()), "grad_input": x.grad.clone()}
    x.grad = weight.grad = None
    del loss
    record["timing"] = check.device.time(step, check.settings)
    record["ms"] = record["timing"].pop("ms")
    peak, retained = check.device.memory_probe(step)
    record |= {"peak_mib": peak / 2**20, "retained_mib": retained / 2**20}
    return record


def section_linear(section: Section, check: Check) -> None:
    rows, features, labels = check.settings.linear_shape
    dtype, device = torch.bfloat16, check.on
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, features, generator=generator, device=device, dtype=dtype).requires_grad_()
    weight = torch.randn(labels, features, generator=generator, device=device, dtype=dtype)
    weight = weight.mul_(features**-0.5).requires_grad_()
    target = _sparse_target(rows, labels, check.settings.labels_per_row, dtype, device)
    results: dict[str, Any] = {
        "shape": {"N": rows, "D": features, "C": labels},
        "dtype": "bfloat16",
        "target": (
            f"fused: sparse COO, {check.settings.labels_per_row} labels per row, value 1 (its stored entries "
            "only are read); unfused: the same target made dense"
        ),
    }

    fused = unfused = None
    if section.cell("fused"):
        fused = _linear_measure(
            check, lambda: check.bce.linear_binary_cross_entropy_with_logits(x, weight, target), (x, weight)
        )
        check.device.free()
    if section.cell("unfused"):
        dense: list[Tensor] = []  # the dense target, dropped when the cell ends
        try:
            dense.append(target.to_dense())
            unfused = _linear_measure(
                check, lambda: F.binary_cross_entropy_with_logits(x @ weight.T, dense[0]), (x, weight)
            )
        except torch.cuda.OutOfMemoryError:
            unfused = {"error": "OOM"}
        finally:
            dense.clear()
            x.grad = weight.grad = None
            check.device.free()
    if fused is not None and unfused is not None and "error" not in unfused:
        loss_error, failure = compare(
            "loss", torch.tensor(fused["loss"]), torch.tensor(unfused["loss"]), "bfloat16"
        )
        if failure:
            section.fail(f"fused vs unfused {failure}")
        mine, theirs = fused["grad_input"].double(), unfused["grad_input"].double()
        normwise = float((mine - theirs).norm() / theirs.norm().clamp_min(1e-300))
        results["grad_input_normwise_difference"] = normwise
        if normwise > 5e-2:
            section.fail(f"fused vs unfused d/d input: normwise relative difference {normwise:.3g} > 0.05")
    for record in (fused, unfused):
        if record is not None:
            record.pop("grad_input", None)
    results |= {"fused": fused, "unfused": unfused, **_linear_targets(fused, unfused)}
    section.results |= results
    section.summary = f"N={rows}, D={features}, C={labels}: " + ", ".join(
        f"{k} {v}" for k, v in results["verdicts"].items()
    )


def _linear_targets(fused: dict | None, unfused: dict | None) -> dict:
    ratios: dict[str, float | None] = {"memory ratio": None, "time ratio": None}
    verdicts = dict.fromkeys(ratios, "not measured")
    if fused is not None and unfused is not None:
        if unfused.get("error") == "OOM":
            verdicts["memory ratio"] = "met (the unfused step does not fit)"
        else:
            if unfused["peak_mib"] > 0:
                ratios["memory ratio"] = fused["peak_mib"] / unfused["peak_mib"]
            ratios["time ratio"] = fused["ms"] / unfused["ms"] if unfused["ms"] else None
            for name, value in ratios.items():
                if value is not None:
                    verdicts[name] = "met" if value <= LINEAR_TARGETS[name] else "missed"
    return {"ratios": ratios, "verdicts": verdicts, "targets": dict(LINEAR_TARGETS)}


SECTION_FUNCTIONS: dict[str, Callable[[Section, Check], None]] = {
    "environment": section_environment,
    "parity": section_parity,
    "accuracy": section_accuracy,
    "compile": section_compile,
    "cuda_graph": section_cuda_graph,
    "no_sync": section_no_sync,
    "autocast": section_autocast,
    "benchmark": section_benchmark,
    "linear": section_linear,
}


# --- the table ------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    from benchmarks.gpu import _ms as format_ms

    return format_ms(value)


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _log2(n: int) -> str:
    return f"2^{n.bit_length() - 1}"


def _row(*cells: object, width: int = 11) -> str:
    values = [str(c) for c in cells] + [""] * (width - len(cells))
    return "| " + " | ".join(values) + " |"


def _bold_row(*cells: str) -> str:
    return _row(*(f"**{c}**" if c else "" for c in cells))


def summary_table(result: dict) -> str:
    """One Markdown table in sub-blocks: sections, benchmark rows, targets, linear, max ulp, best blocks."""
    sections = result["sections"]
    device = result["device"]
    title = f"## bcekit GPU check on {device}"
    if result["dry_run"]:
        title = "## bcekit GPU check: DRY RUN on CPU tensors, Triton interpreted (the numbers mean nothing)"
    lines = [
        title,
        "",
        "| block | loss | dtype | n | bcekit ms | eager ms | compile ms | floor ms | bcekit / floor BW "
        "| eager / bcekit | compile / bcekit |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        _bold_row("section", "status", "wall s", "budget s", "summary"),
    ]
    for name, record in sections.items():
        summary = record.get("summary") or ""
        if record["failures"]:
            summary = f"{summary}; first failure: {record['failures'][0]}"
        elif record.get("error"):
            summary = f"{summary}; {record['error'].splitlines()[-1]}"
        summary = " ".join(summary.replace("|", "/").split())[:200]
        lines.append(
            _row(name, record["status"], f"{record['wall_s']:.1f}", f"{record['budget_s']:.0f}", summary)
        )
    benchmark = sections.get("benchmark", {})
    if benchmark.get("rows"):
        lines.append(
            _bold_row(
                "benchmark",
                "loss",
                "dtype",
                "n",
                *(f"{c} ms" for c in ("bcekit", "eager", "compile", "floor")),
                "bcekit / floor BW",
                "eager / bcekit",
                "compile / bcekit",
            )
        )
        for r in benchmark["rows"]:
            times = [
                ("OOM" if r["errors"][c] == "OOM" else "ERR") if c in r["errors"] else _ms(r.get(c))
                for c in CONTENDERS
            ]
            ratios = [_number(r[k]) for k in ("bcekit / floor BW", "eager / bcekit", "compile / bcekit")]
            lines.append(_row("step", r["loss"], r["dtype"], _log2(r["n"]), *times, *ratios))
        lines.append(_bold_row("target", "loss", "dtype", "n", "measured", "verdict"))
        for t in benchmark["targets"]:
            lines.append(
                _row(t["target"], t["loss"], t["dtype"], _log2(t["n"]), _number(t["value"]), t["verdict"])
            )
    linear = sections.get("linear", {})
    if "shape" in linear:
        header = ("linear", "N, D, C", "dtype", "", "fused ms", "unfused ms", "fused peak MiB")
        header += ("unfused peak MiB", "memory ratio (<= 0.1)", "time ratio (<= 1.1)", "verdicts")
        lines.append(_bold_row(*header))
        fused, unfused = linear.get("fused") or {}, linear.get("unfused") or {}
        shape = linear["shape"]
        oom = unfused.get("error") == "OOM"
        lines.append(
            _row(
                "fused vs unfused",
                f"{shape['N']}, {shape['D']}, {shape['C']}",
                linear["dtype"],
                "",
                _ms(fused.get("ms")),
                "OOM" if oom else _ms(unfused.get("ms")),
                _number(fused.get("peak_mib"), 1),
                "OOM" if oom else _number(unfused.get("peak_mib"), 1),
                _number(linear["ratios"]["memory ratio"], 3),
                _number(linear["ratios"]["time ratio"]),
                "; ".join(f"{k}: {v}" for k, v in linear["verdicts"].items()),
            )
        )
    accuracy = sections.get("accuracy", {}).get("max_ulp")
    if accuracy:
        lines.append(_bold_row("max ulp", "loss", "dtype", "points", "max ulp", "contract", "verdict"))
        for loss, a in accuracy.items():
            verdict = "met" if a["max_ulp"] <= MAX_ULP else "MISSED"
            lines.append(
                _row(
                    "accuracy",
                    loss,
                    "float32",
                    a["points"],
                    f"{a['max_ulp']:.2f}",
                    f"<= {MAX_ULP:g}",
                    verdict,
                )
            )
    best = benchmark.get("sweep", {}).get("best")
    if best:
        lines.append(_bold_row("best block", "", "dtype", "", "block", "warps", "current", "time / current"))
        for dtype_name, b in best.items():
            lines.append(
                _row(
                    "sweep",
                    "",
                    dtype_name,
                    "",
                    b["block"],
                    b["warps"],
                    "x".join(map(str, b["current"])),
                    _number(b["time_vs_current"], 3),
                )
            )
    lines.append("")
    lines.append(f"overall: {result['status']}; wall time {result['wall_s']:.0f} s; JSON {result['json']}")
    return "\n".join(lines)


# --- JSON -----------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Strict JSON: non-finite floats as strings, tuples as lists, anything else unknown as its str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


# --- command line ---------------------------------------------------------------------------------------


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu --check",
        description="End-to-end check of bcekit's GPU path: benchmarks/gpu_check.py says what it checks.",
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU tensors, tiny sizes: checks the script")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=sum(BUDGET_S.values()),
        help=f"seconds for all sections, shared as the defaults are (default {sum(BUDGET_S.values()):.0f})",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        metavar="NAME",
        help=f"run only these sections, of: {', '.join(SECTIONS)}",
    )
    return parser.parse_args(argv)


def _interpreted_run(argv: list[str]) -> int | None:
    """Dry run: Triton's interpreter must be chosen before ``triton.jit`` decorates bcekit's kernels, i.e.
    before Triton is imported. Sets ``TRITON_INTERPRET=1``; where Triton is imported already (``python -m
    benchmarks.gpu`` imports bcekit first), reruns the check in a fresh process and returns its status."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" not in sys.modules:
        return None
    progress("dry run: Triton was imported before TRITON_INTERPRET=1 was set; rerunning in a fresh process")
    return subprocess.call([sys.executable, "-m", "benchmarks.gpu_check", *argv])


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns the exit status (0: every section passed)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    arguments = _arguments(argv)
    if arguments.dry_run:
        status = _interpreted_run(argv)
        if status is not None:
            return status
        # NumPy's warnings inside the interpreter (log(0), inf - inf, ...) are the kernels' IEEE arithmetic
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    elif not torch.cuda.is_available():
        print(NO_CUDA.format(version=torch.__version__, cuda=torch.version.cuda), file=sys.stderr)
        return 2
    settings = Settings.of(arguments)

    import bcekit.torch as bce
    from bcekit.torch import _kernel
    from benchmarks._common import configure_dynamo

    started = time.perf_counter()
    was_on_cpu = _kernel._TRITON_ON_CPU
    _kernel._TRITON_ON_CPU = settings.dry_run  # CPU tensors take the CUDA tensors' branch: the Triton kernels
    launches = Launches()
    configure_dynamo()
    check = Check(settings, Device(settings.dry_run), bce, launches)
    records = {}
    carry = 0.0  # seconds the sections so far left unused (negative: overran)
    try:
        for name in settings.sections:
            own = BUDGET_S[name] * settings.budget_scale
            records[name] = run_section(name, SECTION_FUNCTIONS[name], check, max(own / 2, own + carry))
            carry += own - records[name]["wall_s"]
    finally:
        launches.restore()
        _kernel._TRITON_ON_CPU = was_on_cpu
    passed = all(r["status"] == "passed" for r in records.values())
    environment = records.get("environment", {}).get("machine", {})
    settings.out.mkdir(parents=True, exist_ok=True)
    path = settings.out / "gpu_check.json"
    result = {
        "status": "passed" if passed else "failed",
        "dry_run": settings.dry_run,
        "device": environment.get("device name")
        or ("CPU (dry run)" if settings.dry_run else torch.cuda.get_device_name()),
        "python": platform.python_version(),
        "wall_s": round(time.perf_counter() - started, 1),
        "json": str(path),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(settings).items()},
        "default_budgets_s": {k: round(v * settings.budget_scale, 1) for k, v in BUDGET_S.items()},
        "sections": records,
    }
    path.write_text(json.dumps(_jsonable(result), indent=1, allow_nan=False))
    print(summary_table(result), flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
