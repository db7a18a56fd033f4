"""``bcekit score``: its numbers against :mod:`bcekit.numpy` (and torch) applied to the whole data at once, in
every file format and layout, at every batch size; its JSON, table, plot and progress output; its usage
errors; and the installed ``bcekit`` command.

The references are computed here from the arrays written to the files, never copied from the command's
output: the whole data stacked into ``(rows, labels)`` float64 matrices, the weight as ``(rows, 1)``,
``pos_weight`` as ``(labels,)`` (or ``(1,)``), through one call of the library's loss.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bcekit.numpy as bce

RTOL = 1e-12
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- references and helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """The loss options of one ``bcekit score`` run: its command-line flags and its reference."""

    logits: bool = False
    weight: bool = False
    pos_weight: tuple[float, ...] | None = None
    reduction: str = "mean"
    label_smoothing: float = 0.0
    ignore_index: float | None = None

    def argv(self, weight: str = "w") -> list[str]:
        argv = ["--reduction", self.reduction]
        if self.logits:
            argv.append("--logits")
        if self.weight:
            argv += ["--weight", weight]
        if self.pos_weight is not None:
            argv += ["--pos-weight", *(repr(float(v)) for v in self.pos_weight)]
        if self.label_smoothing:
            argv += ["--label-smoothing", repr(float(self.label_smoothing))]
        if self.ignore_index is not None:
            argv += ["--ignore-index", repr(float(self.ignore_index))]
        return argv

    def loss(
        self, x: np.ndarray, y: np.ndarray, w: np.ndarray | None, pos_weight: np.ndarray | None
    ) -> float:
        options = {
            "weight": None if w is None or not self.weight else w,
            "reduction": self.reduction,
            "label_smoothing": self.label_smoothing,
            "ignore_index": self.ignore_index,
        }
        if self.logits:
            return float(bce.binary_cross_entropy_with_logits(x, y, pos_weight=pos_weight, **options))
        assert pos_weight is None
        return float(bce.binary_cross_entropy(x, y, **options))

    def reference(self, x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> Reference:
        """bcekit.numpy on the whole data: ``x``, ``y`` are ``(rows, labels)``, ``w`` is ``(rows,)``."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        w2 = None if w is None else np.asarray(w, np.float64)[:, None]
        pw = None if self.pos_weight is None else np.asarray(self.pos_weight, np.float64)
        overall = self.loss(x, y, w2, pw)
        per_label = [
            self.loss(x[:, [j]], y[:, [j]], w2, None if pw is None else pw[[j if pw.size > 1 else 0]])
            for j in range(x.shape[1])
        ]
        if self.ignore_index is None:
            kept = np.ones(y.shape, bool)
        elif math.isnan(self.ignore_index):
            kept = ~np.isnan(y)
        else:
            kept = y != self.ignore_index
        counts = [int(c) for c in kept.sum(axis=0)]
        return Reference(overall, per_label, counts, x.shape[0])


@dataclass(frozen=True)
class Reference:
    loss: float
    per_label: list[float]
    elements: list[int]
    rows: int


def names(labels: int) -> tuple[list[str], list[str]]:
    """Prediction and target column names of ``labels`` labels."""
    return [f"p{j}" for j in range(labels)], [f"y{j}" for j in range(labels)]


