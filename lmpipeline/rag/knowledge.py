"""The knowledge base of the `rag` stage and the rule that decides each question's gold entries.

The entries are the validated pretrain passages cut into overlapping word chunks (`p<line>.<n>`),
and, only with `rag.faq`, each *train* question with its answer (`f<n>`): a held-out question's
answer is never an entry, so a held-out question is answered from the corpus as a deployed system
would answer a new one.

A question's gold entries are the chunks that state its answer, decided from the answer alone
(never the question), so that retrieval is scored against what the corpus says:

1. the chunks that contain the answer as a phrase, both normalized as SQuAD normalizes answers
   (DPR's "has answer" rule for open-domain QA), if the answer has a content word;
2. otherwise, of the `CANDIDATE_SENTENCES` sentences of the passages that BM25 ranks best for
   the answer, the one holding the largest share of its content words (ties: the better BM25
   score), if that share is at least `MIN_SUPPORT`; its gold entries are the chunks that hold
   the whole sentence, or, for a sentence cut by chunk borders, those that hold most of it;
3. otherwise none: the answer is "not in corpus", and the question is scored apart.

`validate_rag` writes the golds into the validated split, where anyone can inspect them.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import bm25s

from lmpipeline.data import write_jsonl
from lmpipeline.errors import StageError
from lmpipeline.metrics import content_words, normalize_answer, support
from lmpipeline.rag.lexical import bm25_search, build_bm25

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
PASSAGES_FILE = "passages.jsonl"  # the entries of a built system: one {"id", "text"} per line
CANDIDATE_SENTENCES = 10
MIN_SUPPORT = 0.5  # a sentence states an answer when it holds at least half its content words
# A chunk holding less than this share is safely silent on an answer: half the rule's threshold,
# a margin against passages that state it in other words.
SILENT_MAX_SUPPORT = MIN_SUPPORT / 2

Record = dict[str, Any]


def silent_on(answer: str, text: str) -> bool:
    """Whether `text` holds too little of `answer` to state it (below SILENT_MAX_SUPPORT of its
    content words): a safe hard negative, or a passage an example without the answer may show."""
    return support(answer, [text]) < SILENT_MAX_SUPPORT


@dataclass(frozen=True)
class Entry:
    id: str  # "p12.1": chunk 1 of line 12 of the pretrain text; "f7": train question 7 (FAQ)
    text: str


@dataclass(frozen=True)
class Chunk:
    """A chunk of a passage, and the words of the passage it covers: [start, end)."""

    entry: Entry
    line: int
    start: int
    end: int


def chunk_spans(n_words: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Windows of `size` words, `overlap` shared by neighbours; each adds at least one new word."""
    stride = size - overlap
    return [(s, min(s + size, n_words)) for s in range(0, max(n_words - overlap, 1), stride)]


def chunk_words(text: str, size: int, overlap: int) -> list[str]:
    words = text.split()
    return [" ".join(words[s:e]) for s, e in chunk_spans(len(words), size, overlap)]


def passage_chunks(passages: Sequence[str], size: int, overlap: int) -> list[Chunk]:
    """Every passage's chunks, numbered by the passage's line (1-based) and place in it."""
    chunks = []
    for line, passage in enumerate(passages, start=1):
        words = passage.split()
        for n, (s, e) in enumerate(chunk_spans(len(words), size, overlap)):
            chunks.append(Chunk(Entry(f"p{line}.{n}", " ".join(words[s:e])), line, s, e))
    return chunks


# --- golds -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sentence:
    text: str
    line: int
    start: int  # word span in its passage
    end: int


def sentences(passages: Sequence[str]) -> list[Sentence]:
    out = []
    for line, passage in enumerate(passages, start=1):
        start = 0
        for text in SENTENCE_END.split(passage.strip()):
            n = len(text.split())
            out.append(Sentence(text, line, start, start + n))
            start += n
    return out


def holding(sentence: Sentence, chunks: Sequence[Chunk]) -> list[str]:
    """The chunks that hold all of `sentence`, else those that hold the most of its words."""
    overlap = {
        c.entry.id: min(c.end, sentence.end) - max(c.start, sentence.start)
        for c in chunks
        if c.line == sentence.line
    }
    best = max(overlap.values(), default=0)
    return [cid for cid, words in overlap.items() if words == best and words > 0]


