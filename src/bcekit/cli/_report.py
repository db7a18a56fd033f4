"""What ``bcekit score`` prints and draws: a table, a JSON document, a PNG of calibration and losses."""

from __future__ import annotations

import json
import math
import os
from typing import IO, Any

import numpy as np

from bcekit.cli._scoring import CALIBRATION_BINS, LOSS_EDGES, Result

__all__ = ["as_json", "write_table", "plot_format", "write_plot"]


def _number(value: float) -> float | str:
    """JSON has no infinities or NaN: those are written as the strings ``"inf"``, ``"-inf"``, ``"nan"``."""
    return value if math.isfinite(value) else str(value)


def as_json(result: Result) -> str:
    """``{"loss", "reduction", "rows", "elements", "per_label"}``; ``per_label`` is keyed by prediction
    column, each entry ``{"target", "loss", "elements"}``."""
    document: dict[str, Any] = {
        "loss": _number(result.loss),
        "reduction": result.reduction,
        "rows": result.rows,
        "elements": result.elements,
        "per_label": {
            label.prediction: {
                "target": label.target,
                "loss": _number(label.loss),
                "elements": label.elements,
            }
            for label in result.per_label
        },
    }
    return json.dumps(document, allow_nan=False)


def write_table(result: Result, stream: IO[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    kind = "logits" if result.logits else "probabilities"
    console = Console(file=stream, highlight=False, soft_wrap=False)
    console.print(f"binary cross-entropy ({kind}), {result.reduction} over {result.rows:,} rows")
    table = Table()
    table.add_column("prediction")
    table.add_column("target")
    table.add_column("elements", justify="right")
    table.add_column("loss", justify="right")
    for label in result.per_label:
        table.add_row(label.prediction, label.target, f"{label.elements:,}", f"{label.loss:.10g}")
    if len(result.per_label) > 1:
        table.add_section()
        table.add_row("all", "", f"{result.elements:,}", f"{result.loss:.10g}", style="bold")
    console.print(table)


def plot_format(path: str) -> str:
    """The image format of ``path``, from its extension (PNG without one), checked before any data is read:
    raises ``ValueError`` (its message one line) for an extension matplotlib does not write, or a path that
    cannot be written (a missing folder, a folder, no permission). Creates no file."""
    from matplotlib.backend_bases import FigureCanvasBase

    extension = os.path.splitext(path)[1][1:].lower()
    supported = FigureCanvasBase.get_supported_filetypes()
    if extension and extension not in supported:
        expected = ", ".join("." + name for name in sorted(supported))
        raise ValueError(f"--plot {path}: unknown image type '.{extension}' (expected {expected})")
    if os.path.isdir(path):
        raise ValueError(f"--plot {path}: is a folder")
    existed = os.path.lexists(path)
    try:
        with open(path, "ab"):  # appending nothing: an existing file is left as it is
            pass
    except OSError as error:
        raise ValueError(f"--plot {path}: cannot write it: {error.strerror or error}") from None
    if not existed:
        os.remove(path)
    return extension or "png"


def write_plot(result: Result, path: str, image_format: str = "png") -> None:
    """A reliability diagram (mean target against mean predicted probability, per probability bin) and a
    histogram of per-element losses on a logarithmic axis; one curve per label (up to 8, else all pooled).
    Written to ``path`` as it is, in ``image_format`` (see :func:`plot_format`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert result.calibration is not None and result.loss_histogram is not None
    labels = [label.prediction for label in result.per_label]
    calibration, histogram = result.calibration, result.loss_histogram
    if len(labels) > 8:
        labels, calibration, histogram = ["all labels"], calibration.sum(0)[None], histogram.sum(0)[None]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    left.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
    for name, (count, predicted, observed) in zip(labels, calibration, strict=True):
        used = count > 0
        left.plot(
            predicted[used] / count[used], observed[used] / count[used], marker="o", markersize=4, label=name
        )
    left.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="mean predicted probability (bin)",
        ylabel="mean target (bin)",
        title=f"Reliability diagram ({CALIBRATION_BINS} bins)",
    )
    left.legend(loc="upper left", fontsize="small")
    edges = np.concatenate(([LOSS_EDGES[0] / 10], LOSS_EDGES, [LOSS_EDGES[-1] * 10]))
    for name, counts in zip(labels, histogram, strict=True):
        right.stairs(counts, edges, label=name)
    right.set(
        xscale="log",
        xlabel=f"per-element loss (outer bins open: < {LOSS_EDGES[0]:g}, > {LOSS_EDGES[-1]:g})",
        ylabel="elements",
        title=f"Per-element loss, {result.elements:,} elements",
    )
    right.legend(loc="upper right", fontsize="small")
    try:
        figure.savefig(path, dpi=110, format=image_format)
    finally:
        plt.close(figure)
