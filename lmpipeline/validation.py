"""Validation of the user's data files (the `validate_*` stages) with a Great Expectations suite.

Each line of the user's file, or each row of a table (`lmpipeline.sources`: Parquet, CSV, a saved
dataset), becomes a row (its position, decode/parse status, field values); a GX Expectation Suite
per dataset checks the rows; every unexpected row becomes a message `file:line: what is wrong`
(`file: row N: what is wrong` in a table without lines). Only a file that passes is written out,
in canonical form and, for prompt/response data, already split into train and eval by `seed`, so
downstream stages never see unvalidated data and the split is decided in one place.

The file is read as a stream, `validate.chunk_lines` lines (or rows) at a time: the checks of one
line (decoding, JSON, text, fields, lengths) run on each chunk, and what is written goes to a
temporary file as it is checked. The checks across lines (exact duplicates, and prompts on both
sides of the split) keep a 16-byte digest of each record and of each split key, not the texts, and
run once the file has been read, on a frame of those digests. Memory holds one chunk and the
digests, whatever the file's size; the outputs appear only once everything passed.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import tempfile
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from lmpipeline.conversations import (
    PAIR,
    NotAConversation,
    Shape,
    canonical,
    messages_of,
    shape_of,
)
from lmpipeline.data import (
    RawLine,
    canonical_json,
    eval_mask,
    follow_umask,
    prompt_key,
    publishing_dir,
    text_problem,
    visible,
)
from lmpipeline.errors import StageError
from lmpipeline.params import DATASET_FIELDS, Bounds, Params, SftBounds, ValidateParams
from lmpipeline.sources import RawRow, Source, open_source
from lmpipeline.text_repair import KINDS, repair

# GX would otherwise send usage analytics at import; this project never talks to the network.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
import great_expectations as gx
import great_expectations.expectations as gxe
from great_expectations.data_context.types.base import ProgressBarsConfig

RECORD = "record"  # pseudo-field of checks on the whole line


@dataclass(frozen=True)
class Dataset:
    name: str
    fields: tuple[str, ...]  # ("text",) for the corpus: one passage per line of its output
    jsonl: bool  # the output is JSONL records split into train and eval, not passages
    split_key: str | None = None  # field whose repeats across train/eval are leakage
    conversations: bool = False  # records in any of the shapes of lmpipeline.conversations


DATASETS = {
    "pretrain": Dataset("pretrain", DATASET_FIELDS["pretrain"], jsonl=False),
    # A conversation's first user turn and last assistant turn stand in its prompt and response
    # columns: the split key is the conversation's start, so no start lands on both sides.
    "sft": Dataset(
        "sft", ("prompt", "response"), jsonl=True, split_key="prompt", conversations=True
    ),
    "rag": Dataset("rag", DATASET_FIELDS["rag"], jsonl=True, split_key="question"),
}


@dataclass(frozen=True)
class Check:
    """One expectation, the field it speaks about, and how to word a failing row."""

    expectation: gxe.Expectation
    field: str
    message: Callable[[pd.Series], str]


@dataclass(frozen=True)
class Problem:
    line: int
    message: str


class ValidationFailed(StageError):
    """The file has `total` problems; `problems` are the first ones by position, up to
    `max_errors`: one `file:line: message` each (`file: row N: message` where `unit` is a row)."""

    def __init__(
        self, path: Path, problems: list[Problem], total: int, max_errors: int, unit: str = "line"
    ) -> None:
        super().__init__(f"{path}: {total} problem(s)")
        self.path, self.problems, self.total = path, problems[:max_errors], total
        self.unit = unit

    def where(self, position: int) -> str:
        if self.unit == "line":
            return f"{self.path}:{position}"
        return f"{self.path}: {self.unit} {position}" if position else str(self.path)

    def report(self, stage: str) -> str:
        """The problems as `file:line: message` lines (they name the file, not the stage)."""
        shown = [f"{self.where(p.line)}: {p.message}" for p in self.problems]
        if self.total > len(self.problems):
            shown.append(f"... and {self.total - len(self.problems)} more (validate.max_errors)")
        shown.append(f"{self.path}: {self.total} problem(s); nothing was written")
        return "\n".join(shown)


# --- rows --------------------------------------------------------------------------------------


class Shapes:
    """The shape of a file's records: the first record's (lmpipeline.conversations). Kept across
    the chunks of a file, so a record of another shape is found wherever it stands."""

    def __init__(self, bounds: SftBounds, unit: str) -> None:
        self.bounds = bounds  # of each turn: prompt's for system and user, response's for assistant
        self.unit = unit  # what a position counts: line or row
        self.first: tuple[Shape, int] | None = None

    def check(self, shape: Shape, number: int) -> None:
        if self.first is None:
            self.first = (shape, number)
        elif self.first[0] is not shape:
            first, at = self.first
            raise NotAConversation(
                f"a {shape.name} record in a file whose first record ({self.unit} {at}) is"
                f" {first.name}: one shape per file"
            )


def to_frame(
    lines: Iterable[RawLine | RawRow],
    ds: Dataset,
    source: Source,
    shapes: Shapes,
    repairing: bool,
) -> pd.DataFrame:
    """One row per non-blank line or table row: status columns, the kinds of repair made to it
    (with `repairing`), one column per field (with its length after stripping and whether
    anything visible is left), the canonical record."""
    rows = [_row(raw, ds, source, shapes, repairing) for raw in lines]
    derived = [f"{f}{suffix}" for f in ds.fields for suffix in (CHARS, VISIBLE)]
    status = ["line", "decoded", "parsed", "is_text", "shaped", "error", "obj", REPAIRS]
    objects = ["is_text", "shaped", "error", "obj", REPAIRS, *ds.fields, *derived, RECORD]
    return pd.DataFrame(rows, columns=[*status, *ds.fields, *derived, WORDS, EXTRA, RECORD]).astype(
        dict.fromkeys(objects, object)
    )


CHARS = "__chars"  # suffix of a field's length column: characters after stripping
VISIBLE = "__visible"  # suffix of a field's column: is anything visible left after stripping
WORDS = "__words"  # words of the record's texts (all turns of a conversation)
EXTRA = "__extra"  # does the record hold keys its shape does not read
REPAIRS = "repairs"  # column of the kinds of repair made to a line (`text_repair.KINDS`)


class DuplicateKey(ValueError):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that names each key once: json.loads would keep the last silently."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise DuplicateKey(f"key {key!r} appears twice in the object; keep one")
        seen.add(key)
    return dict(pairs)


def parse_object(text: str) -> tuple[Any, str | None]:
    """The JSON value of a line, or why it is not one (never an exception)."""
    try:
        return json.loads(text, object_pairs_hook=_object), None
    except json.JSONDecodeError as err:
        return None, f"{err.msg} (column {err.colno})"
    except DuplicateKey as err:
        return None, str(err)
    except ValueError as err:  # an integer of thousands of digits
        return None, f"a value Python's JSON reader refuses: {err}"
    except RecursionError:
        return None, "nested deeper than Python's JSON reader allows"


def _row(
    raw: RawLine | RawRow, ds: Dataset, source: Source, shapes: Shapes, repairing: bool
) -> dict[str, Any]:
    row: dict[str, Any] = {"line": raw.number, "decoded": True, "parsed": False, "error": None}
    row[REPAIRS] = ()
    if isinstance(raw, RawRow):  # a table's row: parsed already, its cells checked below
        obj, row["error"] = raw.record, raw.error
        if obj is None:
            return row
        problem = None
    elif raw.text is None:
        return {**row, "decoded": False, "error": raw.decode_error}
    else:
        # The line itself first: a raw control character or a byte-order mark is no text, in a
        # JSON line as in a passage (JSON would only say "invalid control character"). What a
        # repair mends is checked again once repaired, the rest before: no repair may hide it.
        obj = {"text": raw.text.strip()}
        problem = text_problem(raw.text, multiline=False, repairable=repairing)
        if source.records and problem is None:
            obj, row["error"] = parse_object(raw.text)
            if row["error"] is not None:
                return row
            if not isinstance(obj, dict):
                row["error"] = f"a JSON {type(obj).__name__}, not an object"
                return row
    shape = Shape(ds.name, ds.fields)
    if source.records and problem is None:
        obj, row["error"] = source.mapped(obj)
        if row["error"] is not None:
            return row
        shape = shape_of(obj) if ds.conversations else shape
        problem = _fields_problem(obj, shape.keys, ds, source, repairing)
    if repairing and problem is None:
        # A passage unstripped: str.strip() also takes a NEL (U+0085) that must be refused.
        whole = obj if source.records else {"text": raw.text}  # type: ignore[union-attr]
        obj, row[REPAIRS], problem = _repaired(whole, shape.keys, ds, source)
    row.update(parsed=True, is_text=problem is None, error=problem, obj=obj)
    if problem is not None:  # what is not text goes no further, not even into pandas' columns
        return row
    values = {f: obj.get(f) for f in ds.fields}
    if not ds.jsonl:  # a passage from a record is stripped, as a line of a .txt file is
        values = {f: v.strip() if isinstance(v, str) else v for f, v in values.items()}
    record, texts = values, list(values.values())
    if ds.conversations:
        try:
            shapes.check(shape, raw.number)
            turns = None if shape is PAIR else messages_of(obj, shape, shapes.bounds)
        except NotAConversation as err:
            row.update(shaped=False, error=str(err))
            return row
        record = canonical(obj, shape, turns)
        if turns is not None:
            texts = [t["content"] for t in turns]
            values = {
                "prompt": next(t["content"] for t in turns if t["role"] == "user"),
                "response": turns[-1]["content"],
            }
    row["shaped"] = True
    for f, value in values.items():
        row[f] = value
        if isinstance(value, str):
            row[f + CHARS] = len(value.strip())
            row[f + VISIBLE] = bool(visible(value))
    row[WORDS] = sum(len(t.split()) for t in texts if isinstance(t, str))
    row[EXTRA] = bool(set(obj) - set(shape.keys))
    row[RECORD] = _canonical(record)
    return row


LINE_BREAK = re.compile("[\n\r]")


def _fields_problem(
    obj: dict[str, Any], keys: tuple[str, ...], ds: Dataset, source: Source, repairing: bool
) -> str | None:
    """What in the strings of a record's `keys` (a conversation's turns included) is not text,
    or None: JSON escapes such as \\u0000 decode to what a line could not hold, and a table's
    cell holds anything. A passage is one line of the corpus: it is stripped, as a line of a .txt
    file is (so a cell's trailing line break goes), and a line break inside it is refused."""
    for f in keys:
        for value in _strings(obj.get(f)):
            inside = (len(value) - len(value.lstrip()), len(value.rstrip()))
            if not ds.jsonl and (found := LINE_BREAK.search(value, *inside)):
                return (
                    f"'{source.name(f)}' holds a line break at column {found.start() + 1}; a"
                    " passage is one line: give each passage a row of its own"
                )
            if problem := text_problem(value, multiline=True, repairable=repairing):
                return f"'{source.name(f)}' holds a {problem}"
    return None


def _strings(value: Any) -> Iterator[str]:
    """The strings in a field's value: itself, or those of the turns of a conversation."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                yield from (v for v in item.values() if isinstance(v, str))


def _canonical(values: dict[str, Any]) -> str | None:
    """The canonical JSON of a record's fields; None where a value has no JSON form (bytes, a
    date from a Parquet file), which the field's type check reports."""
    try:
        return canonical_json(values)
    except TypeError:
        return None


