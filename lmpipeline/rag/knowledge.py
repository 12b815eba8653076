"""The knowledge base of the `rag` stage: the validated pretrain passages cut into overlapping word
chunks, plus every answer of the RAG data as its own entry (a question's gold entry), so that
retrieval is scored the same way whichever backend ranks the entries."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lmpipeline.data import read_jsonl, write_jsonl
from lmpipeline.params import RagParams
from lmpipeline.rag.index import bm25_search, build_bm25

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
PASSAGES_FILE = "passages.jsonl"  # the entries of a built system: one {"id", "text"} per line


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


def write_entries(directory: Path, entries: Iterable[Entry]) -> None:
    write_jsonl(directory / PASSAGES_FILE, (asdict(e) for e in entries))


def read_entries(directory: Path) -> list[Entry]:
    return [Entry(r["id"], r["text"]) for r in read_jsonl(directory / PASSAGES_FILE)]
