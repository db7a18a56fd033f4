r"""The ``bcekit`` command. ``bcekit score`` computes the BCE log-loss of prediction files, streaming.

::

    bcekit score preds.parquet --target y --pred p                      # probabilities
    bcekit score a.csv b.csv --target y1 y2 --pred z1 z2 --logits       # two labels, logits
    bcekit score part-*.parquet --target y --pred z --logits --engine dask --scheduler tcp://host:8786

Files are read in batches of ``--batch-rows`` rows, so memory does not grow with the files. The loss is
:mod:`bcekit.numpy`'s, per element in float64, summed exactly (see :mod:`bcekit.cli._scoring`); several
``--target``/``--pred`` pairs are several labels, reported together and one by one. Bad data (a missing
column or value, a non-number, NaN, a probability or target outside [0, 1], files of different lengths, an
empty file, a column name a file repeats, an integer float64 cannot hold exactly) stops the command with exit
status 2 and one line naming the file, the column and the first offending row: no row is dropped silently.
So does an unusable ``--plot`` path, checked before any data is read. Ctrl-C prints one line and exits with
status 130. Needs ``pip install 'bcekit[cli]'`` (pyarrow, rich, matplotlib); the Dask engine needs
``'bcekit[dask]'``.

A folder stands for every data file below it, at any depth, that the command would read if it were named
directly (``.csv``, ``.csv.gz``/``.bz2``/``.lz4``/``.zst``, ``.parquet``, ``.pq``, ``.npy``, ``.npz``), in
sorted path order. Symbolic links to files and to folders are followed alike, wherever they point. Names
starting with ``.`` or ``_`` are skipped (``_SUCCESS``, ``_metadata``, ``.crc`` checksums, ``_temporary``
folders), as are files whose name names no data format (``README.txt``). A file named as data in a form the
command does not read (``part.csv.xz``, ``part.tsv``) is an error, as it is named directly, and so is a
folder or file reached twice (a symbolic-link loop, two links to one folder): rows are never skipped or
read twice.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import IO

__all__ = ["main"]

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C


def _parser() -> argparse.ArgumentParser:
    from bcekit import __version__

    parser = argparse.ArgumentParser(
        prog="bcekit", description="Binary cross-entropy, exact and fast: command-line tools."
    )
    parser.add_argument("--version", action="version", version=f"bcekit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    score = commands.add_parser(
        "score",
        help="the log-loss of prediction files (CSV, Parquet, NPY, NPZ)",
        description=(
            "Score predictions against targets with bcekit's binary cross-entropy, reading the files in "
            "batches. Several --target/--pred pairs are several labels. Files that each hold every column "
            "are read one after another; files that hold different columns are read side by side, row by "
            "row. Bad data exits with status 2 and names the file, the column and the first bad row. "
            "A folder stands for every data file below it that would be read if named directly, in sorted "
            "path order; symbolic links to files and folders are followed; names starting with '.' or '_' "
            "(_SUCCESS, .crc) are skipped, and so are files whose name names no data format; a data file "
            "of a form not read (.csv.xz, .tsv) or a folder or file reached twice is an error."
        ),
    )
    score.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help=".csv (.csv.gz, ...), .parquet, .npy or .npz, or a folder of them (a partitioned data set)",
    )
    score.add_argument("--target", nargs="+", required=True, metavar="COL", help="target columns, in [0, 1]")
    score.add_argument("--pred", nargs="+", required=True, metavar="COL", help="prediction columns")
    score.add_argument("--logits", action="store_true", help="predictions are logits (else probabilities)")
    score.add_argument("--weight", metavar="COL", help="a per-row weight column (multiplies each loss)")
    score.add_argument(
        "--pos-weight",
        nargs="+",
        type=float,
        metavar="V",
        help="weight of positive targets, one value or one per label (logits only, as in torch)",
    )
    score.add_argument("--reduction", choices=("mean", "sum"), default="mean")
    score.add_argument(
        "--label-smoothing", type=float, default=0.0, metavar="S", help="targets become y(1-S) + S/2"
    )
    score.add_argument(
        "--ignore-index",
        type=float,
        metavar="V",
        help="skip elements whose target equals V (nan skips NaN targets); the mean counts the others",
    )
    score.add_argument("--format", choices=("table", "json"), default="table", help="output on stdout")
    score.add_argument(
        "--plot",
        metavar="FILE.png",
        help="write a reliability diagram and a loss histogram (.png, .pdf, .svg, ...; no extension: PNG)",
    )
    score.add_argument(
        "--batch-rows",
        type=int,
        default=None,
        metavar="N",
        help="rows read at a time (default: about 4 MiB of float64 columns); the result does not change",
    )
    score.add_argument(
        "--engine", choices=("local", "dask"), default="local", help="dask: one task per file or row group"
    )
    score.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler (default: a new local cluster)")
    score.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress bar on stderr (auto: when stderr is a terminal)",
    )
    return parser


def main(
    argv: Sequence[str] | None = None, stdout: IO[str] | None = None, stderr: IO[str] | None = None
) -> int:
    """Run the command; returns its exit status (0, or 2 for bad arguments or bad data)."""
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    parser = _parser()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv)  # --help, --version and usage errors print to the given streams
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        return _score(args, stdout, stderr)
    except KeyboardInterrupt:
        print("bcekit score: interrupted", file=stderr)
        return EXIT_INTERRUPTED


def _fail(stderr: IO[str], message: str) -> int:
    if "\n" in message:  # library messages may span lines; the error is one
        message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"bcekit score: error: {message}", file=stderr)
    return EXIT_BAD_INPUT


def _score(args: argparse.Namespace, stdout: IO[str], stderr: IO[str]) -> int:
    try:
        from bcekit.cli._scoring import Job, combine, score_partitions
        from bcekit.cli._sources import DataError, expand, open_table, plan
    except ValueError as error:  # a malformed BCEKIT_* variable, raised where the kernels are loaded
        return _fail(stderr, str(error))

    if args.scheduler is not None and args.engine != "dask":
        return _fail(stderr, "--scheduler needs --engine dask")
    try:
        job = Job(
            targets=tuple(args.target),
            predictions=tuple(args.pred),
            logits=args.logits,
            weight=args.weight,
            pos_weight=None if args.pos_weight is None else tuple(args.pos_weight),
            reduction=args.reduction,
            label_smoothing=args.label_smoothing,
            ignore_index=args.ignore_index,
            batch_rows=args.batch_rows,
            collect_plot=args.plot is not None,
        )
    except ValueError as error:
        return _fail(stderr, str(error))
    missing = _missing_modules(args)
    if missing:
        extra = "dask" if {"dask", "distributed"} & set(missing) else "cli"
        return _fail(stderr, f"needs {', '.join(missing)}: pip install 'bcekit[{extra}]'")
    image_format = None
    if args.plot is not None:
        from bcekit.cli._report import plot_format

        try:
            image_format = plot_format(args.plot)
        except ValueError as error:
            return _fail(stderr, str(error))
    try:
        tables = [open_table(path) for path in expand(args.files)]
        layout, partitions = plan(tables, job.columns)
        known = [t.num_rows for t in tables if t.num_rows is not None]
        if layout == "stacked":
            total = sum(known) if len(known) == len(tables) else None
        else:
            total = known[0] if known else None
        with _progress(args.progress, stderr, total) as advance:
            if args.engine == "dask":
                from bcekit.cli import _dask

                # workers may run in another directory: they open relative paths in this one
                here = os.getcwd()
                located = [
                    replace(p, pieces=tuple(replace(piece, directory=here) for piece in p.pieces))
                    for p in partitions
                ]
                partials = _dask.run(job, located, args.scheduler, advance)
            else:
                partials = score_partitions(job, partitions, advance)
        result = combine(job, partials)
    except DataError as error:
        return _fail(stderr, str(error))
    if image_format is not None:
        # written before the result is printed, so that a failed write leaves stdout empty, as bad data does
        from bcekit.cli._report import write_plot

        try:
            write_plot(result, args.plot, image_format)
        except Exception as error:  # OSError, or matplotlib's own (a format needing LaTeX, say)
            return _fail(stderr, f"--plot {args.plot}: cannot write it: {error}")
    if args.format == "json":
        from bcekit.cli._report import as_json

        print(as_json(result), file=stdout)
    else:
        from bcekit.cli._report import write_table

        write_table(result, stdout)
    if image_format is not None and args.format == "table":
        print(f"plot written to {args.plot}", file=stderr)
    return 0


def _missing_modules(args: argparse.Namespace) -> list[str]:
    import importlib.util

    needed = ["rich"] if args.format == "table" else []
    if any(not path.lower().endswith((".npy", ".npz")) for path in args.files):
        needed.append("pyarrow")
    if args.plot is not None:
        needed.append("matplotlib")
    if args.engine == "dask":
        needed += ["dask", "distributed"]
    return [name for name in needed if importlib.util.find_spec(name) is None]


class _progress:
    """A rich progress bar on ``stderr`` (rows read, against the total where the files record it)."""

    def __init__(self, mode: str, stderr: IO[str], total: int | None) -> None:
        shown = mode == "always" or (mode == "auto" and hasattr(stderr, "isatty") and stderr.isatty())
        self.bar = None
        if shown:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            columns = [TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("rows")]
            self.bar = Progress(*columns, TimeElapsedColumn(), console=Console(file=stderr), transient=False)
            self.task = self.bar.add_task("rows", total=total)

    def __enter__(self) -> Callable[[int], None] | None:
        if self.bar is None:
            return None
        self.bar.start()
        return lambda rows: self.bar.advance(self.task, rows)  # type: ignore[union-attr]

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def run() -> None:
    """Console-script entry point."""
    # The command does no linear algebra: OpenBLAS's thread pool, started when NumPy is imported, would
    # only spin (a tenth of a CPU second per run). Set before NumPy is first imported; the user's value wins.
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
