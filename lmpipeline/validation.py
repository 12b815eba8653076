"""Validation of the user's data files (the `validate_*` stages) with a Great Expectations suite.

Each line of the user's file becomes a row (line number, decode/parse status, field values);
a GX Expectation Suite per dataset checks the rows; every unexpected row becomes a message
`file:line: what is wrong`. Only a file that passes is written out, in canonical form and, for
prompt/response data, already split into train and eval by `seed`, so downstream stages never
see unvalidated data and the split is decided in one place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lmpipeline.data import (
    RawLine,
    canonical_json,
    eval_mask,
    jsonl_text,
    prompt_key,
    publish_dir,
    read_lines,
    text_problem,
    visible,
    write_text_atomic,
)
from lmpipeline.errors import StageError
from lmpipeline.params import Bounds, Params

# GX would otherwise send usage analytics at import; this project never talks to the network.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
import great_expectations as gx
import great_expectations.expectations as gxe
from great_expectations.data_context.types.base import ProgressBarsConfig

RECORD = "record"  # pseudo-field of checks on the whole line


@dataclass(frozen=True)
class Dataset:
    name: str
    fields: tuple[str, ...]  # ("text",) for plain text, one passage per line
    jsonl: bool
    split_key: str | None = None  # field whose repeats across train/eval are leakage


DATASETS = {
    "pretrain": Dataset("pretrain", ("text",), jsonl=False),
    "sft": Dataset("sft", ("prompt", "response"), jsonl=True, split_key="prompt"),
    "rag": Dataset("rag", ("question", "answer"), jsonl=True, split_key="question"),
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
    """The file has problems: one `file:line: message` per line, up to `max_errors`."""

    def __init__(self, path: Path, problems: list[Problem], max_errors: int) -> None:
        super().__init__(f"{path}: {len(problems)} problem(s)")
        self.path, self.problems, self.max_errors = path, problems, max_errors

    def report(self, stage: str) -> str:
        """The problems as `file:line: message` lines (they name the file, not the stage)."""
        shown = [f"{self.path}:{p.line}: {p.message}" for p in self.problems[: self.max_errors]]
        if len(self.problems) > self.max_errors:
            shown.append(
                f"... and {len(self.problems) - self.max_errors} more (validate.max_errors)"
            )
        shown.append(f"{self.path}: {len(self.problems)} problem(s); nothing was written")
        return "\n".join(shown)


# --- rows --------------------------------------------------------------------------------------


def to_frame(lines: Iterable[RawLine], ds: Dataset) -> pd.DataFrame:
    """One row per non-blank line: status columns, one column per field (with its length after
    stripping and whether anything visible is left), the canonical record."""
    rows = [_row(raw, ds) for raw in lines]
    derived = [f"{f}{suffix}" for f in ds.fields for suffix in (CHARS, VISIBLE)]
    columns = ["line", "decoded", "parsed", "is_text", "error", "obj", *ds.fields, *derived]
    frame = pd.DataFrame(rows, columns=[*columns, RECORD]).astype(
        {c: object for c in ["is_text", "error", "obj", *ds.fields, *derived, RECORD]}
    )
    # For the duplicate message only: where else the same record stands.
    lines_of = frame.groupby(RECORD)["line"].agg(list)
    frame["copies"] = [lines_of.get(r, []) if r is not None else [] for r in frame[RECORD]]
    return frame


CHARS = "__chars"  # suffix of a field's length column: characters after stripping
VISIBLE = "__visible"  # suffix of a field's column: is anything visible left after stripping


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


def _row(raw: RawLine, ds: Dataset) -> dict[str, Any]:
    row: dict[str, Any] = {"line": raw.number, "decoded": raw.text is not None, "parsed": False}
    row["error"] = raw.decode_error
    if raw.text is None:
        return row
    # The line itself first: a raw control character or a byte-order mark is no text, in a
    # JSON line as in a passage (JSON would only say "invalid control character").
    obj: Any = {"text": raw.text.strip()}
    problem = text_problem(raw.text, multiline=False)
    if ds.jsonl and problem is None:
        obj, row["error"] = parse_object(raw.text)
        if row["error"] is not None:
            return row
        if not isinstance(obj, dict):
            row["error"] = f"a JSON {type(obj).__name__}, not an object"
            return row
        problem = next(  # escapes such as \u0000 decode to what the line could not hold
            (
                f"'{f}' holds a {p}"
                for f in ds.fields
                if isinstance(obj.get(f), str) and (p := text_problem(obj[f], multiline=True))
            ),
            None,
        )
    row.update(parsed=True, is_text=problem is None, error=problem, obj=obj)
    if problem is not None:  # what is not text goes no further, not even into pandas' columns
        return row
    for f in ds.fields:
        value = obj.get(f)
        row[f] = value
        if isinstance(value, str):
            row[f + CHARS] = len(value.strip())
            row[f + VISIBLE] = bool(visible(value))
    row[RECORD] = canonical_json({f: obj.get(f) for f in ds.fields})
    return row


def add_split(frame: pd.DataFrame, ds: Dataset, eval_fraction: float, seed: int) -> pd.DataFrame:
    """Mark each parsed row train or eval, and note where its prompt sits in the other split."""
    frame = frame.copy()
    frame["eval"] = False
    frame["leaks_to"] = pd.Series([None] * len(frame), dtype=object, index=frame.index)
    parsed = frame.index[frame["parsed"]]
    frame.loc[parsed, "eval"] = eval_mask(len(parsed), eval_fraction, seed)
    # A value that is no string (an object, a list) has no key: its type check reports it.
    keys = frame.loc[parsed, ds.split_key].map(
        lambda v: prompt_key(v) if isinstance(v, str) else None
    )
    for _key, group in frame.loc[parsed].groupby(keys, sort=False):
        if group["eval"].nunique() > 1:
            for idx in group.index:
                other = group[group["eval"] != frame.at[idx, "eval"]]["line"]
                frame.at[idx, "leaks_to"] = other.tolist()
    return frame


# --- the suite ---------------------------------------------------------------------------------


def build_checks(ds: Dataset, params: Params) -> list[Check]:
    """The expectation suite of `ds`, in the order problems are worth reporting."""
    checks = [
        Check(
            gxe.ExpectColumnValuesToBeInSet(column="decoded", value_set=[True]),
            RECORD,
            lambda r: f"not valid UTF-8 ({r['error']}); re-save the file as UTF-8",
        )
    ]
    if ds.jsonl:
        checks.append(
            Check(
                gxe.ExpectColumnValuesToBeInSet(column="parsed", value_set=[True]),
                RECORD,
                lambda r: f"not one well-formed JSON object: {r['error']}",
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
    bounds = getattr(params.validate, ds.name)
    for name in ds.fields:
        checks += _field_checks(f"validate.{ds.name}.{name}", name, getattr(bounds, name))
    checks.append(
        Check(
            gxe.ExpectColumnValuesToBeUnique(column=RECORD),
            RECORD,
            lambda r: (
                "exact duplicate of line(s) "
                f"{_lines([n for n in r['copies'] if n != r['line']])}; keep one copy"
            ),
        )
    )
    if ds.split_key:
        key = ds.split_key
        checks.append(
            Check(
                gxe.ExpectColumnValuesToBeNull(column="leaks_to"),
                RECORD,
                lambda r: (
                    f"{key} also at line(s) {_lines(r['leaks_to'])}, which the split puts on the "
                    f"other side of train/eval (leakage); merge or reword the repeats"
                ),
            )
        )
    return checks


def _field_checks(param: str, name: str, bounds: Bounds) -> list[Check]:
    return [
        Check(
            gxe.ExpectColumnValuesToNotBeNull(column=name),
            name,
            lambda r: f"'{name}' is null" if name in r["obj"] else f"missing key '{name}'",
        ),
        Check(
            gxe.ExpectColumnValuesToBeOfType(column=name, type_="str"),
            name,
            lambda r: f"'{name}' must be a string, got {type(r[name]).__name__} {r[name]!r:.40}",
        ),
        Check(
            gxe.ExpectColumnValuesToBeInSet(column=name + VISIBLE, value_set=[True]),
            name,
            lambda r: f"'{name}' is empty once whitespace and invisible characters are removed",
        ),
        Check(
            gxe.ExpectColumnValuesToBeBetween(
                column=name + CHARS, min_value=bounds.min_chars, max_value=bounds.max_chars
            ),
            name,
            lambda r: (
                f"'{name}' has {r[name + CHARS]} characters once stripped, outside "
                f"[{bounds.min_chars}, {bounds.max_chars}] ({param} in params.yaml)"
            ),
        ),
    ]


def _lines(lines: list[int]) -> str:
    return ", ".join(str(n) for n in lines)


def run_suite(frame: pd.DataFrame, name: str, checks: list[Check]) -> tuple[list[Problem], Any]:
    """Validate `frame` with GX; one problem per line and field, the first failing check wins."""
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas(name).add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
        batch_parameters={"dataframe": frame}
    )
    suite = gx.ExpectationSuite(name=name)
    for i, check in enumerate(checks):
        suite.add_expectation(check.expectation.copy(update={"meta": {"check": i}}))
    result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
    failed: dict[tuple[int, str], tuple[int, str]] = {}
    for res in result.results:
        if (res.exception_info or {}).get("raised_exception"):
            raise RuntimeError(f"GX check failed to run: {res.exception_info}")
        i = res.expectation_config.meta["check"]
        check = checks[i]
        for idx in res.result.get("unexpected_index_list") or []:
            row = frame.loc[idx]
            # A line that did not decode, parse or hold text has no fields to speak of.
            usable = row["parsed"] and row["is_text"]
            if check.field != RECORD and not usable:
                continue
            slot = (int(row["line"]), check.field if usable else RECORD)
            if slot not in failed or failed[slot][0] > i:
                failed[slot] = (i, check.message(row))
    problems = sorted(
        (Problem(line, msg) for (line, _), (_, msg) in failed.items()), key=lambda p: p.line
    )
    return problems, result


# --- outputs -----------------------------------------------------------------------------------


def summarize(frame: pd.DataFrame, ds: Dataset, checks: list[Check]) -> dict[str, Any]:
    """Counts for metrics/validate/<name>.json: deterministic, no paths, no timestamps."""
    metrics: dict[str, Any] = {
        "records": len(frame),
        "words": sum(len(value.split()) for f in ds.fields for value in frame[f]),
        "expectations": len(checks),
        "with_extra_fields": int(sum(bool(set(o) - set(ds.fields)) for o in frame["obj"])),
    }
    if ds.split_key:
        metrics["train"] = int((~frame["eval"]).sum())
        metrics["eval"] = int(frame["eval"].sum())
    return metrics


def render_report(source: str, ds: Dataset, result: Any, metrics: dict[str, Any]) -> str:
    """A Markdown report of the suite that a person (or GitHub) reads."""
    lines = [
        f"# Validation of `{source}`",
        "",
        f"Expectation suite `{ds.name}` (Great Expectations): "
        f"{sum(r.success for r in result.results)}/{len(result.results)} expectations met.",
        "",
        "| expectation | column | arguments | rows checked | unexpected |",
        "|---|---|---|---:|---:|",
    ]
    for res in result.results:
        cfg = res.expectation_config
        kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("column", "batch_id")}
        lines.append(
            f"| {cfg.type} | {cfg.kwargs.get('column', '')} | {json.dumps(kwargs, sort_keys=True)}"
            f" | {res.result.get('element_count', '')} | {res.result.get('unexpected_count', 0)} |"
        )
    lines += ["", "## Counts", "", "```json", json.dumps(metrics, indent=2, sort_keys=True), "```"]
    return "\n".join(lines) + "\n"


def write_outputs(frame: pd.DataFrame, ds: Dataset, output: Path) -> None:
    """The validated data in canonical form: text lines, or train/eval JSONL files."""
    if not ds.jsonl:
        write_text_atomic(output, "".join(t + "\n" for t in frame["text"]))
        return
    fields = [*ds.fields, *(["gold"] if "gold" in frame else [])]  # rag: each question's golds
    splits = (("train", frame[~frame["eval"]]), ("eval", frame[frame["eval"]]))
    publish_dir(
        output,
        {
            f"{name}.jsonl": jsonl_text(rows[fields].to_dict(orient="records"))
            for name, rows in splits
        },
    )


def validate_file(
    path: Path, ds: Dataset, params: Params
) -> tuple[pd.DataFrame, dict[str, Any], Any]:
    """Check `path`; return the rows, the counts and the GX result, or raise ValidationFailed."""
    frame = to_frame(read_lines(path), ds)
    if ds.split_key:
        eval_fraction = getattr(params, ds.name).eval_fraction
        frame = add_split(frame, ds, eval_fraction, params.seed)
    checks = build_checks(ds, params)
    problems, result = run_suite(frame, ds.name, checks)
    if frame.empty and not problems:
        problems = [Problem(0, "no records: the file is empty")]
    if problems:
        raise ValidationFailed(path, problems, params.validate.max_errors)
    return frame, summarize(frame, ds, checks), result
