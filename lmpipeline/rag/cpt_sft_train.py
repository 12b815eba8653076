"""Building the `cpt-sft` RAG system: the CPT encoder, mean-pooled and L2-normalized, fine-tuned
DPR-style on the train questions (each question's first gold chunk is its positive, the other
positives of the batch its negatives) and indexed with FAISS; the SFT model is its generator,
untouched.

Retrieval is ranked for the base encoder (`cpt.model`) and the CPT encoder as is before
fine-tuning, and for the fine-tuned one after. The system it saves is `lmpipeline.rag.cpt_sft`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import bm25s
import faiss
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

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
from lmpipeline.rag.index import build_index, embed, pooled, search
from lmpipeline.rag.knowledge import Entry, KnowledgeBase, Questions, write_entries
from lmpipeline.rag.system import INDEX_FILE, System, SystemConfig
from lmpipeline.training import LossParts

# 1 / temperature 0.05, sentence-transformers' default for in-batch-negative training.
SCALE = 20.0


def load_encoder(path: Path | str, device: torch.device) -> PreTrainedModel:
    """The bare encoder of a model directory: an MLM or pooler head, if any, is not used."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused, absent pooler would be reported as "new"
    try:
        return AutoModel.from_pretrained(path, use_safetensors=True).to(device)
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


Pair = tuple[str, tuple[int, ...]]  # a question and its gold entries


def pairs(split: Questions) -> list[Pair]:
    """(question, gold entries) of each question whose answer a chunk states."""
    stated = split.in_corpus()
    return [(q, tuple(g)) for q, g in zip(stated.questions, stated.golds, strict=True)]


@dataclass(frozen=True)
class PairCollator:
    """Tokenizes (question, gold entries) pairs into the inputs of `contrastive_loss`: the first
    gold is the question's positive."""

    tokenizer: PreTrainedTokenizerBase
    entries: Sequence[Entry]
    max_length: int

    def __call__(self, pairs: Sequence[Pair]) -> dict[str, torch.Tensor]:
        positives = [golds[0] for _, golds in pairs]
        not_negative = torch.tensor([[p in golds for p in positives] for _, golds in pairs])
        batch = {"not_negative": not_negative & ~torch.eye(len(pairs), dtype=torch.bool)}
        for side, texts in (
            ("q", [q for q, _ in pairs]),
            ("p", [self.entries[g].text for g in positives]),
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


class CptSftBackend:
    """The `Backend` that fine-tunes the CPT encoder as the retriever of the SFT generator."""

    def __init__(
        self, params: Params, cpt: Path, sft: Path, kb: KnowledgeBase, device: torch.device
    ) -> None:
        self.params, self.cfg, self.kb, self.device = params, params.rag, kb, device
        self.cpt, self.sft = cpt, sft
        self.tokenizer = AutoTokenizer.from_pretrained(cpt)
        self.index: faiss.Index | None = None  # built by `rank`, from the fine-tuned encoder
        self.embed_per_s = 0.0

    def load_model(self) -> PreTrainedModel:
        return load_encoder(self.cpt, self.device)

    def base_ranks(self, model: PreTrainedModel, questions: Sequence[str]) -> dict[str, np.ndarray]:
        source = resolve_model(self.params.cpt.model)
        base = load_model(AutoModel, source).to(self.device)
        ranked = {"base": self.dense_ranks(base, load_tokenizer(source), questions, "base")[0]}
        del base
        ranked["cpt"] = self.dense_ranks(model, self.tokenizer, questions, "cpt")[0]
        return ranked

    def training(self, train: Questions, held_out: Questions) -> Training:
        """Pairs of the questions whose answer a chunk states (the others have no positive)."""
        return Training(
            loss_fn=contrastive_loss,
            collator=PairCollator(self.tokenizer, self.kb.entries, self.cfg.max_length),
            train=pairs(train),
            held_out=pairs(held_out),
        )

    def checkpoint_inputs(self) -> list[Path]:
        return sorted(self.cpt.glob("*.safetensors"))

    def rank(self, model: PreTrainedModel, questions: Sequence[str]) -> np.ndarray:
        ranked, self.index, self.embed_per_s = self.dense_ranks(
            model, self.tokenizer, questions, "tuned"
        )
        return ranked

    def save(self, model: PreTrainedModel, output: Path, bm25: bm25s.BM25) -> int:
        """Everything `CptSftSystem` reads; the generator stays where the config names it."""
        assert self.index is not None, "rank() builds the index"
        output.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output / RETRIEVER_DIR)
        self.tokenizer.save_pretrained(output / RETRIEVER_DIR)
        faiss.write_index(self.index, str(output / INDEX_FILE))
        bm25.save(str(output / BM25_DIR), show_progress=False)
        write_entries(output, self.kb.entries)
        SystemConfig(
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
        ).write(output)
        return self.index.d

    def flops_per_token(self, model: PreTrainedModel) -> float:
        """6 x the encoder's non-embedding parameters per question or entry token."""
        return 6.0 * model.num_parameters(exclude_embeddings=True)

    def discard(self) -> None:
        """Nothing: this backend writes only on rank 0."""

    def load(self, output: Path, device: str) -> System:
        return CptSftSystem.load(output, SystemConfig.read(output), device)

    def dense_ranks(
        self,
        encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        questions: Sequence[str],
        label: str,
    ) -> tuple[np.ndarray, faiss.Index, float]:
        """Full rankings of the entries for `questions`, the index, and entries embedded per
        second."""
        cfg = self.cfg
        texts = [e.text for e in self.kb.entries]
        start = time.perf_counter()
        vectors = embed(
            encoder, tokenizer, texts, cfg.max_length, cfg.batch_size, f"rag: embed ({label})"
        )
        per_second = len(texts) / (time.perf_counter() - start)
        index = build_index(vectors, cfg.index)
        queries = embed(encoder, tokenizer, questions, cfg.max_length, cfg.batch_size)
        return search(index, queries, len(texts))[1], index, per_second
