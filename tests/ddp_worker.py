"""Run by torchrun from test_launch.py: a few SFT steps on 2 processes, then every rank checks
that its weights equal rank 0's (DDP synchronized the gradients) and that they moved."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import sft
from stages.params import SftParams
from stages.training import training_args

CORPUS = ["the model learns to predict masked tokens", "a retriever finds passages"]


def main(model_dir: str, out: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    records = [{"prompt": f"what {i}", "response": CORPUS[i % 2]} for i in range(16)]
    train, _ = sft.encode_all(tokenizer, records, 32)
    cfg = SftParams(batch_size=2, lr=1e-2, max_steps=4, eval_steps=100, save_steps=100)
    args = training_args(cfg, 0, torch.device("cpu"), None, Path(out), len(train))
    trainer = sft.make_trainer(model, args, train, [], tokenizer.pad_token_id)
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
