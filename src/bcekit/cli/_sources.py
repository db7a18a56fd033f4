"""Prediction files for ``bcekit score``: what they hold, and their rows in bounded batches.

A *table* is one file: CSV (optionally compressed, read with pyarrow), Parquet (pyarrow), NPY (a structured
array whose fields are the columns, or a 1-D / 2-D array whose columns are named ``0``, ``1``, ...) or NPZ
(each 1-D member is a column). Only the columns a job names are read, a batch at a time, so memory is
bounded by the batch size whatever the file's size.

Several files form one data set in one of two layouts, chosen by where the named columns are:

* **stacked**: every file holds every column; the files' rows are read one file after another;
* **side by side**: each column is in exactly one file (targets in one, predictions in another, say); the
  files are read in lockstep, row *i* of each belonging together, so they must have the same row count.

A data set is cut into *partitions* (one per Parquet row group, one per other file in the stacked layout),
the unit of work of the Dask engine; the local engine reads the same partitions in order.

Every value is checked on the way in: a missing or non-numeric value raises :class:`DataError` naming the
file, the column and the first offending row (1-based, not counting a CSV header).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DataError",
    "Table",
    "Piece",
    "Partition",
    "expand",
    "open_table",
    "plan",
    "read_partition",
    "to_float64",
]

_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".npy": "npy", ".npz": "npz"}
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")


class DataError(Exception):
    """Bad input data; ``bcekit score`` prints it as one line and exits with status 2."""

    def __init__(self, path: str, message: str, column: str | None = None, row: int | None = None) -> None:
        super().__init__(path, message, column, row)
        self.path, self.message, self.column, self.row = path, message, column, row

    def __str__(self) -> str:
        where = [self.path]
        if self.column is not None:
            where.append(f"column {self.column!r}")
        if self.row is not None:
            where.append(f"row {self.row}")
        return ": ".join([*where, self.message])

    def __reduce__(self):  # picklable with its fields, for Dask workers
        return (DataError, (self.path, self.message, self.column, self.row))


def file_format(path: str) -> str:
    name = os.path.basename(path).lower()
    for suffix in _COMPRESSED:
        if name.endswith(suffix) and name[: -len(suffix)].endswith(".csv"):
            return "csv"
    fmt = _FORMATS.get(os.path.splitext(name)[1])
    if fmt is None:
        raise DataError(path, "unknown file type: expected .csv (or .csv.gz etc.), .parquet, .npy or .npz")
    return fmt


@dataclass(frozen=True)
class Table:
    """One file's metadata: its columns and, where the format records it, its rows and row groups."""

    path: str
    format: str
    columns: tuple[str, ...]
    num_rows: int | None  # None for CSV: known only after reading it
    row_groups: tuple[int, ...] | None = None  # Parquet row-group sizes


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of some columns of one file (``stop=None``: to the end).

    ``path`` is the file as the user named it (messages use it); a relative one is opened in
    ``directory`` when that is set, which is how Dask workers with another working directory find it.
    """

    path: str
    format: str
    columns: tuple[str, ...]
    start: int = 0
    stop: int | None = None
    directory: str = ""

    @property
    def location(self) -> str:
        return os.path.join(self.directory, self.path)


@dataclass(frozen=True)
class Partition:
    """Rows read together: one piece (stacked layout) or one piece per file, in lockstep (side by side)."""

    index: int
    pieces: tuple[Piece, ...]


def expand(paths: Sequence[str]) -> list[str]:
    """The files named, with each folder replaced by the data files below it (a partitioned data set, as
    Spark, Dask or pyarrow write them), in sorted path order.

    A folder stands for every file below it, at any depth, whose name the command reads when named directly
    (:func:`file_format`). Symbolic links to files and to folders are followed alike, wherever they point;
    names starting with ``.`` or ``_`` (``_SUCCESS``, ``.crc`` checksums, ``_temporary`` folders, hidden
    files) are skipped, as pyarrow's datasets skip them, and so are files whose name names no data format
    (``README.txt``). Raises :class:`DataError` for a file whose name names a data format in a form the
    command does not read (``part.csv.xz``, ``part.tsv``), as naming it directly would; for a folder or file
    reached twice below one folder (a symbolic-link loop, two links to one place), whose rows would be read
    twice; for a folder that cannot be listed; and for a folder with no data file.
    """
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            files.extend(_data_files(path))
        else:
            files.append(path)
    return files


# Name parts that say a file holds data: a file of a folder named so is read, or refused when it is in a
# form the command does not read, rather than skipped.
_DATA_SUFFIXES = frozenset(("csv", "tsv", "parquet", "pq", "npy", "npz"))


def _data_files(folder: str) -> list[str]:
    found: list[str] = []
    # (device, inode) of each folder and file met -> the path it was met by
    seen: dict[tuple[int, int], str] = {}
    pending = [folder]
    while pending:
        directory = pending.pop()
        _visit(directory, seen)
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            raise DataError(directory, f"cannot list the folder: {error.strerror or error}") from None
        subfolders = []
        for entry in entries:
            if entry.name.startswith((".", "_")):
                continue
            path = os.path.join(directory, entry.name)
            if entry.is_dir():  # through a symbolic link too
                subfolders.append(path)
                continue
            try:
                file_format(entry.name)
            except DataError as error:
                if _DATA_SUFFIXES & set(entry.name.lower().split(".")[1:]):
                    raise DataError(path, error.message) from None
                continue
            if os.path.exists(path):  # else open_table reports the broken link
                _visit(path, seen)
            found.append(path)
        pending.extend(reversed(subfolders))
    if not found:
        raise DataError(folder, "a folder with no .csv, .parquet, .npy or .npz file under it")
    return sorted(found)


def _visit(path: str, seen: dict[tuple[int, int], str]) -> None:
    """Record that ``path`` (a file or folder, symbolic links followed) is read; an error the second time."""
    try:
        status = os.stat(path)
    except OSError as error:
        raise DataError(path, f"cannot read it: {error.strerror or error}") from None
    key = (status.st_dev, status.st_ino)
    first = seen.setdefault(key, path)
    if first != path:
        kind = "folder" if os.path.isdir(path) else "file"
        message = f"the same {kind} as {first}, reached again through a link: its rows would be read twice"
        raise DataError(path, message)


def open_table(path: str) -> Table:
    """Read a file's metadata (not its data). Raises :class:`DataError` when it cannot be read."""
    fmt = file_format(path)
    if not os.path.isfile(path):
        if os.path.islink(path) and not os.path.exists(path):
            raise DataError(path, "a broken symbolic link: no such file")
        if os.path.exists(path):
            # its columns are read first and its rows after: a pipe or a device cannot be read twice
            raise DataError(path, "not a regular file (a pipe or a device)")
        raise DataError(path, "no such file")
    try:
        return _OPENERS[fmt](path)
    except DataError:
        raise
    except Exception as error:  # pyarrow's and numpy's exceptions for unreadable files
        raise DataError(path, f"cannot read it as {fmt.upper()}: {error}") from None


