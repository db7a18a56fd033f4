r"""The computation behind ``bcekit score``: per-batch losses from :mod:`bcekit.numpy`, summed exactly.

Each batch of rows becomes an ``(rows, labels)`` float64 matrix of predictions and one of targets; the
per-element losses come from :func:`bcekit.numpy.binary_cross_entropy` (or ``..._with_logits``) with
``reduction='none'``, so the numbers are the library's. A column's batch losses are summed with
:func:`math.fsum` (correctly rounded) and the batch sums are kept, then added with ``fsum`` once at the end,
so the result does not depend on the batch size, the partitioning or the engine beyond the rounding of each
batch's sum (a few units in the last place). ``mean`` divides by the number of elements kept (all of them
unless ``ignore_index`` drops some), as :func:`bcekit.numpy.binary_cross_entropy_with_logits` does.

Values are checked before the loss sees them; the first bad one raises :class:`~bcekit.cli._sources.DataError`
with its file, column and row. For the plot, each partition also counts predictions and targets in probability
bins (the reliability diagram) and per-element losses in logarithmic bins; these counts add across partitions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

import bcekit.numpy as bce
from bcekit import _semantics
from bcekit.cli._sources import DataError, Partition, read_partition, to_float64

__all__ = ["Job", "Partial", "Result", "LabelResult", "score_partition", "combine", "CALIBRATION_BINS"]

CALIBRATION_BINS = 10
# Per-element loss histogram edges: 1e-12 .. 1e3, 4 bins per decade; the first and last bins are open-ended
# (the first also holds exact zeros).
LOSS_EDGES = np.logspace(-12, 3, 61)
_SUMS_KEPT = 4096  # batch sums held per column before they are folded into one (still correctly rounded)


@dataclass(frozen=True)
class Job:
    """What to score: the column pairs and the loss's options, as ``bcekit score`` was given them."""

    targets: tuple[str, ...]
    predictions: tuple[str, ...]
    logits: bool = False
    weight: str | None = None
    pos_weight: tuple[float, ...] | None = None
    reduction: str = "mean"
    label_smoothing: float = 0.0
    ignore_index: float | None = None
    batch_rows: int = 1 << 16
    collect_plot: bool = False

    def __post_init__(self) -> None:
        if len(self.targets) != len(self.predictions):
            raise ValueError(
                f"{len(self.targets)} target column(s) but {len(self.predictions)} prediction column(s): "
                "give one target per prediction"
            )
        if not self.targets:
            raise ValueError("no columns to score")
        if len(set(self.predictions)) != len(self.predictions):
            raise ValueError("a prediction column is named twice")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {self.reduction!r}")
        if self.pos_weight is not None:
            if not self.logits:
                raise ValueError("pos_weight applies to logits only (torch's BCELoss has none): add --logits")
            if len(self.pos_weight) not in (1, len(self.targets)):
                raise ValueError(
                    f"{len(self.pos_weight)} pos_weight values for {len(self.targets)} labels: "
                    "give one value, or one per label"
                )
        if self.batch_rows < 1:
            raise ValueError(f"batch_rows must be at least 1, got {self.batch_rows}")
        _semantics.check_label_smoothing(self.label_smoothing)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the job reads, in the order checks report them: predictions, targets, weight."""
        extra = () if self.weight is None else (self.weight,)
        return tuple(dict.fromkeys((*self.predictions, *self.targets, *extra)))


@dataclass
class Partial:
    """One partition's contribution: sums per label (unrounded batch sums), counts, plot statistics."""

    index: int
    rows: int = 0
    sums: list[list[float | Fraction]] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    calibration: np.ndarray | None = None  # (labels, 3, bins): count, sum of probabilities, sum of targets
    loss_histogram: np.ndarray | None = None  # (labels, len(LOSS_EDGES) + 1)
    error: DataError | None = None


@dataclass(frozen=True)
class LabelResult:
    prediction: str
    target: str
    loss: float
    elements: int


@dataclass(frozen=True)
class Result:
    loss: float
    reduction: str
    rows: int
    elements: int
    per_label: tuple[LabelResult, ...]
    logits: bool
    calibration: np.ndarray | None
    loss_histogram: np.ndarray | None


