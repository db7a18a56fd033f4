"""Fused linear + BCE vs the unfused torch path: time and peak memory of one training step.

Run from the repository root::

    python -m benchmarks.linear [--device cpu|cuda] [--n N] [--d D] [--c C] [--dtype float32]
                                [--chunk-sizes default 4096 ...] [--positives 5] [--targets dense sparse]
                                [--repeats 5] [--timeout 1800] [--out benchmarks/results]

Sizes. CPU (default): N = 2048 rows, D = 256 features, C = 131072 labels, float32. ``--device cuda``:
N = 8192, D = 1024, C = 1,048,576, bfloat16 (the issue's GPU setting; the unfused path's logits alone are
16 GiB there). ``--n``, ``--d``, ``--c`` and ``--dtype`` override either.

What is timed: one forward+backward step of a classifier head, ``loss = f(...); loss.backward()``, then
``x.grad = w.grad = b.grad = None`` (as ``optimizer.zero_grad(set_to_none=True)`` does), with leaves
``x`` (N, D), ``w`` (C, D) and ``b`` (C,) that all require a gradient (``x`` stands for the features an
encoder produced), ``reduction='mean'``. Contenders:

* unfused: ``F.binary_cross_entropy_with_logits(F.linear(x, w, b), y)``: torch builds the (N, C) logits,
  the loss's intermediates and the (N, C) logit gradient;
* fused: ``bcekit.torch.linear_binary_cross_entropy_with_logits(x, w, y, b, chunk_size=k)``, one contender
  per ``--chunk-sizes`` entry (``default``: ``chunk_size=None``, bcekit's own choice).

Targets (``--targets``): ``--positives`` (5) labels of 1 per row, the rest 0, at random distinct labels
(one in each of ``positives`` equal bins of the labels), the same in both kinds:

* dense: an (N, C) tensor of the input's dtype, given to both contenders as is (it is an input: it exists
  before the step, so it is not part of the step's memory);
* sparse: a coalesced COO tensor storing the N x positives ones. The fused path takes it as is (it is never
  densified); the unfused path must build the dense target, so its step is
  ``F.binary_cross_entropy_with_logits(F.linear(x, w, b), y.to_dense())``: the densification is timed and
  its (N, C) tensor counted.

Every (target kind, contender) cell runs in a FRESH ``python`` subprocess, so no cell inherits another's
allocator state, caches or high-water mark. The child

1. runs one step on a tiny problem of the same kind (N = 64, D = 16, C = 512): library initialisation,
   thread pools, Triton's JIT compilation on a GPU; one-time costs that are not the step's;
2. allocates the inputs at the measured size (``x``, ``w``, ``b``, ``y``; never a dense copy of a sparse
   target) and collects garbage;
3. CPU: resets the kernel's high-water mark of its resident set (writes ``5`` to ``/proc/self/clear_refs``;
   where that is refused it goes on without, see below) and reads ``VmRSS`` from ``/proc/self/status``:
   the baseline, which holds the interpreter, the libraries and the inputs. CUDA: ``torch.cuda.synchronize``,
   the baseline is ``torch.cuda.memory_allocated()``, then ``torch.cuda.reset_peak_memory_stats()``;
4. runs 1 + ``--repeats`` steps, each timed on its own (``time.perf_counter``; on CUDA with a
   ``torch.cuda.synchronize()`` before and after): the first is the warm-up (left out of the times), the
   others give the median;
5. reads the peak: CPU ``VmHWM`` (the resident set's high-water mark; ``getrusage().ru_maxrss``, which
   Linux derives from the same mark and ``clear_refs`` resets too, is recorded beside it and their largest
   difference printed), CUDA ``torch.cuda.max_memory_allocated()``.

Peak extra memory = that peak minus the baseline: the most memory the steps (warm-up included) held at once
beyond the inputs and everything that existed before. It includes the parameter gradients both paths must
produce, ``x.grad`` + ``w.grad`` + ``b.grad`` = (N D + C D + C) item sizes (128 MiB of float32 at the CPU
default, most of it ``w.grad``; printed as "gradients"), so the ideal is that figure plus a little; the
column "beyond gradients" subtracts it. The unfused path adds the (N, C) logits, the loss's intermediates and
the logit gradient (and the densified target); the fused path adds chunk-sized buffers and its float32
accumulator of ``x.grad`` for half-precision inputs. The retained memory (after the steps minus the
baseline, with the gradients set to None) is shown too. On the CPU only pages actually touched count, as in
any RSS measurement; (N, C) tensors are far above glibc's mmap threshold, so their pages come and go with
each allocation, while smaller ones, such as the fused path's chunk buffers (8 MiB by default on the CPU),
may stay in malloc's heap (glibc raises its mmap threshold up to 32 MiB once a block that size is freed):
they show as retained, and heap fragmentation adds to the peak. Without a working
``clear_refs`` the high-water mark is the process's lifetime peak: the child then reports ``hwm_slack_mib``
(``VmHWM - VmRSS`` at the baseline, the tiny warm-up's and the allocation's leftovers), and the figure is an
upper bound if the steps' peak is below it (``method`` says which applied). On CUDA the figures are the
caching allocator's tensor allocations, not what it reserved from the driver.

Out of memory: a CUDA cell that raises ``torch.cuda.OutOfMemoryError`` (or a CPU cell whose allocation
fails, or that is SIGKILLed, as the kernel's OOM killer does) is recorded as ``OOM`` and the others run on.
Any other failure is ``ERR`` (its stderr is printed) and makes the script exit with status 1 at the end.

Outputs: the machine; a Markdown table per run (median ms, peak extra, gradients, beyond gradients, retained
MiB, and the ratios fused / unfused of time and of peak extra memory); the issue's targets, memory <= 10% of
the unfused path's and time <= 1.1x, per (target kind, fused contender); ``linear.json`` and ``linear.png``
(time and peak extra memory per cell, bars) in ``--out``. Torch uses ``torch.set_num_threads(os.cpu_count())``
threads on the CPU. Do not run anything else meanwhile: other processes' load skews the timings.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._common import write_results

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
DEFAULTS = {
    "cpu": {"n": 2048, "d": 256, "c": 131072, "dtype": "float32"},
    "cuda": {"n": 8192, "d": 1024, "c": 1 << 20, "dtype": "bfloat16"},
}
TARGET_KINDS = ("dense", "sparse")
UNFUSED = "unfused"
#: The issue's targets for the fused path, as fractions of the unfused path's figures: at most these.
TARGET_MEMORY, TARGET_TIME = 0.10, 1.1
#: The child's tiny warm-up problem (N, D, C).
WARM_UP_SIZE = (64, 16, 512)


def _contender_name(chunk: int | None) -> str:
    return "fused" if chunk is None else f"fused (chunk {chunk})"


# --- the child: one (target kind, contender) cell in a fresh interpreter ----------------------------------


def _inputs(
    device: torch.device, dtype: torch.dtype, n: int, d: int, c: int, positives: int, kind: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leaves x (N, D), w (C, D), b (C,) and the target: ``positives`` ones per row, dense or sparse COO."""
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, generator=generator, device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(c, d, generator=generator, device=device, dtype=dtype) * d**-0.5).requires_grad_()
    b = torch.zeros(c, device=device, dtype=dtype).requires_grad_()
    width = c // positives  # one positive in each of `positives` bins of this width: distinct labels
    offsets = torch.randint(width, (n, positives), generator=generator, device=device)
    columns = (offsets + torch.arange(positives, device=device) * width).reshape(-1)
    rows = torch.arange(n, device=device).repeat_interleave(positives)
    if kind == "dense":
        y = torch.zeros(n, c, device=device, dtype=dtype)
        y[rows, columns] = 1
    else:
        values = torch.ones(rows.numel(), device=device, dtype=dtype)
        indices = torch.stack((rows, columns))
        y = torch.sparse_coo_tensor(indices, values, (n, c), check_invariants=True).coalesce()
    return x, w, b, y


