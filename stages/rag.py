"""Stage `rag`: a domain retriever over a FAISS index, and answers grounded in what it finds.

The knowledge base is the validated pretrain passages cut into overlapping word chunks, plus every
answer of the RAG data as its own entry (a question's gold entry). The retriever is the CPT
encoder, mean-pooled and L2-normalized, fine-tuned DPR-style on the train questions: each
question's gold entry is its positive, the other golds of the batch its negatives. Retrieval is
scored on the held-out questions for the base encoder, the CPT encoder, the fine-tuned one, BM25
and a hybrid of the last two; the SFT model then answers every held-out question closed-book and
with the top passages in its prompt.

`output/rag` holds all that answering needs (retriever, index, passages, BM25 index, config naming
the generator), so `python -m stages.rag ask "..."` and `RagSystem.load("output/rag")` work
without anything else from the training run.

    python -m stages.rag build --cpt output/cpt --sft output/sft --data output/data/rag \
        --pretrain output/data/pretrain.txt --output output/rag --metrics metrics/rag.json \
        --plots metrics/rag --predictions metrics/rag_predictions.jsonl
    python -m stages.rag ask "What label smoothing value did the original Transformer use?"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import bm25s
import faiss
import numpy as np
import Stemmer
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    set_seed,
)
from transformers.utils import logging as hf_logging

from stages.data import file_digest, read_jsonl, write_jsonl, write_text_atomic
from stages.launch import exit_process, is_main_process, relaunch
from stages.models import load_model, load_tokenizer, resolve_model
from stages.params import Params, RagParams, TrainingParams, load_stage_params
from stages.runtime import SetupError, precision, resolve_device
from stages.sft import (
    ensure_chat_template,
    generate,
    normalize_answer,
    prompt_text,
    rouge_l,
    token_f1,
)
from stages.training import (
    EpochSampler,
    LossParts,
    StageResult,
    StageTrainer,
    add_timings_option,
    checkpoint_dir,
    run_and_record,
    score,
    throughput,
    train_resumable,
    training_args,
    write_curves,
)

# The references are short facts, so both modes ask for one sentence; they differ by the passages.
RAG_PROMPT = (
    "Answer the question in one short sentence, using the passages.\n\n{passages}\n\n"
    "Question: {question}"
)
CLOSED_BOOK_PROMPT = "Answer the question in one short sentence.\n\nQuestion: {question}"
PASSAGE = "Passage {n}: {text}"
# 1 / temperature 0.05, sentence-transformers' default for in-batch-negative training.
SCALE = 20.0
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
) -> np.ndarray:
    """(len(texts), dim) float32 embeddings, batched by length so that little is padding."""
    encoder.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), encoder.config.hidden_size), dtype=np.float32)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None):
        rows = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in rows],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(encoder.device)
        out[rows] = pooled(encoder, batch["input_ids"], batch["attention_mask"]).float().cpu()
    return out


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


def answer_scores(answers: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """SQuAD exact match and token F1, and ROUGE-L, averaged over the questions."""
    n = max(len(references), 1)
    pairs = list(zip(answers, references, strict=True))
    return {
        "em": round(sum(normalize_answer(a) == normalize_answer(r) for a, r in pairs) / n, 6),
        "f1": round(sum(token_f1(a, r) for a, r in pairs) / n, 6),
        "rougeL": round(sum(rouge_l(a, r) for a, r in pairs) / n, 6),
    }


# --- retriever fine-tuning ---------------------------------------------------------------------


def contrastive_loss(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> LossParts:
    """In-batch-negatives cross-entropy (DPR): each question against every gold of the batch.

    Two questions that share a gold entry would count it as each other's negative; those
    off-diagonal pairs are masked out.
    """
    q = pooled(model, inputs["q_input_ids"], inputs["q_attention_mask"])
    p = pooled(model, inputs["p_input_ids"], inputs["p_attention_mask"])
    gold = inputs["gold"]
    same = (gold[:, None] == gold[None, :]) & ~torch.eye(len(gold), dtype=torch.bool).to(q.device)
    logits = (SCALE * q @ p.T).masked_fill(same, float("-inf"))
    targets = torch.arange(len(gold), device=q.device)
    return LossParts(
        loss_sum=F.cross_entropy(logits.float(), targets, reduction="sum"),
        predicted=torch.tensor(len(gold)),
        correct=(logits.argmax(-1) == targets).sum(),
    )


@dataclass(frozen=True)
class PairCollator:
    """Tokenizes (question, gold entry) pairs into the inputs of `contrastive_loss`."""

    tokenizer: PreTrainedTokenizerBase
    entries: Sequence[Entry]
    max_length: int

    def __call__(self, pairs: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {"gold": torch.tensor([g for _, g in pairs])}
        for side, texts in (
            ("q", [q for q, _ in pairs]),
            ("p", [self.entries[g].text for _, g in pairs]),
        ):
            tokens = self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            batch[f"{side}_input_ids"] = tokens["input_ids"]
            batch[f"{side}_attention_mask"] = tokens["attention_mask"]
        return batch


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


def finetune_retriever(
    encoder: PreTrainedModel,
    collator: PairCollator,
    train: list[tuple[str, int]],
    held_out: list[tuple[str, int]],
    cfg: RagParams,
    seed: int,
    device: torch.device,
    mode: str | None,
    checkpoints: Path,
    backend: str = "auto",
) -> StageTrainer:
    """Contrastive fine-tuning of `encoder` in place; returns the trainer for its history."""
    train_cfg = retriever_training(cfg)
    batches = [
        collator(held_out[i : i + train_cfg.batch_size])
        for i in range(0, len(held_out), train_cfg.batch_size)
    ]
    trainer = StageTrainer(
        model=encoder,
        args=training_args(train_cfg, seed, device, mode, checkpoints, len(train), backend),
        train_dataset=train,
        eval_dataset=batches,  # the Trainer wants one; StageTrainer scores it with eval_fn
        data_collator=collator,
        loss_fn=contrastive_loss,
        eval_fn=lambda m: {"eval_loss": score(contrastive_loss, m, batches)[0]},
        sampler=EpochSampler(len(train), seed),
    )
    train_resumable(trainer, "rag")
    return trainer


# --- the answering system ----------------------------------------------------------------------


@dataclass(frozen=True)
class RagConfig:
    """output/rag/config.json: what `RagSystem.load` needs besides the files next to it."""

    generator: str  # generator directory, relative to the rag directory
    retriever: str  # dense|bm25|hybrid
    index_type: str
    top_k: int
    max_length: int
    max_new_tokens: int
    prompt: str = RAG_PROMPT
    passage: str = PASSAGE
    closed_book_prompt: str = CLOSED_BOOK_PROMPT


@dataclass(frozen=True)
class Hit:
    entry: Entry
    score: float  # cosine (dense), BM25 score, or fused reciprocal rank (hybrid)


@dataclass(frozen=True)
class Answer:
    question: str
    text: str
    passages: list[Hit]


def rag_prompt(
    config: RagConfig, question: str, hits: Sequence[Hit], max_words: int | None = None
) -> str:
    """The generator's prompt, each passage cut to its first `max_words` words if given."""
    passages = "\n\n".join(
        config.passage.format(n=n, text=" ".join(h.entry.text.split()[:max_words]))
        for n, h in enumerate(hits, start=1)
    )
    return config.prompt.format(passages=passages, question=question)


