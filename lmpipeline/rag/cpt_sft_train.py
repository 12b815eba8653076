"""Building the `cpt-sft` RAG system: a sentence encoder, mean-pooled and L2-normalized,
fine-tuned DPR-style on the train questions and indexed with FAISS; the SFT model is its
generator, untouched.

- **Start.** Fine-tuning starts from the CPT encoder, unless the base encoder (`cpt.model`)
  ranks the train questions' gold chunks better (MRR; `rag.start_encoder: auto`): masked-LM
  training can move the embedding geometry a sentence encoder was trained for, and a retriever
  must never start worse than the encoder CPT began from. Only train questions decide.
- **Negatives.** Each question's first gold chunk is its positive; the other positives of the
  batch are its negatives, and `rag.train.hard_negatives` chunks per question mined from BM25's
  and the starting encoder's top `MINE_DEPTH` that do not state its answer (support below half
  the gold rule's threshold: a margin against false negatives).

Retrieval is ranked for the base encoder and the CPT encoder as is before fine-tuning, and for
the fine-tuned one after. The system it saves is `lmpipeline.rag.cpt_sft`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import bm25s
import faiss
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from lmpipeline.metrics import gold_ranks, recall_at, retrieval_scores
from lmpipeline.models import load_model, load_tokenizer, resolve_model
from lmpipeline.params import Params
from lmpipeline.rag.backend import Training
from lmpipeline.rag.cpt_sft import (
    BACKEND,
    BM25_DIR,
    CLOSED_BOOK_PROMPT,
    PASSAGE,
    RAG_PROMPT,
    RETRIEVER_DIR,
    CptSftSystem,
)
from lmpipeline.rag.index import embed, embed_stream, pooled, search, stream_index
from lmpipeline.rag.knowledge import Entry, KnowledgeBase, Questions, silent_on, write_entries
from lmpipeline.rag.lexical import bm25_search
from lmpipeline.rag.reader import GENERATOR_DIR, reader_records, teach_reader
from lmpipeline.rag.system import ABSENT_ANSWER, INDEX_FILE, System, SystemConfig
from lmpipeline.training import LossParts

# 1 / temperature 0.05, sentence-transformers' default for in-batch-negative training.
SCALE = 20.0


def load_encoder(path: Path | str, device: torch.device) -> PreTrainedModel:
    """The bare encoder of a model directory: an MLM or pooler head, if any, is not used."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused, absent pooler would be reported as "new"
    try:
        return AutoModel.from_pretrained(path, use_safetensors=True, trust_remote_code=False).to(
            device
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def contrastive_loss(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> LossParts:
    """In-batch-negatives cross-entropy (DPR): each question against every positive of the batch.

    Another question's positive that is also one of this question's golds (a shared or second
    gold chunk) would be counted as a negative; the collator's `not_negative` masks those out.
    """
    q = pooled(model, inputs["q_input_ids"], inputs["q_attention_mask"])
    p = pooled(model, inputs["p_input_ids"], inputs["p_attention_mask"])
    logits = (SCALE * q @ p.T).masked_fill(inputs["not_negative"].to(q.device), float("-inf"))
    targets = torch.arange(len(q), device=q.device)
    return LossParts(
        loss_sum=F.cross_entropy(logits.float(), targets, reduction="sum"),
        predicted=torch.tensor(len(q)),
        correct=(logits.argmax(-1) == targets).sum(),
    )


MINE_DEPTH = 30  # hard negatives come from each retriever's top MINE_DEPTH


@dataclass(frozen=True)
class Pair:
    """A question, its gold entries (the first is its positive) and its hard negatives."""

    question: str
    golds: tuple[int, ...]
    negatives: tuple[int, ...] = ()


def pairs(split: Questions, negatives: Sequence[tuple[int, ...]] | None = None) -> list[Pair]:
    """A pair for each question whose answer a chunk states (the others have no positive)."""
    stated = split.in_corpus()
    mined = negatives or [()] * len(stated.records)
    return [
        Pair(q, tuple(g), n) for q, g, n in zip(stated.questions, stated.golds, mined, strict=True)
    ]


def hard_negatives(
    split: Questions, rankings: Sequence[np.ndarray], entries: Sequence[Entry], n: int
) -> list[tuple[int, ...]]:
    """For each question of `split` (all in corpus), its `n` best-ranked entries by `rankings`
    taken in turn (one retriever's rank 1, the other's rank 1, ...) that are not gold and are
    silent on its answer (`silent_on`)."""
    out = []
    for q, (record, golds) in enumerate(zip(split.records, split.golds, strict=True)):
        chosen: list[int] = []
        for rank in range(MINE_DEPTH):
            for ranking in rankings:
                e = int(ranking[q, rank]) if rank < ranking.shape[1] else -1
                if e < 0 or e in golds or e in chosen or len(chosen) == n:
                    continue
                if silent_on(record["answer"], entries[e].text):
                    chosen.append(e)
        out.append(tuple(chosen))
    return out


@dataclass(frozen=True)
class PairCollator:
    """Tokenizes pairs into the inputs of `contrastive_loss`: the questions, then the passages
    (every positive, then every hard negative of the batch) and which passages are not a
    question's negatives (its own golds, other than its positive)."""

    tokenizer: PreTrainedTokenizerBase
    entries: Sequence[Entry]
    max_length: int

    def __call__(self, pairs: Sequence[Pair]) -> dict[str, torch.Tensor]:
        passages = [p.golds[0] for p in pairs] + [e for p in pairs for e in p.negatives]
        not_negative = torch.tensor([[e in p.golds for e in passages] for p in pairs])
        own = torch.zeros_like(not_negative)
        own[:, : len(pairs)] = torch.eye(len(pairs), dtype=torch.bool)
        batch = {"not_negative": not_negative & ~own}
        for side, texts in (
            ("q", [p.question for p in pairs]),
            ("p", [self.entries[e].text for e in passages]),
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


@dataclass
class Encoder:
    """A candidate start of the retriever, with its embedding of the entries."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    index: faiss.Index
    embed_per_s: float


class CptSftBackend:
    """The `Backend` that fine-tunes a sentence encoder as the retriever of the SFT generator."""

    def __init__(
        self,
        params: Params,
        cpt: Path,
        sft: Path,
        kb: KnowledgeBase,
        train: Questions,
        device: torch.device,
        mode: str | None,
    ) -> None:
        self.params, self.cfg, self.kb, self.device, self.mode = (
            params,
            params.rag,
            kb,
            device,
            mode,
        )
        self.cpt, self.sft = cpt, sft
        self.all_train, self.train = train, train.in_corpus()
        self.reader: dict[str, Any] = {}  # what teaching the generator to read did
        self.timings: dict[str, Any] = {}
        self.candidates: dict[str, Encoder] = {}  # filled by load_model: "cpt", "base"
        self.start = ""  # the candidate fine-tuning starts from
        self.start_mrr: dict[str, float] = {}
        self.start_recall = 1.0  # the start's recall@top_k of the train questions' golds
        self.index: faiss.Index | None = None  # built by `rank`, from the fine-tuned encoder
        self.embed_per_s = 0.0

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.candidates[self.start].tokenizer

    def load_model(self) -> PreTrainedModel:
        """The encoder fine-tuning starts from (module docstring: Start)."""
        source = resolve_model(self.params.cpt.model)
        loaded = {
            "cpt": (
                load_encoder(self.cpt, self.device),
                AutoTokenizer.from_pretrained(self.cpt, trust_remote_code=False),
            ),
            "base": (load_model(AutoModel, source).to(self.device), load_tokenizer(source)),
        }
        for name, (model, tokenizer) in loaded.items():
            self.candidates[name] = self.embed_entries(model, tokenizer, name)
        questions, train_ranks = self.train.questions, {}
        for name in loaded:
            ranked = self.dense_ranks(self.candidates[name], questions)
            train_ranks[name] = gold_ranks(ranked, self.train.golds)
            self.start_mrr[name] = retrieval_scores(train_ranks[name])["mrr"]
        choice = self.cfg.start_encoder
        if choice == "auto":
            choice = "cpt" if self.start_mrr["cpt"] > self.start_mrr["base"] else "base"
        self.start = choice
        self.start_recall = recall_at(train_ranks[choice], self.cfg.top_k)
        print(
            f"rag: fine-tuning starts from the {choice} encoder (train-question MRR: cpt"
            f" {self.start_mrr['cpt']:.3f}, base {self.start_mrr['base']:.3f})"
        )
        return self.candidates[choice].model

    def base_ranks(self, model: PreTrainedModel, questions: Sequence[str]) -> dict[str, np.ndarray]:
        ranked = {name: self.dense_ranks(c, questions) for name, c in self.candidates.items()}
        for name in [n for n in self.candidates if n != self.start]:
            del self.candidates[name]  # only the start is still needed
        return {"base": ranked["base"], "cpt": ranked["cpt"]}

    def training(self, train: Questions, held_out: Questions) -> Training:
        """Pairs of the questions whose answer a chunk states, the train ones with hard
        negatives; held-out pairs (the eval loss) have in-batch negatives only."""
        n = self.cfg.train.hard_negatives
        negatives = None
        if n:
            stated = train.in_corpus()
            start = self.candidates[self.start]
            lexical = bm25_search(self.kb.bm25, stated.questions, MINE_DEPTH)[1]
            dense = self.dense_ranks(start, stated.questions, MINE_DEPTH)
            negatives = hard_negatives(stated, [dense, lexical], self.kb.entries, n)
        return Training(
            loss_fn=contrastive_loss,
            collator=PairCollator(self.tokenizer, self.kb.entries, self.cfg.max_length),
            train=pairs(train, negatives),
            held_out=pairs(held_out),
        )

    def decisions(self) -> dict[str, Any]:
        start = {
            "start": {
                "encoder": self.start,
                "train_mrr": self.start_mrr,
                "train_recall_top_k": round(self.start_recall, 6),
            }
        }
        return {**start, "reader": self.reader} if self.reader else start

    def checkpoint_inputs(self) -> list[Path]:
        return sorted(self.cpt.glob("*.safetensors"))

    def rank(self, model: PreTrainedModel, questions: Sequence[str]) -> np.ndarray:
        tuned = self.embed_entries(model, self.tokenizer, "tuned")
        self.index, self.embed_per_s = tuned.index, tuned.embed_per_s
        return self.dense_ranks(tuned, questions)

    def save(self, model: PreTrainedModel, output: Path, bm25: bm25s.BM25) -> int:
        """Everything `CptSftSystem` reads; the generator is the SFT model where the config names
        it, or, with `rag.reader.enabled`, the SFT model taught to read (`generator/`)."""
        assert self.index is not None, "rank() builds the index"
        output.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output / RETRIEVER_DIR)
        self.tokenizer.save_pretrained(output / RETRIEVER_DIR)
        faiss.write_index(self.index, str(output / INDEX_FILE))
        bm25.save(str(output / BM25_DIR), show_progress=False)
        write_entries(output, self.kb.entries)
        config = SystemConfig(
            generator=os.path.relpath(self.sft, output),
            retriever=self.cfg.retriever,
            index_type=self.cfg.index,
            top_k=self.cfg.top_k,
            max_length=self.cfg.max_length,
            max_new_tokens=self.cfg.max_new_tokens,
            prompt=RAG_PROMPT,
            passage=PASSAGE,
            closed_book_prompt=CLOSED_BOOK_PROMPT,
            backend=BACKEND,
        )
        config.write(output)
        if self.cfg.reader.enabled:
            self.teach_reader(output, config)
        return self.index.d

    def teach_reader(self, output: Path, config: SystemConfig) -> None:
        """Fine-tune the generator on the train questions with the passages the saved system
        retrieves (`lmpipeline.rag.reader`); save it and point the config at it."""
        system = CptSftSystem.load(output, config, self.params.device)
        ranked = system.rank(self.all_train.questions, MINE_DEPTH)[1]
        tokenizer, budget = system.generator_tokenizer, system.prompt_budget()
        del system
        cfg = self.cfg.reader
        share = cfg.absent_share if cfg.absent_rule == "fixed" else 1.0 - self.start_recall
        records = reader_records(
            self.all_train,
            ranked,
            self.kb.entries,
            config,
            tokenizer,
            budget,
            share,
            self.params.seed,
        )
        inputs = sorted(self.sft.glob("*.safetensors"))
        generator, speed, history = teach_reader(
            records, self.sft, tokenizer, self.params, self.device, self.mode, inputs
        )
        generator.save_pretrained(output / GENERATOR_DIR)
        tokenizer.save_pretrained(output / GENERATOR_DIR)
        replace(
            config,
            generator=GENERATOR_DIR,
            closed_book_generator=os.path.relpath(self.sft, output),
        ).write(output)
        losses = [e["loss"] for e in history if "loss" in e]
        absent = sum(r["response"] == ABSENT_ANSWER for r in records)
        self.reader = {
            "examples": len(records),
            "absent_share": round(share, 6),
            "absent": absent,
            "train_loss": round(losses[-1], 6) if losses else None,
        }
        self.timings["reader"] = speed

    def flops_per_token(self, model: PreTrainedModel) -> float:
        """6 x the encoder's non-embedding parameters per question or entry token."""
        return 6.0 * model.num_parameters(exclude_embeddings=True)

    def discard(self) -> None:
        """Nothing: this backend writes only on rank 0."""

    def load(self, output: Path, device: str) -> System:
        return CptSftSystem.load(output, SystemConfig.read(output), device)

    def embed_entries(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, label: str
    ) -> Encoder:
        """`model` with its index of every entry, and entries embedded and indexed per second."""
        cfg, n = self.cfg, len(self.kb.entries)
        start = time.perf_counter()
        # Streamed: the entries' tokens and vectors go to the index a window at a time.
        blocks = embed_stream(
            model,
            tokenizer,
            (e.text for e in self.kb.entries),
            cfg.max_length,
            cfg.batch_size,
            f"rag: embed ({label})",
            n,
        )
        index = stream_index(blocks, n, cfg.index)
        return Encoder(model, tokenizer, index, n / (time.perf_counter() - start))

    def dense_ranks(
        self, encoder: Encoder, questions: Sequence[str], depth: int | None = None
    ) -> np.ndarray:
        """The entries ranked for each question by `encoder` (all of them, or the top `depth`)."""
        cfg = self.cfg
        queries = embed(encoder.model, encoder.tokenizer, questions, cfg.max_length, cfg.batch_size)
        return search(encoder.index, queries, depth or encoder.index.ntotal)[1]
