"""Max ulp error of bcekit.torch, bcekit.numpy and torch.nn.functional against an exact reference.

Run from the repository root::

    python -m benchmarks.accuracy [--points 5000] [--seed 0]

For both losses (probabilities and logits), in float32 and float64, every implementation is evaluated
elementwise (``reduction='none'``) on a grid of extremes plus ``--points`` random points, and each result is
compared with the exact loss at the same (rounded) arguments, computed in mpmath at 200 bits
(``tests/_reference.py``). The error is in ulp of the exact value in the tested dtype; a NaN, or a finite
number where the exact value is infinite (or the reverse), counts as ``inf``. The script prints a Markdown
table with each implementation's worst error, where it happens, and how many points exceed 2 ulp.

Logits points: magnitudes log-uniform in [1e-8, 1e4] with random signs, targets hard (0/1) or soft
(uniform), half of them with a per-element ``pos_weight`` log-uniform in [0.01, 100]. Probability points:
uniform, log-uniform down to 1e-45 (float32's subnormals; 1e-320 for float64) and 1 - log-uniform, with
hard or soft targets. The last rows, "logits, hard cases", are points built to scale a rounding error up
(see :func:`hard_logits_groups`); random points almost never land there.

"bcekit GPU" is bcekit.torch's Triton kernels, the path of CUDA tensors: on CUDA tensors where a GPU is
present, else on CPU tensors under Triton's interpreter (set before bcekit is imported). The float32
kernels compute in float32 arithmetic that the interpreter evaluates as the GPU does, so their column is
the GPU's numbers either way; float64 kernels use libdevice on a GPU and NumPy under the interpreter, so
that column is left empty without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

if not torch.cuda.is_available():  # the Triton kernels run under the interpreter: chosen before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from tests._reference import bce_exact, logits_exact, ulp_error  # noqa: E402

import bcekit.numpy as bce_np  # noqa: E402
import bcekit.torch as bce_torch  # noqa: E402
from bcekit.torch import _kernel, _triton  # noqa: E402

DTYPES = ("float32", "float64")
IMPLEMENTATIONS = ("bcekit.torch", "bcekit.numpy", "torch", "bcekit GPU")
#: Where the Triton kernels run: the GPU, else CPU tensors through their branch under the interpreter.
GPU = torch.cuda.is_available()
MAX_ULP = 2.0

LOGIT_MAGNITUDES = (0.0, 1e-30, 1e-8, 0.1, 1.0, 2.0, 10.0, 16.0, 17.0, 20.0, 30.0, 40.0, 88.0, 89.0, 100.0)
LOGIT_MAGNITUDES += (104.0, 700.0, 710.0, 745.0, 750.0, 1000.0, 1e4)
GRID_LOGITS = tuple(s * m for m in LOGIT_MAGNITUDES for s in (1.0, -1.0)) + (math.inf, -math.inf)
GRID_LOGIT_TARGETS = (0.0, 1.0, 0.5, 0.1, 0.999, 1e-3)
GRID_POS_WEIGHTS = (0.5, 3.0)
GRID_PROBABILITIES = (0.0, 1.0, 1e-45, 5e-324, 1e-300, 1e-30, 1e-8, 0.1, 0.5, 0.9, 1 - 2**-24, 1 - 2**-53)
GRID_PROBABILITY_TARGETS = (0.0, 1.0, 0.5, 0.1, 0.9)


@dataclass
class Group:
    """Points evaluated in one call: float64 arguments, cast to the tested dtype before use."""

    x: np.ndarray
    y: np.ndarray
    pos_weight: np.ndarray | None = None  # logits only; None: the argument is left out


@dataclass
class Worst:
    error: float = 0.0
    argument: tuple | None = None
    over: int = 0  # points over MAX_ULP

    def update(self, error: float, argument: tuple) -> None:
        self.over += error > MAX_ULP
        if argument is not None and (self.argument is None or error > self.error):
            self.error, self.argument = error, argument


# --------------------------------------------------------------------------------------------------------
# Points
# --------------------------------------------------------------------------------------------------------


def _hard_or_soft(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.where(rng.random(n) < 0.5, rng.integers(0, 2, n).astype(np.float64), rng.random(n))


def logits_groups(points: int, rng: np.random.Generator) -> list[Group]:
    gx, gy = (np.array(v) for v in zip(*itertools.product(GRID_LOGITS, GRID_LOGIT_TARGETS), strict=True))
    groups = [Group(gx, gy)]
    groups += [Group(gx, gy, np.full_like(gx, p)) for p in GRID_POS_WEIGHTS]
    x = rng.choice([-1.0, 1.0], points) * 10.0 ** rng.uniform(-8.0, 4.0, points)
    y = _hard_or_soft(rng, points)
    half = points // 2
    groups.append(Group(x[:half], y[:half]))
    groups.append(Group(x[half:], y[half:], 10.0 ** rng.uniform(-2.0, 2.0, points - half)))
    return groups


def hard_logits_groups(points: int, rng: np.random.Generator, dtype: str = "float64") -> list[Group]:
    """Points where a rounding error inside the computation is scaled up by ``pos_weight * y``:

    * ``tail = log1p(exp(-x))`` just above 0.5 (bottom of its binade) and ``p * tail`` just below a power
      of two (top of its binade), so k ulp of error in the tail become nearly 2k ulp of the loss;
    * ``exp(-|x|)`` subnormal (``|x| > 708.4``; float32: ``|x| > 87.4``) times ``p`` up to 100;
    * ``p * y`` subnormal (``y`` near or below 2**-1022; float32: 2**-126) times ``sp(-x) >> 1``.
    """
    x = rng.uniform(0.39, 0.433, points)
    p = 2.0 ** rng.integers(0, 7, points) * (1.0 - rng.uniform(0.0, 0.01, points)) / np.log1p(np.exp(-x))
    n = max(points // 10, 1)
    low, high, smallest_normal = (
        (708.5, 745.0, 2.0**-1022) if dtype == "float64" else (87.4, 103.9, 2.0**-126)
    )
    subnormal_tail = Group(rng.uniform(low, high, n), np.ones(n), 10.0 ** rng.uniform(0.3, 2.0, n))
    y = np.concatenate(
        [rng.uniform(0.0, smallest_normal, n // 2), smallest_normal * rng.uniform(1.0, 100.0, n - n // 2)]
    )
    reach = 4.0 if dtype == "float64" else 2.0
    subnormal_coefficient = Group(-(10.0 ** rng.uniform(0.0, reach, n)), y, 10.0 ** rng.uniform(-2.0, 0.0, n))
    return [Group(x, np.ones(points), p), subnormal_tail, subnormal_coefficient]


def probability_groups(points: int, rng: np.random.Generator, dtype: str) -> list[Group]:
    gx, gy = (
        np.array(v)
        for v in zip(*itertools.product(GRID_PROBABILITIES, GRID_PROBABILITY_TARGETS), strict=True)
    )
    smallest = 45.0 if dtype == "float32" else 320.0
    third = points // 3
    x = np.concatenate(
        [
            rng.random(third),
            10.0 ** -rng.uniform(0.0, smallest, third),
            1.0 - 10.0 ** -rng.uniform(0.0, 17.0, points - 2 * third),
        ]
    )
    return [Group(gx, gy), Group(x, _hard_or_soft(rng, points))]


# --------------------------------------------------------------------------------------------------------
# Implementations: float arrays of the tested dtype in, a float array out
# --------------------------------------------------------------------------------------------------------


def _t(a: np.ndarray | None, device: str = "cpu") -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(a).to(device)


def measured(name: str, dtype: str) -> bool:
    """Whether the implementation's column is measured in this run (see the module docstring)."""
    return name != "bcekit GPU" or (_triton.AVAILABLE and (GPU or dtype == "float32"))


