"""Continued masked-LM pre-training (the `cpt` stage): token blocks, BERT's masking, the loss and
its scores.

Lines are tokenized, joined with [SEP] and cut into blocks of `cpt.max_length` tokens (no
padding) once, by the `tokenize_cpt` stage (`lmpipeline.tokens`); a seeded share of blocks is held
out, and the encoder trains with BERT's objective:
`mlm_probability` of the tokens (or whole words) are selected, 80 % of them replaced by [MASK],
10 % by a random token, 10 % left as they are. The held-out blocks are masked once with a fixed
seed, so the base and the final model are scored on exactly the same predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForMaskedLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
)

from lmpipeline.data import eval_mask
from lmpipeline.models import ModelSource
from lmpipeline.params import CptParams
from lmpipeline.tokens import TokenRows
from lmpipeline.training import (
    EpochSampler,
    LossParts,
    StageTrainer,
    WarmupOnly,
    budget_of,
    held_out_scores,
)

# --- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Masking:
    """What BERT's masking needs to know about the tokenizer, and the cpt.* choices."""

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]  # never selected ([CLS], [SEP], [PAD], ...)
    probability: float
    whole_word: bool

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, cfg: CptParams) -> Masking:
        return cls(
            mask_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            special_ids=tuple(tokenizer.all_special_ids),
            probability=cfg.mlm_probability,
            whole_word=cfg.whole_word_masking,
        )


