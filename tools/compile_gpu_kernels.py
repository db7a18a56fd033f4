"""Compile every Triton kernel specialisation bcekit launches, for real NVIDIA targets, without a GPU.

Run from the repository root (``tests/torch/test_gpu_compile.py`` runs it in CI)::

    python tools/compile_gpu_kernels.py [--targets 80 86 89 90 100] [--full 90] [--jobs 2] [--json FILE]

Triton's interpreter (``TRITON_INTERPRET=1``), which the test suite runs the kernels with on CPU tensors,
accepts code that Triton's compiler refuses; this runs the compiler itself. Triton's driver is replaced by
one that reports a CUDA target (``GPUTarget("cuda", arch, 32)``) and never launches: every launch bcekit
makes is compiled (``JITFunction.warmup``: front end, LLVM, PTX, then the bundled ptxas to a cubin) and
nothing runs, so outputs stay garbage and only the host code's path matters.

What is launched comes from the public API: the losses of ``bcekit.torch`` (functional and modules) are
called on small CPU tensors sent down the branch CUDA tensors take (``_kernel._TRITON_ON_CPU``), over both
losses, every dtype, every broadcast form of ``weight`` and ``pos_weight``, forward, fused forward and
both kinds of backward, options, an odd element count, one element and a misaligned view; kernels with
2^31 elements or more (int64 indexing) are launched through ``_triton.run`` on expanded one-element
tensors (nothing is allocated). The compile-time space, every ``(kernel, LOGITS, dtype, W_MODE, P_MODE,
G_MODE)``, must be covered, so a specialisation added to the kernel and not reachable here fails.

Targets: for ``--full`` (sm_90), every compile-time combination and every argument specialisation
Triton makes of each kernel group (see :func:`plan`); for the other targets, one per (kernel, loss, dtype,
pass). sm_100 and later take the bundled ``ptxas-blackwell``; a target
the installed Triton cannot compile for at all is reported as unsupported, not as an error.

Reported per compiled kernel: PTX instructions in all, those of float64 type (``.f64``) and of float32
type, registers, stack and local (spill) bytes per thread (``cuobjdump -res-usage`` on the cubin), and the
compile time. The exit status is nonzero on any compile error, on any float64 instruction in a kernel
whose inputs are not float64, or on a compile-time combination the public API did not reach.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_TARGETS = (80, 86, 89, 90, 100)
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
CONSTEXPRS = ("LOGITS", "W_MODE", "P_MODE", "G_MODE", "INDEX64")
_INSTRUCTION = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)", re.MULTILINE)


# --------------------------------------------------------------------------------------------------------
# A driver that compiles and never launches
# --------------------------------------------------------------------------------------------------------


class _CompileOnlyDriver:
    """What Triton's JIT asks of a driver before a launch: the target, a device id (one per target, so
    each has its own kernel cache) and a stream."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


def _tensor_key(tensor) -> tuple:
    return ("tensor", str(tensor.dtype).rpartition(".")[2], tensor.data_ptr() % 16 == 0)


