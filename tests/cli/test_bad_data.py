"""``bcekit score`` on bad data: exit status 2, nothing on stdout, one line on stderr naming the file, the
column and the first offending row (1-based, not counting a CSV header); and no row dropped silently.

Each case also runs the command on the same data with the bad value fixed and expects success, so a test
cannot pass merely because the command fails on everything. The files are written by the small private
helpers below (independent of ``conftest.py``) so that the exact bytes of each bad cell are under control.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import re
import warnings
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bcekit.numpy as bce
from bcekit.cli import main

NAN, INF = math.nan, math.inf

# -- helpers -------------------------------------------------------------------------------------------------


def _run(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["score", *(os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in argv)], out, err)
    return code, out.getvalue(), err.getvalue()


def _cell(value: object) -> str:
    """A CSV cell: ``None`` is an empty cell, a ``str`` is written verbatim, a float exactly (``repr``)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def _write(path: os.PathLike[str] | str, columns: dict[str, object], *, row_group_size: int | None = None):
    """Write ``columns`` (name -> sequence) in the format of ``path``'s suffix; returns ``path`` as a str.

    CSV cells may be ``None`` (empty) or verbatim strings; Parquet values may be ``None`` (null) and a
    column of strings stays a string column; NPY is a structured array, NPZ one member per column.
    """
    path = os.fspath(path)
    names = list(columns)
    if path.endswith((".csv", ".csv.gz")):
        rows = zip(*(list(columns[c]) for c in names), strict=True)
        text = "\n".join([",".join(names), *(",".join(_cell(v) for v in row) for row in rows)]) + "\n"
        data = text.encode()
        if path.endswith(".gz"):
            data = gzip.compress(data)
        with open(path, "wb") as stream:
            stream.write(data)
    elif path.endswith(".parquet"):
        arrays = {}
        for name in names:
            values = list(columns[name])
            if any(isinstance(v, str) for v in values):
                arrays[name] = pa.array(values, pa.string())
            else:
                arrays[name] = pa.array([None if v is None else float(v) for v in values], pa.float64())
        pq.write_table(pa.table(arrays), path, row_group_size=row_group_size)
    elif path.endswith(".npy"):
        length = len(columns[names[0]])
        array = np.empty(length, dtype=[(name, np.float64) for name in names])
        for name in names:
            array[name] = np.asarray(columns[name], dtype=np.float64)
        with open(path, "wb") as stream:
            np.save(stream, array, allow_pickle=False)
    elif path.endswith(".npz"):
        with open(path, "wb") as stream:
            np.savez(stream, **{name: np.asarray(columns[name], dtype=np.float64) for name in names})
    else:
        raise ValueError(path)
    return path


def _data(n: int, offset: int = 0) -> dict[str, np.ndarray]:
    """``n`` good rows: targets ``y`` in {0, 1}, probabilities ``p``, logits ``z``, weights ``w``."""
    i = np.arange(offset, offset + n)
    return {
        "y": (i % 2).astype(np.float64),
        "p": (i % 97 + 1) / 99.0,
        "z": ((i * 7) % 23 - 11) / 3.0,
        "w": 1.0 + (i % 3),
    }


def _with(columns: dict[str, np.ndarray], column: str, row: int, value: object) -> dict[str, list]:
    """A copy of ``columns`` (as lists) with 1-based ``row`` of ``column`` set to ``value``."""
    copy = {name: list(values) for name, values in columns.items()}
    copy[column][row - 1] = value
    return copy


def _bad(
    result: tuple[int, str, str], *, file: str, column: str | None = None, row: int | None = None
) -> str:
    """Assert a bad-data exit: status 2, empty stdout, exactly one stderr line naming ``file`` (the path as
    given), ``column`` (quoted) and ``row`` (the first row number in the line). Returns the line."""
    code, out, err = result
    assert code == 2, f"exit {code}; stdout {out!r}; stderr {err!r}"
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert os.fspath(file) in line, line
    if column is not None:
        assert repr(column) in line, line
    if row is not None:
        rows = re.findall(r"\brow (\d+)\b", line)
        assert rows[:1] == [str(row)], line
    return line


def _ok(result: tuple[int, str, str]) -> dict:
    code, out, err = result
    assert code == 0, f"exit {code}; stderr {err!r}"
    assert err == ""
    return json.loads(out)


def _loss_sum(p: np.ndarray, y: np.ndarray, *, logits: bool = False, **options) -> float:
    function = bce.binary_cross_entropy_with_logits if logits else bce.binary_cross_entropy
    losses = function(np.asarray(p, np.float64), np.asarray(y, np.float64), reduction="none", **options)
    return math.fsum(np.asarray(losses).ravel().tolist())


# -- bad values, every format, at varying rows ---------------------------------------------------------------

N, BATCH, GROUP = 41, 6, 10  # rows, --batch-rows, Parquet row-group size
# the first row, the last row of the first batch, the first of the second, the first of the second Parquet
# row group, the middle, the last row
ROWS = (1, 6, 7, 11, 23, 41)
FORMATS = ("csv", "parquet", "npy", "npz")

# name: (column, bad value, logits, uses the weight)
VALUE_CASES = {
    "probability nan": ("p", NAN, False, False),
    "logit nan": ("z", NAN, True, False),
    "probability above 1": ("p", 1.5, False, False),
    "probability below 0": ("p", -0.25, False, False),
    "probability +inf": ("p", INF, False, False),
    "probability -inf": ("p", -INF, False, False),
    "target nan": ("y", NAN, False, False),
    "target 2": ("y", 2.0, False, False),
    "target -1": ("y", -1.0, False, False),
    "target 1.5 with logits": ("y", 1.5, True, False),
    "target +inf": ("y", INF, True, False),
    "weight nan": ("w", NAN, False, True),
    "weight +inf": ("w", INF, False, True),
    "weight -inf": ("w", -INF, True, True),
}


