"""What the CPU and GPU benchmarks share: the contenders' functions, torch.compile set-up, the per-panel
summary and the time-per-element plot."""

from __future__ import annotations

import json
import os
import time
from argparse import Namespace
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import bcekit.torch as bce

LOSSES = ("logits", "probabilities")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PASSES = ("fwd", "fwd+bwd")


def configure_dynamo() -> None:
    """Raise the recompile limit and make hitting it an error: torch.compile must never fall back silently."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the older name is an alias in recent releases
        if hasattr(config, name):
            setattr(config, name, 64)
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(config, name):
            setattr(config, name, True)


def functions(loss: str) -> tuple[Callable, Callable]:
    """``(bcekit's function, torch's function)`` for a loss name."""
    if loss == "logits":
        return bce.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits
    return bce.binary_cross_entropy, F.binary_cross_entropy


def compile_loss(torch_fn: Callable) -> Callable:
    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch_fn(x, y)

    return torch.compile(loss_fn, dynamic=True, fullgraph=True)


def panel_summary(
    loss: str, dtype_name: str, pass_: str, graphs_before: int, compile_warm_up: float | None, start: float
) -> dict:
    """The panel's compile statistics and wall time, printed and returned for the JSON."""
    panel = {
        "loss": loss,
        "dtype": dtype_name,
        "pass": pass_,
        "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before,
        "compile_first_call_s": round(compile_warm_up or 0.0, 2),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(
        f"\ntorch.compile: {panel['compiled_graphs']} graph(s) compiled, first call "
        f"{panel['compile_first_call_s']} s; panel wall time {panel['wall_s']} s",
        flush=True,
    )
    return panel


def plot(
    rows: list[dict],
    path: Path,
    contenders: Sequence[str],
    colors: Sequence[str],
    title: str,
    subtitle: str = "",
) -> None:
    """Time per element against size, log-log, one panel per (loss, dtype, pass); cells without a time
    (a contender that does not run there, an out-of-memory cell) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(loss, dtype, pass_) for loss in LOSSES for dtype in DTYPES for pass_ in PASSES]
    panels = [p for p in panels if any((r["loss"], r["dtype"], r["pass"]) == p for r in rows)]
    columns = max(1, (len(panels) + 1) // 2)
    figure, axes = plt.subplots(2, columns, figsize=(4.2 * max(columns, 2), 7.5), squeeze=False)
    for axis, (loss, dtype, pass_) in zip(axes.flat, panels, strict=False):
        selected = [r for r in rows if (r["loss"], r["dtype"], r["pass"]) == (loss, dtype, pass_)]
        for column, color in zip(contenders, colors, strict=True):
            points = [(r["n"], r[column] * 1e6 / r["n"]) for r in selected if r.get(column)]
            if points:
                sizes, per_element = zip(*points, strict=True)
                axis.plot(sizes, per_element, marker="o", markersize=3, color=color, label=column)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_title(f"{loss}, {dtype}, {pass_}", fontsize=9)
        axis.set_xlabel("elements")
        axis.set_ylabel("ns per element")
        axis.grid(True, which="both", alpha=0.3)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    handles = [
        plt.Line2D([], [], color=c, marker="o", label=n) for n, c in zip(contenders, colors, strict=True)
    ]
    figure.legend(handles=handles, loc="upper right", fontsize=8, ncols=len(contenders))
    figure.suptitle(f"{title}: time per element vs size\n{subtitle}", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_results(arguments: Namespace, info: dict, started: float, name: str, **sections: Any) -> float:
    """Record the load average at the end (printed: other processes' load skews timings) and write
    ``OUT/<name>.json`` with the machine, the settings, the wall time and ``sections``; returns the wall time
    in seconds."""
    wall = time.perf_counter() - started
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    info["load average at the end"] = load
    print(f"\nload average at the end (1, 5, 15 min): {load}; other processes' load skews the timings")
    arguments.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(arguments).items()}
    result = {"machine": info, "settings": settings, "wall_s": round(wall, 1), **sections}
    (arguments.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    return wall
