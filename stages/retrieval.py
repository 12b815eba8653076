"""What the two RAG backends share: the knowledge base, the FAISS and BM25 indexes, reciprocal-rank
fusion, and the retrieval and answer scores of `metrics/rag.json`.

The knowledge base is the validated pretrain passages cut into overlapping word chunks, plus every
answer of the RAG data as its own entry (a question's gold entry), so that retrieval is scored
the same way whichever encoder ranks the entries.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import bm25s
import faiss
import numpy as np
import Stemmer
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.data import write_jsonl, write_text_atomic
from stages.params import RagParams, TrainingParams
from stages.sft import normalize_answer, rouge_l, token_f1
from stages.training import write_curves

RRF_K = 60  # the constant of Cormack et al. (2009): ranks beyond a few dozen barely count
CANDIDATES = 50  # per retriever, fused by the hybrid when answering
RECALL_KS = (1, 5, 10)
CURVE_DEPTH = 20  # recall@k is plotted for k = 1..CURVE_DEPTH
HNSW_NEIGHBOURS = 32
HNSW_EF_SEARCH = 128
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")

# --- knowledge base ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    id: str  # "p12.1": chunk 1 of line 12 of the pretrain text; "a7": answer 7
    text: str


@dataclass(frozen=True)
class KnowledgeBase:
    entries: list[Entry]
    answer_entry: dict[str, int]  # answer text -> index of its entry (a question's gold)

    def gold(self, records: Sequence[dict[str, str]]) -> list[int]:
        return [self.answer_entry[r["answer"].strip()] for r in records]


def chunk_words(text: str, size: int, overlap: int) -> list[str]:
    """Windows of `size` words, `overlap` shared by neighbours; each adds at least one new word."""
    words = text.split()
    stride = size - overlap
    return [" ".join(words[s : s + size]) for s in range(0, max(len(words) - overlap, 1), stride)]


def stating_sentences(answers: Sequence[str], passages: Sequence[str]) -> list[str]:
    """For each answer, the sentence of the passages that BM25 matches best to the answer alone
    (never to its question), or "" when no sentence shares a word with it."""
    pool = [s for p in passages for s in SENTENCE_END.split(p)]
    scores, ids = bm25_search(build_bm25(pool), answers, 1)
    return [pool[i] if score > 0 else "" for score, i in zip(scores[:, 0], ids[:, 0], strict=True)]


def knowledge_base(
    passages: Sequence[str], answers: Sequence[str], cfg: RagParams
) -> KnowledgeBase:
    """Chunked passages, then each distinct answer once (two questions may share an answer),
    with the sentence that states it as context when `cfg.answer_context` is on."""
    entries = [
        Entry(f"p{line}.{c}", text)
        for line, passage in enumerate(passages, start=1)
        for c, text in enumerate(chunk_words(passage, cfg.chunk_words, cfg.chunk_overlap))
    ]
    distinct = list(dict.fromkeys(a.strip() for a in answers))
    contexts = stating_sentences(distinct, passages) if cfg.answer_context else [""] * len(distinct)
    answer_entry = {}
    for n, (answer, context) in enumerate(zip(distinct, contexts, strict=True), start=1):
        answer_entry[answer] = len(entries)
        entries.append(Entry(f"a{n}", f"{answer} — {context}" if context else answer))
    return KnowledgeBase(entries, answer_entry)


# --- dense retrieval ---------------------------------------------------------------------------

# How an encoder's output becomes one vector per text.
Pooling = Callable[[PreTrainedModel, torch.Tensor, torch.Tensor], torch.Tensor]


def pooled(encoder: PreTrainedModel, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over real tokens, L2-normalized: inner product = cosine."""
    hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0), dim=-1)