def columns(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> dict[str, np.ndarray]:
    preds, targets = names(x.shape[1])
    data = {p: x[:, j] for j, p in enumerate(preds)} | {t: y[:, j] for j, t in enumerate(targets)}
    if w is not None:
        data["w"] = w
    return data


def score_argv(files: list[str], labels: int, options: Options, *extra: str) -> list[str]:
    preds, targets = names(labels)
    return ["score", *files, "--target", *targets, "--pred", *preds, *options.argv(), *extra]


def make_data(
    seed: int, rows: int, labels: int, *, logits: bool, ignore: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predictions (logits, or probabilities with some exact 0 and 1), hard and soft targets (some equal to
    ``ignore``), positive weights."""
    rng = np.random.default_rng(seed)
    if logits:
        x = rng.normal(0.0, 3.0, (rows, labels))
    else:
        x = rng.uniform(0.0, 1.0, (rows, labels))
        x[rng.random(x.shape) < 0.03] = 0.0
        x[rng.random(x.shape) < 0.03] = 1.0
    y = (rng.random((rows, labels)) < 0.4).astype(np.float64)
    soft = rng.random(y.shape) < 0.3
    y[soft] = rng.uniform(0.0, 1.0, int(soft.sum()))
    if ignore is not None:
        y[rng.random(y.shape) < 0.2] = ignore
    w = rng.uniform(0.1, 3.0, rows)
    return x, y, w


def strict_json(text: str) -> dict:
    """The one JSON document ``text`` holds; NaN and Infinity literals (not JSON) are refused."""

    def refuse(literal: str) -> None:
        raise AssertionError(f"{literal} is not JSON")

    return json.loads(text, parse_constant=refuse)


def score_json(run, *argv: str) -> dict:
    code, out, err = run(*argv, "--format", "json", "--progress", "never")
    assert code == 0, err
    assert err == ""
    assert out.endswith("\n") and out.count("\n") == 1, out
    return strict_json(out)


@pytest.fixture
def score(run):
    """``score(*argv) -> JSON document`` of a successful ``bcekit <argv> --format json`` that wrote nothing
    else, on stdout or stderr."""
    return lambda *argv: score_json(run, *argv)


def number(value: float | str) -> float:
    """A loss from the JSON document: a float, or a string the command writes for a non-finite one."""
    if isinstance(value, str):
        assert value in ("inf", "-inf", "nan"), value
        return float(value)
    assert isinstance(value, float)
    return value


def assert_close(actual: float, expected: float) -> None:
    if math.isnan(expected):
        assert math.isnan(actual), (actual, expected)
    else:
        assert math.isclose(actual, expected, rel_tol=RTOL, abs_tol=0.0), (actual, expected)


def check(doc: dict, ref: Reference, options: Options, labels: int | None = None) -> None:
    preds, targets = names(len(ref.per_label) if labels is None else labels)
    assert doc["reduction"] == options.reduction
    assert doc["rows"] == ref.rows
    assert doc["elements"] == sum(ref.elements)
    assert_close(number(doc["loss"]), ref.loss)
    assert list(doc["per_label"]) == preds
    for pred, target, loss, elements in zip(preds, targets, ref.per_label, ref.elements, strict=True):
        entry = doc["per_label"][pred]
        assert entry["target"] == target
        assert entry["elements"] == elements
        assert_close(number(entry["loss"]), loss)


# -- every option against bcekit.numpy ----------------------------------------------------------------------

OPTION_CASES = {
    "probabilities": (3, Options()),
    "probabilities-sum": (3, Options(reduction="sum")),
    "logits": (3, Options(logits=True)),
    "logits-sum": (3, Options(logits=True, reduction="sum")),
    "one-label": (1, Options(logits=True)),
    "probabilities-weight": (3, Options(weight=True)),
    "logits-weight-sum": (2, Options(logits=True, weight=True, reduction="sum")),
    "pos-weight-one-value": (3, Options(logits=True, pos_weight=(2.5,))),
    "pos-weight-per-label": (3, Options(logits=True, pos_weight=(0.5, 3.0, 1.25))),
    "pos-weight-weight-sum": (2, Options(logits=True, weight=True, pos_weight=(4.0, 0.25), reduction="sum")),
    "smoothing-probabilities": (3, Options(label_smoothing=0.1)),
    "smoothing-logits-pos-weight": (2, Options(logits=True, label_smoothing=0.3, pos_weight=(2.0, 0.7))),
    "smoothing-one": (2, Options(label_smoothing=1.0)),
    "ignore-minus-one": (3, Options(ignore_index=-1.0)),
    "ignore-minus-one-logits-sum": (3, Options(logits=True, ignore_index=-1.0, reduction="sum")),
    "ignore-nan": (3, Options(logits=True, ignore_index=math.nan)),
    "ignore-nan-everything": (
        3,
        Options(weight=True, label_smoothing=0.2, ignore_index=math.nan, reduction="sum"),
    ),
    "ignore-everything-logits": (
        2,
        Options(logits=True, weight=True, pos_weight=(3.0,), label_smoothing=0.05, ignore_index=-1.0),
    ),
}


@pytest.mark.parametrize("labels, options", OPTION_CASES.values(), ids=OPTION_CASES.keys())
def test_options_match_numpy(tmp_path, write, score, labels, options):
    x, y, w = make_data(1, 200, labels, logits=options.logits, ignore=options.ignore_index)
    path = write(tmp_path, "data.parquet", columns(x, y, w), row_group_size=64)
    doc = score(*score_argv([path], labels, options))
    check(doc, options.reference(x, y, w), options)


@pytest.mark.parametrize("logits", [False, True], ids=["probabilities", "logits"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_torch(tmp_path, write, score, logits, reduction):
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    x, y, w = make_data(2, 150, 3, logits=logits)
    pos_weight = (0.5, 2.0, 1.5) if logits else None
    options = Options(logits=logits, weight=True, pos_weight=pos_weight, reduction=reduction)
    path = write(tmp_path, "data.npz", columns(x, y, w))
    doc = score(*score_argv([path], 3, options))

    tx, ty, tw = (torch.from_numpy(a) for a in (x, y, w[:, None]))
    assert tx.dtype == torch.float64

    def loss(columns: slice) -> float:
        if logits:
            pw = torch.tensor(pos_weight, dtype=torch.float64)[columns]
            value = functional.binary_cross_entropy_with_logits(
                tx[:, columns], ty[:, columns], weight=tw, pos_weight=pw, reduction=reduction
            )
        else:
            value = functional.binary_cross_entropy(
                tx[:, columns], ty[:, columns], weight=tw, reduction=reduction
            )
        return float(value)

    assert_close(number(doc["loss"]), loss(slice(None)))
    for j in range(3):
        assert_close(number(doc["per_label"][f"p{j}"]["loss"]), loss(slice(j, j + 1)))


def test_numeric_types_are_read_as_float64(tmp_path, write, score):
    """Integer, boolean and float32 columns score as their float64 values."""
    rng = np.random.default_rng(3)
    rows = 60
    p0 = rng.uniform(0, 1, rows).astype(np.float32)
    p1 = rng.uniform(0, 1, rows)
    y0 = rng.integers(0, 2, rows).astype(np.int8)
    y1 = rng.random(rows) < 0.5
    w = rng.integers(1, 5, rows).astype(np.int32)
    data = {"p0": p0, "p1": p1, "y0": y0, "y1": y1, "w": w}
    options = Options(weight=True)
    x = np.column_stack([p0.astype(np.float64), p1])
    y = np.column_stack([y0.astype(np.float64), y1.astype(np.float64)])
    ref = options.reference(x, y, w.astype(np.float64))
    for name in ("data.parquet", "data.npz", "data.npy"):
        doc = score(*score_argv([write(tmp_path, name, data)], 2, options))
        check(doc, ref, options)


# -- formats and layouts -----------------------------------------------------------------------------------

FORMAT_OPTIONS = {
    "probabilities": Options(weight=True, label_smoothing=0.05, ignore_index=-1.0),
    "logits": Options(logits=True, weight=True, pos_weight=(2.0, 0.5), ignore_index=-1.0, reduction="sum"),
}


@pytest.mark.parametrize("options", FORMAT_OPTIONS.values(), ids=FORMAT_OPTIONS.keys())
@pytest.mark.parametrize(
    "name, kw",
    [
        ("data.csv", {}),
        ("data.csv.gz", {}),
        ("data.parquet", {"row_group_size": 8}),  # 7 row groups
        ("data.parquet", {}),  # one row group
        ("data.npy", {"npy": "structured"}),
        ("data.npz", {}),
        ("data.npz", {"compressed": True}),
    ],
    ids=["csv", "csv.gz", "parquet-row-groups", "parquet", "npy-structured", "npz", "npz-compressed"],
)
def test_formats(tmp_path, write, score, name, kw, options):
    x, y, w = make_data(4, 50, 2, logits=options.logits, ignore=options.ignore_index)
    path = write(tmp_path, name, columns(x, y, w), **kw)
    doc = score(*score_argv([path], 2, options))
    check(doc, options.reference(x, y, w), options)


@pytest.mark.parametrize("options", FORMAT_OPTIONS.values(), ids=FORMAT_OPTIONS.keys())
def test_npy_2d_columns_are_numbered(tmp_path, write, score, options):
    x, y, w = make_data(5, 40, 2, logits=options.logits, ignore=options.ignore_index)
    data = {"0": x[:, 0], "1": x[:, 1], "2": y[:, 0], "3": y[:, 1], "4": w}
    path = write(tmp_path, "data.npy", data, npy="2d")
    argv = ["score", path, "--target", "2", "3", "--pred", "0", "1", *options.argv(weight="4")]
    doc = score(*argv)
    ref = options.reference(x, y, w)
    assert doc["rows"] == 40
    assert list(doc["per_label"]) == ["0", "1"]
    assert [doc["per_label"][p]["target"] for p in ("0", "1")] == ["2", "3"]
    assert_close(number(doc["loss"]), ref.loss)
    for j, p in enumerate(("0", "1")):
        assert doc["per_label"][p]["elements"] == ref.elements[j]
        assert_close(number(doc["per_label"][p]["loss"]), ref.per_label[j])


def test_npy_1d_side_by_side(tmp_path, write, score):
    """A 1-D NPY of targets (column ``0``) beside a CSV of predictions."""
    x, y, _ = make_data(6, 45, 1, logits=True)
    targets = write(tmp_path, "targets.npy", {"0": y[:, 0]}, npy="1d")
    preds = write(tmp_path, "preds.csv", {"z": x[:, 0]})
    options = Options(logits=True, pos_weight=(1.5,))
    doc = score("score", targets, preds, "--target", "0", "--pred", "z", *options.argv())
    ref = options.reference(x, y)
    assert doc["rows"] == 45 and doc["elements"] == 45
    assert doc["per_label"]["z"]["target"] == "0"
    assert_close(number(doc["loss"]), ref.loss)
    assert_close(number(doc["per_label"]["z"]["loss"]), ref.per_label[0])


@pytest.mark.parametrize("options", FORMAT_OPTIONS.values(), ids=FORMAT_OPTIONS.keys())
@pytest.mark.parametrize(
    "files",
    [
        [("a.parquet", {"row_group_size": 5}), ("b.parquet", {"row_group_size": 5}), ("c.parquet", {})],
        [("a.csv", {}), ("b.npz", {}), ("c.npy", {}), ("d.parquet", {"row_group_size": 3})],
    ],
    ids=["three-parquet", "mixed-formats"],
)
def test_stacked_layout(tmp_path, write, score, files, options):
    """Files that each hold every column are read one after another."""
    x, y, w = make_data(7, 61, 2, logits=options.logits, ignore=options.ignore_index)
    cuts = np.linspace(0, 61, len(files) + 1).astype(int)
    cuts[1] -= 3  # unequal parts
    paths = [
        write(tmp_path, name, columns(x[a:b], y[a:b], w[a:b]), **kw)
        for (name, kw), a, b in zip(files, cuts[:-1], cuts[1:], strict=True)
    ]
    doc = score(*score_argv(paths, 2, options))
    check(doc, options.reference(x, y, w), options)


def test_folder_is_its_data_files(tmp_path, write, score):
    """A folder (a partitioned data set) stands for the data files under it, sorted by path; other files
    (``_SUCCESS``, hidden ones, unknown types) and ``_``/``.`` folders are skipped."""
    options = FORMAT_OPTIONS[next(iter(FORMAT_OPTIONS))]
    x, y, w = make_data(9, 50, 2, logits=options.logits, ignore=options.ignore_index)
    dataset = tmp_path / "dataset"
    (dataset / "year=2025").mkdir(parents=True)
    (dataset / "year=2026").mkdir()
    (dataset / "_temporary").mkdir()
    parts = [
        ("year=2025/part-0.parquet", 0, 12),
        ("year=2025/part-1.csv", 12, 30),
        ("year=2026/a.npz", 30, 50),
    ]
    for name, a, b in parts:
        write(dataset, name, columns(x[a:b], y[a:b], w[a:b]), row_group_size=5 if "parquet" in name else None)
    (dataset / "_SUCCESS").write_text("")
    (dataset / ".part-0.parquet.crc").write_text("junk")
    (dataset / "README.txt").write_text("not data")
    write(dataset / "_temporary", "leftover.csv", columns(x[:3], 2 + y[:3], w[:3]))  # would be bad data
    doc = score(*score_argv([dataset], 2, options))
    check(doc, options.reference(x, y, w), options)
    # the same files named one by one (in another order) give the same loss
    doc_files = score(*score_argv([dataset / name for name, _, _ in reversed(parts)], 2, options))
    assert doc_files["loss"] == pytest.approx(doc["loss"], rel=1e-12)


def test_folder_without_data_files(tmp_path, run):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_SUCCESS").write_text("")
    code, stdout, stderr = run("score", tmp_path / "empty", "--target", "y", "--pred", "p")
    assert (code, stdout) == (2, "")
    assert "empty" in stderr and "no .csv, .parquet, .npy or .npz file" in stderr


@pytest.mark.parametrize("options", FORMAT_OPTIONS.values(), ids=FORMAT_OPTIONS.keys())
@pytest.mark.parametrize(
    "files",
    [
        [("targets.parquet", {"row_group_size": 6}, "yw"), ("preds.csv", {}, "p")],
        [("targets.parquet", {"row_group_size": 6}, "yw"), ("preds.csv.gz", {}, "p")],
        [("targets.csv", {}, "yw"), ("preds.parquet", {"row_group_size": 7}, "p")],
        [("preds.npy", {}, "p"), ("targets.parquet", {"row_group_size": 4}, "yw")],
        [("targets.npz", {}, "y"), ("preds.parquet", {"row_group_size": 9}, "p"), ("weight.csv", {}, "w")],
        [("targets.npy", {}, "y"), ("preds.npz", {"compressed": True}, "p"), ("weight.npz", {}, "w")],
    ],
    ids=["parquet+csv", "parquet+csv.gz", "csv+parquet", "npy+parquet", "npz+parquet+csv", "npy+npz+npz"],
)
def test_side_by_side_layout(tmp_path, write, score, files, options):
    """Targets, predictions and weights in different files (of different formats) are read row by row."""
    x, y, w = make_data(8, 57, 2, logits=options.logits, ignore=options.ignore_index)
    everything = columns(x, y, w)
    paths = []
    for name, kw, kinds in files:
        part = {c: v for c, v in everything.items() if c[0] in kinds}
        paths.append(write(tmp_path, name, part, **kw))
    for batch_rows in ("5", "1000"):
        doc = score(*score_argv(paths, 2, options, "--batch-rows", batch_rows))
        check(doc, options.reference(x, y, w), options)


# -- batch size --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout",
    ["csv", "parquet-row-groups", "npy", "npz", "stacked", "side-by-side"],
)
def test_batch_size_does_not_matter(tmp_path, write, score, layout):
    options = Options(logits=True, weight=True, pos_weight=(1.5, 0.75), ignore_index=math.nan)
    x, y, w = make_data(9, 23, 2, logits=True, ignore=math.nan)
    data = columns(x, y, w)
    if layout == "csv":
        paths = [write(tmp_path, "d.csv", data)]
    elif layout == "parquet-row-groups":
        paths = [write(tmp_path, "d.parquet", data, row_group_size=4)]
    elif layout == "npy":
        paths = [write(tmp_path, "d.npy", data)]
    elif layout == "npz":
        paths = [write(tmp_path, "d.npz", data)]
    elif layout == "stacked":
        first = {c: v[:10] for c, v in data.items()}
        second = {c: v[10:] for c, v in data.items()}
        paths = [write(tmp_path, "a.parquet", first, row_group_size=3)]
        paths.append(write(tmp_path, "b.csv", second))
    else:
        targets = {c: v for c, v in data.items() if c[0] in "yw"}
        preds = {c: v for c, v in data.items() if c[0] == "p"}
        paths = [write(tmp_path, "t.parquet", targets, row_group_size=6)]
        paths.append(write(tmp_path, "p.npz", preds))
    ref = options.reference(x, y, w)
    docs = []
    for batch_rows in (["--batch-rows", "1"], ["--batch-rows", "7"], ["--batch-rows", "1000"], []):
        docs.append(score(*score_argv(paths, 2, options, *batch_rows)))
        check(docs[-1], ref, options)
    for doc in docs[1:]:  # the sums are exact: the same to the last bit
        assert doc == docs[0]


@pytest.mark.parametrize(
    "options",
    [
        Options(logits=True),
        Options(logits=True, weight=True, pos_weight=(1.5, 0.25), label_smoothing=0.05),
        Options(logits=False, weight=True, ignore_index=math.nan),
    ],
    ids=["logits", "logits-options", "probabilities-weight-ignore"],
)
def test_mean_is_the_correctly_rounded_mean_of_the_losses(tmp_path, write, score, options):
    """The reported mean is the exact mean of the per-element float64 losses, rounded once: checked against
    Fraction sums of the kernel's per-element losses (themselves checked against mpmath in
    tests/test_accuracy.py), whatever the batch size and the thread count."""
    from fractions import Fraction

    import bcekit
    from bcekit import _native

    if not _native.AVAILABLE:
        pytest.skip("the C++ kernels are not built")
    rows, labels = 20_011, 2
    x, y, w = make_data(31, rows, labels, logits=options.logits, ignore=options.ignore_index)
    path = write(tmp_path, "d.parquet", columns(x, y, w), row_group_size=3_000)
    kept = np.ones(y.shape, bool) if options.ignore_index is None else ~np.isnan(y)
    weight = np.asarray(w, np.float64) if options.weight else None
    sums, counts = [], []
    for j in range(labels):
        losses = np.empty(rows)
        p = None if options.pos_weight is None else np.full(rows, options.pos_weight[j])
        yj = np.where(kept[:, j], y[:, j], 0.0)
        _native._core.losses64(
            int(options.logits),
            np.ascontiguousarray(x[:, j]),
            yj,
            weight,
            p,
            options.label_smoothing,
            None,
            losses,
            "auto",
        )
        sums.append(sum((Fraction(v) for v in losses[kept[:, j]].tolist()), Fraction(0)))
        counts.append(int(kept[:, j].sum()))
    previous = bcekit.get_num_threads()
    try:
        for threads, batch_rows in ((1, "1000"), (2, "4099"), (2, None)):
            bcekit.set_num_threads(threads)
            extra = [] if batch_rows is None else ["--batch-rows", batch_rows]
            doc = score(*score_argv([path], labels, options, *extra))
            assert doc["loss"] == float(sum(sums) / sum(counts))
            for j, (name, label) in enumerate(doc["per_label"].items()):
                assert label["loss"] == float(sums[j] / counts[j]), name
    finally:
        bcekit.set_num_threads(previous)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 40),
    labels=st.integers(1, 3),
    logits=st.booleans(),
    weight=st.booleans(),
    pos_weight=st.sampled_from([None, "one", "per-label"]),
    reduction=st.sampled_from(["mean", "sum"]),
    label_smoothing=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)),
    ignore_index=st.sampled_from([None, -1.0, math.nan]),
    fmt=st.sampled_from(["csv", "parquet", "npy", "npz"]),
    batch_rows=st.integers(1, 50),
    row_group_size=st.integers(1, 40),
)
def test_property_matches_numpy(
    write,
    score,
    seed,
    rows,
    labels,
    logits,
    weight,
    pos_weight,
    reduction,
    label_smoothing,
    ignore_index,
    fmt,
    batch_rows,
    row_group_size,
):
    rng = np.random.default_rng(seed)
    pw = None
    if logits and pos_weight is not None:
        pw = tuple(float(v) for v in rng.uniform(0.1, 5.0, 1 if pos_weight == "one" else labels))
    options = Options(logits, weight, pw, reduction, label_smoothing, ignore_index)
    x, y, w = make_data(seed, rows, labels, logits=logits, ignore=ignore_index)
    kw = {"row_group_size": row_group_size} if fmt == "parquet" else {}
    with tempfile.TemporaryDirectory() as directory:
        path = write(directory, f"data.{fmt}", columns(x, y, w), **kw)
        doc = score(*score_argv([path], labels, options, "--batch-rows", str(batch_rows)))
    check(doc, options.reference(x, y, w), options)


# -- JSON --------------------------------------------------------------------------------------------------


def test_json_document(tmp_path, write, run):
    x, y, w = make_data(10, 30, 3, logits=False, ignore=-1.0)
    y[:, 1] = -1.0  # ignored throughout: no elements, but the label is reported
    y[0, 1] = 1.0
    path = write(tmp_path, "d.parquet", columns(x, y, w))
    options = Options(weight=True, ignore_index=-1.0)
    code, out, err = run(*score_argv([path], 3, options), "--format", "json")
    assert (code, err) == (0, "")
    doc = strict_json(out)  # raises on anything after the document
    assert out == json.dumps(doc) + "\n"
    assert set(doc) == {"loss", "reduction", "rows", "elements", "per_label"}
    assert set(doc["per_label"]) == {"p0", "p1", "p2"}
    for entry in doc["per_label"].values():
        assert set(entry) == {"target", "loss", "elements"}
    kept = (y != -1.0).sum(axis=0)
    assert doc["per_label"]["p1"]["elements"] == 1
    assert [doc["per_label"][p]["elements"] for p in ("p0", "p1", "p2")] == kept.tolist()
    assert doc["elements"] == int(kept.sum()) < 3 * 30
    assert doc["rows"] == 30
    check(doc, options.reference(x, y, w), options)


def test_json_non_finite_losses(tmp_path, write, run):
    """An infinite logit against the wrong target is an infinite loss; a mean over no elements is NaN; both
    are written as strings, so the document stays JSON."""
    z0 = np.array([0.5, -1.0, math.inf, 2.0])
    z1 = np.array([0.25, 1.0, -3.0, 0.0])
    y0 = np.array([1.0, 0.0, 0.0, 1.0])  # the +inf logit has target 0: infinite loss
    y1 = np.array([1.0, 0.0, 1.0, 0.0])
    y2 = np.full(4, math.nan)  # every element ignored
    data = {"p0": z0, "p1": z1, "p2": z1, "y0": y0, "y1": y1, "y2": y2}
    path = write(tmp_path, "d.npz", data)
    x, y = np.column_stack([z0, z1, z1]), np.column_stack([y0, y1, y2])
    for reduction in ("mean", "sum"):
        options = Options(logits=True, reduction=reduction, ignore_index=math.nan)
        ref = options.reference(x, y)
        assert math.isinf(ref.per_label[0]) and math.isinf(ref.loss)
        assert math.isfinite(ref.per_label[1])
        assert math.isnan(ref.per_label[2]) == (reduction == "mean")
        code, out, err = run(*score_argv([path], 3, options), "--format", "json")
        assert (code, err) == (0, "")
        doc = strict_json(out)
        assert doc["loss"] == str(ref.loss) == "inf"
        assert doc["per_label"]["p0"]["loss"] == "inf"
        assert doc["per_label"]["p2"]["elements"] == 0
        expected = ref.per_label[2] if math.isfinite(ref.per_label[2]) else str(ref.per_label[2])
        assert doc["per_label"]["p2"]["loss"] == expected
        check(doc, ref, options)


def test_json_all_ignored_mean_is_nan(tmp_path, write, run):
    path = write(tmp_path, "d.csv", {"p": np.array([0.2, 0.9]), "y": np.array([-1.0, -1.0])})
    argv = ["score", path, "--target", "y", "--pred", "p", "--ignore-index", "-1", "--format", "json"]
    code, out, err = run(*argv)
    assert (code, err) == (0, "")
    doc = strict_json(out)
    reference = bce.binary_cross_entropy(np.array([0.2, 0.9]), np.full(2, -1.0), ignore_index=-1.0)
    assert math.isnan(float(reference))
    assert doc == {
        "loss": "nan",
        "reduction": "mean",
        "rows": 2,
        "elements": 0,
        "per_label": {"p": {"target": "y", "loss": "nan", "elements": 0}},
    }


def test_huge_finite_losses_sum_to_inf(tmp_path, write, score):
    """Finite per-element losses whose sum overflows: the sum is inf, as bcekit.numpy's; the mean comes
    back into range (bcekit.numpy sums in extended precision), and the command's must match it."""
    z = np.array([1e308, 1e308, 0.0])
    y = np.zeros(3)
    path = write(tmp_path, "d.npz", {"z": z, "y": y})
    assert float(bce.binary_cross_entropy_with_logits(z, y, reduction="sum")) == math.inf
    doc = score("score", path, "--target", "y", "--pred", "z", "--logits", "--reduction", "sum")
    assert doc["loss"] == doc["per_label"]["z"]["loss"] == "inf"
    mean = float(bce.binary_cross_entropy_with_logits(z, y, reduction="mean"))
    assert math.isfinite(mean)
    doc = score("score", path, "--target", "y", "--pred", "z", "--logits", "--batch-rows", "1")
    assert doc["loss"] == pytest.approx(mean, rel=1e-12)
    assert doc["per_label"]["z"]["loss"] == pytest.approx(mean, rel=1e-12)


def test_opposite_infinite_losses_give_nan(tmp_path, write, score):
    """A negative pos_weight makes -inf losses beside +inf ones: bcekit.numpy's sum is NaN, not an error."""
    z = np.array([math.inf, -math.inf])
    y = np.full(2, 0.5)
    path = write(tmp_path, "d.npz", {"z": z, "y": y})
    expected = float(bce.binary_cross_entropy_with_logits(z, y, pos_weight=np.array([-1.0]), reduction="sum"))
    assert math.isnan(expected)
    doc = score(
        "score", path, "--target", "y", "--pred", "z", "--logits", "--pos-weight", "-1", "--reduction", "sum"
    )
    assert doc["loss"] == "nan"


# -- table -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [1, 3])
@pytest.mark.parametrize("logits", [False, True], ids=["probabilities", "logits"])
def test_table(tmp_path, write, run, labels, logits):
    rows = 1234
    x, y, w = make_data(11, rows, labels, logits=logits, ignore=-1.0)
    options = Options(logits=logits, weight=True, ignore_index=-1.0, reduction="sum" if logits else "mean")
    path = write(tmp_path, "d.parquet", columns(x, y, w), row_group_size=500)
    code, out, err = run(*score_argv([path], labels, options))
    assert (code, err) == (0, "")
    ref = options.reference(x, y, w)
    lines = out.splitlines()
    kind = "logits" if logits else "probabilities"
    assert f"({kind})" in lines[0] and options.reduction in lines[0] and "1,234 rows" in lines[0]
    preds, targets = names(labels)
    for pred, target, loss, elements in zip(preds, targets, ref.per_label, ref.elements, strict=True):
        (line,) = [line for line in lines if f" {pred} " in line]
        assert f" {target} " in line and f" {elements:,} " in line and f" {loss:.10g} " in line
    total = [line for line in lines if " all " in line]
    if labels == 1:
        assert total == []
        assert f" {ref.loss:.10g} " in out
    else:
        (line,) = total
        assert f" {ref.loss:.10g} " in line and f" {sum(ref.elements):,} " in line


# -- plot --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "logits, labels, fmt", [(False, 1, "json"), (True, 3, "table"), (False, 10, "json"), (True, 10, "table")]
)
def test_plot(tmp_path, write, run, logits, labels, fmt):
    import matplotlib.image

    x, y, w = make_data(12, 300, labels, logits=logits, ignore=math.nan)
    options = Options(logits=logits, ignore_index=math.nan)
    path = write(tmp_path, "d.npz", columns(x, y, w))
    png = tmp_path / "plot.png"
    code, out, err = run(*score_argv([path], labels, options), "--plot", png, "--format", fmt)
    assert code == 0, err
    if fmt == "json":
        check(strict_json(out), options.reference(x, y, w), options)
        assert err == ""
    else:
        assert err == f"plot written to {png}\n"
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 20_000
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 800
    assert image.std() > 0.05  # not blank


