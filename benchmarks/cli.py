"""``bcekit score`` against the tools people would use instead: DuckDB and polars over the same file.

Run from the repository root::

    python -m benchmarks.cli [--rows 10000000] [--labels 4] [--repeats 3] [--small-rows 1000000]
                             [--dir DIR] [--out benchmarks/results] [--tools bcekit duckdb polars]

It writes three seeded data sets of ``--rows`` rows and ``--labels`` labels, each as Parquet (row groups of
2^20 rows) and as CSV, into ``--dir`` (default: a temporary folder, removed afterwards):

* ``logits``: a 0/1 target and a float64 logit per label (the case the issue measured);
* ``probabilities``: a 0/1 target and a float64 probability per label (some exactly 0 or 1);
* ``weighted``: logits with a per-row weight column, scored with ``--weight w --pos-weight 2``.

Every (data set, format) is then scored by each tool, each run a fresh process, the tools in turn
(bcekit, DuckDB, polars, bcekit, ...) for ``--repeats`` rounds, so a slow spell of the machine weighs on all
of them alike. The same mean log-loss over all labels, as each tool's user would write it: ``bcekit score
FILE ... --format json``; DuckDB, one SQL query over the file with the softplus form of the loss; polars, a
lazy scan and the same expression. Reported per run: wall time (median over the rounds) and rows/s, peak
resident set size (the largest over the rounds), the loss, and its relative difference to an exact
reference: :func:`math.fsum` over every element's float64 loss (NumPy's ``logaddexp`` and ``log``
formulas, which do not cancel), computed here after the timed runs. bcekit is also run on a
``--small-rows`` copy of the logits files, to show that its peak memory does not grow with the file.

Results go to ``OUT/cli.json`` and Markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATASETS = ("logits", "probabilities", "weighted")
FORMATS = ("parquet", "csv")
POS_WEIGHT = 2.0


def write_data(
    directory: Path, rows: int, labels: int, dataset: str = "logits", seed: int = 0
) -> dict[str, Path]:
    """The data set as ``scores_<dataset>.parquet`` and ``.csv``; returns ``{format: path}``."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    columns = {}
    for label in range(labels):
        logit = rng.normal(scale=3.0, size=rows)
        columns[f"y{label}"] = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float64)
        model = logit + rng.normal(scale=1.0, size=rows)  # a noisy model of the truth
        if dataset == "probabilities":
            # float64 sigmoid: saturates to exactly 0 or 1 for the most confident predictions
            e = np.exp(-np.abs(model))
            columns[f"p{label}"] = np.where(model >= 0, 1 / (1 + e), e / (1 + e))
        else:
            columns[f"z{label}"] = model
    if dataset == "weighted":
        columns["w"] = rng.uniform(0.5, 2.0, rows)
    table = pa.table(columns)
    paths = {"parquet": directory / f"scores_{dataset}.parquet", "csv": directory / f"scores_{dataset}.csv"}
    pq.write_table(table, paths["parquet"], row_group_size=1 << 20)
    pcsv.write_csv(table, paths["csv"])
    return paths


