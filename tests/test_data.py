from pathlib import Path

import numpy as np

from lmpipeline.data import (
    eval_mask,
    prompt_key,
    read_jsonl,
    read_lines,
    read_passages,
    write_jsonl,
)


def test_bom_crlf_and_blank_lines_are_tolerated_and_line_numbers_kept(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_bytes(b"\xef\xbb\xbffirst\r\n\r\n   \nsecond\r\nbad \xff\n")
    lines = list(read_lines(path))
    assert [(line.number, line.text) for line in lines[:2]] == [(1, "first"), (4, "second")]
    assert lines[2].number == 5 and lines[2].text is None
    assert "0xff" in (lines[2].decode_error or "")


def test_eval_mask_is_deterministic_and_sized_by_fraction() -> None:
    a, b = eval_mask(200, 0.1, seed=7), eval_mask(200, 0.1, seed=7)
    assert np.array_equal(a, b) and a.sum() == 20
    assert not np.array_equal(a, eval_mask(200, 0.1, seed=8))
    assert eval_mask(5, 0.01, seed=0).sum() == 1  # a tiny fraction still holds one out
    assert eval_mask(5, 0.0, seed=0).sum() == 0


def test_prompt_key_ignores_case_and_spacing() -> None:
    assert prompt_key("  What is  BERT?\t") == prompt_key("what is bert?")


def test_written_jsonl_is_canonical(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    write_jsonl(path, [{"b": "é", "a": 1}])
    assert path.read_bytes() == '{"a": 1, "b": "é"}\n'.encode()
    assert read_jsonl(path) == [{"a": 1, "b": "é"}]


def test_validated_passages_are_read_one_per_line_as_validation_counted_them(
    tmp_path: Path,
) -> None:
    # Separators that str.splitlines() would cut a passage at; validation keeps them inside.
    inside = ["a\rb", "c\u2028d", "e\x0cf", "g\x85h", "i\x1ej"]
    path = tmp_path / "pretrain.txt"
    path.write_bytes("".join(p + "\n" for p in inside).encode("utf-8"))
    assert [line.text for line in read_lines(path)] == inside
    assert read_passages(path) == inside
    (tmp_path / "empty.txt").write_bytes(b"")
    assert read_passages(tmp_path / "empty.txt") == []
