"""CPU speed, side by side in one process: bcekit vs torch eager vs torch.compile vs NumPy vs the floor.

    python -m benchmarks.cpu [--min-log2 10] [--max-log2 24] [--repeats 5] [--out benchmarks/results]

For each loss (logits, probabilities), dtype (float32, bfloat16), pass (forward, forward+backward) and size
2^k, it times the median of ``--repeats`` runs after a warm-up, prints a Markdown table of milliseconds and
of ratios to torch eager, and writes ``cpu.png`` (time per element against size). The floor is
``torch.add(x, y, out=g)``: reading input and target and writing a gradient-sized output, which any
forward+backward must do at least once. The NumPy column is the textbook composition
(``max(x, 0) - x y + log1p(exp(-|x|))``, gradient ``sigmoid(x) - y``), float32 only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import bcekit.torch as bce

Runner = Callable[[], object]


def _median_ms(run: Runner, repeats: int) -> float:
    run()  # warm-up (and compilation for torch.compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _torch_runner(function: Callable, x: torch.Tensor, y: torch.Tensor, backward: bool) -> Runner:
    if not backward:

        def forward() -> object:
            with torch.no_grad():
                return function(x, y)

        return forward
    leaf = x.detach().clone().requires_grad_()

    def forward_backward() -> object:
        loss = function(leaf, y)
        (grad,) = torch.autograd.grad(loss, leaf)
        return grad

    return forward_backward


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


def _floor_runner(x: torch.Tensor, y: torch.Tensor) -> Runner:
    out = torch.empty_like(x)
    return lambda: torch.add(x, y, out=out)


def measure(min_log2: int, max_log2: int, repeats: int) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for logits in (True, False):
        ours_fn = bce.binary_cross_entropy_with_logits if logits else bce.binary_cross_entropy
        torch_fn = F.binary_cross_entropy_with_logits if logits else F.binary_cross_entropy
        for dtype in (torch.float32, torch.bfloat16):
            for backward in (False, True):
                for log2 in range(min_log2, max_log2 + 1, 2):
                    n = 1 << log2
                    x = torch.randn(n, generator=generator)
                    if not logits:
                        x = torch.sigmoid(x)
                    x, y = x.to(dtype), torch.rand(n, generator=generator).to(dtype)
                    torch._dynamo.reset()  # a fresh compilation per row: no recompile limit, no fallback
                    compiled_fn = torch.compile(torch_fn, dynamic=False)
                    row = {
                        "loss": "logits" if logits else "probabilities",
                        "dtype": str(dtype).removeprefix("torch."),
                        "pass": "fwd+bwd" if backward else "fwd",
                        "n": n,
                        "bcekit": _median_ms(_torch_runner(ours_fn, x, y, backward), repeats),
                        "torch eager": _median_ms(_torch_runner(torch_fn, x, y, backward), repeats),
                        "torch.compile": _median_ms(_torch_runner(compiled_fn, x, y, backward), repeats),
                        "floor": _median_ms(_floor_runner(x, y), repeats),
                    }
                    if dtype == torch.float32:
                        row["numpy"] = _median_ms(
                            _numpy_runner(x.numpy(), y.numpy(), backward, logits), repeats
                        )
                    rows.append(row)
                    print(_format_row(row), flush=True)
    return rows


COLUMNS = ("bcekit", "torch eager", "torch.compile", "numpy", "floor")
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red")


def _format_row(row: dict) -> str:
    times = " | ".join(f"{row[c]:.3f}" if c in row else "-" for c in COLUMNS)
    ratio = row["bcekit"] / row["torch eager"]
    size = f"2^{row['n'].bit_length() - 1}"
    return f"| {row['loss']} | {row['dtype']} | {row['pass']} | {size} | {times} | {ratio:.2f} |"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["loss"], r["dtype"], r["pass"]) for r in rows})
    figure, axes = plt.subplots(2, len(panels) // 2, figsize=(4 * len(panels) // 2, 7), squeeze=False)
    for axis, (loss, dtype, pass_) in zip(axes.flat, panels, strict=True):
        selected = [r for r in rows if (r["loss"], r["dtype"], r["pass"]) == (loss, dtype, pass_)]
        sizes = [r["n"] for r in selected]
        for column, color in zip(COLUMNS, COLORS, strict=True):
            if column in selected[0]:
                per_element = [r[column] * 1e6 / r["n"] for r in selected]
                axis.plot(sizes, per_element, marker="o", color=color, label=column)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_title(f"{loss}, {dtype}, {pass_}", fontsize=9)
        axis.set_xlabel("elements")
        axis.set_ylabel("ns per element")
    handles = [plt.Line2D([], [], color=c, marker="o", label=n) for n, c in zip(COLUMNS, COLORS, strict=True)]
    figure.legend(handles=handles, loc="upper right", fontsize=8, ncols=len(COLUMNS))
    figure.suptitle(f"bcekit CPU benchmark ({platform.machine()}, {torch.get_num_threads()} threads)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def replot(path: Path) -> None:
    """Redraw ``cpu.png`` beside a saved ``cpu.json`` without measuring again."""
    _plot(json.loads(path.read_text()), path.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-log2", type=int, default=10)
    parser.add_argument("--max-log2", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    arguments = parser.parse_args()
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads; milliseconds, median of {arguments.repeats}\n"
    )
    print(f"| loss | dtype | pass | n | {' | '.join(COLUMNS)} | bcekit / eager |")
    print("|---" * (5 + len(COLUMNS)) + "|")
    rows = measure(arguments.min_log2, arguments.max_log2, arguments.repeats)
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / "cpu.json").write_text(json.dumps(rows, indent=1))
    _plot(rows, arguments.out / "cpu.png")
    print(f"\nplot: {arguments.out / 'cpu.png'}")


if __name__ == "__main__":
    main()