def fitted_prompt(
    config: RagConfig,
    question: str,
    hits: Sequence[Hit],
    tokenizer: PreTrainedTokenizerBase,
    budget: int | None,
) -> str:
    """The prompt, with passages shortened (halving their words) until its chat rendering fits
    `budget` tokens: a generator with a short context (GPT-2: 1,024) still gets every passage."""
    max_words = max((len(h.entry.text.split()) for h in hits), default=0)
    while True:
        prompt = rag_prompt(config, question, hits, max_words)
        rendered = prompt_text(tokenizer, prompt)
        if budget is None or max_words <= 1 or len(tokenizer(rendered)["input_ids"]) <= budget:
            return prompt
        max_words //= 2


class RagSystem:
    """Retriever, index and generator loaded from a rag directory; `ask` answers a question."""

    def __init__(self, path: Path, device: torch.device) -> None:
        self.path = path
        self.config = RagConfig(**json.loads((path / "config.json").read_text(encoding="utf-8")))
        self.entries = [Entry(r["id"], r["text"]) for r in read_jsonl(path / "passages.jsonl")]
        self.tokenizer = AutoTokenizer.from_pretrained(path / "retriever")
        self.encoder = AutoModel.from_pretrained(path / "retriever", use_safetensors=True)
        self.encoder.to(device).eval()
        self.index = faiss.read_index(str(path / "index.faiss"))
        self.bm25 = bm25s.BM25.load(str(path / "bm25"), show_progress=False)
        generator = (path / self.config.generator).resolve()
        self.generator_tokenizer = AutoTokenizer.from_pretrained(generator)
        ensure_chat_template(self.generator_tokenizer)
        if self.generator_tokenizer.pad_token is None:
            self.generator_tokenizer.pad_token = self.generator_tokenizer.eos_token
        self.generator = AutoModelForCausalLM.from_pretrained(generator, use_safetensors=True)
        self.generator.to(device).eval()

    @classmethod
    def load(cls, path: Path | str = "output/rag", device: str = "auto") -> RagSystem:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise SetupError(f"{path} holds no RAG system (no config.json): run `dvc repro rag`")
        generator = path / json.loads((path / "config.json").read_text())["generator"]
        if not (generator / "config.json").is_file():
            raise SetupError(
                f"{path}/config.json names the generator {generator}, which holds no model:"
                " keep output/rag next to output/sft (`dvc pull` or `dvc repro sft`)"
            )
        return cls(path, resolve_device(device))

    def rank(self, questions: Sequence[str], depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, entry indices) of the configured retriever for each question."""
        kind = self.config.retriever
        if kind == "bm25":
            return bm25_search(self.bm25, questions, depth)
        vectors = embed(self.encoder, self.tokenizer, questions, self.config.max_length, 32)
        dense = search(self.index, vectors, max(depth, CANDIDATES))
        if kind == "dense":
            return dense[0][:, :depth], dense[1][:, :depth]
        lexical = bm25_search(self.bm25, questions, max(depth, CANDIDATES))
        return fuse([dense[1], lexical[1]], len(self.entries), depth)

    def retrieve(self, question: str, k: int | None = None) -> list[Hit]:
        scores, ids = self.rank([question], k or self.config.top_k)
        return [
            Hit(self.entries[i], float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0
        ]

    def closed_book(self, questions: Sequence[str], batch_size: int) -> list[str]:
        """The generator's answers without passages, in the same prompt format otherwise."""
        prompts = [self.config.closed_book_prompt.format(question=q) for q in questions]
        return generate(
            self.generator,
            self.generator_tokenizer,
            prompts,
            self.config.max_new_tokens,
            batch_size,
        )

    def ask(self, question: str, k: int | None = None) -> Answer:
        hits = self.retrieve(question, k)
        context = getattr(self.generator.config, "max_position_embeddings", None)
        budget = context - self.config.max_new_tokens if context else None
        prompt = fitted_prompt(self.config, question, hits, self.generator_tokenizer, budget)
        text = generate(
            self.generator, self.generator_tokenizer, [prompt], self.config.max_new_tokens, 1
        )[0]
        return Answer(question, text, hits)


