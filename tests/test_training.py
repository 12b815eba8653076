"""The shared training loop: resume from complete checkpoints only, and gradient accumulation
that trains exactly as the larger batch."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM, Trainer, TrainingArguments

from lmpipeline import cpt, cpt_lm, mixing, sft, tokens, training
from lmpipeline.chat import load_causal_lm, load_chat_tokenizer
from lmpipeline.models import load_tokenizer, resolve_model
from lmpipeline.params import CptLmParams, CptParams, RagTrainingParams, SftParams
from lmpipeline.rag import backend, cpt_sft_train
from lmpipeline.rag.knowledge import Entry
from lmpipeline.runtime import Peak
from lmpipeline.testing import (
    CORPUS,
    TINY_ENCODER,
    random_model,
    save,
    vocab_size,
    wordpiece_tokenizer,
)
from lmpipeline.training import last_complete_checkpoint, training_args
from tests.helpers import sft_records


def test_resume_skips_a_checkpoint_a_crash_left_half_written(tmp_path: Path) -> None:
    assert last_complete_checkpoint(tmp_path / "missing") is None
    for step, complete in [(5, True), (10, True), (15, False)]:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


# --- gradient accumulation ---------------------------------------------------------------------

# Float32 sums in another order, through three AdamW steps: 2.3e-6 measured for SFT (a weight
# near 0, where Adam's normalization magnifies rounding). Grouping the micro-batches apart from
# the larger batch, or averaging per micro-batch, measured about 3e-3 here.
ACCUMULATION_ATOL = 1e-5


@pytest.fixture(scope="module")
def dropout_free_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT without dropout: two runs can then differ only by their arithmetic."""
    tokenizer = wordpiece_tokenizer()
    config = BertConfig(
        vocab_size=vocab_size(tokenizer),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **TINY_ENCODER,
    )
    model = random_model(BertForMaskedLM, config)
    return save(model, tokenizer, tmp_path_factory.mktemp("bert-no-dropout"))


def three_steps(batch: int, accum: int, max_tokens: int) -> dict[str, float]:
    """Training params of 3 optimizer steps of `batch` x `accum` at a constant lr of 1e-3."""
    return {
        "batch_size": batch,
        "grad_accum": accum,
        "lr": 1e-3,
        "max_steps": 3,
        "warmup_ratio": 0.0,
        "max_tokens_per_batch": max_tokens,
    }


def cpt_trained(
    model_dir: Path, batch: int, accum: int, out: Path, max_tokens: int = 0, mode: str | None = None
) -> dict[str, torch.Tensor]:
    """The CPT trainer's weights after 3 optimizer steps of `batch` x `accum` blocks."""
    source = resolve_model(str(model_dir))
    tokenizer = load_tokenizer(source)
    model, fresh = cpt.load_mlm(source)
    cfg = CptParams(max_length=16, **three_steps(batch, accum, max_tokens))
    blocks = tokens.blocks_of(CORPUS * 8, tokenizer, cfg.max_length)
    train, heldout = cpt.split_blocks(blocks, cfg.eval_fraction, seed=0)
    masking = cpt.Masking.of(tokenizer, cfg)
    batches = cpt.fixed_eval_batches(heldout, masking, 2, seed=0)
    args = training_args(cfg, 0, torch.device("cpu"), mode, out, len(train))
    cpt.make_trainer(model, args, train, batches, masking, cfg, fresh).train()
    return {k: v.clone() for k, v in model.state_dict().items()}


def sft_trained(
    model_dir: Path, batch: int, accum: int, out: Path, max_tokens: int = 0, mode: str | None = None
) -> dict[str, torch.Tensor]:
    """The SFT trainer's weights after 3 optimizer steps of `batch` x `accum` examples."""
    tokenizer, _ = load_chat_tokenizer(model_dir)
    model = load_causal_lm(model_dir, torch.device("cpu"))
    cfg = SftParams(**three_steps(batch, accum, max_tokens))
    train, _ = tokens.encode_all(tokenizer, sft_records(24), max_length=48)
    batches = sft.eval_batches(train[:4], 4, tokenizer.pad_token_id)
    args = training_args(cfg, 0, torch.device("cpu"), mode, out, len(train))
    budget = training.budget_of(cfg, shifted=True)
    sft.make_trainer(model, args, train, batches, tokenizer.pad_token_id, budget).train()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("stage", ["cpt", "sft"])