@contextlib.contextmanager
def _kernels(name: str):
    """``bcekit GPU``: CPU tensors take the CUDA tensors' branch (Triton) unless a GPU runs it."""
    if name != "bcekit GPU" or GPU:
        yield "cuda" if name == "bcekit GPU" else "cpu"
        return
    _kernel._TRITON_ON_CPU = True
    try:
        yield "cpu"
    finally:
        _kernel._TRITON_ON_CPU = False


def _logits(name: str, x: np.ndarray, y: np.ndarray, p: np.ndarray | None) -> np.ndarray:
    if name == "bcekit.numpy":
        return np.asarray(bce_np.binary_cross_entropy_with_logits(x, y, pos_weight=p, reduction="none"))
    function = (
        F.binary_cross_entropy_with_logits if name == "torch" else bce_torch.binary_cross_entropy_with_logits
    )
    with _kernels(name) as device:
        return (
            function(_t(x, device), _t(y, device), pos_weight=_t(p, device), reduction="none").cpu().numpy()
        )


def _probabilities(name: str, x: np.ndarray, y: np.ndarray, p: np.ndarray | None) -> np.ndarray:
    if name == "bcekit.numpy":
        return np.asarray(bce_np.binary_cross_entropy(x, y, reduction="none"))
    function = F.binary_cross_entropy if name == "torch" else bce_torch.binary_cross_entropy
    with _kernels(name) as device:
        return function(_t(x, device), _t(y, device), reduction="none").cpu().numpy()


