"""``bcekit score --engine dask``: the same numbers and the same errors as the local engine.

One two-worker ``distributed.LocalCluster`` (worker processes, so partitions and partials really travel) is
shared by the module; every case runs the local engine and the Dask engine on the same files and compares
their JSON output, to 1e-12 relative. Files are written by small private helpers (independent of
``conftest.py``).
"""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest

pytest.importorskip("distributed")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from bcekit.cli import main  # noqa: E402

# -- helpers -------------------------------------------------------------------------------------------------


def _run(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["score", *(os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in argv)], out, err)
    return code, out.getvalue(), err.getvalue()


def _write(path, columns: dict[str, np.ndarray], *, row_group_size: int | None = None) -> str:
    path = os.fspath(path)
    names = list(columns)
    arrays = [np.asarray(columns[name], dtype=np.float64) for name in names]
    if path.endswith(".csv"):
        lines = [",".join(names)]
        lines += [",".join(repr(float(a[i])) for a in arrays) for i in range(len(arrays[0]))]
        with open(path, "w") as stream:
            stream.write("\n".join(lines) + "\n")
    elif path.endswith(".parquet"):
        table = pa.table(dict(zip(names, arrays, strict=True)))
        pq.write_table(table, path, row_group_size=row_group_size)
    elif path.endswith(".npy"):
        array = np.empty(len(arrays[0]), dtype=[(name, np.float64) for name in names])
        for name, values in zip(names, arrays, strict=True):
            array[name] = values
        with open(path, "wb") as stream:
            np.save(stream, array, allow_pickle=False)
    elif path.endswith(".npz"):
        with open(path, "wb") as stream:
            np.savez(stream, **dict(zip(names, arrays, strict=True)))
    else:
        raise ValueError(path)
    return path


def _data(n: int, seed: int) -> dict[str, np.ndarray]:
    """Two labels: targets ``y1``, ``y2`` (with a few -1 entries, for --ignore-index -1, in ``y2``),
    probabilities ``p1``, ``p2``, logits ``z1``, ``z2``, weights ``w``."""
    rng = np.random.default_rng(seed)
    y2 = rng.integers(0, 2, n).astype(np.float64)
    y2[rng.random(n) < 0.1] = -1.0
    return {
        "y1": rng.integers(0, 2, n).astype(np.float64),
        "y2": y2,
        "p1": rng.uniform(0.001, 0.999, n),
        "p2": rng.uniform(0.001, 0.999, n),
        "z1": rng.normal(0.0, 3.0, n),
        "z2": rng.normal(0.0, 3.0, n),
        "w": rng.uniform(0.5, 2.0, n),
    }


def _assert_same(local: dict, dask: dict) -> None:
    """The same document, to the last bit: both engines sum the same float64 losses exactly."""
    assert dask == local


def _compare(scheduler: str | None, *argv: object) -> dict:
    """Run both engines with ``argv`` (plus ``--format json``); assert success and the same output."""
    code, out, err = _run(*argv, "--format", "json")
    assert (code, err) == (0, ""), err
    local = json.loads(out)
    dask_args = ["--engine", "dask"] + ([] if scheduler is None else ["--scheduler", scheduler])
    code, out, err = _run(*argv, "--format", "json", *dask_args)
    assert (code, err) == (0, ""), err
    dask = json.loads(out)
    _assert_same(local, dask)
    assert math.isfinite(local["loss"]) and local["rows"] > 0
    return dask


