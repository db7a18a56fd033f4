"""Shared fixtures of the ``bcekit score`` tests: data files in every format, and the command run in-process.

Tests use the fixtures (a conftest is not importable under ``--import-mode=importlib``):

* ``write(directory, name, columns, fmt=None, **kw) -> str`` writes ``columns`` (name -> 1-D array) to
  ``directory / name`` and returns the path; the format comes from the name (``.csv``, ``.csv.gz``,
  ``.parquet``, ``.npy``, ``.npz``) unless ``fmt`` names one of :data:`FORMATS`;
* ``run(*argv) -> (exit status, stdout, stderr)`` runs ``bcekit <argv>`` in-process.
"""

from __future__ import annotations

import gzip
import io
import os

import numpy as np
import pytest

FORMATS = ("csv", "csv.gz", "parquet", "npy", "npz")


def _csv_field(value: object) -> str:
    if value is None:
        return ""  # a missing value
    if isinstance(value, (float, np.floating)):
        return repr(float(value))  # round-trips exactly; nan, inf, -inf as pyarrow reads them
    return str(value)


def write_file(
    directory: str | os.PathLike[str],
    name: str,
    columns: dict[str, np.ndarray],
    fmt: str | None = None,
    *,
    row_group_size: int | None = None,
    npy: str = "structured",
    compressed: bool = False,
) -> str:
    """Write ``columns`` to ``directory / name`` and return the path.

    ``fmt``: one of :data:`FORMATS` (default: from ``name``). Parquet takes ``row_group_size`` (rows per row
    group). NPY takes ``npy``: ``"structured"`` (one field per column), ``"2d"`` (the columns side by side,
    which must then be named ``"0"``, ``"1"``, ...) or ``"1d"`` (one column, named ``"0"``). NPZ takes
    ``compressed`` (``np.savez_compressed``). CSV values are written exactly (floats by ``repr``); ``None``
    in an object array is written as an empty field, strings as they are.
    """
    path = os.path.join(os.fspath(directory), name)
    if fmt is None:
        lowered = name.lower()
        fmt = next((f for f in sorted(FORMATS, key=len, reverse=True) if lowered.endswith("." + f)), None)
        if fmt is None:
            raise ValueError(f"cannot tell the format of {name!r}: pass fmt")
    names = list(columns)
    arrays = [np.asarray(columns[c]) for c in names]
    if fmt in ("csv", "csv.gz"):
        lines = [",".join(names)]
        lines += [",".join(_csv_field(a[i]) for a in arrays) for i in range(len(arrays[0]) if arrays else 0)]
        text = "\n".join(lines) + "\n"
        if fmt == "csv.gz":
            with gzip.open(path, "wt", newline="") as stream:
                stream.write(text)
        else:
            with open(path, "w", newline="") as stream:
                stream.write(text)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({c: pa.array(a) for c, a in zip(names, arrays, strict=True)})
        pq.write_table(table, path, row_group_size=row_group_size)
    elif fmt == "npy":
        if npy == "structured":
            array = np.empty(len(arrays[0]), dtype=[(c, a.dtype) for c, a in zip(names, arrays, strict=True)])
            for c, a in zip(names, arrays, strict=True):
                array[c] = a
        elif npy == "2d":
            assert names == [str(i) for i in range(len(names))], "a 2-D array's columns are '0', '1', ..."
            array = np.column_stack(arrays)
        elif npy == "1d":
            assert names == ["0"], "a 1-D array's one column is '0'"
            array = arrays[0]
        else:
            raise ValueError(f"npy must be 'structured', '2d' or '1d', got {npy!r}")
        with open(path, "wb") as stream:  # np.save would append .npy to other names
            np.save(stream, array, allow_pickle=False)
    elif fmt == "npz":
        with open(path, "wb") as stream:
            (np.savez_compressed if compressed else np.savez)(stream, **dict(zip(names, arrays, strict=True)))
    else:
        raise ValueError(f"unknown format {fmt!r}: expected one of {FORMATS}")
    return path


def run_score(*argv: object) -> tuple[int, str, str]:
    """``bcekit <argv>`` in-process: ``(exit status, stdout, stderr)``. Paths may be ``Path`` objects."""
    from bcekit.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    code = main([os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in argv], stdout, stderr)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture
def write():
    """:func:`write_file`: ``write(directory, name, columns, fmt=None, **kw) -> path``."""
    return write_file


@pytest.fixture
def run():
    """:func:`run_score`: ``run(*argv) -> (exit status, stdout, stderr)``."""
    return run_score
