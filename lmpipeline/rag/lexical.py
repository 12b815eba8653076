"""BM25 over any texts (bm25s, English stopwords and Snowball stemming): the lexical retriever,
and the rule that finds the sentences stating an answer. Light to import: no torch."""

from __future__ import annotations

from collections.abc import Sequence

import bm25s
import numpy as np
import Stemmer

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