def test_gradient_accumulation_trains_as_the_larger_batch(
    stage: str,
    dropout_free_bert_dir: Path,
    tiny_llama_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """4 x 1 and 2 x 2 see the same examples per optimizer step and weigh every predicted token
    the same (the loss is divided by the predicted tokens of the whole accumulated batch), so
    they end at the same weights: only the order of float additions differs."""
    monkeypatch.chdir(tmp_path)
    trained, model_dir = {
        "cpt": (cpt_trained, dropout_free_bert_dir),
        "sft": (sft_trained, tiny_llama_dir),
    }[stage]
    initial = load_file(model_dir / "model.safetensors")
    large = trained(model_dir, 4, 1, tmp_path / "4x1")
    accumulated = trained(model_dir, 2, 2, tmp_path / "2x2")
    for name, weight in large.items():
        torch.testing.assert_close(accumulated[name], weight, rtol=0, atol=ACCUMULATION_ATOL)
    moved = max((large[k] - initial[k]).abs().max().item() for k in initial if k in large)
    assert moved > 1e-3  # three AdamW steps at lr 1e-3 moved the weights by about that much


@pytest.mark.parametrize(
    ("stage", "trainer_counts"), [("cpt", True), ("sft", True), ("sft", False)]
)
def test_a_token_budget_splits_batches_and_trains_as_the_whole_batch(
    stage: str,
    trainer_counts: bool,
    dropout_free_bert_dir: Path,
    tiny_llama_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A budget of 20 padded tokens cuts each micro-batch of 4 into chunks of one row (the rows
    are 16 tokens or more): each chunk's loss is divided by the whole micro-batch's predicted
    tokens, so the gradients, and so the weights, are the unsplit batch's. That count comes from
    the Trainer, or, for a model it counts nothing for, from the budget itself."""
    monkeypatch.chdir(tmp_path)
    if not trainer_counts:
        monkeypatch.setattr(Trainer, "_get_num_items_in_batch", lambda *args: None)
    trained, model_dir = {
        "cpt": (cpt_trained, dropout_free_bert_dir),
        "sft": (sft_trained, tiny_llama_dir),
    }[stage]
    whole = trained(model_dir, 4, 1, tmp_path / "whole")
    split = trained(model_dir, 4, 1, tmp_path / "split", max_tokens=20)
    for name, weight in whole.items():
        torch.testing.assert_close(split[name], weight, rtol=0, atol=ACCUMULATION_ATOL)


def cpt_lm_trained(model_dir: Path, out: Path, mode: str) -> dict[str, torch.Tensor]:
    """cpt_lm's trainer's weights after 3 steps on packed blocks."""
    tokenizer = load_tokenizer(resolve_model(str(model_dir)))
    model = load_causal_lm(model_dir, torch.device("cpu"))
    cfg = CptLmParams(max_length=16, **three_steps(2, 1, 0))
    blocks = tokens.pack(CORPUS * 8, tokenizer, 16)
    held = mixing.held_out_blocks(len(blocks), cfg, seed=0)
    train, held_out = blocks.select(np.flatnonzero(~held)), blocks.select(np.flatnonzero(held))
    args = training_args(cfg, 0, torch.device("cpu"), mode, out, len(train))
    cpt_lm.make_trainer(model, args, train, cpt_lm.eval_batches(held_out, 2)).train()
    return model.state_dict()


def retriever_trained(model_dir: Path, out: Path, mode: str) -> dict[str, torch.Tensor]:
    """The retriever's trainer's (every RAG fine-tuning's) weights after 3 steps."""
    tokenizer = load_tokenizer(resolve_model(str(model_dir)))
    encoder = cpt_sft_train.load_encoder(model_dir, torch.device("cpu"))
    entries = [Entry(f"a{i}", f"{CORPUS[i % 2]} {i}") for i in range(8)]
    pairs = [cpt_sft_train.Pair(f"question {i} {CORPUS[i % 2]}", (i,)) for i in range(8)]
    collate = cpt_sft_train.PairCollator(tokenizer, entries, max_length=16)
    training = backend.Training(cpt_sft_train.contrastive_loss, collate, pairs, pairs[:2])
    cfg = RagTrainingParams(batch_size=2, lr=1e-3, max_steps=3, warmup_ratio=0.0)
    backend.make_trainer(encoder, training, cfg, 0, torch.device("cpu"), mode, out).train()
    return encoder.state_dict()


@pytest.mark.parametrize("stage", ["cpt", "cpt_lm", "sft", "retriever"])
def test_mixed_precision_runs_every_loss_and_score_under_autocast_on_fp32_weights(
    stage: str,
    dropout_free_bert_dir: Path,
    tiny_llama_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bf16 autocast is real on a CPU: in a bf16 run every linear layer of the stage's loss and
    of its held-out score computes in bf16, while the weights the optimizer holds stay fp32.
    (The stage losses call parts of the model, which accelerate's forward wrapper never sees.)
    The reader trains through SFT's loss and the same Trainer."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bf16"
    run = {
        "cpt": lambda: cpt_trained(dropout_free_bert_dir, 2, 1, out, mode="bf16"),
        "cpt_lm": lambda: cpt_lm_trained(tiny_llama_dir, out, "bf16"),
        "sft": lambda: sft_trained(tiny_llama_dir, 2, 1, out, mode="bf16"),
        "retriever": lambda: retriever_trained(dropout_free_bert_dir, out, "bf16"),
    }[stage]
    outputs: list[tuple[bool, torch.dtype]] = []

    def record(module: torch.nn.Module, args: Any, output: Any) -> None:
        if isinstance(module, torch.nn.Linear):
            outputs.append((torch.is_autocast_enabled("cpu"), output.dtype))

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        weights = run()
    finally:
        hook.remove()
    assert outputs and set(outputs) == {(True, torch.bfloat16)}
    assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.float32}


def test_the_trained_model_computes_in_fp32_after_mixed_precision_training(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accelerate wraps the model's forward in autocast while it trains; what the stage then
    computes with the model (answers, an index) must be fp32, as a reload of it computes."""
    monkeypatch.chdir(tmp_path)
    tokenizer, _ = load_chat_tokenizer(tiny_llama_dir)
    model = load_causal_lm(tiny_llama_dir, torch.device("cpu"))
    cfg = SftParams(**three_steps(2, 1, 0))
    train, _ = tokens.encode_all(tokenizer, sft_records(8), max_length=48)
    batches = sft.eval_batches(train[:2], 2, tokenizer.pad_token_id)
    args = training_args(cfg, 0, torch.device("cpu"), "bf16", tmp_path / "out", len(train))
    trainer = sft.make_trainer(model, args, train, batches, tokenizer.pad_token_id)
    trained = training.train_resumable(trainer, "sft")
    assert not hasattr(trained.forward, "__wrapped__")  # not accelerate's autocast wrapper
    with torch.no_grad():
        logits = trained(input_ids=torch.tensor([train[0].input_ids])).logits
    assert logits.dtype == torch.float32


def test_a_budget_cuts_rows_not_tokens() -> None:
    budget = training.TokenBudget(max_tokens=10, shifted=True)
    inputs = {"input_ids": torch.zeros(5, 4), "labels": torch.tensor([[-100, 1, 2, -100]] * 5)}
    chunks = budget.split(inputs)
    assert [len(c["input_ids"]) for c in chunks] == [2, 2, 1]  # 2 x 4 <= 10 padded tokens
    assert budget.predicted(inputs["labels"]) == 10  # labels[:, 1:]: two per row
    assert training.TokenBudget(3, shifted=False).split(inputs)[0]["input_ids"].shape == (1, 4)


def test_held_out_batches_within_a_budget_score_as_the_whole_batches(tiny_llama_dir: Path) -> None:
    model = load_causal_lm(tiny_llama_dir, "cpu")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (6, 12), generator=generator)
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]
    budget = training.TokenBudget(max_tokens=24, shifted=True)  # 2 rows of 12 a forward pass
    chunks = training.within_budget(batches, budget)
    assert [len(c["input_ids"]) for c in chunks] == [2, 2, 2]
    whole = training.score(sft.causal_loss, model, batches)
    assert training.score(sft.causal_loss, model, chunks) == pytest.approx(whole, rel=1e-6)
    assert training.within_budget(batches, None) is batches  # no budget: untouched


def test_mfu_is_never_above_one_and_names_its_peak(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    slow = Peak(1e9, (1024, 1024, 1024))
    monkeypatch.setattr(training, "matmul_peak", lambda device, hidden, dtype: slow)
    trainer = SimpleNamespace(
        dtype=torch.float32,
        tokens_seen=1000,
        step_seconds=1.0,
        state=SimpleNamespace(global_step=2),
        peak=Peak(2e9, (2048, 32, 128)),  # measured before training: the better one is used
        model=SimpleNamespace(config=SimpleNamespace(hidden_size=32)),
    )
    fair = training.throughput("sft", trainer, 1e6, torch.device("cpu"))  # 1 GFLOP/s achieved
    assert fair["mfu"] == 0.5 and fair["peak"].startswith("2 GFLOP/s (2048x32 @ 32x128")
    outran = training.throughput("sft", trainer, 1e7, torch.device("cpu"))  # 10 GFLOP/s
    assert outran["mfu"] == 1.0
    assert "training outran every sample" in capsys.readouterr().out


def test_bf16_training_measures_its_peak_in_bf16_syncs_its_clock_and_frees_its_optimizer(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MFU's peak is measured in the dtype training computes in; the step clock waits for the
    device's queued work; once trained, the optimizer's state is let go before the next phase."""
    monkeypatch.chdir(tmp_path)
    measured: list[torch.dtype] = []
    real_peak = training.matmul_peak

    def peak(device: torch.device, hidden: int | None, dtype: torch.dtype) -> Peak:
        measured.append(dtype)
        return real_peak(device, hidden, dtype)

    monkeypatch.setattr(training, "matmul_peak", peak)
    tokenizer, _ = load_chat_tokenizer(tiny_llama_dir)
    model = load_causal_lm(tiny_llama_dir, torch.device("cpu"))
    train, _ = tokens.encode_all(tokenizer, sft_records(8), max_length=48)
    batches = sft.eval_batches(train[:2], 2, tokenizer.pad_token_id)
    args = training_args(
        SftParams(**three_steps(2, 1, 0)), 0, torch.device("cpu"), "bf16", tmp_path, len(train)
    )
    trainer = sft.make_trainer(model, args, train, batches, tokenizer.pad_token_id)
    trained = training.train_resumable(trainer, "sft")
    speed = training.throughput("sft", trainer, 1e6, torch.device("cpu"))
    assert measured == [torch.bfloat16, torch.bfloat16]  # before and after training
    assert "bf16 matmul" in str(speed["peak"])
    assert trainer.optimizer is None and trained is trainer.model
    # The step clock synchronizes a CUDA device before reading the time (none here: mocked).
    synced: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", synced.append)
    timer = training.StepTimer(trainer)
    cuda = SimpleNamespace(device=torch.device("cuda:1"))
    timer.on_step_begin(cuda, None, None)
    timer.on_step_end(cuda, None, None)
    assert synced == [torch.device("cuda:1")] * 2


def test_activation_checkpointing_is_asked_under_the_name_the_installed_trainer_has(
    tmp_path: Path,
) -> None:
    """transformers renamed the field (`gradient_checkpointing` before 5.2x, a deprecated alias
    after, which the tests turn into an error): whichever this install has is the one set."""
    cfg = SftParams(gradient_checkpointing=True)
    args = training_args(cfg, 0, torch.device("cpu"), None, tmp_path, 8)
    assert training.CHECKPOINTING in TrainingArguments.__dataclass_fields__
    assert getattr(args, training.CHECKPOINTING) is True
