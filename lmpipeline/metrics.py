"""The scores of the metrics files: perplexity, answer scores (SQuAD exact match and token F1,
ROUGE-L) and retrieval scores (recall@k, MRR) over the rank of each question's gold entry."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

RECALL_KS = (1, 5, 10)
_PUNCTUATION = set(string.punctuation)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # a fresh head can start far above exp()'s range


# --- answers -----------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure over lower-cased alphanumeric tokens (longest common subsequence)."""
    pred = re.findall(r"[a-z0-9]+", prediction.lower())
    ref = re.findall(r"[a-z0-9]+", reference.lower())
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for p in pred:
        current = [0]
        for j, r in enumerate(ref):
            current.append(previous[j] + 1 if p == r else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(pred) + len(ref))


def answer_scores(answers: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """SQuAD exact match and token F1, and ROUGE-L, averaged over the questions."""
    n = max(len(references), 1)
    pairs = list(zip(answers, references, strict=True))
    return {
        "em": round(sum(normalize_answer(a) == normalize_answer(r) for a, r in pairs) / n, 6),
        "f1": round(sum(token_f1(a, r) for a, r in pairs) / n, 6),
        "rougeL": round(sum(rouge_l(a, r) for a, r in pairs) / n, 6),
    }


# --- retrieval ---------------------------------------------------------------------------------


def gold_ranks(ranked: np.ndarray, gold: Sequence[int]) -> np.ndarray:
    """1-based rank of each question's gold entry in its ranking; 0 where it is not listed."""
    hits = ranked == np.asarray(gold)[:, None]
    return np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0)


def recall_at(ranks: np.ndarray, k: int) -> float:
    return float(((ranks > 0) & (ranks <= k)).mean()) if len(ranks) else 0.0


def retrieval_scores(ranks: np.ndarray) -> dict[str, float]:
    """recall@1/5/10 and mean reciprocal rank (0 for a gold entry not retrieved at all)."""
    scores = {f"recall@{k}": round(recall_at(ranks, k), 6) for k in RECALL_KS}
    reciprocal = np.where(ranks > 0, 1.0 / np.maximum(ranks, 1), 0.0)
    scores["mrr"] = round(float(reciprocal.mean()) if len(ranks) else 0.0, 6)
    return scores