# --------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------


def _cast(a: np.ndarray | None, dtype: str) -> np.ndarray | None:
    if a is None:
        return None
    with np.errstate(over="ignore"):
        return a.astype(dtype)


def evaluate(
    groups: list[Group], dtype: str, loss: Callable, exact_of: Callable
) -> tuple[int, dict[str, Worst], dict[str, Worst]]:
    """Per implementation: the worst error over all points, and over the points with finite arguments."""
    worst = {name: Worst() for name in IMPLEMENTATIONS}
    worst_finite = {name: Worst() for name in IMPLEMENTATIONS}
    count = 0
    for group in groups:
        x, y, p = _cast(group.x, dtype), _cast(group.y, dtype), _cast(group.pos_weight, dtype)
        arguments = [
            (a, b) if p is None and exact_of is bce_exact else (a, b, None if p is None else float(p[i]))
            for i, (a, b) in enumerate(zip(x.tolist(), y.tolist(), strict=True))
        ]
        exact = [exact_of(*a) for a in arguments]
        count += len(arguments)
        for name in IMPLEMENTATIONS:
            if not measured(name, dtype):
                continue
            results = loss(name, x, y, p).tolist()
            for value, e, a in zip(results, exact, arguments, strict=True):
                error = ulp_error(value, e, dtype)
                worst[name].update(error, a)
                finite = all(v is None or math.isfinite(v) for v in a)
                worst_finite[name].update(error if finite else 0.0, a if finite else None)
    return count, worst, worst_finite


def _format_error(error: float) -> str:
    if math.isinf(error):
        return "inf"
    return f"{error:.2f}" if error < 100 else f"{error:.3g}"


def _format_argument(argument: tuple | None, dtype: str) -> str:
    if argument is None:
        return ""
    scalar = np.dtype(dtype).type  # str() of a NumPy scalar: the shortest text that round-trips in dtype
    names = ("x", "y", "p")
    return ", ".join(f"{n}={str(scalar(v))}" for n, v in zip(names, argument, strict=False) if v is not None)


def _cell(w: Worst, dtype: str, with_argument: bool) -> str:
    text = _format_error(w.error)
    if with_argument and w.argument is not None:
        text += f" ({_format_argument(w.argument, dtype)})"
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=5000, help="random points per loss and dtype")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    rows = []
    cases = [*itertools.product(("probabilities", "logits"), DTYPES)]
    cases += [("logits, hard cases", "float32"), ("logits, hard cases", "float64")]
    for row, (loss_name, dtype) in enumerate(cases):
        rng = np.random.default_rng([args.seed, row])
        if loss_name == "logits":
            groups, loss, exact_of = logits_groups(args.points, rng), _logits, logits_exact
        elif loss_name == "logits, hard cases":
            groups, loss, exact_of = hard_logits_groups(args.points // 5, rng, dtype), _logits, logits_exact
        else:
            groups, loss, exact_of = probability_groups(args.points, rng, dtype), _probabilities, bce_exact
        count, worst, worst_finite = evaluate(groups, dtype, loss, exact_of)
        cells = [
            _cell(worst[name], dtype, with_argument=True) if measured(name, dtype) else "-"
            for name in IMPLEMENTATIONS
        ]
        finite = _cell(worst_finite["torch"], dtype, with_argument=True)
        over = " / ".join(str(worst[name].over) if measured(name, dtype) else "-" for name in IMPLEMENTATIONS)
        rows.append([loss_name, dtype, str(count), *cells, finite, over])

    print(
        f"torch {torch.__version__}, numpy {np.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}; seed {args.seed}, {args.points} random points per row plus the grid; "
        f"bcekit GPU: {torch.cuda.get_device_name() if GPU else 'Triton interpreter, CPU tensors'}; "
        f"{time.perf_counter() - start:.0f} s\n"
    )
    header = [
        "loss",
        "dtype",
        "points",
        "bcekit.torch max ulp",
        "bcekit.numpy max ulp",
        "torch max ulp",
        "bcekit GPU max ulp",
        "torch max ulp, finite args",
        f"points > {MAX_ULP:g} ulp (bcekit.torch / bcekit.numpy / torch / bcekit GPU)",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