def _open_csv(path: str) -> Table:
    if os.path.getsize(path) == 0:
        raise DataError(path, "the file is empty")
    return Table(path, "csv", _csv_names(path), None)


def _csv_names(path: str) -> tuple[str, ...]:
    """The CSV file's column names, from its header, as pyarrow reads them."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    with pa.input_stream(path, compression="detect") as stream:
        reader = pcsv.open_csv(
            stream, read_options=pcsv.ReadOptions(block_size=1 << 16), parse_options=_csv_parse()
        )
        return tuple(reader.schema.names)


def _open_parquet(path: str) -> Table:
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata
    names = tuple(metadata.schema.to_arrow_schema().names)
    groups = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    return Table(path, "parquet", names, metadata.num_rows, groups)


def _npy_columns(array: np.ndarray) -> tuple[str, ...]:
    if array.dtype.names:
        if array.ndim != 1:
            raise ValueError(
                f"a structured array must be 1-D (its fields are the columns), got shape {array.shape}"
            )
        return tuple(array.dtype.names)
    if array.ndim == 1:
        return ("0",)
    if array.ndim == 2:
        return tuple(str(i) for i in range(array.shape[1]))
    raise ValueError(f"expected a structured, 1-D or 2-D array, got shape {array.shape}")


def _open_npy(path: str) -> Table:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return Table(path, "npy", _npy_columns(array), array.shape[0])


def _npz_header(archive: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype, object]:
    """The member's shape and dtype, and a stream positioned at its first element."""
    stream = archive.open(member)
    version = np.lib.format.read_magic(stream)
    read_header = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }.get(version)
    if read_header is None:
        raise ValueError(f"member {member!r}: unsupported .npy format version {version}")
    shape, _, dtype = read_header(stream)
    return shape, dtype, stream