def _repaired(
    obj: dict[str, Any], keys: tuple[str, ...], ds: Dataset, source: Source
) -> tuple[dict[str, Any], tuple[str, ...], str | None]:
    """`obj` with the strings of its `keys` repaired (a conversation's turns included), the kinds
    of repair made, and what still makes one of them no text: a C1 control that was no
    mojibake, or what a repair decoded."""
    obj, made = dict(obj), set()

    def fixed(f: str, text: str) -> str:
        new, kinds = repair(text)
        if problem := text_problem(new, multiline=source.records):
            where = ", in the repaired text" if kinds else ""  # its columns are the repaired ones
            raise _NotText(
                f"'{source.name(f)}' holds a {problem}{where}"
                if source.records
                else problem + where
            )
        made.update(kinds)
        return new if source.records else new.strip()  # a passage is stripped, as before

    try:
        for f in keys:
            value = obj.get(f)
            if isinstance(value, str):
                obj[f] = fixed(f, value)
            elif isinstance(value, list):  # a conversation: the strings of each turn
                obj[f] = [
                    {k: fixed(f, v) if isinstance(v, str) else v for k, v in item.items()}
                    if isinstance(item, dict)
                    else item
                    for item in value
                ]
    except _NotText as err:
        return obj, (), str(err)
    return obj, tuple(k for k in KINDS if k in made), None


