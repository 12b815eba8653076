"""Any bytes as a user's file: validation either accepts records that round-trip through the
canonical output (as they are under `validate.text: strict`, as `text_repair.repair` makes them
under `repair`), or refuses with `file:line` messages; it never raises anything else, and it
decides, says and writes the same whether the file is read in chunks of two lines or in one."""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lmpipeline.data import BOM, read_jsonl, read_passages
from lmpipeline.params import Params
from lmpipeline.text_repair import repair
from lmpipeline.validation import DATASETS, Dataset, ValidationFailed, validate_file

# Bytes that make the hard cases likely: JSON syntax, escapes, controls, BOMs, separators,
# surrogates, invalid UTF-8, what a repair mends (mojibake, NFD, a soft hyphen), and the fields
# the datasets need.
PIECES = [
    b'{"prompt": "',
    b'{"question": "',
    b'", "response": "',
    b'", "answer": "',
    b'"}',
    b"\n",
    b"\r\n",
    b"\r",
    b"\\u0000",
    b"\\ud800",
    b"\\n",
    b"\x00",
    b"\x1c",
    b"\xc2\x85",
    b"\xe2\x80\xa8",
    b"\xe2\x80\x8b",
    b"\xef\xbb\xbf",
    b"\xc3\xa2\xe2\x82\xac\xe2\x84\xa2",  # the mojibake of U+2019: "â€™"
    b"e\xcc\x81",  # NFD "é"
    b"\xc2\xad",
    b"\xff",
    b"[",
    b"]",
    b"{",
    b"}",
    b",",
    b"1" * 20,
    b"Explain the learning rate warmup schedule",
    b"It ramps up.",
    b" ",
]
FILES = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join),
)


def outcome(source: Path, ds: Dataset, chunk_lines: int, text: str, work: Path) -> tuple[Any, ...]:
    """What validating `source` in chunks of `chunk_lines` lines into the empty `work` gives:
    the report of a refusal, or the counts, the outcomes and the bytes of every file written."""
    validate = replace(Params().validate, chunk_lines=chunk_lines, text=text)
    params = replace(Params(), validate=validate)
    out = work / "out"
    try:
        metrics, outcomes = validate_file(source, ds, params, out)
    except ValidationFailed as err:
        assert err.problems and all(p.line >= 0 and p.message for p in err.problems)
        assert not any(work.iterdir())  # nothing written, no temporary file left
        return ("refused", err.report(f"validate_{ds.name}"))
    files = sorted(out.iterdir()) if out.is_dir() else [out]
    return ("accepted", metrics, outcomes, [(f.name, f.read_bytes()) for f in files])


def mended(value: Any, text: str) -> Any:
    """A string as the canonical output holds it under `validate.text`."""
    return repair(value)[0] if text == "repair" and isinstance(value, str) else value


def check(root: Path, dataset: str, content: bytes, text: str) -> None:
    ds = DATASETS[dataset]
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        name = "input.txt" if dataset == "pretrain" else "input.jsonl"
        source, streamed, whole = Path(tmp) / name, Path(tmp) / "2", Path(tmp) / "all"
        source.write_bytes(content)
        streamed.mkdir()
        whole.mkdir()
        result = outcome(source, ds, 10_000, text, whole)
        # Chunks of two lines find, say and write exactly what one chunk does.
        assert outcome(source, ds, 2, text, streamed) == result
        if result[0] == "refused":
            assert all(line.startswith(f"{source}:") for line in result[1].splitlines())
            return
        lines = [t.strip() for t in content.removeprefix(BOM).decode().split("\n") if t.strip()]
        out = whole / "out"
        if dataset == "pretrain":
            assert read_passages(out) == [mended(t, text).strip() for t in lines]
            return
        written = read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl")
        expected = [{f: mended(json.loads(t)[f], text) for f in ds.fields} for t in lines]
        key = json.dumps
        assert sorted(map(key, written)) == sorted(map(key, expected))


# The default policy in the fast suite; strict, checked line by line in test_validate, in CI.
@pytest.mark.parametrize("text", [pytest.param("strict", marks=pytest.mark.slow), "repair"])
@pytest.mark.parametrize("dataset", ["pretrain", "sft", "rag"])
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=FILES)
# Found by this test: a line with no count (not text) beside a short one made the count a float
# ("12.0 characters") in one chunk, an int in chunks of two lines.
@example(content=b'{"prompt": "{"prompt": "\xc2\x85\r\n{"prompt": "\n{"prompt": "')
def test_any_bytes_are_accepted_as_round_tripping_records_or_refused_by_line(
    tmp_path: Path, dataset: str, text: str, content: bytes
) -> None:
    check(tmp_path, dataset, content, text)