def _open_npz(path: str) -> Table:
    names, rows = [], None
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if not member.endswith(".npy"):
                continue
            shape, dtype, stream = _npz_header(archive, member)
            stream.close()
            name = member[: -len(".npy")]
            if len(shape) != 1:
                raise DataError(path, f"member has shape {shape}; columns must be 1-D arrays", name)
            if dtype.hasobject:
                raise DataError(path, "member holds Python objects, not numbers", name)
            if rows is not None and shape[0] != rows:
                raise DataError(path, f"member has {shape[0]} rows, earlier members {rows}", name)
            names.append(name)
            rows = shape[0]
    return Table(path, "npz", tuple(names), 0 if rows is None else rows)


_OPENERS = {"csv": _open_csv, "parquet": _open_parquet, "npy": _open_npy, "npz": _open_npz}


# -- layout and partitions ----------------------------------------------------------------------------------


def plan(tables: Sequence[Table], columns: Sequence[str]) -> tuple[str, list[Partition]]:
    """The layout (``'stacked'`` or ``'side by side'``) of ``tables`` and their partitions.

    Raises :class:`DataError` for a column no file holds, a column a file has more than once (CSV headers and
    NPZ archives can repeat a name), a layout that is neither, a file with no rows, or side-by-side files
    whose recorded row counts differ.
    """
    needed = tuple(dict.fromkeys(columns))
    holders = {column: [t for t in tables if column in t.columns] for column in needed}
    for column, found in holders.items():
        if not found:
            listing = "; ".join(f"{t.path} has {', '.join(t.columns) or 'no columns'}" for t in tables)
            raise DataError(tables[0].path if len(tables) == 1 else "input", f"not found ({listing})", column)
    for table in tables:
        for column in needed:
            count = table.columns.count(column)
            if count > 1:
                message = (
                    f"appears more than once in the file ({count} times): which one to read is ambiguous"
                )
                raise DataError(table.path, message, column)
    for table in tables:
        if table.num_rows == 0:
            raise DataError(table.path, "the file has no rows")
    if all(len(found) == len(tables) for found in holders.values()):
        return "stacked", _stacked(tables, needed)
    if any(len(found) > 1 for found in holders.values()):
        # some column is in several files: these are parts of one table, so each must hold every column
        table, column = next((t, c) for t in tables for c in needed if t not in holders[c])
        holder = holders[column][0].path
        raise DataError(
            table.path,
            f"not found, though {holder} has it: files read one after another must each hold every "
            "column (files read side by side must each hold different columns)",
            column,
        )
    unused = [t.path for t in tables if not any(t in found for found in holders.values())]
    if unused:
        raise DataError(unused[0], "holds none of the named columns")
    return "side by side", _side_by_side(tables, holders)


def _stacked(tables: Sequence[Table], columns: tuple[str, ...]) -> list[Partition]:
    partitions: list[Partition] = []
    for table in tables:
        if table.row_groups:
            start = 0
            for size in table.row_groups:
                piece = Piece(table.path, table.format, columns, start, start + size)
                partitions.append(Partition(len(partitions), (piece,)))
                start += size
        else:
            partitions.append(Partition(len(partitions), (Piece(table.path, table.format, columns),)))
    return partitions