class _NotText(ValueError):
    """What a repaired string still holds that is no text."""


# --- the suite ---------------------------------------------------------------------------------


def row_checks(ds: Dataset, params: Params, source: Source) -> list[Check]:
    """The expectations on each line or row alone, in the order problems are worth reporting."""
    checks = [
        Check(
            gxe.ExpectColumnValuesToBeInSet(column="decoded", value_set=[True]),
            RECORD,
            lambda r: f"not valid UTF-8 ({r['error']}); re-save the file as UTF-8",
        )
    ]
    if source.records:
        checks.append(
            Check(
                gxe.ExpectColumnValuesToBeInSet(column="parsed", value_set=[True]),
                RECORD,
                lambda r: f"not one well-formed {source.shape}: {r['error']}",
            )
        )
    checks.append(
        Check(
            # null where the line did not decode or parse: those checks above speak for it
            gxe.ExpectColumnValuesToBeInSet(column="is_text", value_set=[True]),
            RECORD,
            lambda r: f"not text: {r['error']}",
        )
    )
    if ds.conversations:
        checks.append(
            Check(
                # null where the line did not get this far: the checks above speak for it
                gxe.ExpectColumnValuesToBeInSet(column="shaped", value_set=[True]),
                RECORD,
                lambda r: str(r["error"]),
            )
        )
    bounds = getattr(params.validate, ds.name)
    for name in ds.fields:
        checks += _field_checks(f"validate.{ds.name}.{name}", name, getattr(bounds, name), source)
    return checks