def measure(argv: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS in bytes, and stdout of one command.

    The peak is ``RUSAGE_CHILDREN``'s maximum over this process's children, so call it in a process that
    runs nothing else: :func:`measure_isolated` does.
    """
    import resource

    started = time.perf_counter()
    completed = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({completed.returncode}): {completed.stderr}")
    return elapsed, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, completed.stdout


def measure_isolated(argv: list[str]) -> tuple[float, int, str]:
    """``measure`` in a child Python, so RUSAGE_CHILDREN holds this command's peak only."""
    code = (
        "import json, sys; from benchmarks.cli import measure; "
        "print(json.dumps(measure(json.loads(sys.argv[1]))))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True, check=True
    ).stdout
    elapsed, peak, stdout = json.loads(output)
    return elapsed, peak, stdout


def _columns(dataset: str, labels: int) -> tuple[list[str], list[str]]:
    prediction = "p" if dataset == "probabilities" else "z"
    return [f"y{i}" for i in range(labels)], [f"{prediction}{i}" for i in range(labels)]


def bcekit_command(path: Path, dataset: str, labels: int) -> list[str]:
    targets, predictions = _columns(dataset, labels)
    argv = [sys.executable, "-m", "bcekit", "score", str(path), "--target", *targets, "--pred", *predictions]
    if dataset != "probabilities":
        argv.append("--logits")
    if dataset == "weighted":
        argv += ["--weight", "w", "--pos-weight", repr(POS_WEIGHT)]
    return [*argv, "--format", "json"]


def _sql_terms(dataset: str, labels: int) -> list[str]:
    """Each label's per-row loss as a SQL expression (the softplus form; the clamped logs for
    probabilities, as torch's BCELoss)."""
    targets, predictions = _columns(dataset, labels)
    terms = []
    for y, x in zip(targets, predictions, strict=True):
        if dataset == "probabilities":
            terms.append(f"-({y} * greatest(ln({x}), -100) + (1 - {y}) * greatest(ln(1 - {x}), -100))")
            continue
        tail = f"ln(1 + exp(-abs({x})))"
        if dataset == "logits":
            terms.append(f"(greatest({x}, 0) - {x} * {y} + {tail})")
        else:  # pos_weight p: p y softplus(-x) + (1 - y) softplus(x), times w
            terms.append(
                f"w * ({POS_WEIGHT!r} * {y} * (greatest(-{x}, 0) + {tail})"
                f" + (1 - {y}) * (greatest({x}, 0) + {tail}))"
            )
    return terms


def duckdb_command(path: Path, dataset: str, labels: int) -> list[str]:
    reader = "read_parquet" if path.suffix == ".parquet" else "read_csv"
    sums = " + ".join(f"sum({t})" for t in _sql_terms(dataset, labels))
    query = f"SELECT ({sums}) / ({labels} * count(*)) FROM {reader}('{path}')"
    code = (
        "import duckdb; db = duckdb.connect(); db.execute('SET enable_progress_bar = false'); "
        f"print(repr(db.sql({query!r}).fetchall()[0][0]))"
    )
    return [sys.executable, "-c", code]


def polars_command(path: Path, dataset: str, labels: int) -> list[str]:
    targets, predictions = _columns(dataset, labels)
    terms = []
    for y, x in zip(targets, predictions, strict=True):
        Y, X = f"pl.col({y!r})", f"pl.col({x!r})"
        if dataset == "probabilities":
            terms.append(
                f"-({Y} * {X}.log().clip(lower_bound=-100)"
                f" + (1 - {Y}) * (1 - {X}).log().clip(lower_bound=-100))"
            )
            continue
        tail = f"(1 + (-{X}.abs()).exp()).log()"
        if dataset == "logits":
            terms.append(f"({X}.clip(lower_bound=0) - {X} * {Y} + {tail})")
        else:
            terms.append(
                f"pl.col('w') * ({POS_WEIGHT!r} * {Y} * ((-{X}).clip(lower_bound=0) + {tail})"
                f" + (1 - {Y}) * ({X}.clip(lower_bound=0) + {tail}))"
            )
    scan = "scan_parquet" if path.suffix == ".parquet" else "scan_csv"
    total = " + ".join(f"({t}).sum()" for t in terms)
    code = (
        f"import polars as pl; frame = pl.{scan}({str(path)!r})"
        f".select(({total}) / ({labels} * pl.len())).collect(); print(repr(frame.item()))"
    )
    return [sys.executable, "-c", code]


COMMANDS = {"bcekit": bcekit_command, "duckdb": duckdb_command, "polars": polars_command}


def _loss(tool: str, stdout: str) -> float:
    return float(json.loads(stdout)["loss"]) if tool == "bcekit" else float(stdout.strip())


def exact_reference(path: Path, dataset: str, labels: int) -> float:
    """fsum of every element's float64 loss, over all labels, divided by their number."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    targets, predictions = _columns(dataset, labels)
    w = table.column("w").to_numpy() if dataset == "weighted" else None
    count, parts = 0, []
    for yc, xc in zip(targets, predictions, strict=True):
        x, y = table.column(xc).to_numpy(), table.column(yc).to_numpy()
        if dataset == "probabilities":
            with np.errstate(divide="ignore"):
                loss = y * np.minimum(-np.log(x), 100.0) + (1 - y) * np.minimum(-np.log1p(-x), 100.0)
        else:
            p = POS_WEIGHT if dataset == "weighted" else 1.0
            loss = p * y * np.logaddexp(0.0, -x) + (1 - y) * np.logaddexp(0.0, x)
            if w is not None:
                loss = loss * w
        parts.append(math.fsum(loss.tolist()))
        count += len(x)
    total = math.fsum(parts)  # the per-label fsums are correctly rounded: 1e-16 of the total at most
    return total / count


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _available(tool: str) -> bool:
    if tool == "bcekit":
        return True
    try:
        __import__(tool)
    except ImportError:
        print(
            f"{tool} is not installed (pip install -r requirements-benchmarks.txt): skipped", file=sys.stderr
        )
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--small-rows", type=int, default=1_000_000, help="rows of the memory-flatness run")
    parser.add_argument("--labels", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every tool on every file")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--tools", nargs="+", choices=tuple(COMMANDS), default=list(COMMANDS))
    parser.add_argument("--dir", type=Path, default=None, help="data folder (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    tools = [t for t in args.tools if _available(t)]

    directory = Path(tempfile.mkdtemp(prefix="bcekit-cli-")) if args.dir is None else args.dir
    directory.mkdir(parents=True, exist_ok=True)
    runs, flatness = [], []
    try:
        for dataset in args.datasets:
            started = time.perf_counter()
            paths = write_data(directory, args.rows, args.labels, dataset)
            print(f"wrote {dataset} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            reference = exact_reference(paths["parquet"], dataset, args.labels)
            for fmt in FORMATS:
                samples: dict[str, list[tuple[float, int, float]]] = {t: [] for t in tools}
                for _ in range(args.repeats):
                    for tool in tools:
                        elapsed, peak, stdout = measure_isolated(
                            COMMANDS[tool](paths[fmt], dataset, args.labels)
                        )
                        samples[tool].append((elapsed, peak, _loss(tool, stdout)))
                for tool in tools:
                    seconds = statistics.median(s[0] for s in samples[tool])
                    loss = samples[tool][0][2]
                    runs.append(
                        {
                            "dataset": dataset,
                            "format": fmt,
                            "file_bytes": paths[fmt].stat().st_size,
                            "tool": tool,
                            "seconds": seconds,
                            "seconds_all": [s[0] for s in samples[tool]],
                            "peak_rss_bytes": max(s[1] for s in samples[tool]),
                            "loss": loss,
                            "losses_agree": len({s[2] for s in samples[tool]}) == 1,
                            "relative_difference_to_exact": abs(loss - reference) / abs(reference),
                        }
                    )
                    print(f"{dataset} {fmt} {tool}: {seconds:.2f} s", file=sys.stderr)
            for path in paths.values():
                path.unlink()
        if "bcekit" in tools and "logits" in args.datasets:
            small = write_data(directory, args.small_rows, args.labels, "logits")
            for fmt in FORMATS:
                _, peak, _ = measure_isolated(bcekit_command(small[fmt], "logits", args.labels))
                flatness.append({"format": fmt, "rows": args.small_rows, "peak_rss_bytes": peak})
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)

    versions = {}
    for name in ("pyarrow", "duckdb", "polars"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    report = {
        "machine": f"{_cpu()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "versions": versions,
        "rows": args.rows,
        "labels": args.labels,
        "repeats": args.repeats,
        "runs": runs,
        "flatness": flatness,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cli.json").write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)


def print_tables(report: dict) -> None:
    mib = 2**20
    rows = report["rows"]
    print(f"{rows:,} rows x {report['labels']} labels; {report['machine']}; {report['versions']}\n")
    print("| data | file | tool | time (s) | rows/s | peak RSS | loss | rel. diff to exact |")
    print("|---|---|---|---|---|---|---|---|")
    for run in report["runs"]:
        print(
            f"| {run['dataset']} | {run['format']} ({run['file_bytes'] / mib:,.0f} MiB) | {run['tool']} "
            f"| {run['seconds']:.2f} | {rows / run['seconds'] / 1e6:.1f} M "
            f"| {run['peak_rss_bytes'] / mib:.0f} MiB "
            f"| {run['loss']!r} | {run['relative_difference_to_exact']:.1e} |"
        )
    if report["flatness"]:
        print("\nbcekit's peak RSS, logits:")
        big = {
            r["format"]: r["peak_rss_bytes"]
            for r in report["runs"]
            if r["tool"] == "bcekit" and r["dataset"] == "logits"
        }
        for entry in report["flatness"]:
            print(
                f"- {entry['format']}: {entry['rows']:,} rows {entry['peak_rss_bytes'] / mib:.0f} MiB, "
                f"{rows:,} rows {big.get(entry['format'], 0) / mib:.0f} MiB"
            )


if __name__ == "__main__":
    main()
