"""What the generator's CPT trains on (`tokenize_cpt_lm`): the corpus packed into blocks, a seeded
share of them held out, and, in the training blocks alone, what keeps a chat model answering.

Raw-corpus continued pre-training erodes instruction following (issue 28). Two remedies from the
literature, each off by default and measured in docs/training.md:
- `cpt_lm.replay`: SFT *train* conversations, rendered with the chat template, replayed beside
  the corpus (replay in continual pre-training), so many tokens of them per corpus train token;
- `cpt_lm.reading`: each train passage in a chat, followed by templated questions about it that
  the passage answers (reading comprehension, AdaptLLM: Cheng et al., ICLR 2024). The templates
  ask for what a passage states word for word (the sentence after a quoted one; the rest of a
  sentence begun), so they hold on any corpus: no question is written for the default data.

Held out means held out: the held-out blocks are corpus only, the same blocks whatever is mixed
in (so their perplexity before and after compares); a reading chat is made only of a passage none
of whose tokens lies in a held-out block; only the SFT train split is replayed, never its eval
split. Mixed-in chats are shuffled with `seed` and packed into blocks of their own, each chat
followed by the end-of-text token as each passage is; the loss is on every token, as on the corpus.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from lmpipeline import tokens
from lmpipeline.chat import Message, encode_chat
from lmpipeline.data import eval_mask
from lmpipeline.errors import StageError
from lmpipeline.params import CptLmParams
from lmpipeline.tokens import Row

MIN_WORDS = 6  # a sentence shorter than this is too short to quote half of


def held_out_blocks(count: int, cfg: CptLmParams, seed: int) -> np.ndarray:
    """Which of `count` corpus blocks are held out, drawn with `seed`; a corpus too short for
    one of each is the user's to fix (a shorter `cpt_lm.max_length`, or `enabled: false`)."""
    if count < 2:
        raise StageError(
            f"the corpus makes {count} block(s) of cpt_lm.max_length={cfg.max_length}"
            " tokens; at least 2 are needed (one to train on, one held out): lower"
            " cpt_lm.max_length or set cpt_lm.enabled: false"
        )
    return eval_mask(count, cfg.eval_fraction, seed)


def lengths(rows: datasets.Dataset, column: str) -> np.ndarray:
    """The length of each row's list in `column`, read from the Arrow data."""
    return pc.list_value_length(rows.data.column(column)).to_numpy(zero_copy_only=False)


def clear_passages(sizes: np.ndarray, held_out: np.ndarray, max_length: int) -> np.ndarray:
    """Which passages (their token counts in stream order, `packer`'s input) have no token in a
    held-out block. The tokens past the last whole block are dropped by the packer: in no block."""
    ends = np.cumsum(sizes)
    first, last = (ends - sizes) // max_length, np.maximum(ends - 1, 0) // max_length
    held = np.concatenate([[0], np.cumsum(np.append(held_out, False))])  # held[b] = held before b
    last = np.minimum(last, len(held_out))
    first = np.minimum(first, len(held_out))
    return (held[last + 1] - held[first] == 0) | (sizes == 0)


def sentences(text: str) -> list[str]:
    """The sentences of a passage: split after . ! or ? before the next word."""
    return [s for s in re.split(r"(?<=[.!?])\s+(?=\S)", text.strip()) if s]


