"""The tokenize stages: what they write is exactly what the training stages made in memory, in
order, from several processes; the training stages refuse tokens that another tokenizer or
another max_length made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from lmpipeline import mixing, tokens
from lmpipeline.chat import load_chat_tokenizer
from lmpipeline.data import read_jsonl
from lmpipeline.errors import StageError
from lmpipeline.params import CptLmParams
from stages import tokenize
from tests.helpers import CORPUS, tiny_passages, write_sft_project


def run(kind: str, data: Path, out: Path, params: dict, base: Path | None = None) -> int:
    (out.parent / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    args = [kind, f"--data={data}", f"--output={out}", f"--params={out.parent / 'params.yaml'}"]
    return tokenize.main([*args, *([f"--base={base}"] if base else [])])


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of 5 rows, so that even a tiny file is tokenized by two processes."""
    monkeypatch.setattr(tokens, "BATCH", 5)
    monkeypatch.setattr(tokens, "processes", lambda: 2)


def test_cpt_blocks_are_the_in_memory_blocks(
    tmp_path: Path, tiny_bert_dir: Path, small_batches: None
) -> None:
    lines = [f"{line} number {i}" for i, line in enumerate(CORPUS * 9)]
    (tmp_path / "pretrain.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    params = {"cpt": {"model": str(tiny_bert_dir), "max_length": 16}}
    assert run("cpt", tmp_path / "pretrain.txt", tmp_path / "tokens", params) == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    meta, splits = tokens.load(tmp_path / "tokens", tokenizer, "cpt", "tokenize_cpt", {})
    written = tokens.TokenRows(splits["blocks"])
    expected = tokens.blocks_of(lines, tokenizer, 16)
    assert len(written) == len(expected) == meta["blocks"] > 1
    for column in ("input_ids", "word_starts"):
        assert written.column(column).tolist() == expected.column(column).tolist()
    assert meta["max_length"] == 16 and meta["passage_tokens"] >= 14 * meta["blocks"]
    # The same inputs give the same bytes, or DVC would rerun every stage downstream.
    assert run("cpt", tmp_path / "pretrain.txt", tmp_path / "again", params) == 0
    assert files_of(tmp_path / "again") == files_of(tmp_path / "tokens")


def test_cpt_lm_blocks_are_the_in_memory_blocks(
    tmp_path: Path, tiny_llama_dir: Path, small_batches: None
) -> None:
    passages = tiny_passages() * 3
    (tmp_path / "pretrain.txt").write_text("\n".join(passages) + "\n", encoding="utf-8")
    params = {"cpt_lm": {"enabled": True, "max_length": 8}}
    assert run("cpt_lm", tmp_path / "pretrain.txt", tmp_path / "tok", params, tiny_llama_dir) == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    _, splits = tokens.load(tmp_path / "tok", tokenizer, "cpt_lm", "tokenize_cpt_lm", {})
    train = tokens.TokenRows(splits["train"]).column("input_ids").tolist()
    held_out = tokens.TokenRows(splits["held_out"]).column("input_ids").tolist()
    expected = tokens.pack(passages, tokenizer, 8).column("input_ids").tolist()
    held = mixing.held_out_blocks(len(expected), CptLmParams(max_length=8), seed=42)
    assert train == [b for b, h in zip(expected, held, strict=True) if not h]
    assert held_out == [b for b, h in zip(expected, held, strict=True) if h] != []


def test_cpt_lm_disabled_tokenizes_nothing(tmp_path: Path, tiny_llama_dir: Path) -> None:
    (tmp_path / "pretrain.txt").write_text("\n".join(tiny_passages()) + "\n", encoding="utf-8")
    params = {"cpt_lm": {"enabled": False}}
    assert run("cpt_lm", tmp_path / "pretrain.txt", tmp_path / "tok", params, tiny_llama_dir) == 0
    meta = json.loads((tmp_path / "tok" / tokens.META_FILE).read_text())
    assert meta == {"enabled": False, "splits": []}


def tokenized_sft_project(tmp_path: Path, max_length: int, base: Path) -> Path:
    """An SFT project (`write_sft_project`) with its examples tokenized under `tokens`."""
    project = write_sft_project(tmp_path, max_length=max_length)
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert run("sft", project / "data", project / "tokens", params, base) == 0
    return project


def test_sft_examples_are_the_in_memory_examples(
    tmp_path: Path, tiny_llama_dir: Path, small_batches: None
) -> None:
    project = tokenized_sft_project(tmp_path, 24, tiny_llama_dir)
    tokenizer, _ = load_chat_tokenizer(tiny_llama_dir)
    meta, splits = tokens.load(project / "tokens", tokenizer, "sft", "tokenize_sft", {})
    for split in ("train", "eval"):
        expected, truncated = tokens.encode_all(
            tokenizer, read_jsonl(project / f"data/{split}.jsonl"), 24
        )
        written = tokens.Examples(splits[split])
        assert [written[i] for i in range(len(written))] == expected
        assert written.lengths() == [len(e.input_ids) for e in expected]
        assert meta[f"{split}_truncated"] == truncated
    assert meta["train_truncated"] > 0  # 24 tokens cut some: the count is tested, not zero


def test_training_stages_refuse_tokens_of_another_tokenizer_or_max_length(
    tmp_path: Path, tiny_llama_dir: Path, tiny_gpt2_dir: Path
) -> None:
    project = tokenized_sft_project(tmp_path, 32, tiny_llama_dir)
    other, _ = load_chat_tokenizer(tiny_gpt2_dir)
    with pytest.raises(StageError, match=r"another tokenizer .*`dvc repro tokenize_sft`"):
        tokens.load(project / "tokens", other, "sft", "tokenize_sft", {})
    same, _ = load_chat_tokenizer(tiny_llama_dir)
    with pytest.raises(StageError, match=r"max_length 32, the params say 64"):
        tokens.load(project / "tokens", same, "sft", "tokenize_sft", {"max_length": 64})
    with pytest.raises(StageError, match=r"no token dataset .*`dvc repro tokenize_sft` makes it"):
        tokens.load(project / "nothing", same, "sft", "tokenize_sft", {})
