"""The choices the `cpt-sft` build makes on train questions ranked or read by models that never
trained on them: which first-stage retriever answers use, whether the reranker does, and the
refusal threshold, each with the figures it was made on, for `metrics/rag.json`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmpipeline.metrics import NDCG_K, gold_ranks, retrieval_scores, token_f1
from lmpipeline.rag.knowledge import Questions
from lmpipeline.rag.refusal import choose_threshold, f1_with_refusals

# The first stages `rag.retriever: auto` chooses among, in the order that breaks a tie: a single
# retriever before a fusion of both (the simpler system, and BM25 needs no encoder when asked),
# then hybrids from an even fusion outwards.
FIRST_STAGES: tuple[tuple[str, float | None], ...] = (
    ("dense", None),
    ("bm25", None),
    ("hybrid", 0.5),
    ("hybrid", 0.7),
    ("hybrid", 0.3),
)
CHOICE_METRIC = f"ndcg@{NDCG_K}"


def stage_name(kind: str, weight: float | None) -> str:
    return f"hybrid@{weight}" if kind == "hybrid" else kind


@dataclass(frozen=True)
class RetrieverChoice:
    kind: str  # dense | bm25 | hybrid
    weight: float | None  # hybrid: the dense ranking's share of the fusion
    best_hybrid: float  # the weight of the hybrid that ranked best (what metrics call `hybrid`)
    scores: dict[str, float]  # CHOICE_METRIC of every candidate on the questions it chose on

    def figures(self) -> dict[str, Any]:
        return {
            "used": self.kind,
            "fusion_weight": self.weight,
            "train": {CHOICE_METRIC: self.scores},
        }


def choose_retriever(
    setting: str, rank: Callable[[str, float | None], np.ndarray], golds: Sequence[Sequence[int]]
) -> RetrieverChoice:
    """The first stage that ranks the questions' `golds` best (`setting` auto), or the one
    `setting` names (a hybrid then fuses evenly); `rank(kind, weight)` ranks them."""
    scores = {
        stage_name(kind, weight): retrieval_scores(gold_ranks(rank(kind, weight), golds))[
            CHOICE_METRIC
        ]
        for kind, weight in FIRST_STAGES
    }
    hybrids = [(w, scores[stage_name("hybrid", w)]) for k, w in FIRST_STAGES if k == "hybrid"]
    best_hybrid = float(max(hybrids, key=lambda h: h[1])[0])  # type: ignore[arg-type]
    if setting == "auto":
        kind, weight = max(FIRST_STAGES, key=lambda c: scores[stage_name(*c)])
    else:
        kind, weight = setting, (0.5 if setting == "hybrid" else None)
    return RetrieverChoice(kind, weight, best_hybrid, scores)


def rerank_pays(before: dict[str, float], after: dict[str, float]) -> bool:
    """Whether reranking ranks the calibration questions' golds better than the first stage."""
    return after[CHOICE_METRIC] > before[CHOICE_METRIC]


@dataclass(frozen=True)
class Calibration:
    """The refusal threshold and what it gives on the calibration questions."""

    threshold: float | None
    figures: dict[str, Any]


def calibrate_refusal(
    questions: Questions,
    shown: Sequence[Sequence[int]],
    logprobs: Sequence[float],
    answers: Sequence[str],
) -> Calibration:
    """The threshold of `refusal.choose_threshold` over the calibration questions: `shown` are
    the entries each prompt gave, `logprobs` the reader's log-likelihood of its refusal after
    it, `answers` its best answer that is not the refusal. A prompt lacks the answer where it
    shows no gold entry (for a question no chunk answers, always)."""
    references = [r["answer"] for r in questions.records]
    lacking = [not set(s) & set(g) for s, g in zip(shown, questions.golds, strict=True)]
    f1 = [token_f1(a, r) for a, r in zip(answers, references, strict=True)]
    threshold = choose_threshold(logprobs, f1, lacking)
    refused = [threshold is not None and lp > threshold for lp in logprobs]
    n = max(len(references), 1)
    figures = {
        "questions": len(references),
        "lacking": round(sum(lacking) / n, 6),
        "refused": round(sum(refused) / n, 6),
        "f1": round(sum(0.0 if r else x for r, x in zip(refused, f1, strict=True)) / n, 6),
        "f1_with_refusals": round(f1_with_refusals(answers, references, refused, lacking), 6),
    }
    return Calibration(threshold, figures)