def _side_by_side(tables: Sequence[Table], holders: dict[str, list[Table]]) -> list[Partition]:
    # Row counts are compared while reading (not from metadata), so that a bad value in an earlier row
    # is reported first, as it would be in any other layout.
    owned = [(t, tuple(c for c, found in holders.items() if found[0] is t)) for t in tables]
    # Row ranges follow the first Parquet file's row groups (cheap to read there), else one partition.
    grouped = next((t for t in tables if t.row_groups), None)
    bounds: list[tuple[int, int | None]] = [(0, None)]
    if grouped is not None and len(grouped.row_groups) > 1:
        edges = np.cumsum((0, *grouped.row_groups)).tolist()
        bounds = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]
        bounds[-1] = (bounds[-1][0], None)  # the last partition also checks that every file ends there
    return [
        Partition(i, tuple(Piece(t.path, t.format, cols, start, stop) for t, cols in owned))
        for i, (start, stop) in enumerate(bounds)
    ]


def _row_count_error(short: Piece, other: str, rows: int) -> DataError:
    return DataError(
        short.path, f"missing: the file ends after row {rows}, {other} goes on", short.columns[0], rows + 1
    )


# -- reading ------------------------------------------------------------------------------------------------


def _csv_parse() -> object:
    import pyarrow.csv as pcsv

    # A blank line is a row of empty cells (an error), not nothing: skipping it would shift the rows of a
    # one-column file against the file read beside it.
    return pcsv.ParseOptions(ignore_empty_lines=False)


# A reader returns ``(origin, batches)``: its batches hold consecutive rows from row ``origin`` (at most
# ``piece.start``) on; :func:`_rows` skips what comes before ``piece.start`` and cuts at ``piece.stop``.
Reader = tuple[int, Iterator[dict[str, object]]]


def _iter_csv(piece: Piece, batch_rows: int) -> Reader:
    from bcekit import _native

    plain = os.path.basename(piece.path).lower().endswith(".csv")  # not compressed
    if plain and _native.AVAILABLE:
        return 0, _csv_numbers(piece)
    return 0, _csv_text(piece)  # CSV cannot seek


# Bytes of an uncompressed CSV file read at a time by the kernels' number reader (then to a line end).
CSV_CHUNK_BYTES = 16 << 20


def _csv_numbers(piece: Piece) -> Iterator[dict[str, object]]:
    """An uncompressed CSV file's columns as float64, a chunk of whole lines at a time, by the kernels'
    reader of plain numeric lines (on all threads); from the first chunk it refuses on (quotes, spaces, a
    missing or non-numeric value, ...), the rows come from :func:`_csv_text`, which reads whatever pyarrow
    reads and reports bad values with their row. The two read the same numbers to the same float64s.
    Lines end at ``\n`` (or ``\r\n``), as pyarrow's blocks do (line breaks inside quotes are not supported
    either way)."""
    from bcekit import _native

    names = _csv_names(piece.location)
    slots = [piece.columns.index(name) if name in piece.columns else -1 for name in names]
    done = 0
    buffer = bytearray(CSV_CHUNK_BYTES)  # reused: parse_csv is done with it when it returns
    with open(piece.location, "rb", buffering=0) as stream:
        stream.readline()  # the header
        size = 0
        while True:
            size += stream.readinto(memoryview(buffer)[size:CSV_CHUNK_BYTES])
            if size == 0:
                return
            end = buffer.rfind(b"\n", 0, size) + 1
            if end == 0:  # no whole line in the buffer: one longer than it, or the file's last
                more = stream.read(CSV_CHUNK_BYTES)
                if more:
                    buffer[size:size] = more
                    size += len(more)
                    continue
                end = size
            values = _native.parse_csv(
                np.frombuffer(buffer, np.uint8, end), len(names), slots, len(piece.columns)
            )
            if values is None:
                break
            yield {c: values[k] for k, c in enumerate(piece.columns)}
            done += values.shape[1]
            buffer[: size - end] = buffer[end:size]  # the part line, first in the next chunk
            size -= end
    yield from _csv_text(piece, done)