def _fsum(values: Iterable[float | Fraction]) -> float | Fraction:
    """The sum, correctly rounded to a float; exact (a Fraction) where the float sum would overflow.

    An overflowing sum is kept exact so that a mean can still come back into range, as bcekit.numpy's
    does (it sums in extended precision). Infinities and NaN follow IEEE: inf - inf is NaN.
    """
    values = list(values)
    special = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
    if special:
        return math.nan if any(math.isnan(v) for v in special) or len(set(special)) > 1 else special[0]
    if all(isinstance(v, float) for v in values):
        try:
            return math.fsum(values)
        except OverflowError:  # finite terms whose sum exceeds the largest float: sum them exactly
            pass
    return sum((Fraction(v) for v in values), Fraction(0))


def _array_sum(values: np.ndarray) -> float | Fraction:
    """:func:`_fsum` of a batch's losses, with the special values found by NumPy rather than per element."""
    finite = np.isfinite(values)
    if not finite.all():
        return _fsum(values[~finite].tolist())  # the infinities or NaN decide the sum
    try:
        return math.fsum(values.tolist())
    except OverflowError:
        return _fsum(values.tolist())


def _float(value: float | Fraction) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _first(bad: np.ndarray) -> int | None:
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else None


def _column_problem(job: Job, column: str, values: np.ndarray) -> tuple[int, str] | None:
    """The first bad value of one column, as ``(index in batch, message)``, or None."""
    problems: list[tuple[int, str]] = []
    if column in job.predictions:
        if job.logits:
            row = _first(np.isnan(values))
            if row is not None:
                problems.append((row, "prediction is NaN"))
        else:
            row = _first(~((values >= 0.0) & (values <= 1.0)))
            if row is not None:
                hint = "" if np.isnan(values[row]) else " (if these are logits, pass --logits)"
                problems.append((row, f"probability {float(values[row])!r} is not in [0, 1]{hint}"))
    if column in job.targets:
        ignore = job.ignore_index
        ignored = np.zeros(values.shape, bool) if ignore is None else _ignored(values, ignore)
        row = _first(~((values >= 0.0) & (values <= 1.0)) & ~ignored)
        if row is not None:
            hint = " (pass --ignore-index nan to skip NaN targets)" if np.isnan(values[row]) else ""
            problems.append((row, f"target {float(values[row])!r} is not in [0, 1]{hint}"))
    if column == job.weight:
        row = _first(~np.isfinite(values))
        if row is not None:
            problems.append((row, f"weight {float(values[row])!r} is not finite"))
    return min(problems) if problems else None


def _ignored(values: np.ndarray, ignore_index: float) -> np.ndarray:
    return np.isnan(values) if math.isnan(ignore_index) else values == ignore_index


def check_batch(
    job: Job, first_row: int, raw: dict[str, object], paths: dict[str, str]
) -> dict[str, np.ndarray]:
    """The batch's columns as float64; :class:`DataError` for its first bad value, the earliest row first
    (then the column order of :attr:`Job.columns`), whether it is not a number or out of range."""
    values, found = {}, []
    for order, column in enumerate(job.columns):
        values[column], problem = to_float64(raw[column])
        if problem is not None:
            found.append((problem[0], order, column, problem[1]))
        # the values before a conversion problem are checked too: one of them may come first
        problem = _column_problem(job, column, values[column])
        if problem is not None:
            found.append((problem[0], order, column, problem[1]))
    if found:
        row, _, column, message = min(found)
        raise DataError(paths[column], message, column, first_row + row + 1)
    return values


