"""The `rag-sequence` RAG system as `ask` loads it: transformers' RagSequenceForGeneration over the
project's knowledge base.

The entries are embedded once by the DPR context encoder `rag.ctx_encoder` into a FAISS index,
which a `RagRetriever` with a custom index serves to the RAG model (DPR question encoder + BART
generator, `facebook/rag-sequence-nq` by default). Its directory holds everything `ask` needs:
    config.json     backend and answering settings
    model/          the fine-tuned RagSequenceForGeneration and its two tokenizers
    index.faiss     the entries' DPR vectors (inner product)
    kb/             the entries as a datasets.Dataset (title, text, embeddings) for RagRetriever
    passages.jsonl  entry ids and texts
How it is trained is in `lmpipeline.rag.rag_sequence_train`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import torch
from datasets import Dataset
from transformers import (
    BatchEncoding,
    DPRContextEncoder,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RagRetriever,
    RagSequenceForGeneration,
    RagTokenizer,
)

from lmpipeline.errors import SetupError
from lmpipeline.models import load_model, load_tokenizer, resolve_model
from lmpipeline.params import RagParams
from lmpipeline.rag.index import embed, search
from lmpipeline.rag.knowledge import Entry, write_entries
from lmpipeline.rag.system import (
    INDEX_FILE,
    Answer,
    Hit,
    SystemConfig,
    hits,
    load_entries,
    load_index,
)
from lmpipeline.rag.system import model_dir as system_model_dir
from lmpipeline.runtime import resolve_device

BACKEND = "rag-sequence"
MODEL_DIR = "model"
KB_DIR = "kb"


def dpr_pooled(
    encoder: PreTrainedModel, input_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """DPR's vector: the [CLS] state (through the projection, if the encoder has one)."""
    return encoder(input_ids=input_ids, attention_mask=mask).pooler_output


# --- model, knowledge base and retriever -------------------------------------------------------


def load_rag(ref: str, n_docs: int) -> tuple[RagSequenceForGeneration, RagTokenizer]:
    """The RAG model and tokenizers of `ref`, set to marginalize over `n_docs` documents of a
    custom index."""
    source = resolve_model(ref)
    if not (source.path / "question_encoder_tokenizer").is_dir():
        raise SetupError(
            f"rag.model '{ref}' is not a RAG model directory (no question_encoder_tokenizer/):"
            " save one with RagSequenceForGeneration.save_pretrained and"
            " RagTokenizer.save_pretrained"
        )
    model = load_model(RagSequenceForGeneration, source)
    # The hub models name the wiki_dpr index; ours is the project's knowledge base, whose paths
    # are given when a retriever is made (`kb_retriever`), never saved with the model.
    model.config.index_name = "custom"
    model.config.passages_path = model.config.index_path = None
    model.config.n_docs = n_docs
    return model, RagTokenizer.from_pretrained(source.path, trust_remote_code=False)


def embed_entries(entries: Sequence[Entry], cfg: RagParams, device: torch.device) -> np.ndarray:
    """The entries' vectors from the DPR context encoder `cfg.ctx_encoder`."""
    source = resolve_model(cfg.ctx_encoder)
    encoder = load_model(DPRContextEncoder, source).to(device)
    texts = [e.text for e in entries]
    vectors = embed(
        encoder,
        load_tokenizer(source),
        texts,
        cfg.max_length,
        cfg.batch_size,
        "rag: embed (DPR context encoder)",
        dpr_pooled,
    )
    del encoder
    return vectors


def save_kb(path: Path, entries: Sequence[Entry], vectors: np.ndarray, index: faiss.Index) -> None:
    """The index, and the entries as the datasets.Dataset that a custom RagRetriever reads.

    The entries have no titles: the generator sees ' / text // question'."""
    path.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path / INDEX_FILE))
    kb = Dataset.from_dict(
        {"title": [""] * len(entries), "text": [e.text for e in entries], "embeddings": vectors}
    )
    kb.save_to_disk(str(path / KB_DIR))
    write_entries(path, entries)


def kb_retriever(
    model: RagSequenceForGeneration, tokenizer: RagTokenizer, path: Path
) -> RagRetriever:
    """A RagRetriever over the index and entries saved in `path` by `save_kb`."""
    config = copy.deepcopy(model.config)
    config.passages_path, config.index_path = str(path / KB_DIR), str(path / INDEX_FILE)
    return RagRetriever(config, tokenizer.question_encoder, tokenizer.generator)


def question_vectors(
    model: RagSequenceForGeneration,
    tokenizer: RagTokenizer,
    questions: Sequence[str],
    max_length: int,
    batch_size: int,
) -> np.ndarray:
    """The question encoder's DPR vectors of `questions`."""
    return embed(
        model.question_encoder,
        tokenizer.question_encoder,
        questions,
        max_length,
        batch_size,
        pool=dpr_pooled,
    )


# --- the answering system ----------------------------------------------------------------------


class RagSequenceSystem:
    """The fine-tuned RAG model with its retriever, loaded from a rag directory."""

    def __init__(self, path: Path, config: SystemConfig, device: torch.device) -> None:
        self.config = config
        model_dir = system_model_dir(path, config.model, "model")
        self.entries = load_entries(path)
        self.tokenizer = RagTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.model = RagSequenceForGeneration.from_pretrained(
            model_dir, use_safetensors=True, trust_remote_code=False
        )
        self.model.set_retriever(kb_retriever(self.model, self.tokenizer, path))
        self.model.to(device).eval()
        self.index = load_index(path, len(self.entries))

    @classmethod
    def load(cls, path: Path, config: SystemConfig, device: str = "auto") -> RagSequenceSystem:
        return cls(path, config, resolve_device(device))

    def retrieve(self, question: str, k: int | None = None) -> list[Hit]:
        vectors = question_vectors(
            self.model, self.tokenizer, [question], self.config.max_length, 1
        )
        scores, ids = search(self.index, vectors, k or self.config.top_k)
        return hits(self.entries, scores[0], ids[0])

    @torch.no_grad()
    def closed_book(self, questions: Sequence[str], batch_size: int) -> list[str]:
        """The BART generator's answers to the bare questions, without documents."""
        answers: list[str] = []
        for start in range(0, len(questions), batch_size):
            inputs = self._tokens(self.tokenizer.generator, questions[start : start + batch_size])
            out = self.model.generator.generate(
                **inputs, max_new_tokens=self.config.max_new_tokens, num_beams=1, do_sample=False
            )
            answers += [
                a.strip()
                for a in self.tokenizer.generator.batch_decode(out, skip_special_tokens=True)
            ]
        return answers

    @torch.no_grad()
    def ask(self, question: str, k: int | None = None) -> Answer:
        """RAG-sequence decoding: an answer per retrieved document, the one with the highest
        marginal likelihood kept."""
        k = k or self.config.top_k
        inputs = self._tokens(self.tokenizer.question_encoder, [question])
        out = self.model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            n_docs=k,
            num_beams=1,
            num_return_sequences=1,  # transformers 5.0 reads it from the config, which lacks it
            max_new_tokens=self.config.max_new_tokens,
        )
        text = self.tokenizer.generator.batch_decode(out, skip_special_tokens=True)[0].strip()
        return Answer(question, text, self.retrieve(question, k))

    def ask_many(self, questions: Sequence[str], batch_size: int) -> list[Answer]:
        """One question at a time: RAG-sequence decodes an answer per document already."""
        return [self.ask(q) for q in questions]

    def _tokens(self, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> BatchEncoding:
        return tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        ).to(self.model.device)