def _one_error_line(code: int, out: str, err: str) -> str:
    assert (code, out) == (2, ""), err
    assert err.startswith("bcekit score: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("name", ["plot.foo", "plot.png.bak", "plot.docx"])
def test_plot_unknown_extension_fails_before_reading(tmp_path, write, run, name):
    """The image type is checked first: with bad data too, the error is about --plot, and no file is made."""
    x, y, _ = make_data(17, 30, 1, logits=False)
    good = write(tmp_path, "good.npz", columns(x, y))
    bad = write(tmp_path, "bad.csv", columns(x, 2 + y))  # targets out of [0, 1]
    target = tmp_path / name
    for path in (good, bad):
        err = _one_error_line(*run(*score_argv([path], 1, Options()), "--plot", target))
        assert f"--plot {target}" in err and ".png" in err, err
        assert not target.exists()


@pytest.mark.parametrize("where", ["missing folder", "a folder", "under a file"])
def test_plot_unwritable_path_fails_before_reading(tmp_path, write, run, where):
    x, y, _ = make_data(18, 30, 1, logits=False)
    bad = write(tmp_path, "bad.csv", columns(x, 2 + y))
    (tmp_path / "folder.png").mkdir()
    target = {
        "missing folder": tmp_path / "absent" / "plot.png",
        "a folder": tmp_path / "folder.png",
        "under a file": tmp_path / "bad.csv" / "plot.png",
    }[where]
    err = _one_error_line(*run(*score_argv([bad], 1, Options()), "--plot", target))
    assert f"--plot {target}" in err, err
    assert not (tmp_path / "absent").exists()


def test_plot_check_leaves_no_file_behind(tmp_path, write, run):
    x, y, _ = make_data(19, 30, 1, logits=False)
    bad = write(tmp_path, "bad.csv", columns(x, 2 + y))
    target = tmp_path / "plot.png"
    err = _one_error_line(*run(*score_argv([bad], 1, Options()), "--plot", target))
    assert "bad.csv" in err and "--plot" not in err
    assert not target.exists()


def test_plot_without_extension_is_a_png_at_that_path(tmp_path, write, run):
    x, y, w = make_data(20, 40, 1, logits=False)
    path = write(tmp_path, "d.csv", columns(x, y, w))
    target = tmp_path / "calibration"
    code, out, err = run(*score_argv([path], 1, Options()), "--plot", target, "--format", "json")
    assert (code, err) == (0, ""), err
    check(strict_json(out), Options().reference(x, y, w), Options())
    assert target.read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "calibration.png").exists()


