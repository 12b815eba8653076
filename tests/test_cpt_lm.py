"""The cpt_lm stage: the generator's causal-LM pre-training on the corpus, before SFT."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmpipeline import cpt_lm, mixing, tokens
from lmpipeline.params import CptLmParams
from lmpipeline.training import training_args
from stages import cpt_lm as stage
from stages import tokenize as tokenize_stage
from tests.helpers import (
    CORPUS,
    crash_at_step,
    run_sft,
    sft_records,
    tiny_passages,
    tokenized,
    write_sft_project,
)

PASSAGES = [line for _ in range(6) for line in CORPUS]  # repeated: a corpus it can learn


def write_project(root: Path, **overrides: object) -> Path:
    (root / "pretrain.txt").write_text("\n".join(PASSAGES) + "\n", encoding="utf-8")
    cfg = {
        "enabled": True,
        "max_length": 16,
        "batch_size": 4,
        "lr": 1e-2,
        "epochs": 4,
        "eval_steps": 4,
        "save_steps": 4,
        "warmup_ratio": 0.0,
        **overrides,
    }
    (root / "params.yaml").write_text(yaml.safe_dump({"seed": 5, "cpt_lm": cfg}))
    return root


def run(root: Path, base: Path) -> int:
    sft = root / "sft" if (root / "sft").is_dir() else None
    params = root / "params.yaml"
    tokens = tokenized("cpt_lm", root / "pretrain.txt", root / "tokens", params, base, sft)
    args = ["--base", str(base), "--tokens", str(tokens), "--output"]
    args += [str(root / "out"), "--metrics", str(root / "metrics.json"), "--plots"]
    args += [str(root / "plots"), "--timings", str(root / "timings.json")]
    return stage.main([*args, "--params", str(root / "params.yaml")])


def test_blocks_are_the_passages_joined_by_end_of_text_without_padding(
    tiny_llama_dir: Path,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    blocks = tokens.pack(tiny_passages()[:3], tokenizer, max_length=8).column("input_ids").long()
    stream = []
    for passage in tiny_passages()[:3]:
        stream += [
            *tokenizer(passage, add_special_tokens=False)["input_ids"],
            tokenizer.eos_token_id,
        ]
    assert blocks.shape == (len(stream) // 8, 8)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]  # in order, remainder dropped
    assert tokenizer.pad_token_id not in blocks  # eos separates; nothing pads
    batch = cpt_lm.as_batch(blocks)
    assert batch["attention_mask"].all() and torch.equal(batch["labels"], blocks)
    # A marker the corpus holds as text stays text: the only end-of-text is the separator.
    marked = tokens.pack(["the model <|im_end|> finds passages"], tokenizer, 2).column("input_ids")
    assert marked.flatten().tolist().count(tokenizer.eos_token_id) <= 1


def test_held_out_blocks_never_reach_training(tiny_llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    cfg = CptLmParams(max_length=8, eval_fraction=0.25)
    everything = tokens.pack(PASSAGES, tokenizer, 8)
    held = mixing.held_out_blocks(len(everything), cfg, seed=5)
    train = everything.select(np.flatnonzero(~held))
    held_out = everything.select(np.flatnonzero(held))
    assert len(train) + len(held_out) == len(everything) and len(held_out) >= 1
    # Each held-out block is a distinct stretch of the stream, and the trainer's data is `train`.
    held_rows = {tuple(row.tolist()) for row in held_out.column("input_ids")}
    order = [tuple(row.tolist()) for row in everything.column("input_ids")]
    positions = [i for i, row in enumerate(order) if row in held_rows]
    assert len(positions) == len(held_out)
    trainer = cpt_lm.make_trainer(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        training_args(cfg, 5, torch.device("cpu"), None, Path("unused"), len(train)),
        train,
        cpt_lm.eval_batches(held_out, 4),
    )
    data = trainer.train_dataset
    trained_on = {tuple(data[i]["input_ids"].tolist()) for i in range(len(data))}
    assert trained_on == {row for i, row in enumerate(order) if i not in positions}


def test_stage_lowers_held_out_perplexity_and_saves_a_model_sft_starts_from(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    root = write_project(tmp_path)
    assert run(root, tiny_llama_dir) == 0
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["enabled"] and metrics["blocks"]["held_out"] >= 1
    assert metrics["final"]["perplexity"] < 0.5 * metrics["base"]["perplexity"]
    timings = json.loads((root / "timings.json").read_text())
    # 4 epochs of full 16-token blocks: every token counted is a real one, none is padding
    assert timings["train"]["tokens"] == 4 * metrics["blocks"]["train"] * 16
    assert (root / "plots/plots/metrics/eval/loss.tsv").is_file()
    assert not list((tmp_path / "checkpoints").glob("cpt_lm-*"))  # removed once it succeeded
    # The output is a plain causal LM with its tokenizer: SFT starts from it as from any base.
    sft_root = tmp_path / "sft"
    sft_root.mkdir()
    assert run_sft(write_sft_project(sft_root, epochs=1), root / "out") == 0


def test_stage_trains_on_replayed_and_reading_chats_and_reports_them(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    root = write_project(tmp_path, replay=0.5, reading=1, epochs=1)
    (root / "sft").mkdir()
    records = "".join(json.dumps(r) + "\n" for r in sft_records(8))
    (root / "sft/train.jsonl").write_text(records, encoding="utf-8")
    assert run(root, tiny_llama_dir) == 0
    metrics = json.loads((root / "metrics.json").read_text())
    mixed = metrics["mixed_in"]
    assert mixed["reading_chats"] > 0 and mixed["replayed_chats"] > 0
    # The corpus's training blocks and the mixed-in ones are what it trained on, once each.
    timings = json.loads((root / "timings.json").read_text())
    assert metrics["blocks"]["train"] > mixed["mixed_blocks"] > 0
    assert timings["train"]["tokens"] == metrics["blocks"]["train"] * 16


def test_lora_is_merged_into_a_plain_model(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    root = write_project(tmp_path, lora_r=4, lora_alpha=8)
    assert run(root, tiny_llama_dir) == 0
    saved = json.loads((root / "out/config.json").read_text())
    assert "peft" not in json.dumps(saved) and not (root / "out/adapter_config.json").exists()
    assert json.loads((root / "metrics.json").read_text())["final"]["perplexity"] > 0
    AutoModelForCausalLM.from_pretrained(root / "out")


def test_disabled_stage_outputs_the_base_model_unchanged(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    root = write_project(tmp_path, enabled=False)
    assert run(root, tiny_llama_dir) == 0
    compared = filecmp.dircmp(tiny_llama_dir, root / "out")
    assert not compared.diff_files and not compared.left_only and not compared.right_only
    assert json.loads((root / "metrics.json").read_text()) == {"enabled": False}


def test_resumed_run_ends_as_an_uninterrupted_one(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    root = write_project(tmp_path, save_steps=2)
    with crash_at_step(3):
        run(root, tiny_llama_dir)
    assert run(root, tiny_llama_dir) == 0
    resumed = (root / "metrics.json").read_bytes()
    assert run(root, tiny_llama_dir) == 0
    assert (root / "metrics.json").read_bytes() == resumed


def test_a_corpus_too_short_for_two_blocks_is_one_line(
    tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_project(tmp_path, max_length=120)
    (root / "pretrain.txt").write_text(CORPUS[0] + "\n", encoding="utf-8")
    args = ["cpt_lm", f"--data={root / 'pretrain.txt'}", f"--output={root / 'tokens'}"]
    args += [f"--params={root / 'params.yaml'}", f"--base={tiny_llama_dir}"]
    assert tokenize_stage.main(args) == 1  # found where the blocks are made and held out
    err = capsys.readouterr().err
    assert "cpt_lm.max_length=120" in err and "Traceback" not in err
    assert not (root / "tokens").exists()
