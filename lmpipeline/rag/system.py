"""What a built RAG system is, whichever backend built it: the `System` interface that `ask` uses
(retrieve, answer closed-book, answer with passages), its config file, and what it returns.

`output/rag` holds a system: `config.json` (a `SystemConfig`, naming the backend),
`passages.jsonl` (the knowledge base's entries), `index.faiss`, and the backend's models. Loading
it needs nothing else from the training run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lmpipeline.data import write_text_atomic
from lmpipeline.errors import SetupError
from lmpipeline.rag.knowledge import Entry

CONFIG_FILE = "config.json"
INDEX_FILE = "index.faiss"


@dataclass(frozen=True, kw_only=True)
class SystemConfig:
    """output/rag/config.json. Fields a backend does not use are None and left out of the file."""

    generator: str | None = (
        None  # cpt-sft: the generator's directory, relative to the rag directory
    )
    retriever: str  # dense|bm25|hybrid
    index_type: str
    top_k: int
    max_length: int
    max_new_tokens: int
    prompt: str | None = None  # cpt-sft: the prompt with passages, {passages} and {question}
    passage: str | None = None  # cpt-sft: one passage in it, {n} and {text}
    closed_book_prompt: str | None = None  # cpt-sft: the prompt without passages
    backend: str = "cpt-sft"
    model: str | None = None  # rag-sequence: the RAG model's directory, relative
    closed_book_generator: str | None = None  # cpt-sft: if not the generator (a taught reader)

    def write(self, directory: Path) -> None:
        fields = {k: v for k, v in asdict(self).items() if v is not None}
        write_text_atomic(directory / CONFIG_FILE, json.dumps(fields, indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> SystemConfig:
        path = directory / CONFIG_FILE
        if not path.is_file():
            raise SetupError(
                f"{directory} holds no RAG system (no {CONFIG_FILE}): run `dvc repro rag`"
            )
        return cls(**json.loads(path.read_text(encoding="utf-8")))


@dataclass(frozen=True)
class Hit:
    entry: Entry
    score: float  # cosine (dense), inner product (DPR), BM25 score, or fused reciprocal rank


@dataclass(frozen=True)
class Answer:
    question: str
    text: str
    passages: list[Hit]


def hits(entries: Sequence[Entry], scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
    """One question's row of (scores, entry indices) as hits; -1 (nothing found) is dropped."""
    return [Hit(entries[i], float(s)) for s, i in zip(scores, ids, strict=True) if i >= 0]


class System(Protocol):
    """A built RAG system, loaded from its directory."""

    config: SystemConfig

    def retrieve(self, question: str, k: int | None = None) -> list[Hit]:
        """The top `k` entries (default `config.top_k`) for `question`, best first."""
        ...

    def closed_book(self, questions: Sequence[str], batch_size: int) -> list[str]:
        """The generator's answers without passages."""
        ...

    def ask(self, question: str, k: int | None = None) -> Answer:
        """The answer with the top `k` passages, and those passages."""
        ...