def _probabilities(x: np.ndarray, logits: bool) -> np.ndarray:
    if not logits:
        return x
    with np.errstate(over="ignore"):
        e = np.exp(-np.abs(x))  # sigmoid without overflow: e^{-|x|} is in (0, 1]
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _batch_losses(job: Job, x: np.ndarray, y: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
    options = {"label_smoothing": job.label_smoothing, "ignore_index": job.ignore_index}
    if job.logits:
        pos_weight = None if job.pos_weight is None else np.asarray(job.pos_weight, dtype=np.float64)
        return bce.binary_cross_entropy_with_logits(
            x, y, weight=weight, reduction="none", pos_weight=pos_weight, **options
        )
    return bce.binary_cross_entropy(x, y, weight=weight, reduction="none", **options)


def score_partition(job: Job, partition: Partition, progress: Callable[[int], None] | None = None) -> Partial:
    """Score one partition. Bad data ends it early, with the error in :attr:`Partial.error`."""
    labels = len(job.targets)
    partial = Partial(partition.index, sums=[[] for _ in range(labels)], kept=[0] * labels)
    if job.collect_plot:
        partial.calibration = np.zeros((labels, 3, CALIBRATION_BINS))
        partial.loss_histogram = np.zeros((labels, len(LOSS_EDGES) + 1), dtype=np.int64)
    paths = {c: piece.path for piece in partition.pieces for c in piece.columns}
    try:
        for first_row, raw in read_partition(partition, job.batch_rows):
            values = check_batch(job, first_row, raw, paths)
            _accumulate(job, partial, values)
            if progress is not None:
                progress(len(values[job.predictions[0]]))
    except DataError as error:
        partial.error = error
    return partial


def _accumulate(job: Job, partial: Partial, values: dict[str, np.ndarray]) -> None:
    x = np.column_stack([values[c] for c in job.predictions])
    y = np.column_stack([values[c] for c in job.targets])
    weight = None if job.weight is None else values[job.weight][:, None]
    losses = _batch_losses(job, x, y, weight)
    kept = np.ones(y.shape, bool) if job.ignore_index is None else ~_ignored(y, job.ignore_index)
    partial.rows += x.shape[0]
    for label in range(x.shape[1]):
        column_sums = partial.sums[label]
        column_sums.append(_array_sum(losses[:, label]))
        if len(column_sums) > _SUMS_KEPT:
            column_sums[:] = [_fsum(column_sums)]
        partial.kept[label] += int(np.count_nonzero(kept[:, label]))
    if partial.calibration is not None:
        _plot_statistics(job, partial, x, y, losses, kept)


def _plot_statistics(
    job: Job, partial: Partial, x: np.ndarray, y: np.ndarray, losses: np.ndarray, kept: np.ndarray
) -> None:
    assert partial.calibration is not None and partial.loss_histogram is not None
    p = _probabilities(x, job.logits)
    bins = np.clip((p * CALIBRATION_BINS).astype(np.int64), 0, CALIBRATION_BINS - 1)
    loss_bins = np.searchsorted(LOSS_EDGES, losses)
    for label in range(x.shape[1]):
        keep = kept[:, label]
        b, pl, yl = bins[keep, label], p[keep, label], y[keep, label]
        partial.calibration[label, 0] += np.bincount(b, minlength=CALIBRATION_BINS)
        partial.calibration[label, 1] += np.bincount(b, weights=pl, minlength=CALIBRATION_BINS)
        partial.calibration[label, 2] += np.bincount(b, weights=yl, minlength=CALIBRATION_BINS)
        partial.loss_histogram[label] += np.bincount(loss_bins[keep, label], minlength=len(LOSS_EDGES) + 1)


def combine(job: Job, partials: Sequence[Partial]) -> Result:
    """The job's result from its partitions' partials, in partition order.

    Raises the :class:`DataError` of the first partition (in file and row order) that found bad data, so
    every engine reports the same error as reading the files one after another would.
    """
    ordered = sorted(partials, key=lambda p: p.index)
    for partial in ordered:
        if partial.error is not None:
            raise partial.error
    labels = len(job.targets)
    sums = [[s for p in ordered for s in p.sums[label]] for label in range(labels)]
    kept = [sum(p.kept[label] for p in ordered) for label in range(labels)]
    per_label = tuple(
        LabelResult(prediction, target, _reduce(job.reduction, _fsum(sums[i]), kept[i]), kept[i])
        for i, (prediction, target) in enumerate(zip(job.predictions, job.targets, strict=True))
    )
    elements = sum(kept)
    total = _fsum(s for column in sums for s in column)
    calibration = histogram = None
    if job.collect_plot:
        calibration = sum(p.calibration for p in ordered)
        histogram = sum(p.loss_histogram for p in ordered)
    return Result(
        loss=_reduce(job.reduction, total, elements),
        reduction=job.reduction,
        rows=sum(p.rows for p in ordered),
        elements=elements,
        per_label=per_label,
        logits=job.logits,
        calibration=calibration,
        loss_histogram=histogram,
    )


def _reduce(reduction: str, total: float | Fraction, count: int) -> float:
    if reduction == "sum":
        return _float(total)
    if not count:
        return math.nan
    return _float(total / count)