def _value_args(path: str, logits: bool, weighted: bool) -> list[str]:
    args = [path, "--target", "y", "--pred", "z" if logits else "p", "--format", "json"]
    args += ["--batch-rows", str(BATCH)]
    if logits:
        args.append("--logits")
    if weighted:
        args += ["--weight", "w"]
    return args


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("case", list(VALUE_CASES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_value(tmp_path, fmt, case, row):
    column, value, logits, weighted = VALUE_CASES[case]
    good = _write(tmp_path / f"good.{fmt}", _data(N), row_group_size=GROUP)
    assert _ok(_run(*_value_args(good, logits, weighted)))["rows"] == N
    bad = _write(tmp_path / f"bad.{fmt}", _with(_data(N), column, row, value), row_group_size=GROUP)
    _bad(_run(*_value_args(bad, logits, weighted)), file=bad, column=column, row=row)


# -- non-numeric and empty CSV cells -------------------------------------------------------------------------

TEXTS = {
    "word": "abc",
    "leading space": " 2.5",
    "trailing space": "2.5 ",
    "NA": "NA",
    "two points": "0.5.1",
    "empty": None,
    "quoted empty": '""',
    "blank": "   ",
}


@pytest.mark.parametrize("row", (1, 6, 7, 23, 41))
@pytest.mark.parametrize("text", list(TEXTS))
@pytest.mark.parametrize("suffix", ("csv", "csv.gz"))
def test_csv_cell_not_a_number(tmp_path, suffix, text, row):
    args = ["--target", "y", "--pred", "p", "--format", "json", "--batch-rows", str(BATCH)]
    good = _write(tmp_path / f"good.{suffix}", _data(N))
    assert _ok(_run(good, *args))["rows"] == N
    bad = _write(tmp_path / f"bad.{suffix}", _with(_data(N), "p", row, TEXTS[text]))
    _bad(_run(bad, *args), file=bad, column="p", row=row)


@pytest.mark.parametrize("text", ("abc", None))
@pytest.mark.parametrize(("column", "row"), [("y", 1), ("y", 12), ("w", 7), ("w", 41)])
def test_csv_cell_not_a_number_in_target_and_weight(tmp_path, column, row, text):
    args = ["--target", "y", "--pred", "p", "--weight", "w", "--format", "json", "--batch-rows", "4"]
    assert _ok(_run(_write(tmp_path / "good.csv", _data(N)), *args))["rows"] == N
    bad = _write(tmp_path / "bad.csv", _with(_data(N), column, row, text))
    _bad(_run(bad, *args), file=bad, column=column, row=row)


@pytest.mark.parametrize("row", (1, 2, 5))
def test_csv_blank_line_in_a_one_column_file_is_an_empty_cell(tmp_path, row):
    """In a one-column CSV an empty cell is an empty line: it is a missing value at its row, not a row to
    skip (skipping it would shift every later prediction onto the wrong target)."""
    targets = _write(tmp_path / "targets.csv", {"y": [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]})
    args = ["--target", "y", "--pred", "p", "--format", "json"]
    values = [0.5, 0.25, 0.75, 0.125, 0.625, 0.375]
    good = _write(tmp_path / "good.csv", {"p": values})
    assert _ok(_run(good, targets, *args))["rows"] == 6
    bad = _write(tmp_path / "bad.csv", _with({"p": values}, "p", row, None))
    _bad(_run(bad, targets, *args), file=bad, column="p", row=row)
    # an empty cell in each file: both files one line short, every row between paired with the wrong one
    bad_targets = _write(tmp_path / "bad_targets.csv", {"y": [1.0, 0.0, 1.0, None, 1.0, 0.0]})
    first = (bad, "p", row) if row < 4 else (bad_targets, "y", 4)
    _bad(_run(bad, bad_targets, *args), file=first[0], column=first[1], row=first[2])


def test_csv_bad_value_beyond_the_first_read_block(tmp_path):
    """A CSV larger than pyarrow's read block (1 MiB) arrives in several blocks; rows count on across them."""
    n, row = 150_007, 123_457
    good = _write(tmp_path / "good.csv", _data(n))
    assert _ok(_run(good, "--target", "y", "--pred", "p", "--format", "json"))["rows"] == n
    bad = _write(tmp_path / "bad.csv", _with(_data(n), "p", row, "x"))
    for batch in ("65536", "1000", "77"):
        result = _run(bad, "--target", "y", "--pred", "p", "--batch-rows", batch)
        _bad(result, file=bad, column="p", row=row)


# -- Parquet nulls and non-number columns --------------------------------------------------------------------


@pytest.mark.parametrize("row", (1, 10, 11, 25, 41))
@pytest.mark.parametrize("column", ("p", "y", "w"))
def test_parquet_null(tmp_path, column, row):
    args = ["--target", "y", "--pred", "p", "--weight", "w", "--format", "json", "--batch-rows", str(BATCH)]
    good = _write(tmp_path / "good.parquet", _data(N), row_group_size=GROUP)
    assert _ok(_run(good, *args))["rows"] == N
    bad = _write(tmp_path / "bad.parquet", _with(_data(N), column, row, None), row_group_size=GROUP)
    _bad(_run(bad, *args), file=bad, column=column, row=row)


@pytest.mark.parametrize("row", (1, 11, 41))
def test_parquet_string_column(tmp_path, row):
    """A string column whose values are not numbers: the first one that is not is reported."""
    args = ["--target", "y", "--pred", "p", "--format", "json", "--batch-rows", str(BATCH)]
    good = _write(tmp_path / "good.parquet", _data(N), row_group_size=GROUP)
    assert _ok(_run(good, *args))["rows"] == N
    columns = _data(N)
    texts = [repr(float(v)) for v in columns["p"]]
    texts[row - 1] = "high"
    bad = _write(tmp_path / "bad.parquet", {"y": columns["y"], "p": texts}, row_group_size=GROUP)
    _bad(_run(bad, *args), file=bad, column="p", row=row)


def test_parquet_binary_column(tmp_path):
    path = os.fspath(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"y": [1.0, 0.0, 1.0], "p": pa.array([b"a", b"b", b"c"])}), path)
    _bad(_run(path, "--target", "y", "--pred", "p"), file=path, column="p", row=1)