def cross_checks(ds: Dataset, source: Source) -> list[Check]:
    """The expectations across lines or rows, on the frame of digests (`Digests.frame`)."""
    unit = source.unit
    checks = [
        Check(
            gxe.ExpectColumnValuesToBeUnique(column=RECORD),
            RECORD,
            lambda r: (
                f"exact duplicate of {unit}(s) "
                f"{_lines([n for n in r['copies'] if n != r['line']])}; keep one copy"
            ),
        )
    ]
    if ds.split_key:
        key = source.name(ds.split_key)
        checks.append(
            Check(
                gxe.ExpectColumnValuesToBeNull(column="leaks_to"),
                RECORD,
                lambda r: (
                    f"{key} also at {unit}(s) {_lines(r['leaks_to'])}, which the split puts on "
                    f"the other side of train/eval (leakage); merge or reword the repeats"
                ),
            )
        )
    return checks


def _field_checks(param: str, name: str, bounds: Bounds, source: Source) -> list[Check]:
    label = source.name(name)  # the file's name for the field: messages speak of its columns
    mapped = f" (data.columns.{source.dataset} maps it onto '{name}')" if label != name else ""
    return [
        Check(
            gxe.ExpectColumnValuesToNotBeNull(column=name),
            name,
            lambda r: (
                f"'{label}' is null" if name in r["obj"] else f"missing key '{label}'{mapped}"
            ),
        ),
        Check(
            gxe.ExpectColumnValuesToBeOfType(column=name, type_="str"),
            name,
            lambda r: f"'{label}' must be a string, got {type(r[name]).__name__} {r[name]!r:.40}",
        ),
        Check(
            gxe.ExpectColumnValuesToBeInSet(column=name + VISIBLE, value_set=[True]),
            name,
            lambda r: f"'{label}' is empty once whitespace and invisible characters are removed",
        ),
        Check(
            gxe.ExpectColumnValuesToBeBetween(
                column=name + CHARS, min_value=bounds.min_chars, max_value=bounds.max_chars
            ),
            name,
            lambda r: (
                # int: the column is float in a chunk where another line has no count (NaN),
                # and the message must not depend on how the file was cut into chunks.
                f"'{label}' has {int(r[name + CHARS])} characters once stripped, outside "
                f"[{bounds.min_chars}, {bounds.max_chars}] ({param} in params.yaml)"
            ),
        ),
    ]


