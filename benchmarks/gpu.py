"""GPU speed, side by side in one process: bcekit vs torch eager vs torch.compile vs a device-to-device copy.

Run from the repository root, on a machine with a CUDA GPU (nothing is downloaded at run time)::

    python -m benchmarks.gpu [--min-log2 16] [--max-log2 28] [--step 1] [--budget 0.25] [--min-repeats 5]
                             [--max-repeats 1000] [--memory-log2 26] [--losses logits probabilities]
                             [--dtypes float32 bfloat16] [--passes fwd fwd+bwd] [--out benchmarks/results]

Without CUDA (``torch.cuda.is_available()`` False) it prints why and exits with status 2. A hidden
``--dry-run`` runs every code path (runners, timing loop, tables, targets, JSON, plot) on CPU tensors with
tiny sizes and fake memory numbers, and writes into a temporary folder unless ``--out`` is given: a check of
the script itself; its numbers mean nothing.

``python -m benchmarks.gpu --check [--dry-run] [--out DIR] [--budget-s SECONDS]`` runs instead the
end-to-end check of bcekit's GPU path: correctness, torch.compile, CUDA graphs and the speed targets in one
JSON and one table (``benchmarks/gpu_check.py`` says what it checks).

What is timed. For each loss (logits, probabilities), dtype (float32, bfloat16), pass (forward,
forward+backward) and size 2^k (``--min-log2`` to ``--max-log2``), each contender in turn gets its own
runner (its own leaf, gradient and buffers, freed with ``torch.cuda.empty_cache()`` before the next
contender, so the cells do not share memory) and runs once as a warm-up (where torch.compile compiles and
Triton JIT-compiles bcekit's kernel), then once more, timed, to size a sample. A sample is ``inner``
back-to-back calls between two CUDA events, ``inner`` = enough calls for about 1 ms (at most 100), so 1 at
the large sizes: small sizes measure the per-step cost of a loop whose host runs ahead of the GPU, as a
training loop does; there launch and Python overhead dominate. Samples are taken until there are at least
``--min-repeats`` and ``--budget`` seconds have passed, or ``--max-repeats``; the median sample divided by
``inner`` is reported, in milliseconds. Inputs are made on the GPU (``randn``; probabilities are its
sigmoid; targets ``rand``) and are not flushed from L2 between calls: tensors of 2^16..2^22 elements may
stay in the 50 MB L2 of an H100, so their GB/s can exceed HBM's; at 2^28 (1 GiB per float32 tensor)
everything comes from HBM.

* forward (``fwd``): ``loss = f(x, y)`` under ``torch.no_grad()``, reduction ``mean``.
* forward+backward (``fwd+bwd``) models a training step, the same for every contender (as
  ``benchmarks/cpu.py``): ``loss = f(leaf, y); loss.backward(); leaf.grad = None`` (as
  ``optimizer.zero_grad(set_to_none=True)`` does), so allocating and freeing the gradient is part of every
  step's cost.
* bcekit: ``bcekit.torch.binary_cross_entropy[_with_logits]`` (the Triton kernels of
  ``bcekit.torch._triton``: the machine section says whether Triton is there; without it bcekit falls back
  to composed torch operations and these numbers are not the kernels'); torch eager: the same calls of
  ``torch.nn.functional``; torch.compile: those calls compiled per (loss, dtype, pass) with
  ``dynamic=True, fullgraph=True`` (default mode), after ``torch._dynamo.reset()``. Dynamo's recompile limit
  is raised to 64 and ``fail_on_recompile_limit_hit`` is set, so a recompile storm raises instead of
  silently falling back to eager; the graphs compiled per panel are printed and saved (``compiled_graphs``).
* copy: the floor, ``dst.copy_(src)`` between two preallocated contiguous tensors of the contender's dtype
  on the same GPU (a ``cudaMemcpyAsync`` device to device), sized to move the same bytes as the ideal
  pass of a loss, counting bytes read plus bytes written (an element of ``src`` is read once and written
  once to ``dst``):

  - fwd+bwd: the ideal fused pass reads input and target and writes the gradient, 3 n s bytes (s = item
    size; the loss itself is a few bytes per 1024 elements). The copy moves ``3n/2`` elements: it reads
    1.5 n s and writes 1.5 n s bytes, 3 n s in all.
  - fwd: the ideal pass reads input and target, 2 n s bytes, and writes nothing sizeable. The copy moves
    ``n`` elements: reads n s and writes n s bytes, 2 n s in all. A copy rather than a read-only reduction
    (say ``torch.sum`` over 2n elements) keeps one primitive, cudaMemcpy, the best-tuned data mover on the
    device, as the yardstick of both passes; HBM's bandwidth is shared by reads and writes, so bytes moved
    in either direction cost alike to first order. It is, if anything, the stricter of the two floors.

Reported per cell: milliseconds per step (median) of each contender; bcekit GB/s = the ideal bytes above
/ bcekit's time (10^9 bytes per GB) and the copy's GB/s (the same bytes / its time); ``bcekit / copy BW``,
the fraction of the copy's bandwidth bcekit reaches (= copy time / bcekit time, as the bytes are the same);
``eager / bcekit`` and ``compile / bcekit``, the speed-ups (time ratios). A cell that runs out of GPU
memory shows ``OOM`` (``torch.cuda.OutOfMemoryError`` is caught per cell and the memory freed); any other
error ``ERR``, with the message on stderr and in the JSON. The smallest size is also printed on its own in
microseconds (per-step overhead).

Targets (printed for each (loss, dtype), with the device name, at the largest size measured, 2^28 by
default): fwd+bwd ``bcekit / copy BW >= 0.85``, ``eager / bcekit >= 3``, ``compile / bcekit >= 1.3``.

Peak memory of a step (``--memory-log2``, default 2^26; 0 skips it). For each (loss, dtype) and each
contender but the copy, in this process: the inputs and the leaf are made at that size, two
forward+backward steps run (warm-up; torch.compile is compiled afresh), then ``before =
torch.cuda.memory_allocated()``, ``torch.cuda.reset_peak_memory_stats()``, one step,
``torch.cuda.max_memory_allocated() - before``: the step's peak memory beyond the inputs and whatever was
allocated before, in MiB and as a multiple of the gradient's bytes (n s; the ideal is 1x, the gradient
only). ``retained`` is ``memory_allocated()`` after the step minus before (memory a contender keeps between
steps). These are the caching allocator's tensor allocations, not what it has reserved from the driver.

Outputs: the device (``torch.cuda.get_device_name()``) and versions (torch, CUDA, Triton); Markdown tables
per (loss, dtype, pass); the targets; the memory table; ``gpu.json`` and ``gpu.png`` (time per element
against size, log-log, one panel per (loss, dtype, pass)) in ``--out``. A default run takes a few minutes
on an H100 (about 420 cells of ``--budget`` seconds, plus compilation); ``--losses``, ``--dtypes`` and
``--passes`` select panels (with another ``--out``, so runs do not overwrite each other).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bcekit.torch import _triton as bce_triton
from benchmarks._common import (
    DTYPES,
    LOSSES,
    PASSES,
    compile_loss,
    configure_dynamo,
    functions,
    panel_summary,
    plot,
)

Runner = Callable[[], object]

CONTENDERS = ("bcekit", "torch eager", "torch.compile", "copy")
LOSS_CONTENDERS = CONTENDERS[:3]
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
#: A sample lasts about this long: back-to-back calls between two events (at most MAX_INNER of them).
SAMPLE_MS = 1.0
MAX_INNER = 100
#: The issue's targets for fwd+bwd at the largest size (2^28): at least these.
TARGETS = {"bcekit / copy BW": 0.85, "eager / bcekit": 3.0, "compile / bcekit": 1.3}
NO_CUDA = (
    "benchmarks.gpu needs a CUDA GPU: torch.cuda.is_available() is False here "
    "(torch {version}, built with CUDA {cuda}). Run it on a machine with an NVIDIA GPU."
)


# --- where it runs: CUDA, or the CPU for --dry-run ---------------------------------------------------------


class Backend:
    """Timing, synchronisation and memory statistics: CUDA events and allocator stats on the GPU;
    perf_counter and fake (zero) memory numbers for ``--dry-run`` on CPU tensors."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.device = torch.device("cpu") if dry_run else torch.device("cuda", torch.cuda.current_device())

    def sync(self) -> None:
        if not self.dry_run:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        """Give back what the last runner left: its tensors are unreachable once it is deleted."""
        gc.collect()
        if not self.dry_run:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def sample(self, run: Runner, inner: int) -> float:
        """Milliseconds per call of ``inner`` back-to-back calls."""
        if self.dry_run:
            start = time.perf_counter()
            for _ in range(inner):
                run()
            return (time.perf_counter() - start) * 1e3 / inner
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(inner):
            run()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / inner

    def time(self, run: Runner, budget: float, min_repeats: int, max_repeats: int) -> dict:
        """Median ms per call after a warm-up; samples until min_repeats and budget, or max_repeats."""
        self.sync()
        start = time.perf_counter()
        run()  # warm-up (compilation for torch.compile, Triton's JIT for bcekit)
        self.sync()
        warm_up = time.perf_counter() - start
        single = self.sample(run, 1)
        inner = max(1, min(MAX_INNER, math.ceil(SAMPLE_MS / max(single, 1e-6))))
        samples: list[float] = []
        start = time.perf_counter()
        while len(samples) < max_repeats and (
            len(samples) < min_repeats or time.perf_counter() - start < budget
        ):
            samples.append(self.sample(run, inner))
        return {
            "ms": statistics.median(samples),
            "samples": len(samples),
            "inner": inner,
            "warm_up_s": warm_up,
        }

    def memory_probe(self, step: Runner) -> tuple[int, int]:
        """(peak bytes beyond those allocated before, bytes still allocated after) of one step."""
        if self.dry_run:
            step()
            return 0, 0
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        step()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        return peak, torch.cuda.memory_allocated(self.device) - before


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError)


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def machine(backend: Backend) -> dict:
    info: dict = {}
    if backend.dry_run:
        info["device"] = (
            f"CPU ({platform.processor() or platform.machine()}): DRY RUN, the numbers mean nothing"
        )
    else:
        props = torch.cuda.get_device_properties(backend.device)
        info["device"] = torch.cuda.get_device_name(backend.device)
        info["compute capability"] = f"{props.major}.{props.minor}"
        info["GPU memory (GiB)"] = round(props.total_memory / 2**30, 1)
        info["multiprocessors"] = props.multi_processor_count
        info["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
    info.update(
        {
            "torch": torch.__version__,
            "torch CUDA": torch.version.cuda or "none",
            "triton": _triton_version(),
            "bcekit Triton kernels": bce_triton.describe(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        }
    )
    return info


# --- inputs and runners -----------------------------------------------------------------------------------


def _inputs(
    loss: str, dtype: torch.dtype, n: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, generator=generator, device=device)
    if loss == "probabilities":
        x = torch.sigmoid(x)
    return x.to(dtype), torch.rand(n, generator=generator, device=device).to(dtype)


def _ideal_bytes(n: int, item_size: int, backward: bool) -> int:
    """Bytes the ideal pass moves: input and target read (and the gradient written, for fwd+bwd)."""
    return (3 if backward else 2) * n * item_size


def _loss_runner(function: Callable, x: torch.Tensor, y: torch.Tensor, backward: bool) -> Runner:
    if not backward:

        def forward() -> object:
            with torch.no_grad():
                return function(x, y)

        return forward

    leaf = x.detach().clone().requires_grad_()

    def step() -> object:
        loss = function(leaf, y)
        loss.backward()
        leaf.grad = None  # optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def _copy_runner(x: torch.Tensor, backward: bool) -> Runner:
    """``dst.copy_(src)``, moving (read + written) the bytes of the ideal pass: see the module docstring."""
    elements = _ideal_bytes(x.numel(), x.element_size(), backward) // 2 // x.element_size()
    src = torch.zeros(elements, dtype=x.dtype, device=x.device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _runner(
    name: str, loss: str, backward: bool, x: torch.Tensor, y: torch.Tensor, compiled: Callable | None
) -> Runner:
    ours_fn, torch_fn = functions(loss)
    if name == "bcekit":
        return _loss_runner(ours_fn, x, y, backward)
    if name == "torch eager":
        return _loss_runner(torch_fn, x, y, backward)
    if name == "torch.compile":
        assert compiled is not None
        return _loss_runner(compiled, x, y, backward)
    return _copy_runner(x, backward)


# --- measuring ---------------------------------------------------------------------------------------------


def _error_text(error: BaseException) -> str:
    return "OOM" if _is_oom(error) else f"{type(error).__name__}: {str(error).strip()[:300]}"


def _derive(row: dict) -> None:
    """GB/s and ratios of a row whose times are in."""
    ours, copy = row.get("bcekit"), row.get("copy")
    seconds = {name: row[name] * 1e-3 for name in CONTENDERS if row.get(name)}
    row["bcekit GB/s"] = row["bytes"] / seconds["bcekit"] / 1e9 if ours else None
    row["copy GB/s"] = row["bytes"] / seconds["copy"] / 1e9 if copy else None
    row["bcekit / copy BW"] = copy / ours if ours and copy else None
    row["eager / bcekit"] = row["torch eager"] / ours if ours and row.get("torch eager") else None
    row["compile / bcekit"] = row["torch.compile"] / ours if ours and row.get("torch.compile") else None


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if value < 1 else f"{value:.3f}" if value < 100 else f"{value:.1f}"


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


DERIVED = ("bcekit GB/s", "copy GB/s", "bcekit / copy BW", "eager / bcekit", "compile / bcekit")
TABLE_HEAD = (
    f"| n | {' | '.join(CONTENDERS)} | {' | '.join(DERIVED)} |\n" + "|---:" * (1 + len(CONTENDERS) + 5) + "|"
)


def _format_row(row: dict) -> str:
    errors = row.get("errors", {})
    times = " | ".join(
        ("OOM" if errors[c] == "OOM" else "ERR") if c in errors else _ms(row.get(c)) for c in CONTENDERS
    )
    derived = " | ".join(
        (
            _number(row["bcekit GB/s"], 0),
            _number(row["copy GB/s"], 0),
            _number(row["bcekit / copy BW"]),
            _number(row["eager / bcekit"]),
            _number(row["compile / bcekit"]),
        )
    )
    return f"| 2^{row['n'].bit_length() - 1} | {times} | {derived} |"


def measure(
    backend: Backend,
    log2s: list[int],
    panels_wanted: list[tuple[str, str, str]],
    budget: float,
    min_repeats: int,
    max_repeats: int,
) -> tuple[list, list]:
    rows, panels = [], []
    for loss, dtype_name, pass_ in panels_wanted:
        dtype, backward = DTYPES[dtype_name], pass_ == "fwd+bwd"
        _, torch_fn = functions(loss)
        torch._dynamo.reset()  # one fresh compilation per panel, shared by all its sizes
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compiled = compile_loss(torch_fn)
        print(f"\n### {loss}, {dtype_name}, {pass_} (ms per step, median)\n\n{TABLE_HEAD}", flush=True)
        panel_start, compile_warm_up = time.perf_counter(), None
        for log2 in log2s:
            n = 1 << log2
            item_size = torch.empty((), dtype=dtype).element_size()
            row: dict = {
                "loss": loss,
                "dtype": dtype_name,
                "pass": pass_,
                "n": n,
                "bytes": _ideal_bytes(n, item_size, backward),
                "timing": {},
                "errors": {},
            }
            x = y = None
            try:
                x, y = _inputs(loss, dtype, n, backend.device)
            except Exception as error:  # no inputs: every cell of the row fails alike
                row["errors"] = dict.fromkeys(CONTENDERS, _error_text(error))
            for name in CONTENDERS if x is not None else ():
                run = None
                try:
                    run = _runner(name, loss, backward, x, y, compiled)
                    timing = backend.time(run, budget, min_repeats, max_repeats)
                    row[name] = timing.pop("ms")
                    row["timing"][name] = timing
                    if name == "torch.compile" and compile_warm_up is None:
                        compile_warm_up = timing["warm_up_s"]
                except Exception as error:
                    row["errors"][name] = _error_text(error)
                    if not _is_oom(error):
                        print(f"{loss}, {dtype_name}, {pass_}, 2^{log2}, {name}: {error!r}", file=sys.stderr)
                finally:
                    del run
                    backend.free()
            _derive(row)
            rows.append(row)
            print(_format_row(row), flush=True)
            del x, y
            backend.free()
        panels.append(panel_summary(loss, dtype_name, pass_, graphs_before, compile_warm_up, panel_start))
    return rows, panels


def _overhead_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    smallest = min(r["n"] for r in rows)
    selected = [r for r in rows if r["n"] == smallest]
    lines = [
        f"### n = 2^{smallest.bit_length() - 1}: per-step cost (µs, median)\n",
        f"| loss | dtype | pass | {' | '.join(CONTENDERS)} |",
        "|---" * 3 + "|---:" * len(CONTENDERS) + "|",
    ]
    for r in selected:
        cells = " | ".join("-" if r.get(c) is None else f"{r[c] * 1e3:.1f}" for c in CONTENDERS)
        lines.append(f"| {r['loss']} | {r['dtype']} | {r['pass']} | {cells} |")
    return "\n".join(lines)


def targets(rows: list[dict], device: str) -> tuple[str, list[dict]]:
    """The issue's targets, checked on the fwd+bwd rows of the largest size measured."""
    selected = [r for r in rows if r["pass"] == "fwd+bwd"]
    if not selected:
        return "", []
    largest = max(r["n"] for r in selected)
    lines = [
        f"### Targets: fwd+bwd at n = 2^{largest.bit_length() - 1} on {device}\n",
        "| loss | dtype | bcekit GB/s | copy GB/s | "
        + " | ".join(f"{k} (>= {v})" for k, v in TARGETS.items())
        + " | verdict |",
        "|---|---|" + "---:|" * (2 + len(TARGETS)) + "---|",
    ]
    results = []
    for r in (r for r in selected if r["n"] == largest):
        met = {k: r[k] is not None and r[k] >= v for k, v in TARGETS.items()}
        verdict = (
            "met" if all(met.values()) else "NOT met: " + ", ".join(k for k, ok in met.items() if not ok)
        )
        results.append(
            {"loss": r["loss"], "dtype": r["dtype"], "n": largest, "device": device, "verdict": verdict}
            | {k: r[k] for k in ("bcekit GB/s", "copy GB/s", *TARGETS)}
        )
        cells = " | ".join(_number(r[k]) for k in TARGETS)
        lines.append(
            f"| {r['loss']} | {r['dtype']} | {_number(r['bcekit GB/s'], 0)} | {_number(r['copy GB/s'], 0)} | "
            f"{cells} | {verdict} |"
        )
    return "\n".join(lines), results


def measure_memory(backend: Backend, log2: int, pairs: list[tuple[str, str]]) -> list[dict]:
    results = []
    n = 1 << log2
    for loss, dtype_name in pairs:
        dtype = DTYPES[dtype_name]
        gradient_bytes = n * torch.empty((), dtype=dtype).element_size()
        _, torch_fn = functions(loss)
        for contender in LOSS_CONTENDERS:
            result: dict = {"loss": loss, "dtype": dtype_name, "contender": contender, "n": n}
            x = y = step = None
            try:
                compiled = None
                if contender == "torch.compile":
                    torch._dynamo.reset()
                    compiled = compile_loss(torch_fn)
                x, y = _inputs(loss, dtype, n, backend.device)
                step = _runner(contender, loss, True, x, y, compiled)
                for _ in range(2):  # warm-up: compilation, Triton's JIT, the allocator's first blocks
                    step()
                backend.sync()
                gc.collect()
                peak, retained = backend.memory_probe(step)
                result |= {
                    "peak_extra_mib": peak / 2**20,
                    "gradient_mib": gradient_bytes / 2**20,
                    "multiple_of_gradient": peak / gradient_bytes,
                    "retained_mib": retained / 2**20,
                }
                line = (
                    f"{result['peak_extra_mib']:.1f} | {result['multiple_of_gradient']:.2f} | "
                    f"{result['retained_mib']:.1f}"
                )
            except Exception as error:
                result["error"] = _error_text(error)
                line = "OOM | - | -" if _is_oom(error) else "ERR | - | -"
                if not _is_oom(error):
                    print(f"memory {loss}, {dtype_name}, {contender}: {error!r}", file=sys.stderr)
            finally:
                del x, y, step
                backend.free()
            results.append(result)
            print(f"| {loss} | {dtype_name} | {contender} | {line} |", flush=True)
    return results


# --- plot --------------------------------------------------------------------------------------------------


def _subtitle(info: dict) -> str:
    return f"{info['device']}, torch {info['torch']}, CUDA {info['torch CUDA']}, Triton {info['triton']}"


def replot(path: Path) -> None:
    """Redraw ``gpu.png`` beside a saved ``gpu.json`` without measuring again."""
    data = json.loads(path.read_text())
    plot(
        data["rows"],
        path.with_suffix(".png"),
        CONTENDERS,
        COLORS,
        "bcekit GPU benchmark",
        _subtitle(data["machine"]),
    )


# --- command line -------------------------------------------------------------------------------------------


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-log2", type=int, default=None, help="smallest size 2^k (default 16)")
    parser.add_argument("--max-log2", type=int, default=None, help="largest size 2^k (default 28)")
    parser.add_argument("--step", type=int, default=1, help="step between exponents (default 1)")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timed samples per cell, at least (default 0.25)",
    )
    parser.add_argument("--min-repeats", type=int, default=5)
    parser.add_argument("--max-repeats", type=int, default=1000)
    parser.add_argument(
        "--memory-log2", type=int, default=None, help="size 2^k of the peak-memory measurement; 0 skips it"
    )
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu.json, gpu.png")
    # CPU tensors, tiny sizes, fake memory numbers: checks the script's own code paths without a GPU
    parser.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    dry = arguments.dry_run
    defaults = {
        "min_log2": 10 if dry else 16,
        "max_log2": 12 if dry else 28,
        "budget": 0.02 if dry else 0.25,
        "memory_log2": 12 if dry else 26,
        "out": Path(tempfile.mkdtemp(prefix="bcekit-gpu-dry-run-")) if dry else Path("benchmarks/results"),
    }
    for name, value in defaults.items():
        if getattr(arguments, name) is None:
            setattr(arguments, name, value)
    if dry:
        arguments.max_repeats = min(arguments.max_repeats, 20)
    return arguments


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--check" in argv:  # the end-to-end check, benchmarks/gpu_check.py, with the other arguments
        from benchmarks import gpu_check

        sys.exit(gpu_check.main([a for a in argv if a != "--check"]))
    arguments = _arguments(argv)
    if not arguments.dry_run and not torch.cuda.is_available():
        print(NO_CUDA.format(version=torch.__version__, cuda=torch.version.cuda), file=sys.stderr)
        sys.exit(2)

    started = time.perf_counter()
    backend = Backend(arguments.dry_run)
    configure_dynamo()
    info = machine(backend)
    print("## Machine\n")
    for key, value in info.items():
        print(f"- {key}: {value}")
    if not bce_triton.AVAILABLE and not arguments.dry_run:
        print("\nWARNING: Triton is not importable: bcekit runs its composed torch path, not its kernels.")
    print(
        f"\nMilliseconds per step, median of samples after a warm-up (a sample: back-to-back calls between "
        f"CUDA events for about {SAMPLE_MS} ms, at most {MAX_INNER} calls): at least "
        f"{arguments.min_repeats} samples and {arguments.budget} s per cell, at most "
        f"{arguments.max_repeats} samples. GB/s: bytes of the ideal pass (fwd 2ns, fwd+bwd 3ns) / time; "
        "copy: dst.copy_(src) moving those bytes (read + written).",
        flush=True,
    )
    log2s = list(range(arguments.min_log2, arguments.max_log2 + 1, arguments.step))
    wanted = [
        (loss, dtype, pass_)
        for loss in LOSSES
        for dtype in DTYPES
        for pass_ in PASSES
        if loss in arguments.losses and dtype in arguments.dtypes and pass_ in arguments.passes
    ]
    rows, panels = measure(
        backend, log2s, wanted, arguments.budget, arguments.min_repeats, arguments.max_repeats
    )
    overhead = _overhead_table(rows)
    if overhead:
        print(f"\n{overhead}")
    target_table, target_results = targets(rows, info["device"])
    if target_table:
        print(f"\n{target_table}")

    memory = []
    if arguments.memory_log2 > 0:
        method = "dry run: not measured, zeros" if arguments.dry_run else "torch.cuda.max_memory_allocated()"
        print(
            f"\n### Peak memory of one forward+backward step, n = 2^{arguments.memory_log2}, beyond the "
            f"inputs and the leaf ({method}; on {info['device']})\n\n"
            "| loss | dtype | contender | peak extra MiB | × gradient | retained MiB |\n"
            "|---|---|---|---:|---:|---:|",
            flush=True,
        )
        pairs = [
            (loss, d) for loss in LOSSES for d in DTYPES if loss in arguments.losses and d in arguments.dtypes
        ]
        memory = measure_memory(backend, arguments.memory_log2, pairs)
        print("\ngradient = n × item size; the ideal peak is 1× (the gradient only)")

    wall = time.perf_counter() - started
    arguments.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(arguments).items()}
    settings |= {"sample_ms": SAMPLE_MS, "max_inner": MAX_INNER}
    result = {
        "machine": info,
        "settings": settings,
        "wall_s": round(wall, 1),
        "panels": panels,
        "rows": rows,
        "targets": target_results,
        "memory": memory,
    }
    (arguments.out / "gpu.json").write_text(json.dumps(result, indent=1))
    plot(rows, arguments.out / "gpu.png", CONTENDERS, COLORS, "bcekit GPU benchmark", _subtitle(info))
    print(f"\nwrote {arguments.out / 'gpu.json'} and {arguments.out / 'gpu.png'}; wall time {wall:.0f} s")


if __name__ == "__main__":
    main()
