"""Any bytes as a user's file: validation either accepts records that round-trip through the
canonical output, or refuses with `file:line` messages; it never raises anything else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmpipeline.data import read_jsonl, read_passages
from lmpipeline.params import Params
from lmpipeline.validation import DATASETS, ValidationFailed, validate_file, write_outputs

# Bytes that make the hard cases likely: JSON syntax, escapes, controls, BOMs, separators,
# surrogates, invalid UTF-8, and the fields the datasets need.
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


def check(tmp_path: Path, dataset: str, content: bytes) -> None:
    ds, params = DATASETS[dataset], Params()
    source = tmp_path / "input"
    source.write_bytes(content)
    try:
        frame, _, _ = validate_file(source, ds, params)
    except ValidationFailed as err:
        assert err.problems and all(p.line >= 0 and p.message for p in err.problems)
        report = err.report(f"validate_{dataset}")
        assert all(line.startswith(f"{source}:") for line in report.splitlines())
        return
    out = tmp_path / "out"
    write_outputs(frame, ds, out)
    if dataset == "pretrain":
        assert read_passages(out) == [t for t in frame["text"]]
        return
    written = read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl")
    expected = [{f: r[f] for f in ds.fields} for r in frame["obj"]]
    key = json.dumps
    assert sorted(map(key, written)) == sorted(map(key, expected))


@pytest.mark.parametrize("dataset", ["pretrain", "sft", "rag"])
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=FILES)
def test_any_bytes_are_accepted_as_round_tripping_records_or_refused_by_line(
    tmp_path: Path, dataset: str, content: bytes
) -> None:
    check(tmp_path, dataset, content)
