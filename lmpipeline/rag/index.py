"""Dense retrieval over the knowledge base: embeddings in a FAISS index, and reciprocal-rank fusion
with BM25 (`lmpipeline.rag.lexical`) for the hybrid retriever."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


@torch.no_grad()
def embed(
    encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
    desc: str | None = None,
    pool: Pooling = pooled,
) -> np.ndarray:
    """(len(texts), dim) float32 embeddings, batched by length so that little is padding."""
    encoder.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    vectors = []
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None):
        batch = tokenizer(
            [texts[i] for i in order[start : start + batch_size]],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(encoder.device)
        vectors.append(pool(encoder, batch["input_ids"], batch["attention_mask"]).float().cpu())
    if not vectors:
        return np.zeros((0, encoder.config.hidden_size), dtype=np.float32)
    out = np.empty((len(texts), vectors[0].shape[1]), dtype=np.float32)
    out[order] = torch.cat(vectors).numpy()
    return out


# --- vector index ------------------------------------------------------------------------------


def build_index(vectors: np.ndarray, kind: str) -> faiss.Index:
    """Inner-product index over normalized vectors: exact (flat) or approximate (hnsw, ivf,
    ivfpq), its size-dependent settings chosen from the number of vectors."""
    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        # ~4 sqrt(n) lists (FAISS's guideline), each trained on >= 39 points; a quarter probed
        # for ivf (recall over speed), 1/16 for ivfpq (the lists of a large base are long).
        lists = max(1, min(int(4 * np.sqrt(len(vectors))), len(vectors) // 39))
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        else:
            m, bits = pq_shape(dim, len(vectors))
            index = faiss.IndexIVFPQ(quantizer, dim, lists, m, bits, faiss.METRIC_INNER_PRODUCT)
        # k-means on at most 64 points a list (FAISS itself warns below 39 and samples above
        # 256): a seeded sample keeps training a base of millions to minutes.
        sample = min(len(vectors), 64 * lists)
        rows = np.random.default_rng(0).choice(len(vectors), sample, replace=False)
        index.train(vectors[np.sort(rows)] if sample < len(vectors) else vectors)
        index.nprobe = max(1, lists // (4 if kind == "ivf" else 16))
    index.add(vectors)
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


def fuse(rankings: Sequence[np.ndarray], n_entries: int, depth: int) -> tuple[np.ndarray, ...]:
    """Reciprocal-rank fusion: each ranking gives 1 / (RRF_K + rank) to the entries it lists.
    Entries that no ranking lists come last as -1 (not found)."""
    fused = np.zeros((len(rankings[0]), n_entries))
    for ranking in rankings:
        rows, cols = np.nonzero(ranking >= 0)
        np.add.at(fused, (rows, ranking[rows, cols]), 1.0 / (RRF_K + cols + 1))
    order = np.argsort(-fused, axis=1, kind="stable")[:, :depth]
    scores = np.take_along_axis(fused, order, axis=1)
    return scores, np.where(scores > 0, order, -1)


def lexical_ranks(
    bm25: bm25s.BM25, n_entries: int, questions: Sequence[str], dense: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The full BM25 and hybrid rankings of the `n_entries` entries for `questions`.

    The hybrid fuses each retriever's top CANDIDATES, exactly as a system answering does."""
    lexical = bm25_search(bm25, questions, n_entries)[1]
    fused = fuse([dense[:, :CANDIDATES], lexical[:, :CANDIDATES]], n_entries, n_entries)
    return lexical, fused[1]
