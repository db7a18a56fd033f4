r"""The computation behind ``bcekit score``: per-element float64 losses, summed exactly.

Each batch of rows is a set of float64 columns: a prediction and a target per label, and the weight. One
call of the C++ kernel (``bcekit._native.score``) scores every label of the batch on all threads: the
per-element loss in double-double lanes (long double where those do not reach), rounded once to float64 as
:mod:`bcekit.numpy` rounds it, and the losses summed exactly into an integer count of 2^-1074
(:class:`ExactSum`). Those sums add exactly across batches, partitions and engines, so the result is the
correctly rounded mean (or sum) of the float64 losses whatever ``--batch-rows``, the thread count or the
engine. ``mean`` divides by the number of elements kept (all of them unless ``ignore_index`` drops some), as
:func:`bcekit.numpy.binary_cross_entropy_with_logits` does.

The kernel also checks every value; where one is bad, ``check_batch`` finds the first (earliest row,
then column order) and raises :class:`~bcekit.cli._sources.DataError` with its file, column and row. For the
plot, each partition also counts predictions and targets in probability bins (the reliability diagram) and
per-element losses in logarithmic bins; these counts add across partitions.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

import bcekit.numpy as bce
from bcekit import _native, _semantics
from bcekit.cli._sources import DataError, Partition, read_partition, to_float64

__all__ = [
    "Job",
    "Partial",
    "ExactSum",
    "Result",
    "LabelResult",
    "score_partition",
    "score_partitions",
    "combine",
    "CALIBRATION_BINS",
]

CALIBRATION_BINS = 10
# Per-element loss histogram edges: 1e-12 .. 1e3, 4 bins per decade; the first and last bins are open-ended
# (the first also holds exact zeros).
LOSS_EDGES = np.logspace(-12, 3, 61)
# Rows per batch unless --batch-rows says: about this many bytes of float64 columns. Two batches are in
# memory at a time (the one scored and the next one read), plus the reader's own buffers.
BATCH_BYTES = 4 << 20


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
    batch_rows: int | None = None  # None: BATCH_BYTES of float64 columns
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
        if self.batch_rows is not None and self.batch_rows < 1:
            raise ValueError(f"batch_rows must be at least 1, got {self.batch_rows}")
        _semantics.check_label_smoothing(self.label_smoothing)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the job reads, in the order checks report them: predictions, targets, weight."""
        extra = () if self.weight is None else (self.weight,)
        return tuple(dict.fromkeys((*self.predictions, *self.targets, *extra)))

    @property
    def rows_per_batch(self) -> int:
        if self.batch_rows is not None:
            return self.batch_rows
        return max(1024, BATCH_BYTES // (8 * len(self.columns)))


_SCALE = 1074  # ExactSum.scaled counts units of 2^-1074, the smallest float64: every float64 is a multiple


@dataclass
class ExactSum:
    """A sum of float64 values, exact: ``scaled`` units of 2^-1074 (an integer), and the counts of the
    infinite and NaN terms, which decide the sum by IEEE's rules where there are any (inf - inf is NaN)."""

    scaled: int = 0
    pos_inf: int = 0
    neg_inf: int = 0
    nan: int = 0

    def __iadd__(self, other: ExactSum) -> ExactSum:
        self.scaled += other.scaled
        self.pos_inf += other.pos_inf
        self.neg_inf += other.neg_inf
        self.nan += other.nan
        return self

    @classmethod
    def of(cls, values: np.ndarray) -> ExactSum:
        """The exact sum of a float64 array, in NumPy and Python integers (where the kernels are absent)."""
        values = np.asarray(values, dtype=np.float64).ravel()
        finite = values[np.isfinite(values)]
        mantissa, exponent = np.frexp(finite)  # value = mantissa * 2^exponent, 0.5 <= |mantissa| < 1
        digits = (mantissa * 2.0**53).astype(np.int64)  # exact: 53 bits
        shifts = exponent.astype(np.int64) - 53 + _SCALE
        # a subnormal's shift is negative: its low digits are zeros, so shifting them out is exact
        digits = np.where(shifts < 0, digits >> np.maximum(-shifts, 0), digits)
        shifts = np.maximum(shifts, 0)
        scaled = sum(int(d) << int(k) for d, k in zip(digits.tolist(), shifts.tolist(), strict=True))
        special = values[~np.isfinite(values)]
        return cls(
            scaled,
            int(np.count_nonzero(special == math.inf)),
            int(np.count_nonzero(special == -math.inf)),
            int(np.count_nonzero(np.isnan(special))),
        )

    def value(self, count: int = 1) -> float:
        """The sum divided by ``count``, correctly rounded to float64 (an overflow is an infinity)."""
        if self.nan or (self.pos_inf and self.neg_inf):
            return math.nan
        if self.pos_inf or self.neg_inf:
            return math.inf if self.pos_inf else -math.inf
        try:
            return self.scaled / (count << _SCALE)  # int / int: correctly rounded
        except OverflowError:
            return math.inf if self.scaled > 0 else -math.inf


@dataclass
class Partial:
    """One partition's contribution: exact sums per label, counts, plot statistics."""

    index: int
    rows: int = 0
    sums: list[ExactSum] = field(default_factory=list)
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
    """The per-element losses by :mod:`bcekit.numpy` (where the kernels are absent)."""
    options = {"label_smoothing": job.label_smoothing, "ignore_index": job.ignore_index}
    if job.logits:
        pos_weight = None if job.pos_weight is None else np.asarray(job.pos_weight, dtype=np.float64)
        return bce.binary_cross_entropy_with_logits(
            x, y, weight=weight, reduction="none", pos_weight=pos_weight, **options
        )
    return bce.binary_cross_entropy(x, y, weight=weight, reduction="none", **options)


def score_partition(job: Job, partition: Partition, progress: Callable[[int], None] | None = None) -> Partial:
    """Score one partition. Bad data ends it early, with the error in :attr:`Partial.error`."""
    return score_partitions(job, [partition], progress)[0]


def score_partitions(
    job: Job, partitions: Sequence[Partition], progress: Callable[[int], None] | None = None
) -> list[Partial]:
    """Score partitions one after another, the next batch read while this one is scored, across partition
    boundaries too. The first bad data ends it, with the error in that partition's :attr:`Partial.error`
    (the partials of the partitions after it are not returned)."""

    def batches() -> Iterator[tuple[Partition, int, object]]:
        for partition in partitions:
            try:
                for first_row, raw in read_partition(partition, job.rows_per_batch):
                    yield partition, first_row, raw
            except DataError as error:
                yield partition, -1, error
                return

    partials: list[Partial] = []
    paths: dict[str, str] = {}
    for partition, first_row, raw in _read_ahead(batches()):
        if not partials or partials[-1].index != partition.index:
            partials.append(_new_partial(job, partition))
            paths = {c: piece.path for piece in partition.pieces for c in piece.columns}
        if isinstance(raw, DataError):
            partials[-1].error = raw
            break
        try:
            rows = _accumulate(job, partials[-1], first_row, raw, paths)  # type: ignore[arg-type]
        except DataError as error:
            partials[-1].error = error
            break
        if progress is not None:
            progress(rows)
    return partials


def _new_partial(job: Job, partition: Partition) -> Partial:
    labels = len(job.targets)
    partial = Partial(partition.index, sums=[ExactSum() for _ in range(labels)], kept=[0] * labels)
    if job.collect_plot:
        partial.calibration = np.zeros((labels, 3, CALIBRATION_BINS))
        partial.loss_histogram = np.zeros((labels, len(LOSS_EDGES) + 1), dtype=np.int64)
    return partial


_DONE = object()


def _read_ahead(batches: Iterator[tuple]) -> Iterator[tuple]:
    """The batches, each read on a thread while the one before it is scored (the readers and the kernel
    release the GIL). The reader's exceptions come out here, in order."""
    ready: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def read() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        ready.put((batch, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put((_DONE, None))
        except BaseException as error:  # handed to the consumer, raised there
            ready.put((_DONE, error))

    reader = threading.Thread(target=read, name="bcekit-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            batch, error = ready.get()
            if error is not None:
                raise error
            if batch is _DONE:
                return
            yield batch
    finally:
        stop.set()
        while reader.is_alive():  # let a reader blocked on a full queue see the stop
            try:
                ready.get(timeout=0.1)
            except queue.Empty:
                pass
        reader.join()


def _float64_columns(job: Job, raw: dict[str, object]) -> dict[str, np.ndarray] | None:
    """The batch's columns as contiguous float64 arrays where each already is one (a float64 Parquet or CSV
    column without missing values, a float64 NPY field), without copying; None where one is not."""
    try:
        import pyarrow as pa
    except ImportError:  # NPY and NPZ files are read without it
        pa = None
    values = {}
    for column in job.columns:
        array = raw[column]
        if pa is not None and isinstance(array, (pa.Array, pa.ChunkedArray)):
            if array.type != pa.float64() or array.null_count:
                return None
            array = array.to_numpy()  # a view of one chunk; several are joined
        if not isinstance(array, np.ndarray) or array.dtype != np.float64 or array.ndim != 1:
            return None
        values[column] = np.ascontiguousarray(array)
    return values


def _accumulate(
    job: Job, partial: Partial, first_row: int, raw: dict[str, object], paths: dict[str, str]
) -> int:
    """Add one batch to the partial; returns its rows."""
    values = _float64_columns(job, raw)
    if values is None:  # converted (and checked) column by column
        values = check_batch(job, first_row, raw, paths)
    x = [values[c] for c in job.predictions]
    y = [values[c] for c in job.targets]
    weight = None if job.weight is None else values[job.weight]
    rows = len(x[0])
    losses = [np.empty(rows) for _ in x] if job.collect_plot else None
    if _native.AVAILABLE:
        scores = _native.score(
            job.logits, x, y, weight, job.pos_weight, job.label_smoothing, job.ignore_index, losses
        )
        if any(flags for *_, flags in scores):
            check_batch(job, first_row, raw, paths)  # raises the DataError of the first bad value
            raise AssertionError("bcekit._core.score found a bad value that check_batch did not")
        for label, (digits, pos_inf, neg_inf, nan, kept, _) in enumerate(scores):
            partial.sums[label] += ExactSum(
                int.from_bytes(digits, "little", signed=True), pos_inf, neg_inf, nan
            )
            partial.kept[label] += kept
    else:
        check_batch(job, first_row, raw, paths)
        matrix = _batch_losses(
            job, np.column_stack(x), np.column_stack(y), None if weight is None else weight[:, None]
        )
        losses = [matrix[:, label] for label in range(len(x))]
        for label, target in enumerate(y):
            partial.sums[label] += ExactSum.of(losses[label])
            partial.kept[label] += rows - int(np.count_nonzero(_ignored_mask(job, target)))
    partial.rows += rows
    if partial.calibration is not None:
        assert losses is not None
        xm, ym, lm = np.column_stack(x), np.column_stack(y), np.column_stack(losses)
        _plot_statistics(job, partial, xm, ym, lm, ~_ignored_mask(job, ym))
    return rows


def _ignored_mask(job: Job, y: np.ndarray) -> np.ndarray:
    return np.zeros(y.shape, bool) if job.ignore_index is None else _ignored(y, job.ignore_index)


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
    sums = [ExactSum() for _ in range(labels)]
    kept = [sum(p.kept[label] for p in ordered) for label in range(labels)]
    for p in ordered:
        for label in range(labels):
            sums[label] += p.sums[label]
    per_label = tuple(
        LabelResult(prediction, target, _reduce(job.reduction, sums[i], kept[i]), kept[i])
        for i, (prediction, target) in enumerate(zip(job.predictions, job.targets, strict=True))
    )
    elements = sum(kept)
    total = ExactSum()
    for column in sums:
        total += column
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


def _reduce(reduction: str, total: ExactSum, count: int) -> float:
    if reduction == "sum":
        return total.value()
    if not count:
        return math.nan
    return total.value(count)