@pytest.mark.parametrize(
    "error, shown",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (RuntimeError("LaTeX was not able to process\nthe following string"), "process the following"),
    ],
    ids=["disk-full", "two-line-message"],
)
def test_plot_write_failing_at_the_end(tmp_path, write, run, monkeypatch, error, shown):
    """A write that fails after the data was read (a full disk, say): one line and status 2, no result."""
    import matplotlib.figure

    def failing(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", failing)
    x, y, _ = make_data(21, 30, 1, logits=False)
    path = write(tmp_path, "d.csv", columns(x, y))
    for fmt in ("json", "table"):
        target = tmp_path / "plot.png"
        err = _one_error_line(*run(*score_argv([path], 1, Options()), "--plot", target, "--format", fmt))
        assert f"--plot {target}" in err and shown in err, err


# -- progress ----------------------------------------------------------------------------------------------


def test_progress(tmp_path, write, run):
    x, y, w = make_data(13, 40, 2, logits=True)
    path = write(tmp_path, "d.parquet", columns(x, y, w), row_group_size=16)
    argv = [*score_argv([path], 2, Options(logits=True)), "--format", "json", "--batch-rows", "8"]
    code, out, err = run(*argv, "--progress", "always")
    assert code == 0
    assert "scoring" in err and "40/40" in err  # the bar, complete: Parquet records its row count
    shown = strict_json(out)
    check(shown, Options(logits=True).reference(x, y), Options(logits=True))
    for mode in ("never", "auto"):  # auto: stderr is no terminal here
        code, out, err = run(*argv, "--progress", mode)
        assert (code, err) == (0, "")
        assert strict_json(out) == shown


# -- usage errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target", "y0", "y1", "--pred", "p0"], "target"),
        (["--target", "y0", "--pred", "p0", "p1"], "prediction"),
        (["--target", "y0", "--pred", "p0", "--pos-weight", "2"], "--logits"),
        (
            ["--target", "y0", "y1", "--pred", "p0", "p1", "--logits", "--pos-weight", "1", "2", "3"],
            "pos_wei",
        ),
        (["--target", "y0", "--pred", "p0", "--label-smoothing", "-0.1"], "label_smoothing"),
        (["--target", "y0", "--pred", "p0", "--label-smoothing", "1.5"], "label_smoothing"),
        (["--target", "y0", "--pred", "p0", "--label-smoothing", "nan"], "label_smoothing"),
        (["--target", "y0", "--pred", "p0", "--scheduler", "tcp://127.0.0.1:1"], "--scheduler"),
        (["--target", "y0", "--pred", "p0", "--batch-rows", "0"], "batch_rows"),
        (["--target", "y0", "--pred", "p0", "--batch-rows", "-5"], "batch_rows"),
    ],
    ids=[
        "more-targets",
        "more-preds",
        "pos-weight-without-logits",
        "pos-weight-count",
        "smoothing-negative",
        "smoothing-above-one",
        "smoothing-nan",
        "scheduler-without-dask",
        "batch-rows-zero",
        "batch-rows-negative",
    ],
)
def test_usage_errors(tmp_path, write, run, argv, message):
    x, y, _ = make_data(14, 5, 2, logits=False)
    path = write(tmp_path, "d.csv", columns(x, y))
    code, out, err = run("score", path, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("bcekit score: error: ") and err.count("\n") == 1 and message in err


def test_unknown_extension(tmp_path, write, run):
    x, y, _ = make_data(15, 5, 1, logits=False)
    path = write(tmp_path, "d.txt", columns(x, y), fmt="csv")
    code, out, err = run("score", path, "--target", "y0", "--pred", "p0")
    assert (code, out) == (2, "")
    assert err.startswith("bcekit score: error: ") and "d.txt" in err and "unknown file type" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--target", "y0"],  # no --pred
        ["--target", "y0", "--pred", "p0", "--reduction", "median"],
        ["--target", "y0", "--pred", "p0", "--batch-rows", "many"],
        ["--target", "y0", "--pred", "p0", "--format", "xml"],
    ],
    ids=["no-pred", "bad-reduction", "bad-batch-rows", "bad-format"],
)
def test_argparse_errors_exit_2(tmp_path, write, run, argv):
    path = write(tmp_path, "d.csv", {"p0": np.array([0.5]), "y0": np.array([1.0])})
    code, out, _ = run("score", path, *argv)
    assert (code, out) == (2, "")