class GoldRule:
    """The module's rule over one corpus, its indexes built once: call it on batch after batch
    of answers."""

    def __init__(self, chunks: Sequence[Chunk], passages: Sequence[str]) -> None:
        self.chunks = chunks
        self.padded = [f" {normalize_answer(c.entry.text)} " for c in chunks]
        self.pool = sentences(passages)
        self.bm25 = build_bm25([s.text for s in self.pool]) if self.pool else None

    def __call__(self, answers: Sequence[str]) -> list[list[str]]:
        """Each answer's gold chunk ids ([] where no chunk states it)."""
        golds: list[list[str]] = []
        for answer in answers:
            phrase = f" {normalize_answer(answer)} "
            found = [
                c.entry.id for c, t in zip(self.chunks, self.padded, strict=True) if phrase in t
            ]
            if found and content_words(answer):
                golds.append(found)
            elif self.bm25 is None:
                golds.append([])
            else:
                golds.append(stating_chunks(answer, self.pool, self.bm25, self.chunks))
        return golds


def stating_chunks(
    answer: str, pool: Sequence[Sentence], bm25: bm25s.BM25, chunks: Sequence[Chunk]
) -> list[str]:
    """Rule 2: the chunks holding the sentence that states `answer` ([] if none does)."""
    ids = bm25_search(bm25, [answer], CANDIDATE_SENTENCES)[1]
    candidates = [pool[i] for i in ids[0] if i >= 0]
    if not candidates:
        return []
    best = max(candidates, key=lambda s: support(answer, [s.text]))  # first = better BM25
    return holding(best, chunks) if support(answer, [best.text]) >= MIN_SUPPORT else []


# --- the knowledge base ------------------------------------------------------------------------


@dataclass(frozen=True)
class Questions:
    """Questions of one split and their gold entries (entry indices; [] where no chunk states
    the answer: "not in corpus")."""

    records: list[Record]
    golds: list[list[int]]

    def in_corpus(self) -> Questions:
        return self.subset(self.stated_rows)

    @property
    def stated_rows(self) -> list[int]:
        """The positions of the questions whose answer a chunk states."""
        return [n for n, g in enumerate(self.golds) if g]

    def subset(self, rows: Sequence[int]) -> Questions:
        return Questions([self.records[n] for n in rows], [self.golds[n] for n in rows])

    def split(self, fraction: float, seed: int) -> tuple[Questions, Questions]:
        """(the rest, a share `fraction` of the questions drawn with `seed`), both in file
        order; each keeps at least one question where there are two."""
        n = len(self.records)
        drawn = random.Random(f"calibration-{seed}").sample(range(n), n)
        k = min(max(round(fraction * n), 1), n - 1) if n > 1 else 0
        return self.subset(sorted(drawn[k:])), self.subset(sorted(drawn[:k]))

    @property
    def questions(self) -> list[str]:
        return [r["question"] for r in self.records]


@dataclass(frozen=True)
class KnowledgeBase:
    entries: list[Entry]
    position: dict[str, int]  # entry id -> its index in `entries` (and in the index)

    def questions(self, records: list[Record], source: Path) -> Questions:
        """The records of a validated split with their gold entries (its `gold` ids)."""
        golds = []
        for n, record in enumerate(records, start=1):
            ids = record.get("gold")
            if not isinstance(ids, list) or any(i not in self.position for i in ids):
                raise StageError(
                    f"{source}:{n}: gold {ids!r} names no chunk of these passages and chunk"
                    " params: validate the questions again (`dvc repro validate_rag`)"
                )
            golds.append([self.position[i] for i in ids])
        return Questions(records, golds)

    @cached_property
    def bm25(self) -> bm25s.BM25:
        """The BM25 index of the entries, built once for mining, ranking and the saved system."""
        return build_bm25([e.text for e in self.entries])


def knowledge_base(
    passages: Sequence[str], train: Sequence[Record], size: int, overlap: int, faq: bool
) -> KnowledgeBase:
    """The passages' chunks, then (with `faq`) each train question and its answer."""
    entries = [c.entry for c in passage_chunks(passages, size, overlap)]
    if faq:
        entries += [
            Entry(f"f{n}", f"{r['question']} {r['answer']}") for n, r in enumerate(train, start=1)
        ]
    return KnowledgeBase(entries, {e.id: i for i, e in enumerate(entries)})


def write_entries(directory: Path, entries: Iterable[Entry]) -> None:
    write_jsonl(directory / PASSAGES_FILE, (asdict(e) for e in entries))


def stream_entries(directory: Path) -> Iterator[Entry]:
    """The entries `write_entries` wrote, read one line at a time (a base of millions)."""
    with (directory / PASSAGES_FILE).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                yield Entry(record["id"], record["text"])


def read_entries(directory: Path) -> list[Entry]:
    return list(stream_entries(directory))
