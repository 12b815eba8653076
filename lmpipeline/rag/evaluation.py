"""The scores of `metrics/rag.json`, whichever backend built the system: retrieval over the
held-out questions whose answer a chunk of the corpus states, closed-book and retrieval-augmented
answers (EM, F1, ROUGE-L, supported, refused; for the latter also the share of prompts lacking the
answer) through the system `ask` loads for every held-out question, the latency of both, the
recall@k curves and one prediction record per question."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmpipeline.data import write_jsonl, write_text_atomic
from lmpipeline.metrics import (
    answer_scores,
    normalize_answer,
    recall_at,
    retrieval_scores,
    support,
    token_f1,
)
from lmpipeline.params import RagParams
from lmpipeline.rag.knowledge import Entry, KnowledgeBase, Questions
from lmpipeline.rag.refusal import f1_with_refusals
from lmpipeline.rag.system import ABSENT_ANSWER, Answer, System
from lmpipeline.training import write_curves

CURVE_DEPTH = 20  # recall@k is plotted for k = 1..CURVE_DEPTH
LATENCY_SAMPLE = 8  # questions `ask` answers one at a time for the latency a user waits


def print_retrieval(ranks: dict[str, list[np.ndarray]]) -> None:
    for name, r in ranks.items():
        print(
            f"rag: {name:<9} " + "  ".join(f"{k} {v:.3f}" for k, v in retrieval_scores(r).items())
        )


def p50_ms(seconds: Sequence[float]) -> float:
    return round(float(np.median(seconds)) * 1000, 1) if seconds else 0.0


def prediction_record(
    record: dict[str, Any], gold: list[Entry], closed_book: str, answer: Answer
) -> dict[str, Any]:
    reference, given = record["answer"], [h.entry.text for h in answer.passages]
    shown = {h.entry.id for h in answer.passages}
    return {
        "question": record["question"],
        "reference": reference,
        "gold": [e.id for e in gold],  # [] = no chunk states the answer (not in corpus)
        "closed_book": {
            "answer": closed_book,
            "f1": round(token_f1(closed_book, reference), 4),
            "supported": round(support(closed_book, given), 4),
        },
        "rag": {
            "answer": answer.text,
            "f1": round(token_f1(answer.text, reference), 4),
            "supported": round(support(answer.text, given), 4),
            "lacking": not shown & {e.id for e in gold},  # no passage given states the answer
            "refusal_logprob": None
            if answer.refusal_logprob is None
            else round(answer.refusal_logprob, 4),
            "passages": [
                {"id": h.entry.id, "score": round(h.score, 4), "text": h.entry.text}
                for h in answer.passages
            ],
        },
    }


def write_recall_curves(path: Path, ranks: dict[str, list[np.ndarray]]) -> None:
    rows = ["k," + ",".join(ranks)]
    for k in range(1, CURVE_DEPTH + 1):
        rows.append(f"{k}," + ",".join(f"{recall_at(r, k):.6f}" for r in ranks.values()))
    write_text_atomic(path, "\n".join(rows) + "\n")


def refused(answer: str) -> bool:
    return normalize_answer(answer) == normalize_answer(ABSENT_ANSWER)


def mean(values: Sequence[float]) -> float:
    return round(sum(values) / max(len(values), 1), 6)


def scores_of(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """EM / F1 / ROUGE-L and support of the closed-book and RAG answers of `records` (prediction
    records). Both answers' support is measured against the passages the system retrieved for
    the question: how much of each answer those passages hold. `supported` averages it over every
    answer, a refusal counting 0; `supported_answered` only over the answers that are not the
    refusal (a refusal states nothing to check: RAGAS leaves its faithfulness undefined), and
    `refused` is their share, so that neither hides the other. For RAG answers, `lacking` is the
    share of prompts whose passages hold no gold entry (refusals above it are over-refusal), and
    `f1_with_refusals` the F1 in which a refusal scores 1 where the passages lack the answer and
    0 where they hold it (SQuAD 2.0's rule; the plain `f1` counts every refusal 0)."""
    references = [r["reference"] for r in records]
    out = {}
    for mode in ("closed_book", "rag"):
        answers = [r[mode] for r in records]
        scores = answer_scores([a["answer"] for a in answers], references)
        stated = [a["supported"] for a in answers if not refused(a["answer"])]
        out[mode] = {
            **scores,
            "supported": mean([a["supported"] for a in answers]),
            "supported_answered": mean(stated),
            "refused": mean([refused(a["answer"]) for a in answers]),
        }
    rag = [r["rag"] for r in records]
    lacking = [r["lacking"] for r in rag]
    out["rag"]["lacking"] = mean(lacking)
    out["rag"]["f1_with_refusals"] = round(
        f1_with_refusals(
            [r["answer"] for r in rag], references, [refused(r["answer"]) for r in rag], lacking
        ),
        6,
    )
    return out


def evaluate_answers(
    system: System, kb: KnowledgeBase, held_out: Questions, cfg: RagParams
) -> tuple[dict[str, Any], dict[str, float], list[dict[str, Any]]]:
    """Closed-book and retrieval-augmented answers to every held-out question: scores (those
    whose answer no chunk states also apart), latency and one prediction record per question.
    RAG answers go through `system.ask_many`, `rag.batch_size` at a time: the answers `ask`
    prints (a test holds the two to the same answers). The latency a user waits is measured
    apart, with `ask` on the first `LATENCY_SAMPLE` questions one at a time."""
    questions = held_out.questions
    retrieve_s, first_stage_s = [], []
    first_stage = getattr(system, "first_stage", None)  # cpt-sft: before any reranking
    for q in questions:
        start = time.perf_counter()
        system.retrieve(q)
        retrieve_s.append(time.perf_counter() - start)
        if first_stage is not None:
            start = time.perf_counter()
            first_stage([q], system.config.top_k)
            first_stage_s.append(time.perf_counter() - start)
    closed = system.closed_book(questions, cfg.batch_size)
    start = time.perf_counter()
    answered = system.ask_many(questions, cfg.batch_size)
    answer_all_s = time.perf_counter() - start
    answer_s = []
    for q in tqdm(questions[:LATENCY_SAMPLE], desc="rag: ask latency"):
        start = time.perf_counter()
        system.ask(q)
        answer_s.append(time.perf_counter() - start)
    records = [
        prediction_record(r, [kb.entries[i] for i in g], c, a)
        for r, g, c, a in zip(held_out.records, held_out.golds, closed, answered, strict=True)
    ]
    scores: dict[str, Any] = scores_of(records)
    unstated = [r for r in records if not r["gold"]]
    if unstated:
        scores["not_in_corpus"] = {"questions": len(unstated), **scores_of(unstated)}
    for name in ("closed_book", "rag"):
        print(
            f"rag: answers {name:<11} " + "  ".join(f"{k} {v:.3f}" for k, v in scores[name].items())
        )
    latency = {
        "retrieve_ms_p50": p50_ms(retrieve_s),  # what `ask` retrieves with, reranking included
        "first_stage_ms_p50": p50_ms(first_stage_s or retrieve_s),
        "answer_ms_p50": p50_ms(answer_s),
        "answer_all_s": round(answer_all_s, 1),  # every held-out question, batched
    }
    return scores, latency, records


def score_system(
    system: System,
    kb: KnowledgeBase,
    held_out: Questions,
    cfg: RagParams,
    ranks: dict[str, list[np.ndarray]],
    log_history: list[dict[str, Any]],
    dim: int,
    plots: Path,
    predictions: Path,
) -> tuple[dict[str, Any], dict[str, float]]:
    """The metrics of `metrics/rag.json` and the answer latency, whichever backend built
    `system`; writes the fine-tuning's loss curves (from its Trainer's `log_history`), the recall
    curves and the per-question predictions. Retrieval is scored on the held-out questions whose
    answer a chunk states (`ranks`), answers on all of them."""
    write_curves(log_history, plots)
    write_recall_curves(plots / "recall.csv", ranks)
    eval_loss = [e["eval_loss"] for e in log_history if "eval_loss" in e]
    answers, latency, records = evaluate_answers(system, kb, held_out, cfg)
    write_jsonl(predictions, records)
    stated = len(held_out.in_corpus().records)
    metrics = {
        "questions": {
            "held_out": len(held_out.records),
            "in_corpus": stated,
            "not_in_corpus": len(held_out.records) - stated,
        },
        "retrieval": {name: retrieval_scores(r) for name, r in ranks.items()},
        "answers": answers,
        "index": {"entries": len(kb.entries), "dim": dim, "type": cfg.index},
    }
    if eval_loss:  # none where fine-tuning is off (rag.train.enabled: false)
        metrics["train"] = {"eval_loss": round(eval_loss[-1], 6)}
    return metrics, latency