def _step(contender: str, chunk: int | None, kind: str, inputs: tuple) -> Callable[[], None]:
    from bcekit.torch import linear_binary_cross_entropy_with_logits

    x, w, b, y = inputs
    if contender == UNFUSED:
        if kind == "dense":

            def loss() -> torch.Tensor:
                return F.binary_cross_entropy_with_logits(F.linear(x, w, b), y)
        else:

            def loss() -> torch.Tensor:
                return F.binary_cross_entropy_with_logits(F.linear(x, w, b), y.to_dense())
    else:

        def loss() -> torch.Tensor:
            return linear_binary_cross_entropy_with_logits(x, w, y, b, chunk_size=chunk)

    def step() -> None:
        loss().backward()
        x.grad = w.grad = b.grad = None  # optimizer.zero_grad(set_to_none=True)

    return step


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def _child(spec_json: str) -> None:
    """Runs in a fresh interpreter (see the module docstring); prints one JSON line."""
    spec = json.loads(spec_json)
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(os.cpu_count() or 1)
    kind, contender, chunk = spec["kind"], spec["contender"], spec["chunk"]
    n, d, c, positives = spec["n"], spec["d"], spec["c"], spec["positives"]
    result: dict = {"kind": kind, "contender": contender}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    try:
        small = _inputs(device, dtype, *WARM_UP_SIZE, min(positives, WARM_UP_SIZE[2]), kind, spec["seed"])
        _step(contender, chunk, kind, small)()  # library set-up, thread pools, Triton's JIT
        sync()
        del small
        inputs = _inputs(device, dtype, n, d, c, positives, kind, spec["seed"])
        step = _step(contender, chunk, kind, inputs)
        gc.collect()
        sync()
        if cuda:
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            method = "torch.cuda.max_memory_allocated() after reset_peak_memory_stats()"
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
                method = "VmHWM after clear_refs (exact)"
            except OSError:
                method = "VmHWM without clear_refs (an upper bound if below hwm_slack_mib)"
            before_kib, hwm_before_kib = _status_kib("VmRSS"), _status_kib("VmHWM")
        times = []
        for _ in range(1 + spec["repeats"]):
            sync()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        if cuda:
            peak = torch.cuda.max_memory_allocated(device) - before
            retained = torch.cuda.memory_allocated(device) - before
            result["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak = (_status_kib("VmHWM") - before_kib) * 1024
            retained = (_status_kib("VmRSS") - before_kib) * 1024
            maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            result["ru_maxrss_extra_mib"] = (maxrss_kib - before_kib) / 1024
            result["hwm_slack_mib"] = (hwm_before_kib - before_kib) / 1024
            result["baseline_rss_mib"] = before_kib / 1024
        x, w, b, y = inputs
        item = x.element_size()
        result.update(
            {
                "warm_up_ms": times[0] * 1e3,
                "times_ms": [t * 1e3 for t in times[1:]],
                "median_ms": statistics.median(times[1:]) * 1e3,
                "peak_extra_mib": peak / 2**20,
                "retained_mib": retained / 2**20,
                "gradients_mib": (x.numel() + w.numel() + b.numel()) * item / 2**20,
                "method": method,
            }
        )
    except Exception as error:
        if not _is_oom(error):
            raise
        result.update({"oom": True, "error": f"{type(error).__name__}: {str(error).strip()[:300]}"})
    print(json.dumps(result), flush=True)


# --- the parent -----------------------------------------------------------------------------------------


def _run_cell(spec: dict, timeout: float) -> dict:
    code = f"from benchmarks.linear import _child; _child({json.dumps(spec)!r})"
    cell = {"kind": spec["kind"], "contender": spec["contender"]}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {**cell, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode == -signal.SIGKILL:
        return {**cell, "oom": True, "error": "SIGKILLed (the kernel's OOM killer?)"}
    if done.returncode != 0 or not done.stdout.strip():
        return {**cell, "error": f"exit status {done.returncode}:\n{done.stderr.strip()[-3000:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _time_cell(cell: dict) -> str:
    if cell.get("oom"):
        return "OOM"
    if "error" in cell:
        return "ERR"
    return f"{cell['median_ms']:.1f}"


def _ratio(cell: dict, reference: dict | None, key: str) -> float | None:
    if reference is None or key not in cell or key not in reference or reference[key] <= 0:
        return None
    return cell[key] / reference[key]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


TABLE_HEAD = (
    "| target | contender | ms (median) | peak extra MiB | gradients MiB | beyond gradients MiB | "
    "retained MiB | time / unfused | memory / unfused |\n" + "|---|---|" + "---:|" * 7
)


def _row(cell: dict, reference: dict | None) -> str:
    if "median_ms" not in cell:
        blank = " - |" * 6
        return f"| {cell['kind']} | {cell['contender']} | {_time_cell(cell)} |{blank}"
    peak, gradients = cell["peak_extra_mib"], cell["gradients_mib"]
    return (
        f"| {cell['kind']} | {cell['contender']} | {cell['median_ms']:.1f} | {peak:.1f} | {gradients:.1f} | "
        f"{peak - gradients:.1f} | {cell['retained_mib']:.1f} | "
        f"{_fmt(_ratio(cell, reference, 'median_ms'))} | "
        f"{_fmt(_ratio(cell, reference, 'peak_extra_mib'), 3)} |"
    )


def _targets(cells: list[dict]) -> list[dict]:
    rows = []
    for kind in TARGET_KINDS:
        reference = next((c for c in cells if c["kind"] == kind and c["contender"] == UNFUSED), None)
        for cell in cells:
            if cell["kind"] != kind or cell["contender"] == UNFUSED:
                continue
            time_ratio = _ratio(cell, reference, "median_ms")
            memory_ratio = _ratio(cell, reference, "peak_extra_mib")
            if "median_ms" not in cell:
                verdict = f"fused {_time_cell(cell)}"
            elif reference is None or reference.get("oom"):
                verdict = "unfused OOM, fused runs" if reference else "no unfused cell"
            elif "median_ms" not in reference:
                verdict = "unfused ERR"
            else:
                memory_ok, time_ok = memory_ratio <= TARGET_MEMORY, time_ratio <= TARGET_TIME
                verdict = (
                    "met"
                    if memory_ok and time_ok
                    else "missed: "
                    + ", ".join(what for what, ok in (("memory", memory_ok), ("time", time_ok)) if not ok)
                )
            rows.append(
                {
                    "kind": kind,
                    "contender": cell["contender"],
                    "time_ratio": time_ratio,
                    "memory_ratio": memory_ratio,
                    "verdict": verdict,
                }
            )
    return rows


def _gpu_info() -> None:
    """Runs in a subprocess, so that the parent never holds a CUDA context (GPU memory) of its own."""
    from bcekit.torch import _triton as bce_triton
    from benchmarks.gpu import _triton_version

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    info = {
        "device": props.name,
        "compute capability": f"{props.major}.{props.minor}",
        "GPU memory (GiB)": round(props.total_memory / 2**30, 1),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"),
        "torch CUDA": torch.version.cuda or "none",
        "triton": _triton_version(),
        "bcekit Triton kernels": bce_triton.describe(),
    }
    print(json.dumps(info), flush=True)


def machine(device: str) -> dict:
    from benchmarks.cpu import machine as cpu_machine

    info = cpu_machine()
    if device == "cuda":
        code = "from benchmarks.linear import _gpu_info; _gpu_info()"
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
        )
        info.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return info


def plot(cells: list[dict], path: Path, title: str) -> None:
    """Two panels of grouped bars (one group per target kind): median ms and peak extra MiB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contenders = list(dict.fromkeys(c["contender"] for c in cells))
    kinds = [k for k in TARGET_KINDS if any(c["kind"] == k for c in cells)]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(contenders))
    for axis, key, label in ((axes[0], "median_ms", "ms per step (median)"), (axes[1], "peak_extra_mib", "")):
        for i, contender in enumerate(contenders):
            for j, kind in enumerate(kinds):
                cell = next((c for c in cells if c["kind"] == kind and c["contender"] == contender), None)
                position = j + (i - (len(contenders) - 1) / 2) * width
                color = f"C{i}"
                if cell is not None and key in cell:
                    axis.bar(position, cell[key], width, color=color, label=contender if j == 0 else None)
                else:
                    text = "OOM" if cell is not None and cell.get("oom") else "ERR"
                    axis.bar(position, 0, width, color=color, label=contender if j == 0 else None)
                    axis.annotate(text, (position, 0), ha="center", va="bottom", fontsize=8, color=color)
        axis.set_xticks(range(len(kinds)), [f"{k} target" for k in kinds])
        axis.set_ylabel(label or "peak extra MiB (incl. parameter gradients)")
        axis.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _chunk(text: str) -> int | None:
    if text == "default":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a chunk size must be 'default' or a positive integer, got {text}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--n", type=int, help="rows (CPU default 2048, CUDA 8192)")
    parser.add_argument("--d", type=int, help="features (CPU default 256, CUDA 1024)")
    parser.add_argument("--c", type=int, help="labels (CPU default 131072, CUDA 1048576)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="CPU default float32, CUDA bfloat16")
    parser.add_argument(
        "--chunk-sizes",
        type=_chunk,
        nargs="+",
        default=[None],
        help="one fused contender per entry: 'default' (chunk_size=None) or labels per chunk",
    )
    parser.add_argument("--positives", type=int, default=5, help="targets of 1 per row (default 5)")
    parser.add_argument("--targets", nargs="+", choices=TARGET_KINDS, default=list(TARGET_KINDS))
    parser.add_argument("--repeats", type=int, default=5, help="timed steps after the warm-up (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per cell before it is killed")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    arguments = parser.parse_args()
    defaults = DEFAULTS[arguments.device]
    for key, value in defaults.items():
        if getattr(arguments, key) is None:
            setattr(arguments, key, value)
    if not 1 <= arguments.positives <= arguments.c or arguments.repeats < 1:
        parser.error("need 1 <= --positives <= --c and --repeats >= 1")
    if arguments.device == "cuda" and not torch.cuda.is_available():
        print(
            f"--device cuda needs a CUDA GPU: torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})",
            file=sys.stderr,
        )
        sys.exit(2)

    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)  # what the children use; reported in the machine section
    info = machine(arguments.device)
    print("## Machine\n")
    for key, value in info.items():
        print(f"- {key}: {value}")
    n, d, c, dtype = arguments.n, arguments.d, arguments.c, arguments.dtype
    size = f"N = {n}, D = {d}, C = {c}, {dtype}, {arguments.device}"
    print(
        f"\n### One forward+backward step, {size}, reduction='mean', "
        f"{arguments.positives} positives per row\n\n"
        f"Median of {arguments.repeats} steps after a warm-up step; peak extra = peak over all the steps "
        "minus the baseline (inputs allocated); gradients = x.grad + w.grad + b.grad, which both paths "
        "produce. Each cell is a fresh subprocess.\n\n" + TABLE_HEAD,
        flush=True,
    )
    contenders = [(UNFUSED, None)] + [(_contender_name(k), k) for k in dict.fromkeys(arguments.chunk_sizes)]
    cells, failed = [], False
    for kind in arguments.targets:
        reference = None
        for contender, chunk in contenders:
            spec = {
                "device": arguments.device,
                "dtype": dtype,
                "n": n,
                "d": d,
                "c": c,
                "positives": arguments.positives,
                "kind": kind,
                "contender": contender,
                "chunk": chunk,
                "repeats": arguments.repeats,
                "seed": arguments.seed,
            }
            cell = _run_cell(spec, arguments.timeout)
            cell["chunk"] = chunk
            if "error" in cell and not cell.get("oom"):
                failed = True
                print(f"{kind}, {contender} failed: {cell['error']}", file=sys.stderr, flush=True)
            if contender == UNFUSED:
                reference = cell
            cells.append(cell)
            print(_row(cell, reference), flush=True)

    methods = sorted({cell["method"] for cell in cells if "method" in cell})
    print(f"\nmemory measured by: {', '.join(methods) or '-'}")
    maxrss = [
        abs(c["ru_maxrss_extra_mib"] - c["peak_extra_mib"]) for c in cells if "ru_maxrss_extra_mib" in c
    ]
    if maxrss:
        print(f"getrusage().ru_maxrss - baseline agrees with VmHWM - baseline within {max(maxrss):.1f} MiB")
    targets = _targets(cells)
    print(
        f"\n### The issue's targets: fused memory <= {TARGET_MEMORY:.0%} of unfused (peak extra), "
        f"fused time <= {TARGET_TIME}x unfused\n\n"
        "| target | contender | time / unfused | memory / unfused | verdict |\n|---|---|---:|---:|---|"
    )
    for t in targets:
        time_ratio, memory_ratio = _fmt(t["time_ratio"]), _fmt(t["memory_ratio"], 3)
        print(f"| {t['kind']} | {t['contender']} | {time_ratio} | {memory_ratio} | {t['verdict']} |")

    wall = write_results(arguments, info, started, "linear", cells=cells, targets=targets)
    plot(cells, arguments.out / "linear.png", f"fused linear + BCE vs unfused, one training step: {size}")
    print(
        f"\nwrote {arguments.out / 'linear.json'} and {arguments.out / 'linear.png'}; wall time {wall:.0f} s"
    )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