@torch.no_grad()
def embed(
    encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
    desc: str | None = None,
    pool: Pooling = pooled,
) -> np.ndarray:
    """(len(texts), dim) float32 embeddings, batched by length so that little is padding."""
    encoder.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    vectors = []
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None):
        batch = tokenizer(
            [texts[i] for i in order[start : start + batch_size]],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(encoder.device)
        vectors.append(pool(encoder, batch["input_ids"], batch["attention_mask"]).float().cpu())
    if not vectors:
        return np.zeros((0, encoder.config.hidden_size), dtype=np.float32)
    out = np.empty((len(texts), vectors[0].shape[1]), dtype=np.float32)
    out[order] = torch.cat(vectors).numpy()
    return out


# --- vector index ------------------------------------------------------------------------------


def build_index(vectors: np.ndarray, kind: str) -> faiss.Index:
    """Inner-product index over normalized vectors: exact (flat) or approximate (hnsw, ivf)."""
    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        # ~4 sqrt(n) lists (FAISS's guideline), a quarter of them probed: recall over speed.
        lists = max(1, min(int(4 * np.sqrt(len(vectors))), len(vectors) // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = max(1, lists // 4)
    index.add(vectors)
    return index


def search(index: faiss.Index, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, entry indices) of the `depth` best entries per query; -1 pads a short list."""
    scores, ids = index.search(queries, min(depth, index.ntotal))
    return scores, ids


# --- lexical and hybrid retrieval --------------------------------------------------------------

_STEMMER = Stemmer.Stemmer("english")


def bm25_tokens(texts: Sequence[str]) -> list[list[str]]:
    return bm25s.tokenize(
        list(texts), stopwords="en", stemmer=_STEMMER, return_ids=False, show_progress=False
    )


def build_bm25(texts: Sequence[str]) -> bm25s.BM25:
    tokens = bm25_tokens(texts)
    # Words numbered in sorted order: bm25s would number them in set order, which follows
    # Python's per-process hash seed, and the saved index would differ from run to run.
    vocab = {word: i for i, word in enumerate(sorted({w for doc in tokens for w in doc}))}
    bm25 = bm25s.BM25()
    ids = [[vocab[w] for w in doc] for doc in tokens]
    bm25.index(bm25s.tokenization.Tokenized(ids=ids, vocab=vocab), show_progress=False)
    return bm25


def bm25_search(
    bm25: bm25s.BM25, questions: Sequence[str], depth: int
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, entry indices) of the `depth` best entries per question; -1 where none matched."""
    ids, scores = bm25.retrieve(
        bm25_tokens(questions), k=min(depth, bm25.scores["num_docs"]), show_progress=False
    )
    # An entry sharing no word with the question scores 0: it was not found, whatever its rank.
    return scores, np.where(scores > 0, ids, -1).astype(np.int64)


def fuse(rankings: Sequence[np.ndarray], n_entries: int, depth: int) -> tuple[np.ndarray, ...]:
    """Reciprocal-rank fusion: each ranking gives 1 / (RRF_K + rank) to the entries it lists.
    Entries that no ranking lists come last as -1 (not found)."""
    fused = np.zeros((len(rankings[0]), n_entries))
    for ranking in rankings:
        rows, cols = np.nonzero(ranking >= 0)
        np.add.at(fused, (rows, ranking[rows, cols]), 1.0 / (RRF_K + cols + 1))
    order = np.argsort(-fused, axis=1, kind="stable")[:, :depth]
    scores = np.take_along_axis(fused, order, axis=1)
    return scores, np.where(scores > 0, order, -1)


def lexical_ranks(
    entries: Sequence[Entry], questions: Sequence[str], dense: np.ndarray
) -> tuple[bm25s.BM25, np.ndarray, np.ndarray]:
    """The BM25 index of the entries, and the full BM25 and hybrid rankings for `questions`.

    The hybrid fuses each retriever's top CANDIDATES, exactly as a system answering does."""
    bm25 = build_bm25([e.text for e in entries])
    lexical = bm25_search(bm25, questions, len(entries))[1]
    fused = fuse([dense[:, :CANDIDATES], lexical[:, :CANDIDATES]], len(entries), len(entries))
    return bm25, lexical, fused[1]


# --- fine-tuning -------------------------------------------------------------------------------


def retriever_training(cfg: RagParams) -> TrainingParams:
    """The optimisation settings of the retriever: rag.retriever_* over the shared defaults."""
    return TrainingParams(
        batch_size=cfg.retriever_batch_size,
        lr=cfg.retriever_lr,
        epochs=cfg.retriever_epochs,
        warmup_ratio=0.1,
        eval_steps=10,
        save_steps=10,
    )


# --- scores ------------------------------------------------------------------------------------


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


def print_retrieval(ranks: dict[str, np.ndarray]) -> None:
    for name, r in ranks.items():
        print(
            f"rag: {name:<9} " + "  ".join(f"{k} {v:.3f}" for k, v in retrieval_scores(r).items())
        )


def answer_scores(answers: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """SQuAD exact match and token F1, and ROUGE-L, averaged over the questions."""
    n = max(len(references), 1)
    pairs = list(zip(answers, references, strict=True))
    return {
        "em": round(sum(normalize_answer(a) == normalize_answer(r) for a, r in pairs) / n, 6),
        "f1": round(sum(token_f1(a, r) for a, r in pairs) / n, 6),
        "rougeL": round(sum(rouge_l(a, r) for a, r in pairs) / n, 6),
    }


# --- answers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    entry: Entry
    score: float  # cosine (dense), BM25 score, or fused reciprocal rank (hybrid)


@dataclass(frozen=True)
class Answer:
    question: str
    text: str
    passages: list[Hit]


class AnsweringSystem(Protocol):
    """What a built RAG system offers, whichever backend built it."""

    def retrieve(self, question: str, k: int | None = None) -> list[Hit]: ...

    def closed_book(self, questions: Sequence[str], batch_size: int) -> list[str]: ...

    def ask(self, question: str, k: int | None = None) -> Answer: ...


def p50_ms(seconds: Sequence[float]) -> float:
    return round(float(np.median(seconds)) * 1000, 1) if seconds else 0.0


def prediction_record(
    record: dict[str, str], gold: Entry, closed_book: str, answer: Answer
) -> dict[str, Any]:
    reference = record["answer"]
    return {
        "question": record["question"],
        "reference": reference,
        "gold": gold.id,
        "closed_book": {"answer": closed_book, "f1": round(token_f1(closed_book, reference), 4)},
        "rag": {
            "answer": answer.text,
            "f1": round(token_f1(answer.text, reference), 4),
            "passages": [
                {"id": h.entry.id, "score": round(h.score, 4), "text": h.entry.text}
                for h in answer.passages
            ],
        },
    }


def write_recall_curves(path: Path, ranks: dict[str, np.ndarray]) -> None:
    rows = ["k," + ",".join(ranks)]
    for k in range(1, CURVE_DEPTH + 1):
        rows.append(f"{k}," + ",".join(f"{recall_at(r, k):.6f}" for r in ranks.values()))
    write_text_atomic(path, "\n".join(rows) + "\n")


def evaluate_answers(
    system: AnsweringSystem, kb: KnowledgeBase, eval_records: list[dict[str, str]], cfg: RagParams
) -> tuple[dict[str, dict[str, float]], dict[str, float], list[dict[str, Any]]]:
    """Closed-book and retrieval-augmented answers to the held-out questions: scores, latency
    and one prediction record per question. RAG answers go through `system.ask`, one question
    at a time, so they are what `ask` prints and their latency is what a user waits."""
    questions = [r["question"] for r in eval_records]
    retrieve_s = []
    for q in questions:
        start = time.perf_counter()
        system.retrieve(q)
        retrieve_s.append(time.perf_counter() - start)
    closed = system.closed_book(questions, cfg.batch_size)
    answered, answer_s = [], []
    for q in tqdm(questions, desc="rag: answer with passages"):
        start = time.perf_counter()
        answered.append(system.ask(q))
        answer_s.append(time.perf_counter() - start)
    references = [r["answer"] for r in eval_records]
    scores = {
        "closed_book": answer_scores(closed, references),
        "rag": answer_scores([a.text for a in answered], references),
    }
    for name, s in scores.items():
        print(f"rag: answers {name:<11} " + "  ".join(f"{k} {v:.3f}" for k, v in s.items()))
    latency = {"retrieve_ms_p50": p50_ms(retrieve_s), "answer_ms_p50": p50_ms(answer_s)}
    records = [
        prediction_record(r, kb.entries[g], c, a)
        for r, g, c, a in zip(eval_records, kb.gold(eval_records), closed, answered, strict=True)
    ]
    return scores, latency, records


def score_system(
    system: AnsweringSystem,
    kb: KnowledgeBase,
    eval_records: list[dict[str, str]],
    cfg: RagParams,
    ranks: dict[str, np.ndarray],
    log_history: list[dict[str, Any]],
    dim: int,
    plots: Path,
    predictions: Path,
) -> tuple[dict[str, Any], dict[str, float]]:
    """The metrics of `metrics/rag.json` and the answer latency, whichever backend built
    `system`; writes the fine-tuning's loss curves (from its Trainer's `log_history`), the recall
    curves and the per-question predictions."""
    write_curves(log_history, plots)
    write_recall_curves(plots / "recall.csv", ranks)
    eval_loss = [e["eval_loss"] for e in log_history if "eval_loss" in e]
    answers, latency, records = evaluate_answers(system, kb, eval_records, cfg)
    write_jsonl(predictions, records)
    metrics = {
        "retrieval": {name: retrieval_scores(r) for name, r in ranks.items()},
        "answers": answers,
        "index": {"entries": len(kb.entries), "dim": dim, "type": cfg.index},
        "train": {"eval_loss": round(eval_loss[-1], 6)},
    }
    return metrics, latency