def save_system(
    output: Path, config: RagConfig, entries: Sequence[Entry], found: Retrievers
) -> None:
    """Everything `RagSystem.load` reads; the generator stays where `config` names it."""
    output.mkdir(parents=True, exist_ok=True)
    found.encoder.save_pretrained(output / "retriever")
    found.tokenizer.save_pretrained(output / "retriever")
    faiss.write_index(found.index, str(output / "index.faiss"))
    found.bm25.save(str(output / "bm25"), show_progress=False)
    write_jsonl(output / "passages.jsonl", (asdict(e) for e in entries))
    write_text_atomic(output / "config.json", json.dumps(asdict(config), indent=2) + "\n")


# --- stage -------------------------------------------------------------------------------------


def load_encoder(path: Path | str, device: torch.device) -> PreTrainedModel:
    """The bare encoder of a model directory: an MLM or pooler head, if any, is not used."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused, absent pooler would be reported as "new"
    try:
        return AutoModel.from_pretrained(path, use_safetensors=True).to(device)
    finally:
        hf_logging.set_verbosity(verbosity)


def dense_ranks(
    encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    entries: Sequence[Entry],
    questions: Sequence[str],
    cfg: RagParams,
    label: str,
) -> tuple[np.ndarray, faiss.Index, float]:
    """Full rankings of the entries for `questions`, the index, and entries embedded per second."""
    start = time.perf_counter()
    vectors = embed(
        encoder,
        tokenizer,
        [e.text for e in entries],
        cfg.max_length,
        cfg.batch_size,
        f"rag: embed ({label})",
    )
    per_second = len(entries) / (time.perf_counter() - start)
    index = build_index(vectors, cfg.index)
    queries = embed(encoder, tokenizer, questions, cfg.max_length, cfg.batch_size)
    return search(index, queries, len(entries))[1], index, per_second


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


@dataclass
class Retrievers:
    """What retriever evaluation leaves: gold ranks per retriever, and the parts to save."""

    ranks: dict[str, np.ndarray]
    encoder: PreTrainedModel  # fine-tuned
    tokenizer: PreTrainedTokenizerBase
    index: faiss.Index
    bm25: bm25s.BM25
    embed_per_s: float
    trainer: StageTrainer


def evaluate_retrievers(
    params: Params,
    kb: KnowledgeBase,
    train_records: list[dict[str, str]],
    eval_records: list[dict[str, str]],
    args: argparse.Namespace,
    device: torch.device,
    mode: str | None,
) -> Retrievers | None:
    """Rank the entries for the held-out questions with each retriever, fine-tuning on the way
    (None on the ranks other than 0 of a distributed run, which only fine-tune)."""
    cfg, entries = params.rag, kb.entries
    questions, gold = [r["question"] for r in eval_records], kb.gold(eval_records)
    ranks: dict[str, np.ndarray] = {}
    tokenizer = AutoTokenizer.from_pretrained(args.cpt)
    encoder = load_encoder(args.cpt, device)
    if is_main_process():  # the other ranks of a distributed run only fine-tune
        source = resolve_model(params.cpt.model)
        base = load_model(AutoModel, source).to(device)
        ranked, _, _ = dense_ranks(base, load_tokenizer(source), entries, questions, cfg, "base")
        ranks["base"] = gold_ranks(ranked, gold)
        del base
        ranked, _, _ = dense_ranks(encoder, tokenizer, entries, questions, cfg, "cpt")
        ranks["cpt"] = gold_ranks(ranked, gold)

    inputs = [args.data / "train.jsonl", args.pretrain, *sorted(args.cpt.glob("*.safetensors"))]
    trainer = finetune_retriever(
        encoder,
        PairCollator(tokenizer, entries, cfg.max_length),
        list(zip([r["question"] for r in train_records], kb.gold(train_records), strict=True)),
        list(zip(questions, gold, strict=True)),
        cfg,
        params.seed,
        device,
        mode,
        checkpoint_dir(
            "rag", asdict(cfg), params.seed, params.device, params.fp16, *map(file_digest, inputs)
        ),
        params.launch.backend,
    )
    if not is_main_process():
        return None
    dense, index, embed_per_s = dense_ranks(encoder, tokenizer, entries, questions, cfg, "tuned")
    ranks["finetuned"] = gold_ranks(dense, gold)
    bm25 = build_bm25([e.text for e in entries])
    lexical = bm25_search(bm25, questions, len(entries))[1]
    ranks["bm25"] = gold_ranks(lexical, gold)
    # Fused from each retriever's top CANDIDATES, exactly as `RagSystem.rank` answers.
    fused = fuse([dense[:, :CANDIDATES], lexical[:, :CANDIDATES]], len(entries), len(entries))
    ranks["hybrid"] = gold_ranks(fused[1], gold)
    for name, r in ranks.items():
        print(
            f"rag: {name:<9} " + "  ".join(f"{k} {v:.3f}" for k, v in retrieval_scores(r).items())
        )
    return Retrievers(ranks, encoder, tokenizer, index, bm25, embed_per_s, trainer)


def evaluate_answers(
    system: RagSystem, kb: KnowledgeBase, eval_records: list[dict[str, str]], cfg: RagParams
) -> tuple[dict[str, dict[str, float]], dict[str, float], list[dict[str, Any]]]:
    """Closed-book and retrieval-augmented answers to the held-out questions: scores, latency
    and one prediction record per question. RAG answers go through `RagSystem.ask`, one question
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