# -- --ignore-index and infinite logits ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ("csv", "parquet"))
def test_ignore_index_nan_accepts_nan_targets(tmp_path, fmt):
    columns = _data(N)
    y = columns["y"].copy()
    y[[0, 10, 40]] = NAN
    path = _write(tmp_path / f"data.{fmt}", {**columns, "y": y}, row_group_size=GROUP)
    args = [path, "--target", "y", "--pred", "p", "--format", "json", "--batch-rows", str(BATCH)]
    _bad(_run(*args), file=path, column="y", row=1)
    document = _ok(_run(*args, "--ignore-index", "nan", "--reduction", "sum"))
    assert document["rows"] == N and document["elements"] == N - 3
    kept = ~np.isnan(y)
    assert document["loss"] == pytest.approx(_loss_sum(columns["p"][kept], y[kept]), rel=1e-12)
    # NaN targets are the only ones --ignore-index nan lets through
    bad = _write(tmp_path / f"bad.{fmt}", {**columns, "y": _with({"y": y}, "y", 23, 2.0)["y"]})
    _bad(_run(bad, *args[1:], "--ignore-index", "nan"), file=bad, column="y", row=23)


@pytest.mark.parametrize("fmt", ("csv", "parquet", "npy"))
def test_ignore_index_minus_one(tmp_path, fmt):
    columns = _data(N)
    y = columns["y"].copy()
    y[[3, 6, 39]] = -1.0
    path = _write(tmp_path / f"data.{fmt}", {**columns, "y": y}, row_group_size=GROUP)
    args = [path, "--target", "y", "--pred", "z", "--logits", "--format", "json", "--batch-rows", str(BATCH)]
    _bad(_run(*args), file=path, column="y", row=4)
    document = _ok(_run(*args, "--ignore-index", "-1", "--reduction", "sum"))
    assert document["rows"] == N and document["elements"] == N - 3
    expected = _loss_sum(columns["z"], y, logits=True, ignore_index=-1.0)
    assert document["loss"] == pytest.approx(expected, rel=1e-12)
    for row, value in ((12, 2.0), (41, NAN), (8, -2.0)):
        bad = _write(tmp_path / f"bad{row}.{fmt}", {**columns, "y": _with({"y": y}, "y", row, value)["y"]})
        _bad(_run(bad, *args[1:], "--ignore-index", "-1"), file=bad, column="y", row=row)


@pytest.mark.parametrize("fmt", ("csv", "parquet", "npz"))
def test_infinite_logits_are_accepted(tmp_path, fmt):
    columns = _data(N)
    z = columns["z"].copy()
    y = columns["y"]
    infinite = [0, 17, 40]
    z[infinite] = np.where(y[infinite] == 1.0, INF, -INF)  # certain and right: loss 0
    path = _write(tmp_path / f"data.{fmt}", {"y": y, "z": z}, row_group_size=GROUP)
    args = [path, "--target", "y", "--pred", "z", "--logits", "--format", "json", "--reduction", "sum"]
    document = _ok(_run(*args, "--batch-rows", str(BATCH)))
    finite = np.isfinite(z)
    assert document["rows"] == N and document["elements"] == N
    assert document["loss"] == pytest.approx(_loss_sum(z[finite], y[finite], logits=True), rel=1e-12)
    # certain and wrong: an infinite loss, still not bad data
    wrong = _write(tmp_path / f"wrong.{fmt}", {"y": y, "z": np.where(finite, z, -z)}, row_group_size=GROUP)
    assert _ok(_run(wrong, *args[1:]))["loss"] == "inf"
    # the same values as probabilities are out of [0, 1]
    probabilities = _write(tmp_path / f"probabilities.{fmt}", {"y": y, "p": z}, row_group_size=GROUP)
    _bad(_run(probabilities, "--target", "y", "--pred", "p"), file=probabilities, column="p")


# -- the earliest row wins -----------------------------------------------------------------------------------


def _two_errors(columns, first, second):
    """``columns`` with two bad cells: ``first`` and ``second`` are ``(column, row, value)``."""
    for column, row, value in (first, second):
        columns = _with(columns, column, row, value)
    return columns


EARLIEST_CASES = {
    # name: (suffix, earlier (column, row, value), later (column, row, value)); 12 rows, --batch-rows 8,
    # Parquet row groups of 6: both errors in one batch of one partition unless the name says otherwise
    "csv: target out of range before a non-number": ("csv", ("y", 4, 2.0), ("p", 7, "abc")),
    "csv: non-number before a missing value, one column": ("csv", ("p", 2, "abc"), ("p", 5, None)),
    "csv: missing target before a missing prediction": ("csv", ("y", 3, None), ("p", 6, None)),
    "csv: probability out of range before a missing target": ("csv", ("p", 1, 1.5), ("y", 8, None)),
    "csv: weight before a probability": ("csv", ("w", 3, INF), ("p", 7, 1.5)),
    "parquet: probability out of range before a null": ("parquet", ("p", 2, 1.5), ("y", 5, None)),
    "parquet: null target before a null prediction": ("parquet", ("y", 2, None), ("p", 5, None)),
    "parquet: nan target before a nan probability": ("parquet", ("y", 4, NAN), ("p", 6, NAN)),
    "npy: weight nan before a target out of range": ("npy", ("w", 1, NAN), ("y", 2, 3.0)),
    "csv, across batches": ("csv", ("p", 5, "x"), ("y", 9, None)),
    "parquet, across row groups": ("parquet", ("y", 6, None), ("p", 7, None)),
}


