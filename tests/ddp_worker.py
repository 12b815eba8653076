"""Run by torchrun from test_launch.py: a few training steps of one stage's loss on 2 processes.

`sft` trains a causal LM, `cpt` a masked LM with the stage's own parameter groups, `rag` the
retriever (whose loss calls the model itself), `rag-sequence` a RAG model retrieving from its
own copy of a small index on each rank. With strategy `ddp` every rank then checks that its
weights equal rank 0's (DDP synchronized the gradients) and that they moved; with `fsdp` that
each rank holds only its shard of every parameter. Rank 0 saves the trained weights, gathered
whole, and the held-out losses logged during training, for the test to compare strategies.
With mode `bf16`, every rank also checks that each step, not only the first, computed under
bf16 autocast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from accelerate import state
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from lmpipeline import cpt, sft, tokens
from lmpipeline.launch import exit_process
from lmpipeline.models import load_tokenizer, resolve_model
from lmpipeline.params import CptParams, LaunchParams, RagTrainingParams, SftParams
from lmpipeline.rag import backend, cpt_sft_train, rag_sequence, rag_sequence_train
from lmpipeline.rag.index import build_index
from lmpipeline.rag.knowledge import Entry
from lmpipeline.training import StageTrainer, trained_model, training_args

CORPUS = ["the model learns to predict masked tokens", "a retriever finds passages"]


def shard_on_cpu() -> None:
    """Let accelerate run FSDP on CPU processes, for this test only. FSDP2 itself shards over
    gloo, but accelerate turns FSDP on for accelerator devices only and runs CPU processes as
    DDP (which is why the stages refuse `launch.strategy: fsdp` without CUDA)."""
    init = state.AcceleratorState.__init__

    def with_fsdp(self: state.AcceleratorState, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.fsdp_plugin = plugin
            self.distributed_type = DistributedType.FSDP
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = with_fsdp


def sft_trainer(
    model_dir: str, out: Path, launch: LaunchParams, mode: str | None
) -> tuple[torch.nn.Module, StageTrainer]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    records = [{"prompt": f"what {i}", "response": CORPUS[i % 2]} for i in range(16)]
    train, _ = tokens.encode_all(tokenizer, records, 32)
    batches = sft.eval_batches(train[:4], 2, tokenizer.pad_token_id)
    cfg = SftParams(batch_size=2, lr=1e-2, max_steps=4, eval_steps=2, save_steps=2)
    args = training_args(cfg, 0, torch.device("cpu"), mode, out, len(train), launch)
    return model, sft.make_trainer(model, args, train, batches, tokenizer.pad_token_id)


def cpt_trainer(
    model_dir: str, out: Path, launch: LaunchParams, mode: str | None
) -> tuple[torch.nn.Module, StageTrainer]:
    source = resolve_model(model_dir)
    tokenizer = load_tokenizer(source)
    model, _ = cpt.load_mlm(source)
    fresh = {name for name, _ in model.named_parameters() if name.startswith("cls.")}
    cfg = CptParams(max_length=16, batch_size=2, lr=1e-3, head_lr=1e-2, max_steps=4, eval_steps=2)
    blocks = tokens.blocks_of(CORPUS * 8, tokenizer, cfg.max_length)
    train, heldout = cpt.split_blocks(blocks, cfg.eval_fraction, 0)
    masking = cpt.Masking.of(tokenizer, cfg)
    batches = cpt.fixed_eval_batches(heldout, masking, 2, 0)
    args = training_args(cfg, 0, torch.device("cpu"), mode, out, len(train), launch)
    return model, cpt.make_trainer(model, args, train, batches, masking, cfg, fresh)


RAG_TRAINING = RagTrainingParams(batch_size=2, lr=1e-3, epochs=1, max_steps=4)


def rag_trainer(
    model_dir: str, out: Path, launch: LaunchParams, mode: str | None
) -> tuple[torch.nn.Module, StageTrainer]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)  # the unused pooler starts the same on both ranks
    encoder = AutoModel.from_pretrained(model_dir)
    entries = [Entry(f"a{i}", f"{CORPUS[i % 2]} {i}") for i in range(16)]
    pairs = [cpt_sft_train.Pair(f"question {i} {CORPUS[i % 2]}", (i,)) for i in range(16)]
    collate = cpt_sft_train.PairCollator(tokenizer, entries, max_length=16)
    training = backend.Training(cpt_sft_train.contrastive_loss, collate, pairs, held_out=[])
    cpu = torch.device("cpu")
    return encoder, backend.make_trainer(encoder, training, RAG_TRAINING, 0, cpu, mode, out, launch)


def rag_sequence_trainer(
    model_dir: str, out: Path, launch: LaunchParams, mode: str | None
) -> tuple[torch.nn.Module, StageTrainer]:
    model, tokenizer = rag_sequence.load_rag(model_dir, n_docs=2)
    entries = [Entry(f"a{i}", f"{CORPUS[i % 2]} {i}") for i in range(16)]
    vectors = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    # The process group starts with the Trainer, later: the rank comes from torchrun's env.
    kb = out / f"kb-{os.environ['RANK']}"
    rag_sequence.save_kb(kb, entries, vectors, build_index(vectors, "flat"))
    model.set_retriever(rag_sequence.kb_retriever(model, tokenizer, kb))
    pairs = [(f"question {i} {CORPUS[i % 2]}", CORPUS[i % 2]) for i in range(16)]
    collator = rag_sequence_train.QACollator(tokenizer, max_length=16)
    training = backend.Training(rag_sequence_train.marginal_nll, collator, pairs, pairs[:2])
    cpu = torch.device("cpu")
    ckpt = out / "ckpt"
    return model, backend.make_trainer(model, training, RAG_TRAINING, 0, cpu, mode, ckpt, launch)


def check_synchronized(before: torch.Tensor, model: torch.nn.Module) -> None:
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(after) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, after)
    assert all(torch.equal(gathered[0], g) for g in gathered), "ranks diverged: no gradient sync"
    assert not torch.equal(before, after), "training did not change the weights"
    print(f"rank {dist.get_rank()}: weights equal across ranks")


def check_sharded(model: torch.nn.Module) -> None:
    params = list(model.parameters())
    assert all(isinstance(p, DTensor) for p in params), "FSDP did not shard the parameters"
    held, total = sum(p.to_local().numel() for p in params), sum(p.numel() for p in params)
    assert held < 0.6 * total, f"rank holds {held} of {total} values"
    print(f"rank {dist.get_rank()}: holds {held} of {total} parameter values")


def record_precision(trainer: StageTrainer) -> list[tuple[int, bool, torch.dtype]]:
    """For every linear layer's output from now on: the step, whether autocast was on, dtype."""
    seen: list[tuple[int, bool, torch.dtype]] = []

    def record(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Linear):
            step = trainer.state.global_step
            seen.append((step, torch.is_autocast_enabled("cpu"), output.dtype))

    torch.nn.modules.module.register_module_forward_hook(record)
    return seen