def questions(passage: str, count: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Up to `count` (question, answer) pairs that `passage` answers word for word, drawn with
    `rng`: the sentence after a quoted one, or the rest of a sentence whose first half is given."""
    said = sentences(passage)
    asks = [("next", i) for i in range(len(said) - 1)]
    asks += [("complete", i) for i, s in enumerate(said) if len(s.split()) >= MIN_WORDS]
    pairs = []
    for k in sorted(rng.permutation(len(asks))[:count]):
        kind, i = asks[k]
        if kind == "next":
            question = f'In the passage, which sentence comes right after "{said[i]}"?'
            pairs.append((question, said[i + 1]))
        else:
            words = said[i].split()
            begun = " ".join(words[: len(words) // 2])
            pairs.append((f'Complete this sentence from the passage: "{begun} ..."', said[i]))
    return pairs


def reading_chat(passage: str, count: int, seed: int) -> list[Message]:
    """The passage and its questions as one chat, each answer an assistant turn ([] when no
    question can be asked). The draw depends on the seed and the passage alone, so the chat is
    the same whatever else the corpus holds."""
    digest = int.from_bytes(hashlib.sha256(passage.encode("utf-8")).digest()[:8], "big")
    pairs = questions(passage, count, np.random.default_rng([seed, digest]))
    chat: list[Message] = []
    for n, (question, answer) in enumerate(pairs):
        ask = f"Read the passage, then answer.\n\n{passage}\n\n{question}" if n == 0 else question
        chat += [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
    return chat


def reading_chats(count: int, seed: int) -> tokens.BatchFn:
    """A batch of passages (`text`) -> their reading chats (`messages`); a passage that no
    template can ask about makes none."""

    def make(batch: Row) -> Row:
        chats = (reading_chat(text, count, seed) for text in batch["text"])
        return {"messages": [chat for chat in chats if chat]}

    return make


def chat_stream(tokenizer: PreTrainedTokenizerBase) -> tokens.BatchFn:
    """A batch of chats (`messages`) -> each one's ids as the chat template renders it, followed
    by the end-of-text token (`ids`): what the packer joins, as it joins passages."""
    eos = tokenizer.eos_token_id

    def tokenize(batch: Row) -> Row:
        encoded = (encode_chat(tokenizer, chat, sys.maxsize) for chat in batch["messages"])
        return {"ids": [[*e.input_ids, eos] for e in encoded if e is not None]}

    return tokenize


def replay_order(sizes: np.ndarray, wanted: int, seed: int) -> np.ndarray:
    """Which conversations to replay, in order: seeded permutations of them, one after another,
    until their tokens (`sizes`) reach `wanted`."""
    if wanted <= 0 or not sizes.sum():
        return np.zeros(0, dtype=np.int64)
    rng, order, total = np.random.default_rng(seed), [], 0
    while total < wanted:
        permutation = rng.permutation(len(sizes))
        reached = total + np.cumsum(sizes[permutation])
        taken = min(int(np.searchsorted(reached, wanted)) + 1, len(permutation))
        order.append(permutation[:taken])
        total = int(reached[taken - 1])
    return np.concatenate(order)


def mixed_in(
    lines: datasets.Dataset,
    passages: datasets.Dataset,
    held_out: np.ndarray,
    cfg: CptLmParams,
    seed: int,
    chat_tokenizer: PreTrainedTokenizerBase,
    sft_train: Path,
    work: Path,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """The training blocks that `cpt_lm.reading` and `cpt_lm.replay` add to the corpus's, and
    their counts. `lines` are the passages' texts, `passages` their ids, both in corpus order."""
    parts, counts = [], {"mixed_tokens": 0}
    stream = chat_stream(chat_tokenizer)
    if cfg.reading:
        clear = clear_passages(lengths(passages, "ids"), held_out, cfg.max_length)
        chats = tokens.tokenize(
            lines.select(np.flatnonzero(clear)),
            reading_chats(cfg.reading, seed),
            tokens.CONVERSATION_FEATURES,
        )
        reading = tokens.tokenize(chats, stream, tokens.PASSAGE_FEATURES)
        parts.append(reading)
        counts["reading_chats"] = len(reading)
        counts["mixed_tokens"] += tokens.token_count(reading, "ids")
    if cfg.replay:
        replayable = tokens.tokenize(
            tokens.conversations_of(sft_train, work), stream, tokens.PASSAGE_FEATURES
        )
        sizes = lengths(replayable, "ids")
        wanted = round(cfg.replay * int((~held_out).sum()) * cfg.max_length)
        order = replay_order(sizes, wanted, seed)
        parts.append(replayable.select(order))
        counts["replayed_chats"] = len(order)
        counts["mixed_tokens"] += int(sizes[order].sum())
    shuffled = datasets.concatenate_datasets(parts).shuffle(seed=seed)
    make = tokens.packer(cfg.max_length)
    packed = tokens.regroup(shuffled, make, tokens.CLM_BLOCK_FEATURES, work)
    counts["mixed_blocks"] = len(packed)
    return packed, counts


def settings(cfg: CptLmParams, seed: int) -> dict[str, Any]:
    """The params that decide the blocks: written beside them, checked by the cpt_lm stage."""
    return {
        "max_length": cfg.max_length,
        "eval_fraction": cfg.eval_fraction,
        "seed": seed,
        "replay": cfg.replay,
        "reading": cfg.reading,
    }