@pytest.mark.parametrize("case", list(EARLIEST_CASES))
def test_earliest_bad_row_is_reported(tmp_path, case):
    suffix, earlier, later = EARLIEST_CASES[case]
    args = ["--target", "y", "--pred", "p", "--weight", "w", "--format", "json", "--batch-rows", "8"]
    bad = _write(tmp_path / f"bad.{suffix}", _two_errors(_data(12), earlier, later), row_group_size=6)
    _bad(_run(bad, *args), file=bad, column=earlier[0], row=earlier[1])
    # each error alone is reported too, and fixing both makes the data good
    later_only = _write(tmp_path / f"later.{suffix}", _with(_data(12), *later), row_group_size=6)
    _bad(_run(later_only, *args), file=later_only, column=later[0], row=later[1])
    assert _ok(_run(_write(tmp_path / f"good.{suffix}", _data(12)), *args))["rows"] == 12


def test_earliest_bad_row_across_side_by_side_files(tmp_path):
    """A non-number in the predictions file (listed first) at row 8, one in the targets file at row 3."""
    columns = _data(12)
    args = ["--target", "y", "--pred", "p", "--format", "json"]
    preds = _write(tmp_path / "preds.csv", _with({"p": columns["p"]}, "p", 8, "abc"))
    targets = _write(tmp_path / "targets.csv", _with({"y": columns["y"]}, "y", 3, "one"))
    _bad(_run(preds, targets, *args), file=targets, column="y", row=3)
    # a value check in the targets file still wins over a later one in the predictions file
    preds = _write(tmp_path / "preds2.csv", _with({"p": columns["p"]}, "p", 8, 1.5))
    targets = _write(tmp_path / "targets2.csv", _with({"y": columns["y"]}, "y", 3, 2.0))
    _bad(_run(preds, targets, *args), file=targets, column="y", row=3)


def test_earliest_file_wins_in_stacked_files(tmp_path):
    args = ["--target", "y", "--pred", "p", "--format", "json", "--batch-rows", "5"]
    first = _write(tmp_path / "part1.parquet", _with(_data(20), "p", 17, 1.5), row_group_size=6)
    second = _write(tmp_path / "part2.parquet", _with(_data(20), "y", 1, 2.0), row_group_size=6)
    line = _bad(_run(first, second, *args), file=first, column="p", row=17)
    assert "part2" not in line


# -- the second of several stacked files ---------------------------------------------------------------------


@pytest.mark.parametrize("row", (1, 9, 13))
@pytest.mark.parametrize("fmt", ("csv", "parquet", "npy", "npz"))
def test_bad_value_in_a_later_stacked_file(tmp_path, fmt, row):
    sizes = (17, 13, 19)
    args = ["--target", "y", "--pred", "p", "--format", "json", "--batch-rows", "4"]
    paths = [
        _write(tmp_path / f"part{k + 1}.{fmt}", _data(n, offset=100 * k), row_group_size=5)
        for k, n in enumerate(sizes)
    ]
    assert _ok(_run(*paths, *args))["rows"] == sum(sizes)
    paths[1] = _write(
        tmp_path / f"part2.{fmt}", _with(_data(13, offset=100), "p", row, NAN), row_group_size=5
    )
    line = _bad(_run(*paths, *args), file=paths[1], column="p", row=row)
    assert "part1" not in line and "part3" not in line


# -- side-by-side files of different lengths -----------------------------------------------------------------

LENGTH_CASES = {
    # name: (predictions file suffix, its rows, targets file suffix, its rows)
    "csv shorter than csv": ("csv", 20, "csv", 23),
    "csv longer than csv": ("csv", 23, "csv", 20),
    "csv one row shorter": ("csv", 22, "csv", 23),
    "csv one row longer": ("csv", 24, "csv", 23),
    "parquet shorter than csv": ("parquet", 20, "csv", 23),
    "parquet longer than csv": ("parquet", 23, "csv", 20),
    "csv shorter than parquet, inside a row group": ("csv", 14, "parquet", 30),
    "csv shorter than parquet, at a row-group edge": ("csv", 12, "parquet", 30),
    "csv longer than parquet": ("csv", 31, "parquet", 30),
    "parquet shorter than parquet": ("parquet", 20, "parquet", 23),
    "parquet longer than parquet": ("parquet", 23, "parquet", 20),
    "npy shorter than csv": ("npy", 20, "csv", 23),
    "npz longer than csv": ("npz", 23, "csv", 20),
}


@pytest.mark.parametrize("batch", ("4", "65536"))
@pytest.mark.parametrize("case", list(LENGTH_CASES))
def test_side_by_side_row_counts_differ(tmp_path, case, batch):
    pred_fmt, pred_rows, target_fmt, target_rows = LENGTH_CASES[case]
    args = ["--target", "y", "--pred", "p", "--format", "json", "--batch-rows", batch]
    columns = _data(max(pred_rows, target_rows))
    # an extra column the command does not read, first in each file
    preds = _write(
        tmp_path / f"preds.{pred_fmt}",
        {"id": np.arange(pred_rows), "p": columns["p"][:pred_rows]},
        row_group_size=6,
    )
    targets = _write(
        tmp_path / f"targets.{target_fmt}",
        {"key": np.arange(target_rows), "y": columns["y"][:target_rows]},
        row_group_size=6,
    )
    short, column, rows = (preds, "p", pred_rows) if pred_rows < target_rows else (targets, "y", target_rows)
    _bad(_run(preds, targets, *args), file=short, column=column, row=rows + 1)
    # the same files the other way round
    _bad(_run(targets, preds, *args), file=short, column=column, row=rows + 1)
    # cut to the same length, they are good
    n = min(pred_rows, target_rows)
    fixed = _write(
        tmp_path / f"fixed.{pred_fmt}", {"id": np.arange(n), "p": columns["p"][:n]}, row_group_size=6
    )
    fixed_targets = _write(
        tmp_path / f"fixed_targets.{target_fmt}",
        {"key": np.arange(n), "y": columns["y"][:n]},
        row_group_size=6,
    )
    assert _ok(_run(fixed, fixed_targets, *args))["rows"] == n


