"""What a built RAG system is, whichever backend built it: the `System` interface that `ask` uses
(retrieve, answer closed-book, answer with passages), its config file, and what it returns.

`output/rag` holds a system: `config.json` (a `SystemConfig`, naming the backend),
`passages.jsonl` (the knowledge base's entries), `index.faiss`, and the backend's models. Loading
it needs nothing else from the training run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from lmpipeline.data import visible, write_text_atomic
from lmpipeline.errors import SetupError, StageError
from lmpipeline.rag.knowledge import PASSAGES_FILE, Entry, read_entries

CONFIG_FILE = "config.json"
INDEX_FILE = "index.faiss"
REBUILD = "`dvc checkout output/rag` restores the built system, `dvc repro rag` rebuilds it"
INT_FIELDS = ("top_k", "max_length", "max_new_tokens")  # required
OPTIONAL_INT_FIELDS = ("rerank_candidates", "rerank_max_length")
FLOAT_FIELDS = ("fusion_weight", "refusal_threshold")
# What a cpt-sft generator taught to read says when the passages given do not hold the answer.
ABSENT_ANSWER = "The passages do not say."


def broken(path: Path, what: str) -> SetupError:
    """A file of a built system that cannot be used, and how to get a good one back."""
    return SetupError(f"{path}: {what}; {REBUILD}")


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
    fusion_weight: float | None = None  # hybrid: the dense ranking's share of the fusion
    reranker: str | None = None  # cpt-sft: the cross-encoder's directory, relative; None: none
    rerank_candidates: int | None = None  # first-stage passages the reranker reorders
    rerank_max_length: int | None = None  # tokens of a question and a passage together
    refusal: str | None = None  # cpt-sft: what the reader was taught to say without an answer
    refusal_threshold: float | None = None  # refuse above this log-likelihood; None: never

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
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise broken(path, f"not readable JSON ({err})") from None
        return cls(**checked_config(raw, path))


def checked_config(raw: Any, path: Path) -> dict[str, Any]:
    """The fields of config.json, each known and of its type, or the reason it is not."""
    if not isinstance(raw, dict):
        raise broken(path, f"a JSON {type(raw).__name__}, not an object")
    names = {f.name for f in fields(SystemConfig)}
    if unknown := sorted(set(raw) - names):
        raise broken(path, f"unknown key {unknown[0]!r}")
    if missing := sorted(f for f in ("retriever", "index_type", *INT_FIELDS) if f not in raw):
        raise broken(path, f"missing key {missing[0]!r}")
    for key, value in raw.items():
        if not field_ok(key, value):
            kind = (
                "a positive integer"
                if key in (*INT_FIELDS, *OPTIONAL_INT_FIELDS)
                else "a finite number"
                if key in FLOAT_FIELDS
                else "a string"
            )
            raise broken(path, f"{key} must be {kind}, got {value!r:.40}")
    if not 0 <= raw.get("fusion_weight", 0) <= 1:
        raise broken(path, f"fusion_weight must be in [0, 1], got {raw['fusion_weight']!r}")
    return raw


def field_ok(key: str, value: Any) -> bool:
    """Whether a config.json value has its field's type (JSON numbers, strings or null)."""
    if key in INT_FIELDS or (key in OPTIONAL_INT_FIELDS and value is not None):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if key in FLOAT_FIELDS and value is not None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and math.isfinite(value)
    return value is None or isinstance(value, str)


def model_dir(directory: Path, ref: str | None, key: str) -> Path:
    """A model directory that config.json names relative to the rag directory. It must stay
    inside the folder that holds the rag directory (output/): a system arrives by `dvc pull`
    from others, and must not load whatever an absolute or climbing path points at."""
    root = directory.resolve().parent
    target = (directory / str(ref)).resolve()
    if ref is None or Path(ref).is_absolute() or not target.is_relative_to(root):
        raise broken(
            directory / CONFIG_FILE, f"{key} {ref!r} is not a folder beside it under {root}"
        )
    if not (target / "config.json").is_file():
        raise SetupError(
            f"{directory / CONFIG_FILE}: {key} {ref!r} holds no model: keep the rag directory"
            " next to the models it names (`dvc pull`, or `dvc repro` builds them)"
        )
    return target


def load_entries(directory: Path) -> list[Entry]:
    try:
        return read_entries(directory)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise broken(directory / PASSAGES_FILE, f"not a passages file ({err})") from None


def load_index(directory: Path, n_entries: int, dim: int | None = None) -> faiss.Index:
    """The saved FAISS index, checked against the passages (one vector each) and the encoder."""
    path = directory / INDEX_FILE
    if not path.is_file():
        raise broken(path, "missing")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError:
        raise broken(path, "not a FAISS index (truncated or damaged)") from None
    if index.ntotal != n_entries:
        raise broken(path, f"holds {index.ntotal} vectors for {n_entries} passages")
    if dim is not None and index.d != dim:
        raise broken(path, f"holds {index.d}-dimensional vectors; the retriever makes {dim}")
    return index


def check_question(question: str) -> str:
    """The question, or a one-line refusal of one with nothing to read in it."""
    if not visible(question):
        raise StageError("the question is empty")
    return question


@dataclass(frozen=True)
class Hit:
    entry: Entry
    score: float  # cosine (dense), inner product (DPR), BM25 score, or fused reciprocal rank


@dataclass(frozen=True)
class Answer:
    question: str
    text: str
    passages: list[Hit]
    refusal_logprob: float | None = None  # the reader's log-likelihood of its refusal, if taught


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

    def ask_many(self, questions: Sequence[str], batch_size: int) -> list[Answer]:
        """`ask` for each question, generated `batch_size` at a time: the same answers."""
        ...
