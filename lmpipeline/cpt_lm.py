"""Domain-adaptive pre-training of the generator (the `cpt_lm` stage): the SFT base model keeps
training as a causal LM on the validated corpus before SFT (Gururangan et al., 2020).

Passages are tokenized, each followed by the end-of-text token, concatenated and cut into blocks
of `cpt_lm.max_length` tokens: no padding, the loss on every token (the transformers examples'
`run_clm` packing; attention crosses passage boundaries, as there). A seeded share of the blocks
is held out, and their perplexity is measured before and after training on exactly the same
tokens. The result is a plain Hugging Face causal LM that the `sft` stage starts from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

from lmpipeline.data import eval_mask
from lmpipeline.errors import StageError
from lmpipeline.params import CptLmParams
from lmpipeline.sft import causal_loss
from lmpipeline.training import EpochSampler, StageTrainer, held_out_scores, score


def pack(
    passages: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> torch.Tensor:
    """(n_blocks, max_length) token ids: the passages joined by the end-of-text token and cut into
    blocks; the remainder shorter than a block is dropped."""
    if tokenizer.eos_token_id is None:
        raise StageError("the generator's tokenizer has no end-of-text token to join passages")
    # A passage may hold a marker such as <|im_end|> as text: it stays text, never a control
    # token the model would learn to emit mid-document.
    encoded = tokenizer(list(passages), add_special_tokens=False, split_special_tokens=True)
    encoded = encoded["input_ids"]
    stream = [token for ids in encoded for token in (*ids, tokenizer.eos_token_id)]
    n = len(stream) // max_length
    return torch.tensor(stream[: n * max_length], dtype=torch.long).view(n, max_length)


def split_blocks(
    passages: Sequence[str], tokenizer: PreTrainedTokenizerBase, cfg: CptLmParams, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out blocks, the held-out ones drawn with `seed`; a corpus too short for
    one of each is the user's to fix (a shorter `cpt_lm.max_length`, or `enabled: false`)."""
    blocks = pack(passages, tokenizer, cfg.max_length)
    if len(blocks) < 2:
        raise StageError(
            f"the corpus makes {len(blocks)} block(s) of cpt_lm.max_length={cfg.max_length}"
            " tokens; at least 2 are needed (one to train on, one held out): lower"
            " cpt_lm.max_length or set cpt_lm.enabled: false"
        )
    held_out = torch.from_numpy(eval_mask(len(blocks), cfg.eval_fraction, seed))
    return blocks[~held_out], blocks[held_out]


def as_batch(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Packed blocks as a causal-LM batch: nothing is padding, every next token is predicted."""
    return {"input_ids": blocks, "attention_mask": torch.ones_like(blocks), "labels": blocks}


def eval_batches(blocks: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [as_batch(blocks[i : i + batch_size]) for i in range(0, len(blocks), batch_size)]


def evaluate(model: PreTrainedModel, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Loss, perplexity and next-token accuracy over the held-out blocks."""
    return held_out_scores(causal_loss, model, batches, "token_accuracy")


def make_trainer(
    model: PreTrainedModel,
    args: TrainingArguments,
    train: torch.Tensor,
    batches: list[dict[str, torch.Tensor]],
) -> StageTrainer:
    """The cpt_lm trainer: shuffled packed blocks, loss on every token, held-out loss as eval."""
    return StageTrainer(
        model=model,
        args=args,
        train_dataset=list(train),  # a row per block
        eval_dataset=batches,  # the Trainer wants one; StageTrainer scores it with eval_fn
        data_collator=lambda rows: as_batch(torch.stack(rows)),
        loss_fn=causal_loss,
        eval_fn=lambda m: {"eval_loss": score(causal_loss, m, batches)[0]},
        sampler=EpochSampler(len(train), args.seed),
    )