# -- missing columns -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ("p", "y", "w"))
@pytest.mark.parametrize("fmt", ("csv", "parquet", "npy", "npz"))
def test_missing_column(tmp_path, fmt, missing):
    args = ["--target", "y", "--pred", "p", "--weight", "w", "--format", "json"]
    good = _write(tmp_path / f"good.{fmt}", _data(9))
    assert _ok(_run(good, *args))["rows"] == 9
    columns = {name: values for name, values in _data(9).items() if name != missing}
    bad = _write(tmp_path / f"bad.{fmt}", columns)
    _bad(_run(bad, *args), file=bad, column=missing)


def test_missing_column_in_every_one_of_several_files(tmp_path):
    paths = [_write(tmp_path / f"part{k}.csv", {"y": [1.0, 0.0], "p": [0.5, 0.5]}) for k in (1, 2)]
    line = _bad(_run(*paths, "--target", "y", "--pred", "q"), file=paths[0], column="q")
    assert paths[1] in line


@pytest.mark.parametrize("lacking", ("w", "p", "y"))
@pytest.mark.parametrize("fmt", ("csv", "parquet"))
def test_column_in_some_files_but_not_others(tmp_path, fmt, lacking):
    """Stacked files where the second lacks one column: the error names that file and that column."""
    args = ["--target", "y", "--pred", "p", "--weight", "w", "--format", "json"]
    paths = [_write(tmp_path / f"part{k}.{fmt}", _data(7, offset=7 * k)) for k in (1, 2, 3)]
    assert _ok(_run(*paths, *args))["rows"] == 21
    columns = {name: values for name, values in _data(7, offset=14).items() if name != lacking}
    paths[1] = _write(tmp_path / f"part2.{fmt}", columns)
    line = _bad(_run(*paths, *args), file=paths[1], column=lacking)
    # the file that lacks the column is the one the line is about: it comes before any other file named
    others = [line.index(path) for path in (paths[0], paths[2]) if path in line]
    assert all(line.index(paths[1]) < position for position in others), line


# -- empty, unreadable and absent files ----------------------------------------------------------------------


def _empty(tmp_path, kind: str) -> str:
    if kind == "zero-byte csv":
        path = tmp_path / "empty.csv"
        path.write_bytes(b"")
    elif kind == "header-only csv":
        path = tmp_path / "header.csv"
        path.write_text("y,p\n")
    elif kind == "header-only csv.gz":
        path = tmp_path / "header.csv.gz"
        path.write_bytes(gzip.compress(b"y,p\n"))
    elif kind == "zero-row parquet":
        path = tmp_path / "empty.parquet"
        pq.write_table(pa.table({"y": pa.array([], pa.float64()), "p": pa.array([], pa.float64())}), path)
    elif kind == "zero-row npy":
        path = tmp_path / "empty.npy"
        np.save(path, np.empty(0, dtype=[("y", np.float64), ("p", np.float64)]))
    elif kind == "zero-row npz":
        path = tmp_path / "empty.npz"
        np.savez(path, y=np.empty(0), p=np.empty(0))
    else:
        raise ValueError(kind)
    return os.fspath(path)


EMPTY = (
    "zero-byte csv",
    "header-only csv",
    "header-only csv.gz",
    "zero-row parquet",
    "zero-row npy",
    "zero-row npz",
)


@pytest.mark.parametrize("kind", EMPTY)
def test_empty_file(tmp_path, kind):
    path = _empty(tmp_path, kind)
    _bad(_run(path, "--target", "y", "--pred", "p", "--format", "json"), file=path)


@pytest.mark.parametrize("kind", EMPTY)
def test_empty_file_among_stacked_files(tmp_path, kind):
    good = _write(tmp_path / "good.csv", {"y": [1.0, 0.0, 1.0], "p": [0.5, 0.25, 0.75]})
    args = ["--target", "y", "--pred", "p", "--format", "json"]
    assert _ok(_run(good, *args))["rows"] == 3
    path = _empty(tmp_path, kind)
    _bad(_run(good, path, *args), file=path)


def test_empty_file_side_by_side(tmp_path):
    targets = _write(tmp_path / "targets.csv", {"y": [1.0, 0.0, 1.0]})
    path = tmp_path / "preds.csv"
    path.write_text("p\n")
    _bad(_run(targets, path, "--target", "y", "--pred", "p"), file=os.fspath(path), column="p", row=1)


