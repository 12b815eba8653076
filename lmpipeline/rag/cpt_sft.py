"""The `cpt-sft` RAG system as `ask` loads it: the fine-tuned CPT encoder retrieves (dense, BM25 or
hybrid), the SFT model answers with the top passages in its chat prompt.

Its directory holds `retriever/` (a Hugging Face encoder), `index.faiss`, `bm25/`,
`passages.jsonl` and `config.json`, which names the generator's directory relative to it
(`../sft`). How it is trained is in `lmpipeline.rag.cpt_sft_train`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import bm25s
import faiss
import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from lmpipeline.chat import generate, load_causal_lm, load_chat_tokenizer, prompt_text
from lmpipeline.errors import SetupError
from lmpipeline.rag.index import CANDIDATES, embed, fuse, search
from lmpipeline.rag.knowledge import read_entries
from lmpipeline.rag.lexical import bm25_search
from lmpipeline.rag.system import INDEX_FILE, Answer, Hit, SystemConfig, hits
from lmpipeline.runtime import resolve_device

BACKEND = "cpt-sft"
# The references are short facts, so both modes ask for one sentence; they differ by the passages.
RAG_PROMPT = (
    "Answer the question in one short sentence, using the passages.\n\n{passages}\n\n"
    "Question: {question}"
)
CLOSED_BOOK_PROMPT = "Answer the question in one short sentence.\n\nQuestion: {question}"
PASSAGE = "Passage {n}: {text}"
RETRIEVER_DIR = "retriever"
BM25_DIR = "bm25"
QUERY_BATCH = 32


def rag_prompt(
    config: SystemConfig, question: str, hits: Sequence[Hit], max_words: int | None = None
) -> str:
    """The generator's prompt, each passage cut to its first `max_words` words if given."""
    assert config.prompt is not None and config.passage is not None
    passages = "\n\n".join(
        config.passage.format(n=n, text=" ".join(h.entry.text.split()[:max_words]))
        for n, h in enumerate(hits, start=1)
    )
    return config.prompt.format(passages=passages, question=question)


def fitted_prompt(
    config: SystemConfig,
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


class CptSftSystem:
    """Retriever, indexes and generator loaded from a rag directory; `ask` answers a question."""

    def __init__(self, path: Path, config: SystemConfig, device: torch.device) -> None:
        self.path, self.config = path, config
        self.entries = read_entries(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path / RETRIEVER_DIR)
        self.encoder = AutoModel.from_pretrained(path / RETRIEVER_DIR, use_safetensors=True)
        self.encoder.to(device).eval()
        self.index = faiss.read_index(str(path / INDEX_FILE))
        self.bm25 = bm25s.BM25.load(str(path / BM25_DIR), show_progress=False)
        generator = (path / str(config.generator)).resolve()
        self.generator_tokenizer, _ = load_chat_tokenizer(generator)
        self.generator = load_causal_lm(generator, device).eval()

    @classmethod
    def load(cls, path: Path, config: SystemConfig, device: str = "auto") -> CptSftSystem:
        generator = path / str(config.generator)
        if not (generator / "config.json").is_file():
            raise SetupError(
                f"{path}/config.json names the generator {generator}, which holds no model:"
                " keep output/rag next to output/sft (`dvc pull` or `dvc repro sft`)"
            )
        return cls(path, config, resolve_device(device))

    def rank(self, questions: Sequence[str], depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, entry indices) of the configured retriever for each question."""
        kind = self.config.retriever
        if kind == "bm25":
            return bm25_search(self.bm25, questions, depth)
        vectors = embed(
            self.encoder, self.tokenizer, questions, self.config.max_length, QUERY_BATCH
        )
        dense = search(self.index, vectors, max(depth, CANDIDATES))
        if kind == "dense":
            return dense[0][:, :depth], dense[1][:, :depth]
        lexical = bm25_search(self.bm25, questions, max(depth, CANDIDATES))
        return fuse([dense[1], lexical[1]], len(self.entries), depth)

    def retrieve(self, question: str, k: int | None = None) -> list[Hit]:
        scores, ids = self.rank([question], k or self.config.top_k)
        return hits(self.entries, scores[0], ids[0])

    def closed_book(self, questions: Sequence[str], batch_size: int) -> list[str]:
        """The answers without passages, in the same prompt format otherwise, of the SFT model
        (`closed_book_generator` where the generator was taught to read passages: a model
        taught to say when passages lack an answer is no closed-book baseline)."""
        assert self.config.closed_book_prompt is not None
        prompts = [self.config.closed_book_prompt.format(question=q) for q in questions]
        model, tokenizer = self.generator, self.generator_tokenizer
        if self.config.closed_book_generator:
            path = (self.path / self.config.closed_book_generator).resolve()
            tokenizer, _ = load_chat_tokenizer(path)
            model = load_causal_lm(path, self.generator.device).eval()
        return generate(model, tokenizer, prompts, self.config.max_new_tokens, batch_size)

    def prompt_budget(self) -> int | None:
        """Tokens the prompt may take: the generator's context less the answer's."""
        context = getattr(self.generator.config, "max_position_embeddings", None)
        return context - self.config.max_new_tokens if context else None

    def ask(self, question: str, k: int | None = None) -> Answer:
        found = self.retrieve(question, k)
        budget = self.prompt_budget()
        prompt = fitted_prompt(self.config, question, found, self.generator_tokenizer, budget)
        text = generate(
            self.generator, self.generator_tokenizer, [prompt], self.config.max_new_tokens, 1
        )[0]
        return Answer(question, text, found)
