"""Dense retrieval over the knowledge base: embeddings in a FAISS index, and reciprocal-rank fusion
with BM25 (`lmpipeline.rag.lexical`) for the hybrid retriever."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import bm25s
import faiss
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipeline.rag.lexical import bm25_search

RRF_K = 60  # the constant of Cormack et al. (2009): ranks beyond a few dozen barely count
CANDIDATES = 50  # per retriever, fused by the hybrid when answering
HNSW_NEIGHBOURS = 32
HNSW_EF_SEARCH = 128

# --- dense retrieval ---------------------------------------------------------------------------

# How an encoder's output becomes one vector per text.
Pooling = Callable[[PreTrainedModel, torch.Tensor, torch.Tensor], torch.Tensor]


def pooled(encoder: PreTrainedModel, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over real tokens, L2-normalized: inner product = cosine."""
    hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0), dim=-1)


WINDOW_BATCHES = 64  # batches sorted by length together: little padding, bounded memory


def windows(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    """`texts` in consecutive lists of `size` (the last shorter), read as they come."""
    it = iter(texts)
    while window := list(itertools.islice(it, size)):
        yield window


@torch.no_grad()
def embed_stream(
    encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    max_length: int,
    batch_size: int,
    desc: str | None = None,
    total: int | None = None,
    pool: Pooling = pooled,
) -> Iterator[np.ndarray]:
    """Embeddings of `texts` in their order, one float32 block per window of WINDOW_BATCHES
    batches: only a window's texts and one batch's tokens are held, however many texts come.
    Within a window the batches are formed by length, so that little is padding."""
    encoder.eval()
    bar = tqdm(total=total, desc=desc, disable=desc is None)
    for window in windows(texts, batch_size * WINDOW_BATCHES):
        order = sorted(range(len(window)), key=lambda i: len(window[i]))
        vectors = []
        for start in range(0, len(order), batch_size):
            batch = tokenizer(
                [window[i] for i in order[start : start + batch_size]],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(encoder.device)
            vectors.append(pool(encoder, batch["input_ids"], batch["attention_mask"]).float().cpu())
            bar.update(len(batch["input_ids"]))
        block = np.empty((len(window), vectors[0].shape[1]), dtype=np.float32)
        block[order] = torch.cat(vectors).numpy()
        yield block
    bar.close()


def embed(
    encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
    desc: str | None = None,
    pool: Pooling = pooled,
) -> np.ndarray:
    """(len(texts), dim) float32 embeddings of texts held in memory."""
    blocks = list(
        embed_stream(encoder, tokenizer, texts, max_length, batch_size, desc, len(texts), pool)
    )
    if not blocks:
        return np.zeros((0, encoder.config.hidden_size), dtype=np.float32)
    return np.concatenate(blocks)


# --- vector index ------------------------------------------------------------------------------


ADD_ROWS = 65_536  # vectors added to an index at a time (a block of a memory-mapped spool)


def empty_index(kind: str, dim: int, n: int) -> faiss.Index:
    """Inner-product index over normalized vectors: exact (flat) or approximate (hnsw, ivf,
    ivfpq), its size-dependent settings chosen from the number of vectors `n`."""
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_EF_SEARCH
        return index
    # ~4 sqrt(n) lists (FAISS's guideline), each trained on >= 39 points; a quarter probed
    # for ivf (recall over speed), 1/16 for ivfpq (the lists of a large base are long).
    lists = max(1, min(int(4 * np.sqrt(n)), n // 39))
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
    else:
        m, bits = pq_shape(dim, n)
        index = faiss.IndexIVFPQ(quantizer, dim, lists, m, bits, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = max(1, lists // (4 if kind == "ivf" else 16))
    return index


def build_index(vectors: np.ndarray, kind: str) -> faiss.Index:
    """A `kind` index (see `empty_index`) of `vectors`, in memory or memory-mapped: trained
    (the ivf kinds) on a sample, then filled a block at a time."""
    index = empty_index(kind, vectors.shape[1], len(vectors))
    if not index.is_trained:
        # k-means on at most 64 points a list (FAISS itself warns below 39 and samples above
        # 256): a seeded sample keeps training a base of millions to minutes.
        sample = min(len(vectors), 64 * index.nlist)
        rows = np.random.default_rng(0).choice(len(vectors), sample, replace=False)
        index.train(
            np.ascontiguousarray(vectors[np.sort(rows)] if sample < len(vectors) else vectors)
        )
    for start in range(0, len(vectors), ADD_ROWS):
        index.add(np.ascontiguousarray(vectors[start : start + ADD_ROWS]))
    return index


def stream_index(blocks: Iterable[np.ndarray], n: int, kind: str) -> faiss.Index:
    """`build_index` over `n` vectors arriving in blocks (from `embed_stream`). Flat and hnsw
    take each block as it comes; the ivf kinds must see a sample of all before the first add,
    so the blocks are spooled to a memory-mapped file on disk, not held."""
    blocks = iter(blocks)
    first = next(blocks, None)
    if first is None:
        raise ValueError("no vectors to index")
    index = empty_index(kind, first.shape[1], n)
    if index.is_trained:
        for block in itertools.chain([first], blocks):
            index.add(block)
        if index.ntotal != n:
            raise ValueError(f"{index.ntotal} vectors came, {n} were announced")
        return index
    with tempfile.TemporaryDirectory(prefix="lmpipeline-index-") as spool:
        vectors = np.lib.format.open_memmap(
            Path(spool) / "vectors.npy", mode="w+", dtype=np.float32, shape=(n, first.shape[1])
        )
        at = 0
        for block in itertools.chain([first], blocks):
            vectors[at : at + len(block)] = block
            at += len(block)
        if at != n:
            raise ValueError(f"{at} vectors came, {n} were announced")
        index = build_index(vectors, kind)
        del vectors  # unmapped before its directory goes
        return index


def pq_shape(dim: int, n: int) -> tuple[int, int]:
    """Product quantization of `dim` dimensions for `n` training vectors: sub-vectors of 8
    dimensions (or the largest divisor of `dim` at most 8), each coded on up to 8 bits, fewer
    when there are too few vectors to train 2**bits centroids (39 points each)."""
    width = next(w for w in range(min(8, dim), 0, -1) if dim % w == 0)
    bits = int(max(1, min(8, np.floor(np.log2(max(n // 39, 2))))))
    return dim // width, bits


def search(index: faiss.Index, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, entry indices) of the `depth` best entries per query; -1 pads a short list."""
    scores, ids = index.search(queries, min(depth, index.ntotal))
    return scores, ids


# --- lexical and hybrid retrieval --------------------------------------------------------------


def fuse(
    rankings: Sequence[np.ndarray],
    n_entries: int,
    depth: int,
    weights: Sequence[float] | None = None,
) -> tuple[np.ndarray, ...]:
    """Reciprocal-rank fusion: each ranking gives weight / (RRF_K + rank) to the entries it lists
    (weight 1 each by default: plain RRF). Entries that no ranking lists come last as -1."""
    fused = np.zeros((len(rankings[0]), n_entries))
    for ranking, weight in zip(rankings, weights or [1.0] * len(rankings), strict=True):
        rows, cols = np.nonzero(ranking >= 0)
        np.add.at(fused, (rows, ranking[rows, cols]), weight / (RRF_K + cols + 1))
    order = np.argsort(-fused, axis=1, kind="stable")[:, :depth]
    scores = np.take_along_axis(fused, order, axis=1)
    return scores, np.where(scores > 0, order, -1)


def hybrid_weights(weight: float) -> tuple[float, float]:
    """The fusion weights of the dense and the BM25 ranking for a dense share `weight`: 0.5 is
    plain RRF (both 1), so its scores are those of unweighted fusion."""
    return 2 * weight, 2 * (1 - weight)


def hybrid(
    dense: np.ndarray, lexical: np.ndarray, n_entries: int, depth: int, weight: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, entry indices) of the fusion of each retriever's top CANDIDATES, exactly as a
    system answering does."""
    rankings = [dense[:, :CANDIDATES], lexical[:, :CANDIDATES]]
    return fuse(rankings, n_entries, depth, hybrid_weights(weight))


def lexical_ranks(
    bm25: bm25s.BM25,
    n_entries: int,
    questions: Sequence[str],
    dense: np.ndarray,
    weight: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """The full BM25 and hybrid rankings of the `n_entries` entries for `questions`."""
    lexical = bm25_search(bm25, questions, n_entries)[1]
    return lexical, hybrid(dense, lexical, n_entries, n_entries, weight)[1]