def _csv_text(piece: Piece, skip: int = 0) -> Iterator[dict[str, object]]:
    """The CSV file's rows from row ``skip`` on, each value as text, converted and checked later by
    :func:`to_float64` so that a bad value is reported with its row (pyarrow's float64 reader would trim
    spaces)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    convert = pcsv.ConvertOptions(
        include_columns=list(piece.columns),
        column_types={c: pa.string() for c in piece.columns},
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
        null_values=[""],
    )
    # 256 KiB blocks: pyarrow parses several ahead on its threads, so memory grows with the block size
    # (1 MiB blocks cost 45 MB more at the peak, for no speed)
    with pa.input_stream(piece.location, compression="detect") as stream:
        reader = pcsv.open_csv(
            stream,
            read_options=pcsv.ReadOptions(block_size=1 << 18),
            parse_options=_csv_parse(),
            convert_options=convert,
        )
        for batch in reader:
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            yield {c: batch.column(c).slice(skip) for c in piece.columns}
            skip = 0


def _iter_parquet(piece: Piece, batch_rows: int) -> Reader:
    import pyarrow.parquet as pq

    # Without pre-buffering pyarrow streams each column chunk through a small buffer; with it, it would hold
    # whole row groups (64 MiB for 2^20 rows of 8 float64 columns).
    parquet = pq.ParquetFile(piece.location, pre_buffer=False, buffer_size=1 << 20)
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    edges = np.cumsum((0, *sizes)).tolist()
    stop = edges[-1] if piece.stop is None else piece.stop
    groups = [i for i in range(len(sizes)) if edges[i] < stop and edges[i + 1] > piece.start]
    if not groups:
        return piece.start, iter(())
    batches = parquet.iter_batches(batch_size=batch_rows, row_groups=groups, columns=list(piece.columns))
    return edges[groups[0]], ({c: batch.column(c) for c in piece.columns} for batch in batches)


def _iter_npy(piece: Piece, batch_rows: int) -> Reader:
    array = np.load(piece.location, mmap_mode="r", allow_pickle=False)
    names = _npy_columns(array)
    stop = array.shape[0] if piece.stop is None else min(piece.stop, array.shape[0])

    def batches() -> Iterator[dict[str, object]]:
        for start in range(piece.start, stop, batch_rows):
            block = array[start : min(start + batch_rows, stop)]
            if array.dtype.names:
                yield {c: np.array(block[c]) for c in piece.columns}
            elif array.ndim == 1:
                yield {c: np.array(block) for c in piece.columns}
            else:
                yield {c: np.array(block[:, names.index(c)]) for c in piece.columns}

    return piece.start, batches()


def _iter_npz(piece: Piece, batch_rows: int) -> Reader:
    def batches() -> Iterator[dict[str, object]]:
        with zipfile.ZipFile(piece.location) as archive:
            streams = {}
            try:
                for column in piece.columns:
                    shape, dtype, stream = _npz_header(archive, column + ".npy")
                    streams[column] = (dtype, stream)
                position = 0
                stop = shape[0] if piece.stop is None else min(piece.stop, shape[0])
                while position < stop:
                    count = min(batch_rows, stop - position)
                    batch = {}
                    for column, (dtype, stream) in streams.items():
                        data = stream.read(count * dtype.itemsize)
                        batch[column] = np.frombuffer(data, dtype=dtype, count=count)
                    yield batch
                    position += count
            finally:
                for _, stream in streams.values():
                    stream.close()

    return 0, batches()  # a zip member is a stream: read from its first row


_READERS = {"csv": _iter_csv, "parquet": _iter_parquet, "npy": _iter_npy, "npz": _iter_npz}


def _length(array: object) -> int:
    return len(array)  # type: ignore[arg-type]


def _slice(array: object, start: int, stop: int) -> object:
    if isinstance(array, np.ndarray):
        return array[start:stop]
    return array.slice(start, stop - start)  # type: ignore[attr-defined]


def _concat(parts: list[object]) -> object:
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)  # type: ignore[arg-type]
    import pyarrow as pa

    # Where a CSV's float64 chunks meet its text rows (from the first chunk the number reader refused on),
    # the numbers go back to text: pyarrow writes the shortest text that reads back to the same float64.
    kind = next(p for p in parts if not isinstance(p, np.ndarray)).type  # type: ignore[attr-defined]
    chunks = []
    for p in parts:
        if isinstance(p, np.ndarray):
            chunks.append(pa.array(p).cast(kind))
        else:
            chunks.extend(p.chunks if isinstance(p, pa.ChunkedArray) else [p])  # type: ignore[attr-defined]
    return pa.chunked_array(chunks)


def _rows(piece: Piece, batch_rows: int) -> Iterator[dict[str, object]]:
    """The piece's rows ``[start, stop)`` in batches of exactly ``batch_rows`` (the last one shorter)."""
    position, reader = _READERS[piece.format](piece, batch_rows)
    buffered, pending = 0, []
    for batch in reader:
        size = _length(next(iter(batch.values())))
        if position < piece.start:  # rows before the range: skipped
            if position + size <= piece.start:
                position += size
                continue
            cut = piece.start - position
            batch = {c: _slice(a, cut, size) for c, a in batch.items()}
            position, size = piece.start, size - cut
        if piece.stop is not None and position + size > piece.stop:
            size = piece.stop - position
            batch = {c: _slice(a, 0, size) for c, a in batch.items()}
        if size <= 0:
            break
        pending.append(batch)
        buffered += size
        position += size
        while buffered >= batch_rows:
            yield _take(pending, batch_rows, piece.columns)
            buffered -= batch_rows
        if piece.stop is not None and position >= piece.stop:
            break
    if buffered:
        yield _take(pending, buffered, piece.columns)


