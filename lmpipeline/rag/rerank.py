"""The cross-encoder reranker of the `cpt-sft` system: a question and a passage read together by one
encoder with a one-logit head (BERT sequence classification, the layout of the cross-encoders
sentence-transformers loads), which reorders the first stage's top `rag.rerank.candidates`.

Training (`lmpipeline.rag.rerank_train`) starts from the base encoder. This module is what
answering needs: no Trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmpipeline.runtime import WEIGHTS

RERANKER_DIR = "reranker"
SCORE_BATCH = 32  # (question, passage) pairs per forward pass when scoring


def load_reranker(
    path: Path, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A saved reranker and its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, use_safetensors=True, trust_remote_code=False, **WEIGHTS
    )
    return model.to(device).eval(), tokenizer


def pair_inputs(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    passages: Sequence[str],
    max_length: int,
) -> dict[str, torch.Tensor]:
    """[CLS] question [SEP] passage [SEP], the longer of the two cut first beyond `max_length`."""
    return dict(
        tokenizer(
            list(questions),
            list(passages),
            padding=True,
            truncation="longest_first",
            max_length=max_length,
            return_tensors="pt",
        )
    )


@torch.no_grad()
def cross_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    passages: Sequence[str],
    max_length: int,
) -> np.ndarray:
    """The reranker's score of each passage for `question` (higher: more relevant)."""
    model.eval()
    out = []
    for start in range(0, len(passages), SCORE_BATCH):
        chunk = passages[start : start + SCORE_BATCH]
        batch = pair_inputs(tokenizer, [question] * len(chunk), chunk, max_length)
        logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits
        out.append(logits.float().view(-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def rerank_rows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    ids: np.ndarray,
    texts: Sequence[str],
    max_length: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Each question's row of first-stage entry `ids` (-1: none) reordered by the reranker:
    (scores, entry indices), the reranker's best first; -1 pads a row that had fewer entries.
    `texts` are every entry's text, by index."""
    scores = np.full(ids.shape, -np.inf, dtype=np.float32)
    out = np.full(ids.shape, -1, dtype=np.int64)
    for row, question in enumerate(questions):
        found = ids[row][ids[row] >= 0]
        logits = cross_scores(model, tokenizer, question, [texts[e] for e in found], max_length)
        order = np.argsort(-logits, kind="stable")  # ties keep the first stage's order
        scores[row, : len(found)], out[row, : len(found)] = logits[order], found[order]
    return scores, out
