"""Supervised fine-tuning (the `sft` stage): conversations (a prompt/response pair is one of a
single turn) as chat-formatted examples with the loss on the assistant's turns only,
length-grouped batches, and the held-out scores.

Each conversation is rendered with the tokenizer's chat template (see `lmpipeline.chat`). The
loss covers the assistant turns only (TRL's `assistant_only_loss`; for a pair, its
`completion_only_loss`); batches are grouped by length so that almost no compute goes to padding,
and the vocabulary projection runs on those positions only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

from lmpipeline.chat import Example, generate
from lmpipeline.conversations import context_and_answer
from lmpipeline.metrics import perplexity, rouge_l, token_f1
from lmpipeline.params import AdaptedParams, SftParams
from lmpipeline.tokens import Examples
from lmpipeline.training import EpochSampler, LossParts, StageTrainer, TokenBudget, score

# --- batches -----------------------------------------------------------------------------------


class LengthGrouped(EpochSampler):
    """Batches of near-equal lengths, in random order, drawn afresh each epoch.

    Examples are shuffled, sorted by length within groups of 16 batches and cut into batches, so
    a batch pads to the length of its neighbours; the batches are then shuffled, so that long and
    short ones alternate through training. Only the last (partial) batch keeps its place, because
    the data loader cuts the order into batches itself.

    `batch_size` is the optimizer's batch (micro-batch x accumulation x processes): the data
    loader cuts each such batch into consecutive micro-batches, so accumulating 2 x 2 trains on
    exactly the examples of one batch of 4, and each micro-batch still pads little.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        super().__init__(len(lengths), seed)
        self.lengths, self.batch_size = lengths, batch_size

    def order(self, generator: torch.Generator) -> list[int]:
        shuffled, step = super().order(generator), self.batch_size * 16
        by_length = [
            i
            for start in range(0, self.size, step)
            for i in sorted(shuffled[start : start + step], key=lambda i: -self.lengths[i])
        ]
        batches = [by_length[i : i + self.batch_size] for i in range(0, self.size, self.batch_size)]
        last = batches.pop() if batches and len(batches[-1]) < self.batch_size else []
        shuffled_batches = [batches[b] for b in torch.randperm(len(batches), generator=generator)]
        return [i for batch in [*shuffled_batches, last] for i in batch]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the batch's longest example; padding is masked from attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        pad = width - len(e.input_ids)
        batch["input_ids"].append(e.input_ids + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(e.input_ids) + [0] * pad)
        batch["labels"].append(e.labels + [-100] * pad)
    return {k: torch.tensor(v) for k, v in batch.items()}


def eval_batches(
    examples: list[Example], batch_size: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    return [
        collate(ordered[i : i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)
    ]


# --- loss and scores ---------------------------------------------------------------------------


def unwrap(model: PreTrainedModel) -> PreTrainedModel:
    """The causal LM inside a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def causal_loss(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> LossParts:
    """Next-token cross-entropy summed over response tokens.

    The decoder runs on every token, the vocabulary projection only on positions whose next
    token is a response token: prompt and padding positions never reach the 49k-way softmax.
    """
    inner = unwrap(model)
    hidden = inner.base_model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
    ).last_hidden_state
    targets = inputs["labels"][:, 1:]
    selected = targets != -100
    logits = inner.get_output_embeddings()(hidden[:, :-1][selected])
    targets = targets[selected]
    return LossParts(
        loss_sum=F.cross_entropy(logits.float(), targets, reduction="sum"),
        predicted=selected.sum(),
        correct=(logits.argmax(-1) == targets).sum(),
    )


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batches: list[dict[str, torch.Tensor]],
    records: list[dict[str, Any]],
    cfg: SftParams,
) -> tuple[dict[str, float], list[str]]:
    """Loss, perplexity and accuracy on the assistant turns, then F1 and ROUGE-L of greedy
    answers to each held-out conversation up to its last assistant turn, against that turn."""
    loss, accuracy = score(causal_loss, model, batches)
    contexts, refs = zip(*map(context_and_answer, records), strict=True) if records else ((), ())
    answers = generate(model, tokenizer, contexts, cfg.max_new_tokens, cfg.batch_size)
    n = max(len(refs), 1)
    return {
        "eval_loss": round(loss, 6),
        "perplexity": round(perplexity(loss), 4),
        "token_accuracy": round(accuracy, 6),
        "gen_f1": round(sum(map(token_f1, answers, refs)) / n, 6),
        "gen_rougeL": round(sum(map(rouge_l, answers, refs)) / n, 6),
    }, answers


def with_lora(model: PreTrainedModel, cfg: AdaptedParams) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model  # optional: only LoRA runs need peft

    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def flops_per_token(model: PreTrainedModel, response_share: float, lora: bool) -> float:
    """6 N per token for full fine-tuning (4 N with LoRA: frozen weights get no gradient), N the
    non-embedding parameters, plus the vocabulary projection on the response share of tokens."""
    inner = unwrap(model)
    head = inner.get_output_embeddings().weight.numel()
    factor = 4.0 if lora else 6.0
    return factor * (inner.num_parameters(exclude_embeddings=True) + response_share * head)


def make_trainer(
    model: PreTrainedModel,
    args: TrainingArguments,
    train: Examples | list[Example],
    batches: list[dict[str, torch.Tensor]],
    pad_id: int,
    budget: TokenBudget | None = None,
) -> StageTrainer:
    """The SFT trainer: response-only loss, length-grouped batches, held-out loss as eval."""
    return StageTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=batches,  # the Trainer wants one; StageTrainer scores it with eval_fn
        data_collator=lambda examples: collate(examples, pad_id),
        loss_fn=causal_loss,
        eval_fn=lambda m: {"eval_loss": score(causal_loss, m, batches)[0]},
        sampler=LengthGrouped(lengths(train), optimizer_batch(args), args.seed),
        budget=budget,
    )


def lengths(examples: Examples | list[Example]) -> list[int]:
    if isinstance(examples, Examples):
        return examples.lengths()  # a column of the token dataset: no example is read
    return [len(e.input_ids) for e in examples]


def optimizer_batch(args: TrainingArguments) -> int:
    """Examples per optimizer step, all processes together."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def samples_markdown(
    records: list[dict[str, Any]], base: list[str], final: list[str], count: int
) -> str:
    """The first `count` held-out answers: under the last user turn (the earlier turns of a
    conversation are not shown), the reference, the base model's and the fine-tuned one's."""
    parts = ["# SFT samples: greedy answers to held-out prompts", ""]
    for r, b, f in list(zip(records, base, final, strict=True))[:count]:
        context, reference = context_and_answer(r)
        parts += [
            f"## {context[-1]['content']}",
            "",
            f"**Reference:** {reference}",
            "",
            f"**Base model:** {b}",
            "",
            f"**Fine-tuned:** {f}",
            "",
        ]
    return "\n".join(parts)
