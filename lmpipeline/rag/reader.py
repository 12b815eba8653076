"""Teaching the generator to read (RAFT: Zhang et al., 2024), a step of the `cpt-sft` build.

The SFT model is fine-tuned on the *train* questions in the exact prompt that `ask` gives it: the
passages the built system retrieves for the question, shortened as `ask` shortens them. In most
examples a gold chunk is among them (placed at a random position when the retriever missed it);
in a share of them (`rag.reader.absent_rule`: by default the share of train questions whose golds
the encoder the retriever starts from misses in its top `rag.top_k`), and for every train
question whose answer no chunk states, the golds are left out and the target is `ABSENT_ANSWER`,
so that the model learns to say when the passages do not give the answer rather than to make one
up. Such an example shows only passages silent on the answer (`silent_on`: not a gold, nor a chunk
that holds a quarter of the answer in other words): one that could be read off a passage must
never be taught as absent.
The loss covers the answer only, as in the `sft` stage. Held-out questions never enter it: its
Trainer has no held-out set.

The result is a plain Hugging Face causal LM (`output/rag/generator`) that `ask` and
`pipeline("text-generation")` load; the untouched SFT model stays the closed-book baseline.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipeline.chat import load_causal_lm
from lmpipeline.data import file_digest
from lmpipeline.params import Params
from lmpipeline.rag.cpt_sft import fitted_prompt
from lmpipeline.rag.knowledge import Entry, Questions, silent_on
from lmpipeline.rag.system import ABSENT_ANSWER, Hit, SystemConfig
from lmpipeline.sft import (
    LengthGrouped,
    causal_loss,
    collate,
    flops_per_token,
    optimizer_batch,
)
from lmpipeline.tokens import encode_all
from lmpipeline.training import (
    StageTrainer,
    budget_of,
    checkpoint_dir,
    throughput,
    train_resumable,
    training_args,
)

GENERATOR_DIR = "generator"


def reader_records(
    train: Questions,
    ranked: np.ndarray,
    entries: Sequence[Entry],
    config: SystemConfig,
    tokenizer: PreTrainedTokenizerBase,
    budget: int | None,
    absent_share: float,
    seed: int,
) -> list[dict[str, str]]:
    """One {"prompt", "response"} per train question (module docstring). `ranked` holds each
    question's entries as the system retrieves them, best first (-1 for none)."""
    rng = random.Random(seed)
    k = config.top_k
    records = []
    for record, golds, row in zip(train.records, train.golds, ranked, strict=True):
        found = [int(e) for e in row if e >= 0]
        absent = not golds or rng.random() < absent_share
        others = [e for e in found if e not in golds]
        if absent:
            silent = [e for e in others if silent_on(record["answer"], entries[e].text)]
            chosen, response = silent[:k], ABSENT_ANSWER
        else:
            chosen, response = found[:k], record["answer"]
            if not set(chosen) & set(golds):
                chosen = others[: k - 1]
                chosen.insert(rng.randrange(len(chosen) + 1), golds[0])
        hits = [Hit(entries[e], 0.0) for e in chosen]
        prompt = fitted_prompt(config, record["question"], hits, tokenizer, budget)
        records.append({"prompt": prompt, "response": response})
    return records


def teach_reader(
    records: list[dict[str, str]],
    sft: Path,
    tokenizer: PreTrainedTokenizerBase,
    params: Params,
    device: torch.device,
    mode: str | None,
    inputs: Sequence[Path],
) -> tuple[PreTrainedModel, dict[str, Any], list[dict[str, Any]]]:
    """Fine-tune the SFT model on `records`; return it, its training speed and its loss log.
    `inputs` are the files whose content a resumed run must share."""
    cfg = params.rag.reader
    model = load_causal_lm(sft, device)
    # Prompts fit the generator's context (as `ask` fits them); the answer may not: cut there.
    positions = getattr(model.config, "max_position_embeddings", None) or cfg.max_length
    max_length = min(cfg.max_length, positions)
    examples, truncated = encode_all(tokenizer, records, max_length)
    if truncated:
        print(f"rag: reader: {truncated} of {len(records)} examples cut to {max_length} tokens")
    pad_id = tokenizer.pad_token_id  # load_chat_tokenizer gives every tokenizer one
    # The examples are what the retriever gave: a resumed run must have the same ones.
    config = (asdict(cfg), params.seed, params.device, params.fp16, json.dumps(records))
    out = checkpoint_dir("rag.reader", *config, *map(file_digest, inputs))
    args = training_args(cfg, params.seed, device, mode, out, len(examples), params.launch)
    lengths = [len(e.input_ids) for e in examples]
    trainer = StageTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        eval_dataset=[],  # no held-out set: held-out questions never reach the reader
        data_collator=lambda batch: collate(batch, pad_id),
        loss_fn=causal_loss,
        eval_fn=lambda m: {},
        sampler=LengthGrouped(lengths, optimizer_batch(args), params.seed),
        budget=budget_of(cfg, shifted=True),
    )
    model = train_resumable(trainer, "rag: reader")
    share = trainer.predicted_seen / max(trainer.tokens_seen, 1)
    speed = throughput("rag: reader", trainer, flops_per_token(model, share, False), device)
    return model, speed, trainer.state.log_history
