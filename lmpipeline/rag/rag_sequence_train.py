"""Building the `rag-sequence` RAG system: transformers' RagSequenceForGeneration fine-tuned on the
train questions with the RAG-sequence marginal likelihood, -log sum_z p(z|x) p(y|x,z) over the
`top_k` entries it retrieves. As in Lewis et al. (2020) the context encoder and the index stay
fixed; the question encoder learns through p(z|x), the generator through p(y|x,z). Retrieval is
ranked by the question encoder before (`base`) and after (`finetuned`) fine-tuning; `cpt` has no
meaning here. The system it saves is `lmpipeline.rag.rag_sequence`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bm25s
import faiss
import numpy as np
import torch
from transformers import PreTrainedModel, RagSequenceForGeneration, RagTokenizer

from lmpipeline.errors import SetupError
from lmpipeline.models import save_pretrained
from lmpipeline.params import RagParams
from lmpipeline.rag.backend import Training
from lmpipeline.rag.index import build_index, lexical_ranks, search
from lmpipeline.rag.knowledge import KnowledgeBase, Questions
from lmpipeline.rag.rag_sequence import (
    BACKEND,
    MODEL_DIR,
    RagSequenceSystem,
    embed_entries,
    kb_retriever,
    load_rag,
    question_vectors,
    save_kb,
)
from lmpipeline.rag.system import System, SystemConfig
from lmpipeline.runtime import is_main_process
from lmpipeline.training import LossParts


def marginal_nll(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> LossParts:
    """The RAG-sequence loss summed over the batch's questions, counted per answer token.

    The model retrieves its documents itself; `correct` counts the answer tokens that the
    best-scored document's generator predicts."""
    labels = inputs["labels"]
    out = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        labels=labels,
        reduce_loss=False,
    )
    # The generator reads the labels as decoder input; each position predicts the next label.
    target = labels[:, 1:]
    real = target != model.config.generator.pad_token_id
    logits = out.logits.view(len(labels), -1, *out.logits.shape[1:])
    best = logits[torch.arange(len(labels)), out.doc_scores.argmax(1), :-1]
    return LossParts(
        loss_sum=out.loss.sum(),
        predicted=real.sum(),
        correct=((best.argmax(-1) == target) & real).sum(),
    )


@dataclass(frozen=True)
class QACollator:
    """Tokenizes (question, answer) pairs: questions for the question encoder, answers for the
    generator."""

    tokenizer: RagTokenizer
    max_length: int

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
        kwargs = {"padding": True, "truncation": True, "max_length": self.max_length}
        questions = self.tokenizer.question_encoder(
            [q for q, _ in pairs], return_tensors="pt", **kwargs
        )
        answers = self.tokenizer.generator([a for _, a in pairs], return_tensors="pt", **kwargs)
        return {
            "input_ids": questions["input_ids"],
            "attention_mask": questions["attention_mask"],
            "labels": answers["input_ids"],
            # Only counted (the real tokens trained on): the generator reads the padded labels.
            "answer_attention_mask": answers["attention_mask"],
        }


class RagSequenceBackend:
    """The `Backend` that fine-tunes a RAG-sequence model over a fixed index of the entries."""

    def __init__(self, cfg: RagParams, kb: KnowledgeBase, output: Path, device: torch.device):
        self.cfg, self.kb, self.output, self.device = cfg, kb, output, device
        self.kb_dir: Path | None = None  # where `load_model` saved the entries and index
        self.tokenizer: RagTokenizer | None = None
        self.index: faiss.Index | None = None
        self.embed_per_s = 0.0
        self.timings: dict[str, Any] = {}  # nothing is trained besides the RAG model

    def load_model(self) -> PreTrainedModel:
        """The RAG model, retrieving from the entries embedded by the context encoder."""
        cfg, entries = self.cfg, self.kb.entries
        model, self.tokenizer = load_rag(cfg.model, cfg.top_k)
        start = time.perf_counter()
        vectors = embed_entries(entries, cfg, self.device)
        self.embed_per_s = len(entries) / (time.perf_counter() - start)
        if vectors.shape[1] != model.config.retrieval_vector_size:
            raise SetupError(
                f"rag.ctx_encoder '{cfg.ctx_encoder}' gives {vectors.shape[1]}-dimensional"
                f" vectors, rag.model '{cfg.model}' expects {model.config.retrieval_vector_size}"
            )
        self.index = build_index(vectors, cfg.index)
        # Every process of a distributed run retrieves while training, from its own copy.
        main = is_main_process()
        self.kb_dir = self.output if main else Path(tempfile.mkdtemp(prefix="rag-kb-"))
        save_kb(self.kb_dir, entries, vectors, self.index)
        model.set_retriever(kb_retriever(model, self.tokenizer, self.kb_dir))
        return model.to(self.device)

    def base_ranks(self, model: PreTrainedModel, questions: Sequence[str]) -> dict[str, np.ndarray]:
        return {"base": self.rank(model, questions)}

    def training(self, train: Questions, held_out: Questions) -> Training:
        """Every question with its answer: the marginal likelihood needs no gold entry."""
        return Training(
            loss_fn=marginal_nll,
            collator=QACollator(self._tokenizer(), self.cfg.max_length),
            train=[(r["question"], r["answer"]) for r in train.records],
            held_out=[(r["question"], r["answer"]) for r in held_out.records],
        )

    def checkpoint_inputs(self) -> list[Path]:
        return []

    def decisions(self) -> dict[str, Any]:
        """Nothing: the RAG model is the start, and it learns from the answers alone."""
        return {}

    def rank(self, model: PreTrainedModel, questions: Sequence[str]) -> np.ndarray:
        assert isinstance(model, RagSequenceForGeneration) and self.index is not None
        cfg = self.cfg
        vectors = question_vectors(
            model, self._tokenizer(), questions, cfg.max_length, cfg.batch_size
        )
        return search(self.index, vectors, self.index.ntotal)[1]

    def save(self, model: PreTrainedModel, output: Path, bm25: bm25s.BM25) -> int:
        """The model and its tokenizers beside the index and entries saved by `load_model`."""
        assert self.index is not None
        save_pretrained(output / MODEL_DIR, model, self._tokenizer())
        cfg = self.cfg
        SystemConfig(
            generator=None,
            retriever="dense",
            index_type=cfg.index,
            top_k=cfg.top_k,
            max_length=cfg.max_length,
            max_new_tokens=cfg.max_new_tokens,
            backend=BACKEND,
            model=MODEL_DIR,
        ).write(output)
        return self.index.d

    def final_ranks(self, questions: Sequence[str], dense: np.ndarray) -> dict[str, np.ndarray]:
        """BM25 and the even hybrid beside the question encoder's ranking, which the system
        uses."""
        lexical, fused = lexical_ranks(self.kb.bm25, len(self.kb.entries), questions, dense)
        return {"bm25": lexical, "hybrid": fused, "system": dense}

    def flops_per_token(self, model: PreTrainedModel) -> None:
        """None: a step's work is the generator's over top_k retrieved entries per question,
        not a constant per question or answer token."""
        return None

    def discard(self) -> None:
        if self.kb_dir is not None:
            shutil.rmtree(self.kb_dir)

    def load(self, output: Path, device: str) -> System:
        return RagSequenceSystem.load(output, SystemConfig.read(output), device)

    def _tokenizer(self) -> RagTokenizer:
        assert self.tokenizer is not None, "load_model() loads the tokenizer"
        return self.tokenizer