def _take(pending: list[dict[str, object]], rows: int, columns: tuple[str, ...]) -> dict[str, object]:
    """The first ``rows`` rows of the pending batches, removed from them: a view of the first batch where
    it has them all, else those rows joined (a copy of this batch only, not of the rest)."""
    parts, need = [], rows
    while need:
        first = pending[0]
        size = _length(next(iter(first.values())))
        if size <= need:
            parts.append(pending.pop(0))
            need -= size
        else:
            parts.append({c: _slice(a, 0, need) for c, a in first.items()})
            pending[0] = {c: _slice(a, need, size) for c, a in first.items()}
            need = 0
    if len(parts) == 1:
        return parts[0]
    return {c: _concat([p[c] for p in parts]) for c in columns}


def read_partition(partition: Partition, batch_rows: int) -> Iterator[tuple[int, dict[str, object]]]:
    """``(first row, {column: raw values})`` batches of the partition, ``batch_rows`` rows each.

    Rows are counted from 0 within each file (reported 1-based); raw values are NumPy or pyarrow arrays, for
    :func:`to_float64`. Raises :class:`DataError` for a file with no rows and, once the rows they share
    have been yielded, for side-by-side files that end at different rows.
    """
    streams = [(piece, _rows(piece, batch_rows)) for piece in partition.pieces]
    position = partition.pieces[0].start
    while True:
        batches = [_next(piece, stream) for piece, stream in streams]
        sizes = [0 if batch is None else _length(next(iter(batch.values()))) for batch in batches]
        common = min(sizes)
        if common:
            merged = {}
            for batch in batches:
                assert batch is not None
                merged.update({c: a if len(sizes) == 1 else _slice(a, 0, common) for c, a in batch.items()})
            yield position, merged
        if len(set(sizes)) > 1:
            short = partition.pieces[sizes.index(common)]
            raise _row_count_error(short, partition.pieces[sizes.index(max(sizes))].path, position + common)
        position += common
        if common < batch_rows:
            break
    if position == 0 and partition.pieces[0].start == 0:
        raise DataError(partition.pieces[0].path, "the file has no rows")
    if partition.pieces[0].stop is None and len(streams) > 1:
        # every file ended at a batch boundary; a longer one would have a row more
        for piece, stream in streams:
            if _next(piece, stream) is not None:
                short = next(p for p, _ in streams if p is not piece)
                raise _row_count_error(short, piece.path, position)