def _lines(lines: list[int]) -> str:
    return ", ".join(str(n) for n in lines)


ZERO = bytes(16)  # the digest slot of a row without a record or a split key


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass
class Outcome:
    """One expectation's result over the whole file, summed over the chunks it ran on."""

    type: str
    column: str
    kwargs: dict[str, Any]
    checked: int | None = 0  # None where GX gave no element count
    unexpected: int = 0
    success: bool = True


class Suite:
    """`checks` as one GX Expectation Suite, run on frame after frame (the chunks of a file);
    `outcomes` holds each expectation's result summed over them, in the suite's order."""

    def __init__(self, name: str, checks: list[Check]) -> None:
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        asset = context.data_sources.add_pandas(name).add_dataframe_asset(name)
        self.batches = asset.add_batch_definition_whole_dataframe("all")
        self.suite = gx.ExpectationSuite(name=name)
        for i, check in enumerate(checks):
            self.suite.add_expectation(check.expectation.copy(update={"meta": {"check": i}}))
        self.checks = checks
        self.tally: dict[int, Outcome] = {}

    @property
    def outcomes(self) -> list[Outcome]:
        return list(self.tally.values())

    def run(self, frame: pd.DataFrame) -> list[Problem]:
        """Validate `frame`; one problem per line and field, the first failing check wins."""
        batch = self.batches.get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(self.suite, result_format={"result_format": "COMPLETE"})
        failed: dict[tuple[int, str], tuple[int, str]] = {}
        for res in result.results:
            if (res.exception_info or {}).get("raised_exception"):
                raise RuntimeError(f"GX check failed to run: {res.exception_info}")
            i = res.expectation_config.meta["check"]
            self.count(i, res)
            check = self.checks[i]
            for idx in res.result.get("unexpected_index_list") or []:
                row = frame.loc[idx]
                # A line that did not decode, parse or hold text has no fields to speak of.
                usable = row["parsed"] and row["is_text"] and row["shaped"]
                if check.field != RECORD and not usable:
                    continue
                slot = (int(row["line"]), check.field if usable else RECORD)
                if slot not in failed or failed[slot][0] > i:
                    failed[slot] = (i, check.message(row))
        return sorted(
            (Problem(line, msg) for (line, _), (_, msg) in failed.items()), key=lambda p: p.line
        )

    def count(self, i: int, res: Any) -> None:
        cfg = res.expectation_config
        if i not in self.tally:
            kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("column", "batch_id")}
            self.tally[i] = Outcome(cfg.type, cfg.kwargs.get("column", ""), kwargs)
        outcome, checked = self.tally[i], res.result.get("element_count")
        known = checked is not None and outcome.checked is not None
        outcome.checked = outcome.checked + checked if known else None
        outcome.unexpected += res.result.get("unexpected_count", 0)
        outcome.success = outcome.success and bool(res.success)