def run(params: Params, args: argparse.Namespace) -> StageResult | None:
    """Build and evaluate the RAG system; save it to args.output; return metrics and timings."""
    cfg = params.rag
    set_seed(params.seed)
    device = resolve_device(params.device)
    mode = precision(params.fp16, device)
    train_records = read_jsonl(args.data / "train.jsonl")
    eval_records = read_jsonl(args.data / "eval.jsonl")
    passages = args.pretrain.read_text(encoding="utf-8").splitlines()
    kb = knowledge_base(passages, [r["answer"] for r in train_records + eval_records], cfg)
    n_answers = len(kb.answer_entry)
    print(
        f"rag: {len(kb.entries)} entries ({len(kb.entries) - n_answers} passage chunks,"
        f" {n_answers} answers); {len(train_records)} train / {len(eval_records)} held-out"
        f" questions; {device} ({mode or 'fp32'})"
    )
    found = evaluate_retrievers(params, kb, train_records, eval_records, args, device, mode)
    if found is None:
        return None
    config = RagConfig(
        generator=os.path.relpath(args.sft, args.output),
        retriever=cfg.retriever,
        index_type=cfg.index,
        top_k=cfg.top_k,
        max_length=cfg.max_length,
        max_new_tokens=cfg.max_new_tokens,
    )
    save_system(args.output, config, kb.entries, found)
    write_curves(found.trainer.state.log_history, args.plots)
    write_recall_curves(args.plots / "recall.csv", found.ranks)
    flops = 6.0 * found.encoder.num_parameters(exclude_embeddings=True)
    speed = throughput("rag", found.trainer, flops, device)
    eval_loss = [e["eval_loss"] for e in found.trainer.state.log_history if "eval_loss" in e]

    system = RagSystem.load(args.output, params.device)  # what `ask` will load
    answers, latency, predictions = evaluate_answers(system, kb, eval_records, cfg)
    write_jsonl(args.predictions, predictions)
    metrics = {
        "retrieval": {name: retrieval_scores(r) for name, r in found.ranks.items()},
        "answers": answers,
        "index": {"entries": len(kb.entries), "dim": found.index.d, "type": cfg.index},
        "train": {"eval_loss": round(eval_loss[-1], 6)},
    }
    latency = {"embed_passages_per_s": round(found.embed_per_s, 1), **latency}
    return StageResult(metrics, {"train": speed, "latency": latency})