def _next(piece: Piece, stream: Iterator[dict[str, object]]) -> dict[str, object] | None:
    try:
        return next(stream)
    except StopIteration:
        return None
    except DataError:
        raise
    except Exception as error:  # a corrupt or truncated file, as pyarrow / zipfile report it
        raise DataError(piece.path, f"cannot read it: {error}") from None


_NUMERIC_KINDS = "biuf"


def _inexact_integers(values: np.ndarray) -> np.ndarray:
    """Where an integer array's values have no exact float64 value (only 64-bit integers can lack one)."""
    if values.dtype.itemsize < 8:
        return np.zeros(values.shape, bool)
    floats = values.astype(np.float64)
    # 2^63 (2^64 unsigned): the float nearest the largest values, itself out of the integer type's range
    fits = floats < float(np.iinfo(values.dtype).max) + 1.0
    back = np.where(fits, floats, 0.0).astype(values.dtype)
    return ~fits | (back != values)


def _inexact_problem(values: np.ndarray) -> tuple[int, str] | None:
    hits = np.flatnonzero(_inexact_integers(values))
    if not hits.size:
        return None
    row = int(hits[0])
    return row, f"integer {int(values[row])} cannot be converted to float64 exactly"


def to_float64(raw: object) -> tuple[np.ndarray, tuple[int, str] | None]:
    """The values as float64, up to the first missing or non-numeric one, or the first integer that float64
    cannot hold exactly (beyond 2^53 in magnitude, and odd enough).

    Returns ``(values, None)``, or ``(values before the problem, (its index, message))``: the caller checks
    the values before it too, so that the earliest bad row of all wins.
    """
    if isinstance(raw, np.ndarray):
        if raw.dtype.kind not in _NUMERIC_KINDS:
            return np.empty(0), (0, f"values of type {raw.dtype} are not numbers")
        if raw.ndim != 1:  # a field of a structured NPY array holding an array per row
            return np.empty(0), (0, f"each value is an array of shape {raw.shape[1:]}, not a number")
        problem = _inexact_problem(raw) if raw.dtype.kind in "iu" else None
        if problem is not None:
            return raw[: problem[0]].astype(np.float64), problem
        return raw.astype(np.float64), None
    import pyarrow as pa
    import pyarrow.compute as pc

    array = raw.combine_chunks() if isinstance(raw, pa.ChunkedArray) else raw
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    kind = array.type
    problems = []
    if array.null_count:
        problems.append((int(np.flatnonzero(np.asarray(array.is_null()))[0]), "missing value"))
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            converted = pc.cast(array, pa.float64())
        except pa.ArrowInvalid:
            row, text = _first_non_number(array)
            problems.append((row, f"{text!r} is not a number"))
        else:
            if not problems:
                return converted.to_numpy(zero_copy_only=False), None
    elif pa.types.is_integer(kind):
        # pyarrow's safe cast refuses every integer beyond 2^53, exact or not: checked here instead
        before_null = array.slice(0, problems[0][0]) if problems else array
        inexact = _inexact_problem(before_null.to_numpy(zero_copy_only=False))
        if inexact is not None:
            problems.append(inexact)
    elif not (pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        return np.empty(0), (0, f"values of type {kind} are not numbers")
    problem = min(problems) if problems else None
    if problem is not None:
        array = array.slice(0, problem[0])
    converted = pc.cast(array, pa.float64(), safe=not pa.types.is_integer(kind))
    values = np.asarray(converted.to_numpy(zero_copy_only=False), dtype=np.float64)
    return values, problem


def _first_non_number(array: object) -> tuple[int, str]:
    """The first value pyarrow cannot read as a number: bisection (the error names none)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def parses(start: int, stop: int) -> bool:
        try:
            pc.cast(array.slice(start, stop - start), pa.float64())  # type: ignore[attr-defined]
        except pa.ArrowInvalid:
            return False
        return True

    low, high = 0, len(array)  # type: ignore[arg-type]
    while high - low > 1:  # invariant: [0, low) parses, [0, high) does not
        middle = (low + high) // 2
        if parses(0, middle):
            low = middle
        else:
            high = middle
    return low, array[low].as_py()  # type: ignore[index]
