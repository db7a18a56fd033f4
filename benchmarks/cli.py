"""``bcekit score`` on a file bigger than it needs: peak memory and time of the streaming command.

Run from the repository root::

    python -m benchmarks.cli [--rows 10000000] [--labels 4] [--batch-rows 65536 ...] [--dir DIR]
                             [--out benchmarks/results]

It writes a data set of ``--rows`` rows and ``--labels`` labels (a 0/1 target column and a float64 logit
column per label; seeded) as Parquet (row groups of 2^20 rows) and as CSV into ``--dir`` (default: a
temporary folder, removed afterwards), then runs ``bcekit score FILE --target ... --pred ... --logits
--format json`` on each, once per ``--batch-rows``, each in a fresh process, and reports:

* the data's in-memory size: its 2 x labels columns as float64 arrays (what a tool that loads the file
  whole holds, before any temporaries);
* each run's peak resident set size (``ru_maxrss`` of that process) and wall time;
* the same for ``bcekit score`` on a 10-row file: the cost of the interpreter and imports alone;
* that the loss equals ``bcekit.numpy`` on the whole data (loaded here, after the timed runs), relative
  difference.

Results go to ``OUT/cli.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_data(directory: Path, rows: int, labels: int, seed: int = 0) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    columns = {}
    for label in range(labels):
        logit = rng.normal(scale=3.0, size=rows)
        columns[f"y{label}"] = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float64)
        columns[f"z{label}"] = logit + rng.normal(scale=1.0, size=rows)  # a noisy model of the truth
    table = pa.table(columns)
    paths = {"parquet": directory / "scores.parquet", "csv": directory / "scores.csv"}
    pq.write_table(table, paths["parquet"], row_group_size=1 << 20)
    pcsv.write_csv(table, paths["csv"])
    pcsv.write_csv(table.slice(0, 10), directory / "tiny.csv")
    paths["tiny"] = directory / "tiny.csv"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--labels", type=int, default=4)
    parser.add_argument("--batch-rows", type=int, nargs="+", default=[1 << 16])
    parser.add_argument("--dir", type=Path, default=None, help="data folder (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="bcekit-cli-")) if args.dir is None else args.dir
    directory.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        paths = write_data(directory, args.rows, args.labels)
        print(f"wrote the data in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        targets = [f"y{i}" for i in range(args.labels)]
        predictions = [f"z{i}" for i in range(args.labels)]
        command = [sys.executable, "-m", "bcekit", "score"]
        options = ["--target", *targets, "--pred", *predictions, "--logits", "--format", "json"]
        in_memory = args.rows * 2 * args.labels * 8
        runs = []
        _, baseline, _ = measure_isolated([*command, str(paths["tiny"]), *options])
        for fmt in ("parquet", "csv"):
            for batch_rows in args.batch_rows:
                argv = [*command, str(paths[fmt]), *options, "--batch-rows", str(batch_rows)]
                elapsed, peak, stdout = measure_isolated(argv)
                result = json.loads(stdout)
                runs.append(
                    {
                        "format": fmt,
                        "file_bytes": paths[fmt].stat().st_size,
                        "batch_rows": batch_rows,
                        "seconds": elapsed,
                        "peak_rss_bytes": peak,
                        "loss": result["loss"],
                        "rows": result["rows"],
                    }
                )
                print(f"{fmt} batch {batch_rows}: {elapsed:.1f} s, {peak / 2**20:.0f} MiB", file=sys.stderr)
        reference = _reference(paths["parquet"], targets, predictions)
        for run in runs:
            run["relative_difference_to_bcekit_numpy"] = abs(run["loss"] - reference) / reference
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)

    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "rows": args.rows,
        "labels": args.labels,
        "in_memory_bytes": in_memory,
        "import_only_peak_rss_bytes": baseline,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cli.json").write_text(json.dumps(report, indent=2) + "\n")
    mib = 2**20
    print(f"{args.rows:,} rows x {args.labels} labels; in memory as float64: {in_memory / mib:,.0f} MiB; ")
    print(f"`bcekit score` on a 10-row file (imports only): peak RSS {baseline / mib:.0f} MiB\n")
    print("| file | on disk | batch rows | time (s) | rows/s | peak RSS | peak RSS / in-memory | rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        print(
            f"| {run['format']} | {run['file_bytes'] / mib:,.0f} MiB | {run['batch_rows']:,} "
            f"| {run['seconds']:.1f} | {args.rows / run['seconds']:,.0f} "
            f"| {run['peak_rss_bytes'] / mib:.0f} MiB "
            f"| {run['peak_rss_bytes'] / in_memory:.2f} | {run['relative_difference_to_bcekit_numpy']:.1e} |"
        )


def _reference(path: Path, targets: list[str], predictions: list[str]) -> float:
    import pyarrow.parquet as pq

    import bcekit.numpy as bce

    table = pq.read_table(path)
    x = np.column_stack([table.column(c).to_numpy() for c in predictions])
    y = np.column_stack([table.column(c).to_numpy() for c in targets])
    return float(bce.binary_cross_entropy_with_logits(x, y))


if __name__ == "__main__":
    main()