def ask_main(argv: list[str] | None = None) -> int:
    """`python -m stages.rag ask` and the `rag-ask` console script."""
    parser = argparse.ArgumentParser(description="Answer a question with the trained RAG system")
    parser.add_argument("question")
    parser.add_argument("--rag", type=Path, default=Path("output/rag"), help="rag directory")
    parser.add_argument("--top-k", type=int, default=None, help="passages in the prompt")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()  # loading bars would bury a one-line answer
    try:
        system = RagSystem.load(args.rag, args.device)
    except SetupError as err:
        print(f"ask: {err}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    answer = system.ask(args.question, args.top_k)
    took = time.perf_counter() - start
    print(answer.text)
    print(f"\n({took:.2f} s; {system.config.retriever} retrieval, passages used:)")
    for hit in answer.passages:
        words = hit.entry.text.split()
        preview = " ".join(words[:12]) + (" ..." if len(words) > 12 else "")
        print(f"  [{hit.entry.id}] {hit.score:.3f}  {preview}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ask"]:
        return ask_main(argv[1:])
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="`ask QUESTION` answers with a built system"
    )
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--cpt", type=Path, required=True, help="CPT encoder directory")
    parser.add_argument("--sft", type=Path, required=True, help="generator directory")
    parser.add_argument("--data", type=Path, required=True, help="directory with train/eval.jsonl")
    parser.add_argument("--pretrain", type=Path, required=True, help="validated passages")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    add_timings_option(parser, "rag")
    args = parser.parse_args(argv)
    params = load_stage_params(args.params, "rag")
    if (status := relaunch(params.launch, "stages.rag", argv)) is not None:
        return status
    return run_and_record("rag", lambda: run(params, args), args.metrics, args.timings)


if __name__ == "__main__":
    exit_process(main())