def _corrupt(tmp_path, kind: str) -> str:
    good = _write(tmp_path / "good.parquet", _data(50), row_group_size=10)
    if kind == "garbage parquet":
        path = tmp_path / "bad.parquet"
        path.write_bytes(b"not a parquet file\n" * 20)
    elif kind == "truncated parquet":
        path = tmp_path / "bad.parquet"
        data = open(good, "rb").read()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage npy":
        path = tmp_path / "bad.npy"
        path.write_bytes(b"\x93NUMPY garbage" * 10)
    elif kind == "truncated npy":
        path = tmp_path / "bad.npy"
        _write(path, _data(50))
        data = path.read_bytes()
        path.write_bytes(data[:300])
    elif kind == "garbage npz":
        path = tmp_path / "bad.npz"
        path.write_bytes(b"PK not a zip" * 10)
    elif kind == "corrupt csv.gz":
        path = tmp_path / "bad.csv.gz"
        data = gzip.compress(b"y,p\n" + b"1,0.5\n" * 1000)
        path.write_bytes(data[:40] + bytes(len(data) - 40))
    elif kind == "ragged csv":
        path = tmp_path / "bad.csv"
        path.write_text("y,p\n1,0.5\n0\n1,0.25\n")
    elif kind == "csv, not UTF-8":
        path = tmp_path / "bad.csv"
        path.write_bytes(b"y,p\n1,0.5\n0,\xff\xfe\n")
    else:
        raise ValueError(kind)
    return os.fspath(path)


CORRUPT = (
    "garbage parquet",
    "truncated parquet",
    "garbage npy",
    "truncated npy",
    "garbage npz",
    "corrupt csv.gz",
    "ragged csv",
    "csv, not UTF-8",
)


@pytest.mark.parametrize("kind", CORRUPT)
def test_unreadable_file(tmp_path, kind):
    path = _corrupt(tmp_path, kind)
    args = ["--target", "y", "--pred", "p", "--format", "json"]
    _bad(_run(path, *args), file=path)
    good = _write(tmp_path / "good.csv", _data(5))
    _bad(_run(good, path, *args), file=path)  # the second of two files


def test_file_that_does_not_exist(tmp_path):
    good = _write(tmp_path / "good.parquet", _data(5))
    args = ["--target", "y", "--pred", "p", "--format", "json"]
    assert _ok(_run(good, *args))["rows"] == 5
    for name in ("absent.csv", "absent.parquet", "absent.npy", "absent.csv.gz"):
        absent = os.fspath(tmp_path / name)
        _bad(_run(absent, *args), file=absent)
        _bad(_run(good, absent, good, *args), file=absent)