def check_bf16(seen: list[tuple[int, bool, torch.dtype]], steps: int) -> None:
    """Every step, not only the first, computed its linear layers under bf16 autocast."""
    assert {step for step, _, _ in seen} >= set(range(steps)), "steps without a forward"
    fp32 = sorted({step for step, on, dtype in seen if not on or dtype != torch.bfloat16})
    assert not fp32, f"steps {fp32} computed without bf16 autocast"
    print(f"rank {dist.get_rank()}: bf16 autocast in every one of {steps} steps")


def main(kind: str, strategy: str, model_dir: str, out: str, mode: str = "fp32") -> None:
    if strategy == "fsdp":
        shard_on_cpu()
    make = {
        "sft": sft_trainer,
        "cpt": cpt_trainer,
        "rag": rag_trainer,
        "rag-sequence": rag_sequence_trainer,
    }[kind]
    launch = LaunchParams(nproc_per_node=2, strategy=strategy)
    model, trainer = make(model_dir, Path(out), launch, None if mode == "fp32" else mode)
    seen = record_precision(trainer) if mode == "bf16" else None
    assert dist.get_world_size() == 2
    if strategy == "fsdp":
        trainer.train()
        check_sharded(trainer.model)
        if kind == "sft":  # a sharded checkpoint: every rank wrote its part
            shards = sorted(p.name for p in Path(out).glob("checkpoint-4/pytorch_model_fsdp_0/*"))
            assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards
    else:
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        trainer.train()
        check_synchronized(before, model)
    if seen is not None:
        check_bf16(seen, trainer.state.global_step)
    if kind == "cpt":  # the stage's groups: the head at head_lr, the encoder at lr
        assert {g["initial_lr"] for g in trainer.optimizer.param_groups} == {1e-3, 1e-2}
    whole = trained_model(trainer)
    if dist.get_rank() == 0:
        whole.save_pretrained(Path(out) / strategy)
        losses = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
        (Path(out) / f"{strategy}.json").write_text(json.dumps(losses))
    print(f"rank {dist.get_rank()}: {trainer.state.global_step} steps")


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_process(0)
