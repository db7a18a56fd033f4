"""``bcekit score`` on a folder: it reads every data file below it that it would read named directly, in
sorted path order, following symbolic links to files and to folders alike; names starting with ``.`` or
``_`` are skipped; a file whose name says it holds data in a form the command does not read, and a folder
or file reached twice, are errors (exit status 2, one line naming the path), never rows dropped or counted
twice.

Expected losses come from :mod:`bcekit.numpy` on the arrays written, never from the command's output.
"""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bcekit.numpy as bce
from bcekit.cli import main

# -- helpers -------------------------------------------------------------------------------------------------


def _run(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["score", *(os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in argv)], out, err)
    return code, out.getvalue(), err.getvalue()


def _part(n: int, offset: int) -> dict[str, np.ndarray]:
    i = np.arange(offset, offset + n)
    return {"y": (i % 2).astype(np.float64), "p": (i % 89 + 1) / 91.0}


def _write(path, columns: dict[str, np.ndarray]) -> str:
    """A CSV (values written exactly) or Parquet file of ``columns``; parent folders are made."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".parquet"):
        pq.write_table(pa.table(columns), path, row_group_size=4)
    else:
        names = list(columns)
        rows = zip(*(columns[c] for c in names), strict=True)
        with open(path, "w") as stream:
            stream.write("\n".join([",".join(names), *(",".join(repr(float(v)) for v in r) for r in rows)]))
            stream.write("\n")
    return path


def _symlink(target, link) -> None:
    try:
        os.symlink(target, link, target_is_directory=os.path.isdir(target))
    except (OSError, NotImplementedError):
        pytest.skip("cannot make symbolic links here")


def _score(*paths) -> dict:
    code, out, err = _run(*paths, "--target", "y", "--pred", "p", "--format", "json", "--reduction", "sum")
    assert code == 0, err
    assert err == ""
    return json.loads(out)


def _expected(parts: list[dict[str, np.ndarray]]) -> tuple[int, float]:
    y = np.concatenate([part["y"] for part in parts])
    p = np.concatenate([part["p"] for part in parts])
    return len(y), math.fsum(bce.binary_cross_entropy(p, y, reduction="none").tolist())


def _bad(result: tuple[int, str, str], path) -> str:
    """A one-line error (exit status 2, nothing on stdout) that names ``path``; returns the line."""
    code, out, err = result
    assert (code, out) == (2, ""), err
    assert err.startswith("bcekit score: error: ") and err.count("\n") == 1, err
    assert os.fspath(path) in err, err
    return err


# -- symbolic links ------------------------------------------------------------------------------------------


def test_symlinked_folders_and_files_are_read_alike(tmp_path):
    """Links to a folder and to a file, both outside the data set, count as their targets' rows."""
    parts = [_part(n, 100 * k) for k, n in enumerate((9, 5, 7, 3))]
    dataset = tmp_path / "dataset"
    _write(dataset / "a.csv", parts[0])
    _write(tmp_path / "elsewhere" / "b" / "x.parquet", parts[1])
    _write(tmp_path / "elsewhere" / "b" / "y.csv", parts[2])
    _write(tmp_path / "loose" / "c.csv", parts[3])
    _symlink(tmp_path / "elsewhere" / "b", dataset / "b")
    _symlink(tmp_path / "loose" / "c.csv", dataset / "c.csv")
    rows, loss = _expected(parts)
    document = _score(dataset)
    assert document["rows"] == rows
    assert document["loss"] == pytest.approx(loss, rel=1e-12)


def test_symlinked_folder_keeps_the_sorted_path_order(tmp_path):
    """Files are read in the sorted order of their paths through the link: with a bad value in every file,
    the error is about ``dataset/b/x.csv``, between ``dataset/a.csv`` and ``dataset/c.csv``."""
    dataset = tmp_path / "dataset"
    bad = {"y": np.array([0.0, 2.0]), "p": np.array([0.5, 0.5])}
    _write(dataset / "a.csv", _part(3, 0))
    _write(tmp_path / "real" / "x.csv", bad)
    _write(dataset / "c.csv", bad)
    _symlink(tmp_path / "real", dataset / "b")
    line = _bad(_run(dataset, "--target", "y", "--pred", "p"), os.path.join(dataset, "b", "x.csv"))
    assert "column 'y': row 2" in line


