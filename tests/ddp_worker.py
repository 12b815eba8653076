"""Run by torchrun from test_launch.py: a few training steps of one stage's loss on 2 processes,
then every rank checks that its weights equal rank 0's (DDP synchronized the gradients) and that
they moved. `sft` trains a causal LM, `rag` the retriever (whose loss calls the model itself),
`rag-sequence` a RAG model retrieving from its own copy of a small index on each rank."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from stages import rag, rag_sequence, retrieval, sft
from stages.launch import exit_process
from stages.params import Params, RagParams, SftParams
from stages.training import EpochSampler, StageTrainer, training_args

CORPUS = ["the model learns to predict masked tokens", "a retriever finds passages"]


def sft_trainer(model_dir: str, out: Path) -> tuple[torch.nn.Module, StageTrainer]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    records = [{"prompt": f"what {i}", "response": CORPUS[i % 2]} for i in range(16)]
    train, _ = sft.encode_all(tokenizer, records, 32)
    cfg = SftParams(batch_size=2, lr=1e-2, max_steps=4, eval_steps=100, save_steps=100)
    args = training_args(cfg, 0, torch.device("cpu"), None, out, len(train))
    return model, sft.make_trainer(model, args, train, [], tokenizer.pad_token_id)


def rag_trainer(model_dir: str, out: Path) -> tuple[torch.nn.Module, StageTrainer]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)  # the unused pooler starts the same on both ranks
    encoder = AutoModel.from_pretrained(model_dir)
    entries = [retrieval.Entry(f"a{i}", f"{CORPUS[i % 2]} {i}") for i in range(16)]
    pairs = [(f"question {i} {CORPUS[i % 2]}", i) for i in range(16)]
    cfg = RagParams(retriever_batch_size=2, retriever_lr=1e-3, retriever_epochs=1)
    collate = rag.PairCollator(tokenizer, entries, max_length=16)
    train_cfg = retrieval.retriever_training(cfg)
    args = training_args(train_cfg, 0, torch.device("cpu"), None, out, len(pairs))
    args.max_steps = 4
    trainer = StageTrainer(
        model=encoder,
        args=args,
        train_dataset=pairs,
        eval_dataset=[],
        data_collator=collate,
        loss_fn=rag.contrastive_loss,
        eval_fn=lambda m: {},
        sampler=EpochSampler(len(pairs), 0),
    )
    return encoder, trainer


def rag_sequence_trainer(model_dir: str, out: Path) -> tuple[torch.nn.Module, StageTrainer]:
    model, tokenizer = rag_sequence.load_rag(model_dir, n_docs=2)
    entries = [retrieval.Entry(f"a{i}", f"{CORPUS[i % 2]} {i}") for i in range(16)]
    vectors = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    kb = out / f"kb-{dist.get_rank() if dist.is_initialized() else 0}"
    rag_sequence.save_kb(kb, entries, vectors, retrieval.build_index(vectors, "flat"))
    model.set_retriever(rag_sequence.kb_retriever(model, tokenizer, kb))
    pairs = [(f"question {i} {CORPUS[i % 2]}", CORPUS[i % 2]) for i in range(16)]
    params = Params(rag=RagParams(retriever_batch_size=2, retriever_lr=1e-3, retriever_epochs=1))
    collator = rag_sequence.QACollator(tokenizer, max_length=16)
    return model, rag_sequence.make_trainer(
        model, collator, pairs, pairs[:2], params, torch.device("cpu"), None, out / "ckpt"
    )


def main(kind: str, model_dir: str, out: str) -> None:
    make = {"sft": sft_trainer, "rag": rag_trainer, "rag-sequence": rag_sequence_trainer}[kind]
    model, trainer = make(model_dir, Path(out))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    trainer.train()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(after) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, after)
    assert dist.get_world_size() == 2
    assert all(torch.equal(gathered[0], g) for g in gathered), "ranks diverged: no gradient sync"
    assert not torch.equal(before, after), "training did not change the weights"
    steps = trainer.state.global_step
    print(f"rank {dist.get_rank()}: weights equal across ranks after {steps} steps")


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_process(0)
