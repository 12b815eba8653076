"""Domain-adaptive pre-training of the generator (the `cpt_lm` stage): the SFT base model keeps
training as a causal LM on the validated corpus before SFT (Gururangan et al., 2020).

Passages are tokenized, each followed by the end-of-text token, concatenated and cut into blocks
of `cpt_lm.max_length` tokens once, by the `tokenize_cpt_lm` stage (`lmpipeline.tokens`): no
padding, the loss on every token (the transformers examples' `run_clm` packing; attention crosses
passage boundaries, as there). A seeded share of the blocks
is held out (`lmpipeline.mixing`, which also mixes replayed SFT conversations and reading chats
into the training blocks), and their perplexity is measured before and after training on
exactly the same tokens. The result is a plain Hugging Face causal LM that the `sft` stage
starts from.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, TrainingArguments

from lmpipeline.sft import causal_loss
from lmpipeline.tokens import TokenRows
from lmpipeline.training import EpochSampler, StageTrainer, TokenBudget, held_out_scores, score


def as_batch(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Packed blocks as a causal-LM batch: nothing is padding, every next token is predicted."""
    return {"input_ids": blocks, "attention_mask": torch.ones_like(blocks), "labels": blocks}


def eval_batches(blocks: TokenRows, batch_size: int) -> list[dict[str, torch.Tensor]]:
    ids = blocks.column("input_ids").long()
    return [as_batch(ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)]


def evaluate(model: PreTrainedModel, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Loss, perplexity and next-token accuracy over the held-out blocks."""
    return held_out_scores(causal_loss, model, batches, "token_accuracy")


def make_trainer(
    model: PreTrainedModel,
    args: TrainingArguments,
    train: TokenRows,
    batches: list[dict[str, torch.Tensor]],
    budget: TokenBudget | None = None,
) -> StageTrainer:
    """The cpt_lm trainer: shuffled packed blocks, loss on every token, held-out loss as eval."""
    return StageTrainer(
        model=model,
        args=args,
        train_dataset=train,  # a block per row, read when the batch needs it
        eval_dataset=batches,  # the Trainer wants one; StageTrainer scores it with eval_fn
        data_collator=lambda rows: as_batch(torch.stack([r["input_ids"] for r in rows]).long()),
        loss_fn=causal_loss,
        eval_fn=lambda m: {"eval_loss": score(causal_loss, m, batches)[0]},
        sampler=EpochSampler(len(train), args.seed),
        budget=budget,
    )