def test_unknown_file_type(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("y,p\n1,0.5\n")
    _bad(_run(path, "--target", "y", "--pred", "p"), file=os.fspath(path))


# -- no row is silently dropped ------------------------------------------------------------------------------


def _expected(columns_list, *, logits=False, weighted=False) -> tuple[int, float]:
    y = np.concatenate([c["y"] for c in columns_list])
    x = np.concatenate([c["z" if logits else "p"] for c in columns_list])
    weight = np.concatenate([c["w"] for c in columns_list]) if weighted else None
    return len(y), _loss_sum(x, y, logits=logits, weight=weight)


@pytest.mark.parametrize("batch", ("1", "7", "64", "65536"))
def test_no_row_dropped_stacked(tmp_path, batch):
    parts = [_data(n, offset=1000 * k) for k, n in enumerate((1003, 97, 1, 211, 64, 333))]
    paths = [
        _write(tmp_path / "a.csv", parts[0]),
        _write(tmp_path / "b.parquet", parts[1], row_group_size=10),
        _write(tmp_path / "c.npy", parts[2]),
        _write(tmp_path / "d.parquet", parts[3], row_group_size=37),
        _write(tmp_path / "e.npz", parts[4]),
        _write(tmp_path / "f.csv.gz", parts[5]),
    ]
    if batch == "1":
        paths, parts = paths[1:], parts[1:]  # keep the one-row batches quick
    args = ["--target", "y", "--pred", "z", "--logits", "--weight", "w", "--reduction", "sum"]
    document = _ok(_run(*paths, *args, "--format", "json", "--batch-rows", batch))
    rows, loss = _expected(parts, logits=True, weighted=True)
    assert document["rows"] == rows and document["elements"] == rows
    assert document["loss"] == pytest.approx(loss, rel=1e-12)


SIDE_BY_SIDE = {
    # name: (predictions file, targets file, row-group size of each Parquet file)
    "parquet groups next to csv": ("preds.parquet", "targets.csv", (97, None)),
    "csv next to parquet groups": ("preds.csv", "targets.parquet", (None, 97)),
    "parquet next to parquet, other groups": ("preds.parquet", "targets.parquet", (97, 41)),
    "parquet next to parquet, fewer groups": ("preds.parquet", "targets.parquet", (400, 33)),
    "csv next to csv": ("preds.csv", "targets.csv.gz", (None, None)),
    "npy next to npz": ("preds.npy", "targets.npz", (None, None)),
    "npz next to parquet": ("preds.npz", "targets.parquet", (None, 50)),
}


@pytest.mark.parametrize("batch", ("13", "64", "65536"))
@pytest.mark.parametrize("case", list(SIDE_BY_SIDE))
def test_no_row_dropped_side_by_side(tmp_path, case, batch):
    preds_name, targets_name, (preds_group, targets_group) = SIDE_BY_SIDE[case]
    n = 1001
    columns = _data(n)
    preds = _write(tmp_path / preds_name, {"p": columns["p"], "w": columns["w"]}, row_group_size=preds_group)
    targets = _write(tmp_path / targets_name, {"y": columns["y"]}, row_group_size=targets_group)
    args = ["--target", "y", "--pred", "p", "--weight", "w", "--reduction", "sum", "--format", "json"]
    document = _ok(_run(preds, targets, *args, "--batch-rows", batch))
    rows, loss = _expected([columns], weighted=True)
    assert document["rows"] == rows == n
    assert document["loss"] == pytest.approx(loss, rel=1e-12)


def test_no_row_dropped_large_csv_several_labels(tmp_path):
    """A CSV of several read blocks, two labels, mean reduction: every row and element is counted."""
    n = 60_013
    columns = _data(n)
    other = _data(n, offset=5)
    path = _write(
        tmp_path / "big.csv", {"y": columns["y"], "p": columns["p"], "y2": other["y"], "p2": other["p"]}
    )
    for batch in ("4096", "65536"):
        document = _ok(
            _run(path, "--target", "y", "y2", "--pred", "p", "p2", "--format", "json", "--batch-rows", batch)
        )
        assert document["rows"] == n and document["elements"] == 2 * n
        total = _loss_sum(columns["p"], columns["y"]) + _loss_sum(other["p"], other["y"])
        assert document["loss"] == pytest.approx(total / (2 * n), rel=1e-12)
        assert document["per_label"]["p2"]["elements"] == n


# -- duplicate column names ----------------------------------------------------------------------------------


def _csv_text(header: str, columns: list[np.ndarray]) -> bytes:
    rows = zip(*columns, strict=True)
    return ("\n".join([header, *(",".join(repr(float(v)) for v in row) for row in rows)]) + "\n").encode()


def _compressed(data: bytes, suffix: str) -> bytes:
    import bz2

    return {"": lambda d: d, ".gz": gzip.compress, ".bz2": bz2.compress}[suffix](data)


def _npz_members(path, members: list[tuple[str, np.ndarray]]) -> str:
    """An NPZ whose zip holds ``members`` in this order; a name may come twice (zipfile allows it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name" warning
        with zipfile.ZipFile(path, "w") as archive:
            for name, values in members:
                buffer = io.BytesIO()
                np.save(buffer, np.asarray(values), allow_pickle=False)
                archive.writestr(name + ".npy", buffer.getvalue())
    return os.fspath(path)


def _parquet_named(path, names: list[str], columns: list[np.ndarray]) -> str:
    pq.write_table(pa.Table.from_arrays([pa.array(c) for c in columns], names=names), path)
    return os.fspath(path)


# header, the duplicated column the command reads
DUPLICATE_HEADERS = {
    "prediction twice": ("w,y,p,p", "p"),
    "target twice": ("y,p,y,w", "y"),
    "weight twice": ("w,y,p,w", "w"),
}


@pytest.mark.parametrize("suffix", ("", ".gz", ".bz2"))
@pytest.mark.parametrize("case", list(DUPLICATE_HEADERS))
def test_csv_duplicate_column_name(tmp_path, case, suffix):
    header, column = DUPLICATE_HEADERS[case]
    data = _data(9)
    names = header.split(",")
    values = [data[name] if k == names.index(name) else data[name][::-1] for k, name in enumerate(names)]
    args = ["--target", "y", "--pred", "p", "--weight", "w", "--format", "json"]
    path = tmp_path / f"dup.csv{suffix}"
    path.write_bytes(_compressed(_csv_text(header, values), suffix))
    line = _bad(_run(path, *args), file=os.fspath(path), column=column)
    assert "twice" in line or "more than once" in line, line
    # the file with the second copy renamed is good, and scored on the first copy
    renamed = header.split(",")
    renamed[len(renamed) - 1 - renamed[::-1].index(column)] = "other"
    fixed = tmp_path / f"fixed.csv{suffix}"
    fixed.write_bytes(_compressed(_csv_text(",".join(renamed), values), suffix))
    document = _ok(_run(fixed, *args, "--reduction", "sum"))
    assert document["loss"] == pytest.approx(_loss_sum(data["p"], data["y"], weight=data["w"]), rel=1e-12)


def test_duplicate_column_name_beside_other_files(tmp_path):
    """Side by side: the predictions file names ``p`` twice, the targets come from another file."""
    data = _data(7)
    targets = _write(tmp_path / "targets.csv", {"y": data["y"]})
    preds = tmp_path / "preds.csv"
    preds.write_bytes(_csv_text("p,p", [data["p"], data["p"][::-1]]))
    _bad(_run(preds, targets, "--target", "y", "--pred", "p"), file=os.fspath(preds), column="p")
    # stacked: the second of two files
    good = _write(tmp_path / "good.csv", {"y": data["y"], "p": data["p"]})
    second = tmp_path / "second.csv"
    second.write_bytes(_csv_text("y,p,y", [data["y"], data["p"], data["y"][::-1]]))
    _bad(_run(good, second, "--target", "y", "--pred", "p"), file=os.fspath(second), column="y")


@pytest.mark.parametrize("fmt", ("csv", "parquet", "npz"))
def test_duplicate_column_the_command_does_not_read(tmp_path, fmt):
    """A duplicated column that is not read (an ``id`` column twice, say) does not matter."""
    data = _data(11)
    names = ["id", "y", "id", "p"]
    values = [np.arange(11.0), data["y"], np.arange(11.0) + 1, data["p"]]
    if fmt == "csv":
        path = tmp_path / "data.csv"
        path.write_bytes(_csv_text(",".join(names), values))
    elif fmt == "parquet":
        path = _parquet_named(tmp_path / "data.parquet", names, values)
    else:
        path = _npz_members(tmp_path / "data.npz", list(zip(names, values, strict=True)))
    document = _ok(_run(path, "--target", "y", "--pred", "p", "--format", "json", "--reduction", "sum"))
    assert document["rows"] == 11
    assert document["loss"] == pytest.approx(_loss_sum(data["p"], data["y"]), rel=1e-12)


@pytest.mark.parametrize("column", ("p", "y"))
def test_npz_duplicate_member(tmp_path, column):
    data = _data(8)
    members = [("y", data["y"]), ("p", data["p"]), (column, data[column][::-1])]
    path = _npz_members(tmp_path / "dup.npz", members)
    _bad(_run(path, "--target", "y", "--pred", "p", "--format", "json"), file=path, column=column)
    good = _npz_members(tmp_path / "good.npz", members[:2])
    document = _ok(_run(good, "--target", "y", "--pred", "p", "--format", "json", "--reduction", "sum"))
    assert document["loss"] == pytest.approx(_loss_sum(data["p"], data["y"]), rel=1e-12)


def test_parquet_duplicate_column(tmp_path):
    data = _data(6)
    path = _parquet_named(tmp_path / "dup.parquet", ["y", "p", "p"], [data["y"], data["p"], data["p"][::-1]])
    _bad(_run(path, "--target", "y", "--pred", "p"), file=path, column="p")


# -- integers float64 cannot hold exactly --------------------------------------------------------------------

INEXACT = [("int64", 2**53 + 1), ("int64", -(2**53) - 1), ("int64", 2**63 - 1), ("uint64", 2**64 - 1)]
EXACT = [("int64", 2**53), ("int64", 2**60 + 2**8), ("int64", -(2**63)), ("uint64", 2**63)]


def _integer_file(path, dtype: str, z: list[int], y: np.ndarray) -> str:
    """``y`` (float64) and integer logits ``z`` of ``dtype``, in the format of ``path``'s suffix."""
    path = os.fspath(path)
    logits = np.array(z, dtype=dtype)
    if path.endswith(".parquet"):
        pq.write_table(pa.table({"y": pa.array(y), "z": pa.array(logits)}), path, row_group_size=5)
    elif path.endswith(".npy"):
        array = np.empty(len(y), dtype=[("y", np.float64), ("z", dtype)])
        array["y"], array["z"] = y, logits
        with open(path, "wb") as stream:
            np.save(stream, array, allow_pickle=False)
    else:
        with open(path, "wb") as stream:
            np.savez(stream, y=y, z=logits)
    return path


@pytest.mark.parametrize(("dtype", "value"), INEXACT)
@pytest.mark.parametrize("fmt", ("parquet", "npy", "npz"))
def test_integer_without_an_exact_float64_value(tmp_path, fmt, dtype, value):
    """An integer column (here logits) holding a value float64 would round is refused at that row."""
    n, row = 12, 8
    y = _data(n)["y"]
    z = [k % 5 for k in range(n)]
    z[row - 1] = value
    args = ["--target", "y", "--pred", "z", "--logits", "--format", "json", "--batch-rows", "3"]
    path = _integer_file(tmp_path / f"bad.{fmt}", dtype, z, y)
    line = _bad(_run(path, *args), file=path, column="z", row=row)
    assert str(value) in line, line


@pytest.mark.parametrize(("dtype", "value"), EXACT)
@pytest.mark.parametrize("fmt", ("parquet", "npy", "npz"))
def test_large_integer_with_an_exact_float64_value(tmp_path, fmt, dtype, value):
    n, row = 12, 8
    y = _data(n)["y"]
    z = [k % 5 for k in range(n)]
    z[row - 1] = value
    args = ["--target", "y", "--pred", "z", "--logits", "--format", "json", "--reduction", "sum"]
    path = _integer_file(tmp_path / f"good.{fmt}", dtype, z, y)
    document = _ok(_run(path, *args, "--batch-rows", "3"))
    expected = _loss_sum(np.array([float(v) for v in z]), y, logits=True)
    assert document["loss"] == pytest.approx(expected, rel=1e-12)


# -- NPY arrays whose fields are not columns -----------------------------------------------------------------


def test_npy_sub_array_field(tmp_path):
    """A field holding an array per row (``('p', '<f8', (2,))``) is not a column of numbers."""
    data = _data(5)
    array = np.zeros(5, dtype=[("y", "<f8"), ("p", "<f8", (2,)), ("q", "<f8")])
    array["y"], array["p"], array["q"] = data["y"], data["p"][:, None], data["p"]
    path = os.fspath(tmp_path / "sub.npy")
    np.save(path, array)
    _bad(_run(path, "--target", "y", "--pred", "p"), file=path, column="p", row=1)
    # the other fields of the same file are read
    document = _ok(_run(path, "--target", "y", "--pred", "q", "--format", "json", "--reduction", "sum"))
    assert document["loss"] == pytest.approx(_loss_sum(data["p"], data["y"]), rel=1e-12)


def test_npy_structured_array_of_two_dimensions(tmp_path):
    array = np.zeros((4, 2), dtype=[("y", "<f8"), ("p", "<f8")])
    array["p"] = 0.5
    path = os.fspath(tmp_path / "grid.npy")
    np.save(path, array)
    line = _bad(_run(path, "--target", "y", "--pred", "p"), file=path)
    assert "(4, 2)" in line, line


# -- files that are not regular files ------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_is_not_a_file(tmp_path):
    path = tmp_path / "pipe.csv"
    os.mkfifo(path)
    line = _bad(_run(path, "--target", "y", "--pred", "p"), file=os.fspath(path))
    assert "not a regular file" in line, line


def test_broken_symbolic_link(tmp_path):
    path = tmp_path / "gone.csv"
    try:
        os.symlink(tmp_path / "absent.csv", path)
    except (OSError, NotImplementedError):
        pytest.skip("cannot make symbolic links here")
    line = _bad(_run(path, "--target", "y", "--pred", "p"), file=os.fspath(path))
    assert "broken symbolic link" in line, line


def test_a_malformed_setting_is_one_line(tmp_path):
    """The kernels' module refuses a malformed BCEKIT_* variable with a ValueError naming it; the command
    prints that as its one error line."""
    import subprocess
    import sys

    good = _write(tmp_path / "good.csv", _data(5))
    environment = {**os.environ, "BCEKIT_NUM_THREADS": "many"}
    command = [sys.executable, "-m", "bcekit", "score", good, "--target", "y", "--pred", "p"]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines() == [
        "bcekit score: error: BCEKIT_NUM_THREADS='many': must be a positive whole number of threads for the "
        "kernels on NumPy arrays"
    ]