def mask_tokens(
    input_ids: torch.Tensor,
    word_starts: torch.Tensor,
    masking: Masking,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select `probability` of the tokens (or words), then put [MASK] in 80 % of the selected
    positions, a random token in 10 % and leave 10 % as they are.

    Returns (masked input_ids, labels), labels being -100 wherever nothing is predicted.
    """
    special = torch.isin(input_ids, torch.tensor(masking.special_ids))
    draw = torch.rand(input_ids.shape, generator=generator)
    if masking.whole_word:
        # Every piece of a word takes the draw of the word's first piece.
        word_index = word_starts.long().cumsum(dim=1) - 1
        draw = torch.gather(draw, 1, word_index.clamp(min=0))
    selected = (draw < masking.probability) & ~special
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[selected & (action < 0.8)] = masking.mask_id
    random_slot = selected & (action >= 0.8) & (action < 0.9)
    noise = torch.randint(masking.vocab_size, input_ids.shape, generator=generator)
    masked[random_slot] = noise[random_slot]
    return masked, labels


class MaskedBlocks(torch.utils.data.Dataset):
    """Training blocks, masked afresh at each epoch from (seed, epoch, block) alone.

    `EpochSampler` asks for key = epoch * len + block. Masks that depend on nothing else make a
    run resumed from a checkpoint see exactly the batches an uninterrupted run would have seen,
    whatever the data loader prefetched or the global RNG went through.
    """

    def __init__(self, blocks: TokenRows, masking: Masking, seed: int) -> None:
        self.blocks, self.masking, self.seed = blocks, masking, seed

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        block = self.blocks[key % len(self)]
        input_ids, word_starts = block["input_ids"].long()[None], block["word_starts"][None]
        input_ids, labels = mask_tokens(input_ids, word_starts, self.masking, generator)
        return {"input_ids": input_ids[0], "labels": labels[0]}


class EpochKeys(EpochSampler):
    """A shuffled order whose keys also carry the epoch, as `MaskedBlocks` expects."""

    def order(self, generator: torch.Generator) -> list[int]:
        return [self.epoch * self.size + i for i in super().order(generator)]


# --- loss and evaluation -----------------------------------------------------------------------


def mlm_loss(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> LossParts:
    """Cross-entropy summed over the selected tokens.

    For BERT the vocabulary projection runs on the selected ~15 % of positions only, which
    halves the cost of a training step on a CPU; other architectures take their full head.
    """
    labels = inputs["labels"]
    selected = labels != -100
    if has_sparse_head(model):
        hidden = model.bert(input_ids=inputs["input_ids"]).last_hidden_state
        logits = model.cls(hidden[selected])
    else:
        logits = model(input_ids=inputs["input_ids"]).logits[selected]
    targets = labels[selected]
    return LossParts(
        loss_sum=F.cross_entropy(logits.float(), targets, reduction="sum"),
        predicted=selected.sum(),
        correct=(logits.argmax(-1) == targets).sum(),
    )


def has_sparse_head(model: PreTrainedModel) -> bool:
    return hasattr(model, "bert") and hasattr(model, "cls")


def flops_per_token(model: PreTrainedModel, mlm_probability: float) -> float:
    """Training FLOPs per token, 6 x the parameters that do matmuls on it (Kaplan et al.).

    Embedding lookups cost no matmul; the vocabulary projection (tied to the embeddings) runs on
    every token, or only on the selected ones with the sparse BERT head.
    """
    head = model.get_output_embeddings().weight.numel()
    share = mlm_probability if has_sparse_head(model) else 1.0
    return 6.0 * (model.num_parameters(exclude_embeddings=True) + share * head)


def evaluate(model: PreTrainedModel, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Loss, perplexity and accuracy over the pre-masked held-out batches."""
    return held_out_scores(mlm_loss, model, batches, "mask_accuracy")


def fixed_eval_batches(
    blocks: TokenRows, masking: Masking, batch_size: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Mask the held-out blocks once, with their own generator: the same for base and final."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = blocks.column("input_ids").long()
    input_ids, labels = mask_tokens(input_ids, blocks.column("word_starts"), masking, generator)
    return [
        {"input_ids": input_ids[i : i + batch_size], "labels": labels[i : i + batch_size]}
        for i in range(0, len(input_ids), batch_size)
    ]


# --- training ----------------------------------------------------------------------------------


def load_mlm(source: ModelSource) -> tuple[PreTrainedModel, set[str]]:
    """The masked-LM model of `source`, and the names of the parameters its checkpoint lacked
    (a sentence encoder such as the bundled MiniLM has no MLM head: those start from scratch)."""
    model, info = AutoModelForMaskedLM.from_pretrained(
        source.path, trust_remote_code=False, output_loading_info=True, **source.load_kwargs()
    )
    return model, set(info["missing_keys"])


def param_groups(model: torch.nn.Module, cfg: CptParams, fresh: set[str]) -> list[dict[str, Any]]:
    """AdamW groups: the `fresh` parameters (an MLM head the checkpoint lacked) learn at `head_lr`,
    the pretrained ones at `lr`, so a pretrained head (bert-base-uncased) is fine-tuned gently;
    biases and norms take no weight decay."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():  # tied weights appear once, under the encoder
        is_head = name in fresh
        decays = param.ndim > 1 and "LayerNorm" not in name
        groups.setdefault((is_head, decays), []).append(param)
    return [
        {
            "params": params,
            "lr": (cfg.head_lr or cfg.lr) if is_head else cfg.lr,
            "weight_decay": cfg.weight_decay if decays else 0.0,
        }
        for (is_head, decays), params in sorted(groups.items())
    ]


def split_blocks(blocks: TokenRows, eval_fraction: float, seed: int) -> tuple[TokenRows, TokenRows]:
    """The train blocks and a seeded held-out share of them, in their order."""
    held_out = eval_mask(len(blocks), eval_fraction, seed)
    return blocks.select(np.flatnonzero(~held_out)), blocks.select(np.flatnonzero(held_out))


def make_trainer(
    model: PreTrainedModel,
    args: TrainingArguments,
    train: TokenRows,
    eval_batches: list[dict[str, torch.Tensor]],
    masking: Masking,
    cfg: CptParams,
    fresh: set[str],
) -> StageTrainer:
    """The CPT trainer: blocks masked afresh each epoch, the head the checkpoint lacked at
    `head_lr` and alone for the first `head_warmup_steps`, the fixed held-out batches as eval."""
    warmup = cfg.head_warmup_steps if fresh else 0  # a pretrained head needs none
    return StageTrainer(
        model=model,
        args=args,
        train_dataset=MaskedBlocks(train, masking, args.seed),
        eval_dataset=eval_batches,  # the Trainer wants one; StageTrainer scores it with eval_fn
        param_groups=lambda m: param_groups(m, cfg, fresh),
        loss_fn=mlm_loss,
        eval_fn=lambda m: evaluate(m, eval_batches),
        sampler=EpochKeys(len(train), args.seed),
        budget=budget_of(cfg, shifted=False),
        warmup_only=WarmupOnly(warmup, frozenset(fresh)) if warmup else None,
    )