@pytest.fixture(scope="module")
def scheduler():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        host="127.0.0.1", n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Data sets, each as a list of paths: stacked Parquet (row groups), CSV, NPY + NPZ, and side by side."""
    root = tmp_path_factory.mktemp("dask")
    parquet = [
        _write(root / f"part{k}.parquet", _data(n, seed=k), row_group_size=group)
        for k, (n, group) in enumerate(((1000, 150), (777, 100), (1201, 333)))
    ]
    csv = [_write(root / f"part{k}.csv", _data(n, seed=10 + k)) for k, n in enumerate((503, 1, 997))]
    npy = [
        _write(root / "a.npy", _data(601, seed=20)),
        _write(root / "b.npz", _data(399, seed=21)),
        _write(root / "c.npy", _data(1000, seed=22)),
    ]
    columns = _data(1500, seed=30)
    preds = {name: columns[name] for name in ("p1", "p2", "z1", "z2", "w")}
    targets = {name: columns[name] for name in ("y1", "y2")}
    side = [
        _write(root / "preds.parquet", preds, row_group_size=211),
        _write(root / "targets.csv", targets),
    ]
    return {"parquet": parquet, "csv": csv, "npy": npy, "side by side": side}


OPTIONS = {
    "probabilities": "--target y1 --pred p1".split(),
    "logits, weight, pos_weight, two labels": (
        "--target y1 y2 --pred z1 z2 --logits --weight w --pos-weight 2.5 0.5 --ignore-index -1".split()
    ),
    "probabilities, two labels, ignore -1, sum, smoothing": (
        "--target y1 y2 --pred p1 p2 --ignore-index -1 --reduction sum --label-smoothing 0.1".split()
    ),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dataset", ("parquet", "csv", "npy", "side by side"))
def test_same_result_as_local(scheduler, files, dataset, option):
    document = _compare(scheduler, *files[dataset], *OPTIONS[option], "--batch-rows", "128")
    rows = {"parquet": 2978, "csv": 1501, "npy": 2000, "side by side": 1500}[dataset]
    assert document["rows"] == rows


def test_same_result_as_local_whatever_the_batch_size(scheduler, files):
    for batch in ("7", "65536"):
        options = OPTIONS["logits, weight, pos_weight, two labels"]
        _compare(scheduler, *files["parquet"], *options, "--batch-rows", batch)


def test_plot(scheduler, files, tmp_path):
    png = tmp_path / "plot.png"
    args = [*files["parquet"], *OPTIONS["logits, weight, pos_weight, two labels"], "--format", "json"]
    code, out, err = _run(*args, "--engine", "dask", "--scheduler", scheduler, "--plot", png)
    assert (code, err) == (0, ""), err
    assert json.loads(out)["rows"] == 2978
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # table output says where the plot went
    table_png = tmp_path / "table.png"
    code, out, err = _run(*args[:-2], "--engine", "dask", "--scheduler", scheduler, "--plot", table_png)
    assert code == 0 and "2,978" in out and str(table_png) in err
    assert table_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _same_error(scheduler: str, *argv: object) -> str:
    local = _run(*argv)
    dask = _run(*argv, "--engine", "dask", "--scheduler", scheduler)
    assert local[0] == 2 and local[1] == "" and len(local[2].splitlines()) == 1, local
    assert dask == local
    return local[2]


def test_bad_value_in_a_later_partition(scheduler, tmp_path):
    """A bad value in the third row group of the second file: the same exit status and line as local."""
    good = [_write(tmp_path / f"part{k}.parquet", _data(500, seed=k), row_group_size=100) for k in range(3)]
    args = ["--target", "y1", "--pred", "p1", "--batch-rows", "32"]
    _compare(scheduler, *good, *args)
    columns = _data(500, seed=1)
    columns["p1"][236] = 1.25  # row 237: the third row group (rows 201..300) of part1
    bad = _write(tmp_path / "part1.parquet", columns, row_group_size=100)
    line = _same_error(scheduler, *good[:1], bad, *good[2:], *args)
    assert bad in line and "'p1'" in line and "row 237" in line


def test_earliest_of_several_bad_partitions(scheduler, tmp_path):
    """Bad values in several partitions (later ones finishing first): the first in file order is reported."""
    paths = []
    for k in range(3):
        columns = _data(400, seed=40 + k)
        if k >= 1:
            columns["y1"][[50, 399]] = 2.0  # the first and the last row group of part1 and part2
        paths.append(_write(tmp_path / f"part{k}.parquet", columns, row_group_size=50))
    line = _same_error(scheduler, *paths, "--target", "y1", "--pred", "p1", "--batch-rows", "16")
    assert paths[1] in line and "'y1'" in line and "row 51" in line


def test_side_by_side_length_error_in_a_later_partition(scheduler, tmp_path):
    columns = _data(900, seed=50)
    preds = _write(tmp_path / "preds.parquet", {"p1": columns["p1"]}, row_group_size=200)
    targets = _write(tmp_path / "targets.csv", {"y1": columns["y1"][:650]})
    line = _same_error(scheduler, preds, targets, "--target", "y1", "--pred", "p1", "--batch-rows", "64")
    assert targets in line and "row 651" in line


def test_bad_csv_value_in_a_later_file(scheduler, tmp_path):
    paths = [_write(tmp_path / f"part{k}.csv", _data(300, seed=60 + k)) for k in range(3)]
    text = open(paths[2]).read().splitlines()
    text[120] = "abc," + text[120].split(",", 1)[1]  # data row 120, column y1
    with open(paths[2], "w") as stream:
        stream.write("\n".join(text) + "\n")
    line = _same_error(scheduler, *paths, "--target", "y1", "--pred", "p1", "--batch-rows", "50")
    assert paths[2] in line and "'y1'" in line and "row 120" in line


def test_relative_paths(scheduler, files, tmp_path, monkeypatch):
    """Relative paths work on the workers, and an error names the file as it was given, as local does."""
    monkeypatch.chdir(os.path.dirname(files["parquet"][0]))
    names = [os.path.basename(path) for path in files["parquet"]]
    _compare(scheduler, *names, *OPTIONS["probabilities"])
    columns = _data(300, seed=70)
    columns["p1"][299] = -0.5
    _write(tmp_path / "bad.parquet", columns, row_group_size=100)
    bad = os.path.relpath(tmp_path / "bad.parquet")
    line = _same_error(scheduler, *names, bad, *OPTIONS["probabilities"])
    assert f"{bad}: column 'p1': row 300:" in line


def test_relative_paths_in_a_message_naming_two_files(scheduler, tmp_path, monkeypatch):
    """The side-by-side length error also names the longer file: as given, with either engine."""
    monkeypatch.chdir(tmp_path)
    columns = _data(300, seed=71)
    _write(tmp_path / "preds.parquet", {"p1": columns["p1"][:250]}, row_group_size=100)
    _write(tmp_path / "targets.csv", {"y1": columns["y1"]})
    line = _same_error(scheduler, "preds.parquet", "targets.csv", *OPTIONS["probabilities"])
    assert "row 251" in line and os.fspath(tmp_path) not in line


def test_relative_paths_in_a_missing_column_message(scheduler, files, monkeypatch):
    monkeypatch.chdir(os.path.dirname(files["parquet"][0]))
    names = [os.path.basename(path) for path in files["parquet"][:2]]
    line = _same_error(scheduler, *names, "--target", "y1", "--pred", "q1")
    assert "'q1'" in line and all(name in line for name in names)
    assert os.path.dirname(files["parquet"][0]) not in line


def test_without_a_scheduler_starts_a_local_cluster(files):
    _compare(None, *files["side by side"], *OPTIONS["logits, weight, pos_weight, two labels"])


def test_scheduler_needs_the_dask_engine(scheduler, files):
    code, out, err = _run(*files["csv"], "--target", "y1", "--pred", "p1", "--scheduler", scheduler)
    assert code == 2 and out == "" and "--engine dask" in err