def _value_key(value: Any) -> tuple:
    if hasattr(value, "data_ptr"):
        return _tensor_key(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return (type(value).__name__,)
    width = "i32" if -(2**31) <= value < 2**31 else "i64"
    return (width, value % 16 == 0, value == 1)


class Launch:
    """One launch bcekit made: the kernel, its grid, arguments and compile-time options."""

    def __init__(self, kernel, grid, args: tuple, kwargs: dict) -> None:
        self.kernel, self.grid, self.args, self.kwargs = kernel, grid, args, kwargs
        self.name = kernel.fn.__name__
        specialised = [
            param.name for param in kernel.params if not param.is_constexpr and not param.do_not_specialize
        ]
        names = [param.name for param in kernel.params if not param.is_constexpr]
        values = dict(zip(names, args, strict=False))
        self.key = (
            self.name,
            tuple(sorted(kwargs.items())),
            tuple(_value_key(values[name]) for name in specialised),
        )

    @property
    def dtype(self) -> str:
        return str(self.args[0].dtype).rpartition(".")[2]

    def space(self) -> tuple:
        """Its point in the compile-time space that must be covered."""
        if self.name == "_scale_kernel":
            return (self.name, self.dtype)
        return (self.name, self.dtype, *(self.kwargs[name] for name in CONSTEXPRS[:4]))

    def group(self) -> tuple:
        """Its group for the targets compiled representatively: kernel, loss, dtype, pass, index width."""
        return (
            self.name,
            self.kwargs.get("LOGITS"),
            self.dtype,
            self.kwargs.get("G_MODE"),
            self.kwargs["INDEX64"],
        )

    def describe(self) -> dict:
        return {
            "kernel": self.name,
            "dtype": self.dtype,
            **{name: self.kwargs[name] for name in CONSTEXPRS if name in self.kwargs},
            "BLOCK": self.kwargs["BLOCK"],
            "num_warps": self.kwargs.get("num_warps"),
            "n_divisible_by_16": next((key[1] for key in self.key[2] if key[0] in ("i32", "i64")), None),
            "aligned": all(key[2] for key in self.key[2] if key[0] == "tensor"),
        }


# --------------------------------------------------------------------------------------------------------
# Driving the public API
# --------------------------------------------------------------------------------------------------------


def record_launches() -> list[Launch]:
    """Every distinct launch the public API makes over the option matrix (nothing compiled or run)."""
    import numpy as np
    import torch

    import bcekit.torch as bce
    from bcekit import _native
    from bcekit.torch import _kernel, _triton

    launches: dict[tuple, Launch] = {}

    def record(kernel, grid, *args, **kwargs):
        launch = Launch(kernel, grid, args, kwargs)
        launches.setdefault(launch.key, launch)

    _triton._launch = record
    _kernel._TRITON_ON_CPU = True
    dtypes = {name: getattr(torch, name) for name in DTYPE_NAMES}
    rows, columns = 24, 32  # 768 elements: divisible by 16
    forms = {
        "absent": None,
        "scalar": (),
        "per-class": (columns,),
        "per-row": (rows, 1),
        "full": (rows, columns),
    }
    rng = np.random.default_rng(0)

    def tensor(shape, dtype, low=0.05, high=0.95):
        return torch.tensor(rng.uniform(low, high, shape)).to(dtype)

    def step(kind, x, y, weight=None, pos_weight=None, reduction="mean", target_grad=False, **options):
        leaf = x.clone().requires_grad_(True)
        target = y.clone().requires_grad_(target_grad)
        if kind == "logits":
            loss = bce.binary_cross_entropy_with_logits(
                leaf, target, weight, reduction=reduction, pos_weight=pos_weight, **options
            )
        else:
            loss = bce.binary_cross_entropy(leaf, target, weight, reduction=reduction, **options)
        if reduction == "none":
            loss.backward(torch.rand_like(loss))  # one grad_output per element
            leaf.grad = target.grad = None
            loss = (
                bce.binary_cross_entropy_with_logits(
                    leaf, target, weight, reduction="none", pos_weight=pos_weight
                )
                if kind == "logits"
                else bce.binary_cross_entropy(leaf, target, weight, reduction="none")
            )
            loss.sum().backward()  # one value expanded: read as one
        else:
            loss.backward()

    for dtype_name, kind in itertools.product(DTYPE_NAMES, ("logits", "bce")):
        dtype = dtypes[dtype_name]
        x, y = tensor((rows, columns), dtype), tensor((rows, columns), dtype)
        pos_forms = forms if kind == "logits" else {"absent": None}
        for w_shape, p_shape in itertools.product(forms.values(), pos_forms.values()):
            weight = None if w_shape is None else tensor(w_shape, dtype, 0.5, 2.0)
            pos_weight = None if p_shape is None else tensor(p_shape, dtype, 0.5, 2.0)
            step(kind, x, y, weight, pos_weight, "mean")  # fused forward, scale-unless-one backward
            step(kind, x, y, weight, pos_weight, "sum", target_grad=True)  # and a scalar-grad_output backward
            step(kind, x, y, weight, pos_weight, "none")  # forward, both backwards
        # options, an odd count, one element, a misaligned view, modules
        step(kind, x, y, reduction="mean", label_smoothing=0.1, ignore_index=0.0)
        odd = tensor((37,), dtype), tensor((37,), dtype)
        step(kind, *odd, reduction="mean", target_grad=True)
        step(kind, tensor((1,), dtype), tensor((1,), dtype), reduction="none")
        base_x, base_y = tensor((rows * columns + 1,), dtype), tensor((rows * columns + 1,), dtype)
        step(kind, base_x[1:], base_y[1:], reduction="mean")
        module = (
            bce.BCEWithLogitsLoss(pos_weight=tensor((columns,), dtype)) if kind == "logits" else bce.BCELoss()
        )
        module(x.clone().requires_grad_(True), y).backward()
    # 2^31 elements or more: int64 indices, through the launcher on expanded one-element tensors
    huge = 2**31 + 5
    for dtype_name, kind in itertools.product(DTYPE_NAMES, ("logits", "bce")):
        dtype = dtypes[dtype_name]
        x = torch.full((1,), 0.5, dtype=dtype).expand(huge)
        mean, none = (_native.plan(kind, dtype_name, (huge,), None, None, r, triton=True) for r in (1, 0))
        _triton.run(mean, x, x, None, None, grad_input=x, grad_scale=1.0 / huge)
        one = torch.ones(1, dtype=dtype)
        _triton.run(mean, x, x, None, None, grad_input=x, grad_target=x, grad_output=one)
        _triton.run(none, x, x, None, None, grad_input=x, grad_output=x)
        if dtype in (torch.float32, torch.float64):
            _triton.scale_unless_one(x, one)
    return list(launches.values())


def expected_space() -> set[tuple]:
    """Every compile-time combination the kernels have."""
    space = set()
    for dtype, logits, w_mode, g_mode in itertools.product(DTYPE_NAMES, (True, False), range(5), range(3)):
        for p_mode in range(5) if logits else (0,):
            space.add(("_bce_kernel", dtype, logits, w_mode, p_mode, g_mode))
    space.update({("_scale_kernel", "float32"), ("_scale_kernel", "float64")})
    return space


# --------------------------------------------------------------------------------------------------------
# Compiling and measuring
# --------------------------------------------------------------------------------------------------------


def _cuobjdump() -> str | None:
    try:
        import triton.backends.nvidia as nvidia

        path = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
        return str(path) if path.exists() else None
    except ImportError:  # pragma: no cover
        return None


def _resources(cubin: bytes, tool: str | None) -> dict:
    """Registers, stack, local and shared bytes of the cubin's kernel (``cuobjdump -res-usage``)."""
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        output = subprocess.run([tool, "-res-usage", file.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", output))
    return {
        "registers": int(found.get("REG", -1)),
        "stack_bytes": int(found.get("STACK", -1)),
        "local_bytes": int(found.get("LOCAL", -1)),
        "shared_bytes": int(found.get("SHARED", -1)),
    }


def _ptx_counts(ptx: str) -> dict:
    opcodes = _INSTRUCTION.findall(ptx.split("{", 1)[-1])
    return {
        "instructions": len(opcodes),
        "f64_instructions": sum(".f64" in op for op in opcodes),
        "f32_instructions": sum(".f32" in op for op in opcodes),
    }


def _unsupported(error: BaseException) -> bool:
    text = str(error)
    return "not defined for option 'gpu-name'" in text or "Unsupported" in text and "arch" in text


def compile_launches(arch: int, indices: list[int]) -> list[dict]:
    """Compile the recorded launches ``indices`` (positions in :func:`record_launches`'s list) for
    ``sm_<arch>`` in this process; one result per launch."""
    from triton.runtime.driver import driver

    launches = record_launches()
    driver.set_active(_CompileOnlyDriver(arch))
    tool = _cuobjdump()
    results = []
    for index in indices:
        launch = launches[index]
        result = {"target": f"sm_{arch}", **launch.describe()}
        start = time.perf_counter()
        try:
            compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
            result.update(status="compiled", **_ptx_counts(compiled.asm["ptx"]))
            result.update(_resources(compiled.asm["cubin"], tool))
        except Exception as error:  # noqa: BLE001 - every failure is a finding to report
            status = "unsupported" if _unsupported(error) else "error"
            result.update(status=status, error=f"{type(error).__name__}: {str(error)[-2000:]}")
        result["compile_s"] = round(time.perf_counter() - start, 3)
        results.append(result)
    return results


def _use_the_compiler() -> None:
    """Triton's compiler, not its interpreter: before triton is first imported in this process."""
    if "triton" not in sys.modules:
        os.environ.pop("TRITON_INTERPRET", None)
    elif os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_gpu_kernels: triton was imported with TRITON_INTERPRET=1 in this process")


def _worker(arch: int, indices: list[int], cache: str) -> list[dict]:
    os.environ["TRITON_CACHE_DIR"] = cache
    _use_the_compiler()
    return compile_launches(arch, indices)


def plan(launches: list[Launch], targets: list[int], full: int) -> list[tuple[int, int]]:
    """``(arch, launch index)`` pairs. For ``full``: every compile-time combination (and index width)
    once, and every kernel group with each specialisation of its arguments Triton makes (element count
    divisible by 16 or not, one element, pointers aligned or not) once. For the other targets: one launch
    per (kernel, loss, dtype, pass)."""
    first: dict[tuple, int] = {}
    for index, launch in enumerate(launches):
        first.setdefault(("space", *launch.space(), launch.kwargs["INDEX64"]), index)
        first.setdefault(("arguments", launch.group(), launch.key[2]), index)
    pairs = [(full, index) for index in sorted(set(first.values()))] if full in targets else []
    representative: dict[tuple, int] = {}
    for index, launch in enumerate(launches):
        if not launch.kwargs["INDEX64"]:
            representative.setdefault(launch.group(), index)
    for arch in targets:
        if arch != full:
            pairs += [(arch, index) for index in representative.values()]
    return pairs


def summarise(results: list[dict], launches: list[Launch]) -> tuple[str, list[str]]:
    """A Markdown table per target and per kernel group (sm_90: every group), and the failures."""
    failures = []
    for result in results:
        where = f"{result['target']} {result['kernel']} {result['dtype']} " + " ".join(
            f"{name}={result[name]}" for name in CONSTEXPRS if name in result
        )
        if result["status"] == "error":
            failures.append(f"compile error: {where}: {result['error'].splitlines()[0]}")
        elif result["status"] == "compiled" and result["dtype"] != "float64" and result["f64_instructions"]:
            failures.append(f"{result['f64_instructions']} float64 instructions: {where}")
    missing = expected_space() - {launch.space() for launch in launches}
    failures += [f"not reached through the public API: {point}" for point in sorted(missing, key=str)]

    lines = [
        "| target | compiled | unsupported | errors | float64 instr. in float32/half kernels | max registers"
        " | max local bytes | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_target = collections.defaultdict(list)
    for result in results:
        by_target[result["target"]].append(result)
    for target, rows in sorted(by_target.items()):
        compiled = [r for r in rows if r["status"] == "compiled"]
        lines.append(
            f"| {target} | {len(compiled)} | {sum(r['status'] == 'unsupported' for r in rows)} "
            f"| {sum(r['status'] == 'error' for r in rows)} "
            f"| {sum(r['f64_instructions'] for r in compiled if r['dtype'] != 'float64')} "
            f"| {max((r.get('registers', -1) for r in compiled), default='-')} "
            f"| {max((r.get('local_bytes', -1) for r in compiled), default='-')} "
            f"| {sum(r['compile_s'] for r in rows):.0f} |"
        )
    lines += [
        "",
        "Per kernel group (all specialisations of a group on the most-compiled target: min-max):",
        "",
        "| kernel | loss | dtype | pass | int64 idx | specialisations | PTX instr. | .f64 | .f32 | registers"
        " | local bytes |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    main_target = max(by_target, key=lambda t: len(by_target[t])) if by_target else None
    groups = collections.defaultdict(list)
    for result in by_target.get(main_target, []):
        if result["status"] == "compiled":
            key = (
                result["kernel"],
                {True: "logits", False: "bce"}.get(result.get("LOGITS"), "-"),
                result["dtype"],
                {0: "forward", 1: "backward, 1 grad_output", 2: "backward, n grad_outputs"}.get(
                    result.get("G_MODE"), "scale"
                ),
                result["INDEX64"],
            )
            groups[key].append(result)

    def span(rows, field):
        values = [r.get(field, -1) for r in rows]
        return f"{min(values)}-{max(values)}" if min(values) != max(values) else f"{values[0]}"

    for key, rows in sorted(groups.items(), key=lambda item: str(item[0])):
        lines.append(
            f"| {' | '.join(str(k) for k in key)} | {len(rows)} | {span(rows, 'instructions')} "
            f"| {span(rows, 'f64_instructions')} | {span(rows, 'f32_instructions')} "
            f"| {span(rows, 'registers')} | {span(rows, 'local_bytes')} |"
        )
    return "\n".join(lines), failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", type=int, default=list(DEFAULT_TARGETS))
    parser.add_argument(
        "--full", type=int, default=90, help="the target every specialisation is compiled for"
    )
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--json", type=Path, default=None, help="write every result here")
    parser.add_argument(
        "--sample", type=int, default=None, help="compile only this many launches per target (a quick check)"
    )
    arguments = parser.parse_args(argv)
    _use_the_compiler()
    started = time.perf_counter()
    launches = record_launches()
    pairs = plan(launches, arguments.targets, arguments.full)
    if arguments.sample is not None:
        by_target = collections.defaultdict(list)
        for arch, index in pairs:
            by_target[arch].append((arch, index))
        step = lambda items: max(1, len(items) // arguments.sample)  # noqa: E731
        pairs = [pair for items in by_target.values() for pair in items[:: step(items)][: arguments.sample]]
    print(
        f"compile_gpu_kernels: {len(launches)} distinct launches from the public API, "
        f"{len(pairs)} compilations for sm_{' sm_'.join(map(str, arguments.targets))}",
        file=sys.stderr,
    )
    work = collections.defaultdict(list)
    for number, (arch, index) in enumerate(pairs):
        work[(arch, number % arguments.jobs)].append(index)
    results: list[dict] = []
    spawn = multiprocessing.get_context("spawn")  # fresh workers: no forked torch thread pools
    with (
        tempfile.TemporaryDirectory() as cache,
        concurrent.futures.ProcessPoolExecutor(arguments.jobs, mp_context=spawn) as pool,
    ):
        futures = [pool.submit(_worker, arch, indices, cache) for (arch, _), indices in work.items()]
        for future in concurrent.futures.as_completed(futures):
            results += future.result()
    table, failures = summarise(results, launches)
    print(table)
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    print(
        f"compile_gpu_kernels: {time.perf_counter() - started:.0f} s, {len(failures)} failures",
        file=sys.stderr,
    )
    if arguments.json is not None:
        payload = {
            "targets": arguments.targets,
            "full": arguments.full,
            "results": results,
            "failures": failures,
        }
        arguments.json.write_text(json.dumps(payload, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
