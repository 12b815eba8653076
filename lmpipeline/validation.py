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
    prompt_key,
    read_lines,
    write_jsonl,
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
    """One row per non-blank line: status columns, one column per field, the canonical record."""
    rows = [_row(raw, ds) for raw in lines]
    columns = ["line", "decoded", "parsed", "error", "obj", *ds.fields, RECORD]
    frame = pd.DataFrame(rows, columns=columns).astype(
        {c: object for c in ["error", "obj", *ds.fields, RECORD]}
    )
    # For the duplicate message only: where else the same record stands.
    lines_of = frame.groupby(RECORD)["line"].agg(list)
    frame["copies"] = [lines_of.get(r, []) if r is not None else [] for r in frame[RECORD]]
    return frame


def _row(raw: RawLine, ds: Dataset) -> dict[str, Any]:
    row: dict[str, Any] = {"line": raw.number, "decoded": raw.text is not None, "parsed": False}
    row["error"] = raw.decode_error
    if raw.text is None:
        return row
    if not ds.jsonl:
        obj: Any = {"text": raw.text.strip()}
    else:
        try:
            obj = json.loads(raw.text)
        except json.JSONDecodeError as err:
            row["error"] = f"{err.msg} (column {err.colno})"
            return row
        if not isinstance(obj, dict):
            row["error"] = f"a JSON {type(obj).__name__}, not an object"
            return row
    row.update(parsed=True, obj=obj, **{f: obj.get(f) for f in ds.fields})
    row[RECORD] = canonical_json({f: obj.get(f) for f in ds.fields})
    return row


def add_split(frame: pd.DataFrame, ds: Dataset, eval_fraction: float, seed: int) -> pd.DataFrame:
    """Mark each parsed row train or eval, and note where its prompt sits in the other split."""
    frame = frame.copy()
    frame["eval"] = False
    frame["leaks_to"] = pd.Series([None] * len(frame), dtype=object, index=frame.index)
    parsed = frame.index[frame["parsed"]]
    frame.loc[parsed, "eval"] = eval_mask(len(parsed), eval_fraction, seed)
    keys = frame.loc[parsed, ds.split_key].map(lambda v: prompt_key(v) if isinstance(v, str) else v)
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
            gxe.ExpectColumnValuesToMatchRegex(column=name, regex=r"\S"),
            name,
            lambda r: f"'{name}' is empty or whitespace only",
        ),
        Check(
            gxe.ExpectColumnValueLengthsToBeBetween(
                column=name, min_value=bounds.min_chars, max_value=bounds.max_chars
            ),
            name,
            lambda r: (
                f"'{name}' has {len(r[name])} characters, outside "
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
            # A line that did not decode or parse has no fields to speak of.
            if check.field != RECORD and not row["parsed"]:
                continue
            slot = (int(row["line"]), check.field if row["parsed"] else RECORD)
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
    for name, rows in (("train", frame[~frame["eval"]]), ("eval", frame[frame["eval"]])):
        write_jsonl(output / f"{name}.jsonl", rows[fields].to_dict(orient="records"))


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