# -- the installed command ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["console-script", "python-m"])
def test_installed_command(tmp_path, write, how):
    if how == "console-script":
        executable = shutil.which("bcekit")
        if executable is None:
            pytest.skip("the bcekit console script is not on PATH")
        command = [executable]
    else:
        command = [sys.executable, "-m", "bcekit"]
    x, y, w = make_data(16, 20, 2, logits=True)
    path = write(tmp_path, "d.csv", columns(x, y, w))
    options = Options(logits=True, weight=True)
    argv = [*score_argv([path], 2, options), "--format", "json"]
    done = subprocess.run([*command, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    check(strict_json(done.stdout), options.reference(x, y, w), options)
    bad = subprocess.run(
        [*command, "score", path, "--target", "y0", "--pred", "p0", "--batch-rows", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stdout == "" and "batch_rows" in bad.stderr


def test_folder_files_are_read_in_sorted_path_order(tmp_path, write, run):
    """With a bad value in every file of a folder, the error names the first file in sorted path order."""
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    for name in ("part-2.csv", "part-10.csv", "part-1.csv"):  # sorted: part-1, part-10, part-2
        write(dataset, name, {"y": np.array([0.0, 2.0]), "p": np.array([0.5, 0.5])})
    code, stdout, stderr = run("score", dataset, "--target", "y", "--pred", "p")
    assert (code, stdout) == (2, "")
    assert os.path.join("dataset", "part-1.csv: column 'y': row 2") in stderr


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="watches /proc for the data file being open")
def test_interrupt_prints_one_line_and_exits_130(tmp_path):
    """Ctrl-C (SIGINT) while scoring: one line on stderr, nothing on stdout, exit status 130."""
    path = tmp_path / "big.csv"
    path.write_text("y,p\n" + "1,0.5\n0,0.25\n" * 100_000)  # one row a batch: far longer than the test waits
    command = [sys.executable, "-m", "bcekit", "score", str(path), "--target", "y", "--pred", "p"]
    process = subprocess.Popen(
        [*command, "--batch-rows", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not _has_open(process.pid, path):  # the command is reading the file: past start-up
            assert process.poll() is None and time.monotonic() < deadline, "the command did not start"
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert (process.returncode, out, err) == (130, "", "bcekit score: interrupted\n")


def _has_open(pid: int, path: os.PathLike[str]) -> bool:
    target = os.path.realpath(path)
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for descriptor in descriptors:
        try:
            if os.readlink(f"/proc/{pid}/fd/{descriptor}") == target:
                return True
        except OSError:
            continue
    return False


@pytest.mark.parametrize("logits", [True, False])
def test_without_the_kernels(tmp_path, write, score, monkeypatch, logits):
    """Where the C++ kernels are not built, bcekit.numpy's per-element losses are summed exactly in Python:
    the same result to within the rounding of single elements, the same counts, the same bad-data errors."""
    options = Options(logits=logits, weight=True, ignore_index=math.nan)
    x, y, w = make_data(41, 3_001, 2, logits=logits, ignore=math.nan)
    path = write(tmp_path, "d.parquet", columns(x, y, w), row_group_size=700)
    with_kernels = score(*score_argv([path], 2, options, "--batch-rows", "500"))
    from bcekit import _native

    monkeypatch.setattr(_native, "AVAILABLE", False)
    without = score(*score_argv([path], 2, options, "--batch-rows", "500"))
    assert without["elements"] == with_kernels["elements"] and without["rows"] == with_kernels["rows"]
    assert math.isclose(without["loss"], with_kernels["loss"], rel_tol=1e-15)
    check(without, options.reference(x, y, w), options)
