"""Teaching the generator to read (RAFT: Zhang et al., 2024), a step of the `cpt-sft` build.

The SFT model is fine-tuned on the *fit* questions (train less the calibration slice) in the exact
prompt that `ask` gives it, with the passages a first stage *not trained on the question*
retrieves (the cross-fitted retrievers of `cpt_sft_train`): the passages it will meet when
answering a new question, shortened as `ask` shortens them. The target follows what they hold:

- a gold chunk among them: the answer;
- no gold, and every passage silent on the answer (`silent_on`: not even a quarter of its content
  words), or no chunk of the corpus states it at all: `ABSENT_ANSWER`, so that the model learns
  to say when the passages do not give the answer rather than make one up (`rag.reader.refuse`);
- no gold, but a passage holding part of the answer in other words (chunks overlap, corpora
  restate facts), or refusal not taught: the answer, with the first gold chunk put in place of
  the last passage at a random position, so that nothing is ever taught as absent while it could
  be read off a passage.

So the share of refusals taught is the share of passages that really lack the answer on this
corpus, not a share decided here; how sure the reader must be before it refuses is calibrated
afterwards (`lmpipeline.rag.refusal`). The loss covers the answer only, as in the `sft` stage.
Neither calibration nor held-out questions enter it: its Trainer has no held-out set.

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
    split: Questions,
    ranked: np.ndarray,
    entries: Sequence[Entry],
    config: SystemConfig,
    tokenizer: PreTrainedTokenizerBase,
    budget: int | None,
    refuse: bool,
    seed: int,
) -> list[dict[str, str]]:
    """One {"prompt", "response"} per question of `split` that teaches something (module
    docstring). `ranked` holds each question's entries as a retriever not trained on it ranks
    them, best first (-1 for none)."""
    rng = random.Random(seed)
    k = config.top_k
    records = []
    for record, golds, row in zip(split.records, split.golds, ranked, strict=True):
        answer = record["answer"]
        found = [int(e) for e in row if e >= 0]
        shown = found[:k]
        if set(shown) & set(golds):
            chosen, response = shown, answer
        elif refuse and golds and all(silent_on(answer, entries[e].text) for e in shown):
            chosen, response = shown, ABSENT_ANSWER
        elif golds:
            chosen = shown[: k - 1]
            chosen.insert(rng.randrange(len(chosen) + 1), golds[0])
            response = answer
        elif refuse:  # stated by no chunk: only passages silent on it, as a miss shows
            chosen = [e for e in found if silent_on(answer, entries[e].text)][:k]
            response = ABSENT_ANSWER
        else:
            continue  # stated nowhere and no refusal to teach: only a made-up answer is left
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
    family: str = "rag.reader",
) -> tuple[PreTrainedModel, dict[str, Any], list[dict[str, Any]]]:
    """Fine-tune the causal LM in `sft` (the SFT model, or a reader to train further) on
    `records`; return it, its training speed and its loss log. `inputs` are the files whose
    content a resumed run must share; `family` names its checkpoints and its log lines."""
    cfg = params.rag.reader
    model = load_causal_lm(sft, device)
    # Prompts fit the generator's context (as `ask` fits them); the answer may not: cut there.
    positions = getattr(model.config, "max_position_embeddings", None) or cfg.max_length
    max_length = min(cfg.max_length, positions)
    examples, truncated = encode_all(tokenizer, records, max_length)
    if truncated:
        print(f"{family}: {truncated} of {len(records)} examples cut to {max_length} tokens")
    pad_id = tokenizer.pad_token_id  # load_chat_tokenizer gives every tokenizer one
    # The examples are what the retriever gave: a resumed run must have the same ones.
    config = (asdict(cfg), params.seed, params.device, params.fp16, json.dumps(records))
    out = checkpoint_dir(family, *config, *map(file_digest, inputs))
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
    label = family.replace(".", ": ")
    model = train_resumable(trainer, label)
    share = trainer.predicted_seen / max(trainer.tokens_seen, 1)
    speed = throughput(label, trainer, flops_per_token(model, share, False), device)
    return model, speed, trainer.state.log_history
