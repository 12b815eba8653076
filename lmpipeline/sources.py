"""The user's data as it comes: a file of lines (.jsonl, .txt), a table (.parquet, .csv) or a
folder saved by `datasets` (`Dataset.save_to_disk`), read as a stream of rows for validation.

Each kind yields the same units: a `RawLine` (a line of a .jsonl or .txt file, decoded on its
own so that a bad byte is reported at its line; or a CSV row that could not be decoded) or a
`RawRow` (a table's row, already parsed into column -> value, or why it could not be). The
validation checks a row's values exactly as it checks the object of a JSON line, so a table gives
the same canonical output, and refuses with the same messages, as the same records in JSONL.

Nothing is read whole: lines and CSV rows one at a time, a Parquet file by bounded batches of
its row groups, a saved dataset (memory-mapped Arrow files) by batches. A position in a message
is the line where a record starts in a file of lines or a CSV file (editors show it), and the
1-based row number in a Parquet file or a saved dataset, where lines mean nothing.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from lmpipeline.data import BOM, RawLine, open_input, read_lines
from lmpipeline.errors import StageError

KINDS = {".jsonl": "jsonl", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}
SAVED = "dataset"  # the kind of a folder saved by Dataset.save_to_disk
ACCEPTED = ".jsonl, .txt (pretrain only), .parquet, .csv, or a folder saved by Dataset.save_to_disk"
BATCH_ROWS = 1024  # table rows turned into Python objects at a time: one bounded batch in memory


@dataclass(frozen=True)
class RawRow:
    """One row of a table: its values by the file's column names (Python objects: a list of
    structs comes as a list of dicts), or why it is not a well-formed row."""

    number: int  # CSV: the line where the row starts; Parquet, saved dataset: 1-based row
    record: dict[str, Any] | None
    error: str | None = None


@dataclass(frozen=True)
class Source:
    """The user's data for one dataset: where it is, its kind, and its column mapping."""

    path: Path
    dataset: str  # pretrain | sft | rag
    fields: tuple[str, ...]  # the dataset's own: what the mapping maps onto
    kind: str  # text | jsonl | csv | parquet | dataset
    columns: Mapping[str, str]  # the file's column -> ours (data.columns.<dataset>)

    @property
    def records(self) -> bool:
        """Whether each line or row is a record of named fields (not a passage of a .txt)."""
        return self.kind != "text"

    @property
    def unit(self) -> str:
        """What a position counts: lines of the file, or rows of a table without lines."""
        return "row" if self.kind in ("parquet", SAVED) else "line"

    @property
    def shape(self) -> str:
        """What one record must be, in a message about a record that is not one."""
        return "CSV row" if self.kind == "csv" else "JSON object"

    def name(self, field: str) -> str:
        """The file's name for one of our fields: the column mapped onto it, or its own."""
        return next((theirs for theirs, ours in self.columns.items() if ours == field), field)

    def mapped(self, record: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """`record` under our field names, and why it cannot be where a mapped key meets a key
        of the name it maps onto (one of the two would be lost)."""
        for theirs, ours in self.columns.items():
            if theirs != ours and theirs in record and ours in record and ours not in self.columns:
                return record, (
                    f"'{theirs}' and '{ours}' both give '{ours}' (data.columns.{self.dataset}"
                    f" maps {theirs} onto {ours}); keep one"
                )
        return {self.columns.get(key, key): value for key, value in record.items()}, None

    def check_columns(self, names: Sequence[str], where: str) -> None:
        """A table's column names against the mapping, once for the whole file: a name twice,
        a mapped column that is not there, one that clashes, or none of ours at all (a mapping
        forgotten: every row would lack every field) is a one-line error."""
        twice = [name for name, n in Counter(names).items() if n > 1]
        if twice:
            raise StageError(f"{where}: column {twice[0]!r} appears twice; rename one")
        for theirs, ours in self.columns.items():
            if theirs not in names:
                raise StageError(
                    f"{where}: no column {theirs!r}, which data.columns.{self.dataset} maps onto"
                    f" {ours!r} (the columns: {', '.join(names)})"
                )
        ours, clash = self.mapped(dict.fromkeys(names))
        if clash:
            raise StageError(f"{where}: columns {clash}")
        if not set(self.fields) & set(ours):
            raise StageError(
                f"{where}: none of the columns ({', '.join(names)}) is one of {self.dataset}'s"
                f" fields ({', '.join(self.fields)}); rename one, or map it onto ours in"
                f" data.columns.{self.dataset}"
            )

    def rows(self) -> Iterator[RawLine | RawRow]:
        """The non-blank lines or the rows of the source, in order, as they are read."""
        if self.kind in ("text", "jsonl"):
            return read_lines(self.path)
        readers = {"csv": _csv_rows, "parquet": _parquet_rows, SAVED: _saved_rows}
        return readers[self.kind](self)


def open_source(
    path: Path, dataset: str, fields: tuple[str, ...], columns: Mapping[str, str]
) -> Source:
    """The source at `path` for `dataset`, its kind decided by its suffix (or being a folder),
    or a one-line error saying which kinds there are."""
    kind = SAVED if path.is_dir() else KINDS.get(path.suffix.lower())
    if kind is None:
        raise StageError(f"{path}: not a kind of file the validation reads; give {ACCEPTED}")
    if kind == "text" and dataset != "pretrain":
        raise StageError(
            f"{path}: a .txt file is a corpus of passages, one per line; {dataset} records come"
            " as .jsonl, .parquet, .csv, or a folder saved by Dataset.save_to_disk"
        )
    if kind == "text" and columns:
        raise StageError(
            f"{path}: data.columns.{dataset} maps columns, but a .txt file has none (one passage"
            " per line); remove the mapping, or give a table with a text column"
        )
    return Source(path, dataset, fields, kind, columns)


# --- CSV ----------------------------------------------------------------------------------------


class _Lines:
    """The lines of a binary file, each decoded on its own, for the csv module: an undecodable
    line goes on (with replacement characters, so the row's end is still found) and leaves its
    line number and bad byte in `bad` for the row that holds it."""

    def __init__(self, f: IO[bytes]) -> None:
        self.lines = enumerate(f, start=1)  # a binary file splits at b"\n" only
        self.bad: list[tuple[int, str]] = []

    def __iter__(self) -> Iterator[str]:
        for number, raw in self.lines:
            if number == 1:
                raw = raw.removeprefix(BOM)
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as err:
                self.bad.append((number, f"byte 0x{raw[err.start]:02x} at column {err.start + 1}"))
                yield raw.decode("utf-8", "replace")


# The csv module's words for a malformed row, in a user's words.
CSV_ERRORS = {
    "new-line character seen in unquoted field": "a line break (CR) inside an unquoted cell;"
    " quote the cell",
    "unexpected end of data": "a quoted cell that is never closed (a missing '\"')",
    "',' expected after '\"'": "a '\"' inside a quoted cell must be doubled ('\"\"')",
    "field larger than field limit": "a cell longer than Python's csv limit of 131072"
    " characters; give such texts as .jsonl or .parquet",
}


def _csv_problem(err: csv.Error) -> str:
    text = str(err)
    return next((ours for theirs, ours in CSV_ERRORS.items() if text.startswith(theirs)), text)


def _csv_cells(path: Path) -> Iterator[tuple[int, list[str], str | None, str | None]]:
    """Each row of a CSV file: the line it starts at, its cells, and why it could not be
    decoded or parsed (then no cells). An empty line is skipped, as pandas skips it; a line of
    spaces is a row (a cell of spaces, in a file of one column: the checks call it empty)."""
    with open_input(path) as f:
        lines = _Lines(f)
        reader = csv.reader(lines, strict=True)  # strict: a stray quote is an error, not data
        while True:
            start, lines.bad = reader.line_num + 1, []
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield start, [], None, _csv_problem(err)
                continue
            if lines.bad:
                line, where = lines.bad[0]
                yield start, [], where + (f" of line {line}" if line != start else ""), None
            elif cells:
                yield start, cells, None, None


def _csv_rows(source: Source) -> Iterator[RawLine | RawRow]:
    """The rows of a CSV file (UTF-8, an optional BOM, the header on its first non-blank line)
    as column -> cell. Every cell is a string, as the file holds it: no number is guessed, and
    an empty cell is the empty string (which the checks refuse where text is needed)."""
    header: list[str] = []
    for start, cells, undecodable, malformed in _csv_cells(source.path):
        if not header:
            if undecodable or malformed:
                problem = f"not valid UTF-8 ({undecodable})" if undecodable else malformed
                raise StageError(f"{source.path}:{start}: the header row: {problem}")
            header = cells
            source.check_columns(header, f"{source.path}:{start}")
        elif undecodable:
            yield RawLine(start, None, undecodable)
        elif malformed:
            yield RawRow(start, None, malformed)
        elif len(cells) != len(header):
            yield RawRow(start, None, f"{len(cells)} cells where the header has {len(header)}")
        else:
            yield RawRow(start, dict(zip(header, cells, strict=True)))


# --- Arrow: Parquet files and saved datasets ---------------------------------------------------


def _numbered(batches: Iterable[pa.RecordBatch | pa.Table], path: Path) -> Iterator[RawRow]:
    """The rows of Arrow batches as Python objects, numbered from 1."""
    number = 0
    try:
        for batch in batches:
            for record in batch.to_pylist():
                number += 1
                yield RawRow(number, record)
    except pa.ArrowException as err:
        raise StageError(f"{path}: row {number + 1}: unreadable ({err})") from None


def _parquet_rows(source: Source) -> Iterator[RawRow]:
    with open_input(source.path) as f:
        try:
            table = pq.ParquetFile(f)
        except pa.ArrowException as err:
            raise StageError(f"{source.path}: not a Parquet file ({err})") from None
        source.check_columns(table.schema_arrow.names, str(source.path))
        # Row group by row group, BATCH_ROWS rows at a time: never the whole file in memory.
        yield from _numbered(table.iter_batches(batch_size=BATCH_ROWS), source.path)


def _saved_rows(source: Source) -> Iterator[RawRow]:
    import datasets  # seconds to import: only a saved dataset needs it

    try:
        saved = datasets.load_from_disk(str(source.path), keep_in_memory=False)  # memory-mapped
    except FileNotFoundError:
        raise StageError(
            f"{source.path}: a directory, not a dataset saved by Dataset.save_to_disk (it has"
            " no dataset_info.json and state.json); give a file or such a folder"
        ) from None
    if isinstance(saved, datasets.DatasetDict):
        raise StageError(
            f"{source.path}: a DatasetDict of splits {', '.join(saved)}; give one split's"
            f" folder, such as {source.path / next(iter(saved))}"
        )
    source.check_columns(saved.column_names, str(source.path))
    # Arrow batches, not Python rows: no feature (an Image, an Audio) is decoded on the way.
    yield from _numbered(saved.with_format("arrow").iter(batch_size=BATCH_ROWS), source.path)
