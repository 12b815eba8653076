"""The scores of the metrics files: perplexity, answer scores (SQuAD exact match and token F1,
ROUGE-L, and `supported`: how much of an answer the passages given hold) and retrieval scores
(recall@k, MRR, nDCG@10) over the ranks of each question's gold entries."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np
from bm25s.stopwords import STOPWORDS_EN

RECALL_KS = (1, 3, 5, 10)
NDCG_K = 10
_PUNCTUATION = set(string.punctuation)
_STOPWORDS = frozenset(STOPWORDS_EN)  # Lucene's English list, as BM25 uses


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


def content_words(text: str) -> set[str]:
    """The words of `text` that carry meaning: normalized as SQuAD does, without stopwords."""
    return {w for w in normalize_answer(text).split() if w not in _STOPWORDS}


def support(answer: str, passages: Sequence[str]) -> float:
    """Share of the answer's content words that the passages hold (0 for an answer without
    any): a non-LLM proxy for faithfulness, like RAGAS's non-LLM context metrics."""
    words = content_words(answer)
    if not words:
        return 0.0
    return len(words & set().union(*map(content_words, passages))) / len(words)


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


def gold_ranks(ranked: np.ndarray, golds: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """For each question, the 1-based ranks of its gold entries in its ranking, best first,
    then 0 for each gold entry the ranking does not list."""
    out = []
    for row, gold in zip(ranked, golds, strict=True):
        found = np.flatnonzero(np.isin(row, list(gold))) + 1
        out.append(np.concatenate([found, np.zeros(len(gold) - len(found), dtype=np.int64)]))
    return out


def first_ranks(ranks: Sequence[np.ndarray]) -> np.ndarray:
    """The rank of each question's best-ranked gold entry; 0 where none is listed."""
    return np.array([r[0] if len(r) else 0 for r in ranks], dtype=np.int64)


def recall_at(ranks: Sequence[np.ndarray], k: int) -> float:
    """Share of the questions with at least one gold entry in the top `k`."""
    first = first_ranks(ranks)
    return float(((first > 0) & (first <= k)).mean()) if len(first) else 0.0


def ndcg_at(ranks: Sequence[np.ndarray], k: int) -> float:
    """Mean nDCG@k with binary relevance: each gold entry in the top k gains 1/log2(rank + 1),
    over the best a question's number of golds allows."""
    scores = []
    for r in ranks:
        listed = r[(r > 0) & (r <= k)]
        ideal = np.sum(1.0 / np.log2(np.arange(2, min(len(r), k) + 2)))
        scores.append(float(np.sum(1.0 / np.log2(listed + 1)) / ideal) if ideal else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def retrieval_scores(ranks: Sequence[np.ndarray]) -> dict[str, float]:
    """recall@1/5/10, mean reciprocal rank of the first gold entry (0 where none is retrieved)
    and nDCG@10."""
    scores = {f"recall@{k}": round(recall_at(ranks, k), 6) for k in RECALL_KS}
    first = first_ranks(ranks)
    reciprocal = np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)
    scores["mrr"] = round(float(reciprocal.mean()) if len(first) else 0.0, 6)
    scores[f"ndcg@{NDCG_K}"] = round(ndcg_at(ranks, NDCG_K), 6)
    return scores