def test_symlink_loop_is_an_error(tmp_path):
    dataset = tmp_path / "dataset"
    _write(dataset / "sub" / "a.csv", _part(4, 0))
    _symlink(dataset, dataset / "sub" / "loop")
    line = _bad(_run(dataset, "--target", "y", "--pred", "p"), os.path.join(dataset, "sub", "loop"))
    assert "twice" in line, line


def test_folder_reached_twice_is_an_error(tmp_path):
    """Two ways into one folder would count its rows twice."""
    dataset = tmp_path / "dataset"
    _write(dataset / "a" / "part.csv", _part(4, 0))
    _symlink(dataset / "a", dataset / "b")
    line = _bad(_run(dataset, "--target", "y", "--pred", "p"), dataset / "b")
    assert os.fspath(dataset / "a") in line and "twice" in line, line


def test_file_reached_twice_is_an_error(tmp_path):
    dataset = tmp_path / "dataset"
    _write(dataset / "part.csv", _part(4, 0))
    _symlink(dataset / "part.csv", dataset / "same.csv")
    line = _bad(_run(dataset, "--target", "y", "--pred", "p"), dataset / "same.csv")
    assert os.fspath(dataset / "part.csv") in line and "twice" in line, line


def test_hidden_names_are_skipped_through_links_too(tmp_path):
    dataset = tmp_path / "dataset"
    part = _part(6, 0)
    _write(dataset / "a.csv", part)
    _write(tmp_path / "other" / "bad.csv", {"y": np.array([5.0]), "p": np.array([0.5])})
    _symlink(tmp_path / "other", dataset / "_staging")
    _symlink(tmp_path / "other" / "bad.csv", dataset / ".bad.csv")
    rows, loss = _expected([part])
    document = _score(dataset)
    assert document["rows"] == rows
    assert document["loss"] == pytest.approx(loss, rel=1e-12)


# -- names -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ("part-1.csv.xz", "part-1.tsv", "part-1.parquet.tmp", "part-1.CSV.zip"))
def test_data_file_of_a_form_not_read_is_an_error(tmp_path, name):
    """A file named as data that the command refuses named directly is refused in a folder too."""
    dataset = tmp_path / "dataset"
    _write(dataset / "part-0.csv", _part(4, 0))
    (dataset / "deeper").mkdir()
    (dataset / "deeper" / name).write_bytes(b"y,p\n1,0.5\n")
    direct = _bad(_run(dataset / "deeper" / name, "--target", "y", "--pred", "p"), dataset / "deeper" / name)
    in_folder = _bad(_run(dataset, "--target", "y", "--pred", "p"), dataset / "deeper" / name)
    assert in_folder == direct


def test_other_files_are_skipped(tmp_path):
    dataset = tmp_path / "dataset"
    part = _part(5, 0)
    _write(dataset / "part-0.parquet", part)
    for name in ("_SUCCESS", "_metadata", ".part-0.parquet.crc", "README.txt", "notes.md", "schema.json"):
        (dataset / name).write_text("not data\n")
    rows, loss = _expected([part])
    document = _score(dataset)
    assert document["rows"] == rows
    assert document["loss"] == pytest.approx(loss, rel=1e-12)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_in_a_folder_is_an_error(tmp_path):
    dataset = tmp_path / "dataset"
    _write(dataset / "a.csv", _part(4, 0))
    os.mkfifo(dataset / "b.csv")
    line = _bad(_run(dataset, "--target", "y", "--pred", "p"), dataset / "b.csv")
    assert "not a regular file" in line, line