def repeated(digests: bytearray, rows: np.ndarray) -> Iterator[np.ndarray]:
    """For each digest that two or more of `rows` share, those rows in file order."""
    keys = np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2)[rows]
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    keys, rows = keys[order], rows[order]
    starts = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]).any(axis=1)])
    ends = np.r_[starts[1:], len(rows)]
    for a, b in zip(starts[ends - starts > 1], ends[ends - starts > 1], strict=True):
        yield np.sort(rows[a:b])


@dataclass
class Digests:
    """What the checks across lines keep of every row of a file: its line, whether it parsed,
    a 16-byte digest of its canonical record (rows that hold text) and of its split key (parsed
    rows whose key is a string). About 40 bytes a row, whatever the length of its texts."""

    lines: array = field(default_factory=lambda: array("q"))
    parsed: bytearray = field(default_factory=bytearray)
    usable: bytearray = field(default_factory=bytearray)
    keyed: bytearray = field(default_factory=bytearray)
    records: bytearray = field(default_factory=bytearray)
    keys: bytearray = field(default_factory=bytearray)

    def add(self, frame: pd.DataFrame, split_key: str | None) -> None:
        keys = frame[split_key] if split_key else [None] * len(frame)
        columns = (frame["line"], frame["parsed"], frame[RECORD], keys)
        for line, parsed, record, key in zip(*columns, strict=True):
            has_key, usable = bool(parsed) and isinstance(key, str), isinstance(record, str)
            self.lines.append(int(line))
            self.parsed.append(bool(parsed))
            self.usable.append(usable)
            self.keyed.append(has_key)
            self.records += digest(record) if usable else ZERO
            self.keys += digest(prompt_key(key)) if has_key else ZERO

    def frame(self, eval_fraction: float, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
        """The frame the checks across lines run on (one row per line: its record digest, the
        lines of its copies, the lines its split key also stands at on the other side of the
        split), and which rows the split holds out."""
        lines = np.frombuffer(self.lines, dtype=np.int64)
        usable = np.frombuffer(self.usable, dtype=bool)
        parsed = np.frombuffer(self.parsed, dtype=bool)
        held_out = np.zeros(len(lines), dtype=bool)
        held_out[parsed] = eval_mask(int(parsed.sum()), eval_fraction, seed)
        records = np.full(len(lines), None, dtype=object)
        for row in np.flatnonzero(usable):
            records[row] = bytes(self.records[16 * row : 16 * row + 16])
        copies = np.full(len(lines), None, dtype=object)
        for rows in repeated(self.records, np.flatnonzero(usable)):
            for row in rows:
                copies[row] = lines[rows].tolist()
        leaks_to = np.full(len(lines), None, dtype=object)
        for rows in repeated(self.keys, np.flatnonzero(np.frombuffer(self.keyed, dtype=bool))):
            for row in rows[usable[rows]]:  # a line without text is reported for that alone
                other = rows[held_out[rows] != held_out[row]]
                if len(other):
                    leaks_to[row] = lines[other].tolist()
        frame = pd.DataFrame(
            {"line": lines, "parsed": usable, "is_text": usable, "shaped": usable, RECORD: records}
        ).assign(copies=copies, leaks_to=leaks_to)
        return frame, held_out


SHOWN_LINES = 5  # the lines of each kind of repair that the report names


@dataclass
class Repairs:
    """The lines each kind of repair changed: how many, and the first `SHOWN_LINES` of them."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    first: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in KINDS})

    def __bool__(self) -> bool:
        return any(self.counts.values())

    def add(self, frame: pd.DataFrame) -> None:
        """Count the repairs of a chunk's rows (chunks come in file order)."""
        for line, kinds in zip(frame["line"], frame[REPAIRS], strict=True):
            for kind in kinds:
                self.counts[kind] += 1
                if len(self.first[kind]) < SHOWN_LINES:
                    self.first[kind].append(int(line))


@dataclass
class Scan:
    """What one pass over a file found: the digests, the first problems of single lines (up to
    `validate.max_errors`, in file order) and their number, the counts of its records and the
    repairs made."""

    digests: Digests = field(default_factory=Digests)
    problems: list[Problem] = field(default_factory=list)
    total: int = 0
    records: int = 0
    words: int = 0
    with_extra_fields: int = 0
    repairs: Repairs = field(default_factory=Repairs)


def scan(source: Source, ds: Dataset, suite: Suite, staged: IO[str], cfg: ValidateParams) -> Scan:
    """Check each line or row of `source`, `validate.chunk_lines` at a time, repaired first under
    `validate.text: repair`, and write the records that hold text to `staged` as they pass (the
    text of a passage, or the canonical JSON of a record)."""
    found, shapes = Scan(), Shapes(cfg.sft, source.unit)
    # A bar in a terminal only: messages and logs keep one line per problem.
    bar = tqdm(
        source.rows(),
        desc=f"validate {ds.name}",
        unit=f" {source.unit}s",
        unit_scale=True,
        disable=None,
        leave=False,
    )
    lines = iter(bar)  # one iterator: each chunk takes up where the last one stopped
    for chunk in iter(lambda: list(itertools.islice(lines, cfg.chunk_lines)), []):
        frame = to_frame(chunk, ds, source, shapes, repairing=cfg.text == "repair")
        problems = suite.run(frame)
        found.problems += problems[: cfg.max_errors - len(found.problems)]
        found.total += len(problems)
        found.digests.add(frame, ds.split_key)
        found.repairs.add(frame)
        found.records += len(frame)
        kept = frame[frame[RECORD].notna()]
        if found.total:  # nothing will be written: only the checks go on
            continue
        found.words += int(kept[WORDS].sum())
        found.with_extra_fields += int(kept[EXTRA].sum())
        staged.writelines(t + "\n" for t in (kept[RECORD] if ds.jsonl else kept["text"]))
    return found


Golds = Callable[[Sequence[str]], list[list[str]]]  # answers -> the chunk ids stating each


def publish_splits(
    staged: IO[str], held_out: np.ndarray, output: Path, golds: Golds | None, chunk_lines: int
) -> dict[str, dict[str, int]]:
    """Write the staged records to `output`'s train.jsonl and eval.jsonl as one unit; with
    `golds`, each record gains its `gold` chunk ids, counted per split."""
    counts = {s: {"in_corpus": 0, "not_in_corpus": 0} for s in ("train", "eval")}
    with publishing_dir(output) as new:
        files = {
            split: (new / f"{split}.jsonl").open("w", encoding="utf-8", newline="\n")
            for split in ("train", "eval")
        }
        with files["train"], files["eval"]:
            flags = iter(held_out.tolist())
            for chunk in iter(lambda: list(itertools.islice(staged, chunk_lines)), []):
                ids = golds([json.loads(t)["answer"] for t in chunk]) if golds else None
                for n, text in enumerate(chunk):
                    split = "eval" if next(flags) else "train"
                    if ids is not None:
                        text = canonical_json({**json.loads(text), "gold": ids[n]}) + "\n"
                        counts[split]["in_corpus" if ids[n] else "not_in_corpus"] += 1
                    files[split].write(text)
    return counts


@dataclass
class Checked:
    """What the report tells of a file that passed, besides its counts: each expectation's
    outcome and the repairs made."""

    outcomes: list[Outcome]
    repairs: Repairs


def validate_file(
    path: Path,
    ds: Dataset,
    params: Params,
    output: Path,
    golds: Callable[[], Golds] | None = None,
) -> tuple[dict[str, Any], Checked]:
    """Check `path` and, only if it passes, write its canonical form to `output` (a text file,
    or train.jsonl and eval.jsonl split by `seed`, each question with the gold chunk ids of the
    rule `golds` makes, once the file has passed), repaired under `validate.text: repair`.
    Return the counts (deterministic: no paths, no timestamps), each expectation's outcome and
    the repairs; raise ValidationFailed, having written nothing, when it does not pass."""
    cfg = params.validate
    columns = getattr(params.data.columns, ds.name)
    source = open_source(path, ds.name, DATASET_FIELDS[ds.name], columns)
    row_suite = Suite(ds.name, row_checks(ds, params, source))
    cross_suite = Suite(f"{ds.name}_across_lines", cross_checks(ds, source))
    # Staged beside the output (a rename publishes it); folders made for it go if it fails.
    made = [d for d in (output.parent, *output.parent.parents) if not d.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w+", encoding="utf-8", newline="\n") as staged:
            follow_umask(fd)  # pretrain's output, once renamed
            found = scan(source, ds, row_suite, staged, cfg)
            fraction = getattr(params, ds.name).eval_fraction if ds.split_key else 0.0
            frame, held_out = found.digests.frame(fraction, params.seed)
            across = cross_suite.run(frame)
            problems = sorted(found.problems + across, key=lambda p: p.line)
            total = found.total + len(across)
            if found.records == 0 and not problems:
                problems, total = [Problem(0, "no records: the file is empty")], 1
            if problems:
                raise ValidationFailed(path, problems, total, cfg.max_errors, source.unit)
            metrics: dict[str, Any] = {
                "records": found.records,
                "words": found.words,
                "expectations": len(row_suite.checks) + len(cross_suite.checks),
                "with_extra_fields": found.with_extra_fields,
            }
            if ds.split_key:
                metrics["train"] = int((~held_out).sum())
                metrics["eval"] = int(held_out.sum())
            if found.repairs:  # only then: a file that needs none keeps the counts it had
                metrics["repairs"] = found.repairs.counts
            staged.seek(0)
            if ds.jsonl:
                rule = golds() if golds else None
                counts = publish_splits(staged, held_out, output, rule, cfg.chunk_lines)
                if golds:
                    metrics["gold"] = counts
        if not ds.jsonl:
            os.replace(name, output)  # the staged passages are the canonical file
    except BaseException:
        Path(name).unlink(missing_ok=True)
        for folder in made:  # innermost first; each is empty unless someone else wrote there
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    Path(name).unlink(missing_ok=True)
    return metrics, Checked([*row_suite.outcomes, *cross_suite.outcomes], found.repairs)


def render_report(source: str, ds: Dataset, checked: Checked, metrics: dict[str, Any]) -> str:
    """A Markdown report of the suite that a person (or GitHub) reads."""
    outcomes = checked.outcomes
    lines = [
        f"# Validation of `{source}`",
        "",
        f"Expectation suite `{ds.name}` (Great Expectations): "
        f"{sum(o.success for o in outcomes)}/{len(outcomes)} expectations met.",
        "",
        "| expectation | column | arguments | rows checked | unexpected |",
        "|---|---|---|---:|---:|",
    ]
    for o in outcomes:
        rows = "" if o.checked is None else o.checked
        lines.append(
            f"| {o.type} | {o.column} | {json.dumps(o.kwargs, sort_keys=True)}"
            f" | {rows} | {o.unexpected} |"
        )
    if checked.repairs:
        lines += _repairs_section(checked.repairs)
    lines += ["", "## Counts", "", "```json", json.dumps(metrics, indent=2, sort_keys=True), "```"]
    return "\n".join(lines) + "\n"


def _repairs_section(repairs: Repairs) -> list[str]:
    lines = [
        "",
        "## Repairs",
        "",
        "`validate.text: repair` mended these lines before checking them; the canonical output"
        " holds the repaired text.",
        "",
        "| repair | lines | first lines |",
        "|---|---:|---|",
    ]
    for kind, count in repairs.counts.items():
        if count:
            shown = _lines(repairs.first[kind]) + (", ..." if count > SHOWN_LINES else "")
            lines.append(f"| {kind} | {count} | {shown} |")
    return lines
