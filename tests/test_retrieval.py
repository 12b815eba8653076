"""What both RAG backends share: knowledge base, indexes, fusion and scores."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from lmpipeline import metrics
from lmpipeline.params import RagParams
from lmpipeline.rag import index, knowledge
from tests.helpers import PASSAGES


def test_chunks_overlap_and_every_chunk_adds_words() -> None:
    text = " ".join(f"w{i}" for i in range(10))
    chunks = knowledge.chunk_words(text, size=4, overlap=1)
    assert chunks == ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]
    assert knowledge.chunk_words("a b c", size=4, overlap=1) == ["a b c"]
    # A window that would only repeat the previous one's overlap is not made.
    assert knowledge.chunk_words(" ".join("abcdefg"), size=4, overlap=1) == ["a b c d", "d e f g"]


def test_knowledge_base_has_chunks_then_distinct_answers_as_gold() -> None:
    cfg = RagParams(chunk_words=5, chunk_overlap=2, answer_context=False)
    kb = knowledge.knowledge_base(
        PASSAGES, ["the generator", "masked tokens", "the generator "], cfg
    )
    ids = [e.id for e in kb.entries]
    assert ids[:3] == ["p1.0", "p1.1", "p1.2"]
    assert ids[-2:] == ["a1", "a2"]  # the repeated answer has one entry
    records = [
        {"question": "q?", "answer": "masked tokens"},
        {"question": "r?", "answer": "the generator"},
    ]
    assert [kb.entries[g].id for g in kb.gold(records)] == ["a2", "a1"]


def test_answer_context_is_the_sentence_that_states_the_answer() -> None:
    cfg = RagParams(chunk_words=50, chunk_overlap=5)
    kb = knowledge.knowledge_base(PASSAGES, ["The assistant style.", "zzz unknown"], cfg)
    stated, unknown = kb.entries[-2:]
    assert stated.text == "The assistant style. — Fine tuning teaches the assistant style"
    assert unknown.text == "zzz unknown"  # no sentence shares a word: no context


def test_recall_and_mrr_on_known_rankings() -> None:
    ranked = np.array([[3, 1, 2, 0], [0, 1, 2, 3], [1, 0, -1, -1]])
    ranks = metrics.gold_ranks(ranked, [3, 2, 2])
    assert ranks.tolist() == [1, 3, 0]  # gold 2 of the last query was not retrieved
    scores = metrics.retrieval_scores(ranks)
    assert scores["recall@1"] == pytest.approx(1 / 3, abs=1e-6)
    assert scores["recall@5"] == pytest.approx(2 / 3, abs=1e-6)
    assert scores["mrr"] == pytest.approx((1 + 1 / 3 + 0) / 3, abs=1e-6)


def test_answer_scores_exact_match_f1_and_rouge() -> None:
    scores = metrics.answer_scores(
        ["The epsilon of 0.1.", "beta two", "nothing"], ["an Epsilon of 0.1", "beta one", "x"]
    )
    assert scores["em"] == pytest.approx(1 / 3, abs=1e-6)  # articles, case, punctuation ignored
    assert scores["f1"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-6)
    # ROUGE-L keeps articles: "the epsilon of 0 1" against "an epsilon of 0 1" shares 4 of 5.
    assert scores["rougeL"] == pytest.approx((0.8 + 0.5 + 0) / 3, abs=1e-6)


def test_reciprocal_rank_fusion_prefers_entries_both_rank_high() -> None:
    dense = np.array([[0, 1, 2]])
    lexical = np.array([[1, 2, 0]])
    scores, order = index.fuse([dense, lexical], n_entries=4, depth=4)
    # 1 is 2nd and 1st, 0 is 1st and 3rd, 2 is 3rd and 2nd, 3 is in neither ranking.
    assert order[0].tolist() == [1, 0, 2, -1]
    assert scores[0].tolist() == pytest.approx(
        [1 / 62 + 1 / 61, 1 / 61 + 1 / 63, 1 / 63 + 1 / 62, 0]
    )


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_index_round_trip_finds_the_nearest_entry(kind: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((200, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    built = index.build_index(vectors, kind)
    faiss.write_index(built, str(tmp_path / "index.faiss"))
    loaded = faiss.read_index(str(tmp_path / "index.faiss"))
    scores, ids = index.search(loaded, vectors[:20], depth=5)
    assert ids.shape == (20, 5)
    assert (ids[:, 0] == np.arange(20)).mean() >= 0.9  # each vector is its own nearest entry
    assert np.allclose(scores[:, 0][ids[:, 0] == np.arange(20)], 1.0, atol=1e-5)


def test_bm25_ranks_the_entry_sharing_rare_words_first_and_lists_no_non_match() -> None:
    bm25 = index.build_bm25([*PASSAGES, "an unrelated sentence about cooking"])
    scores, ids = index.bm25_search(bm25, ["which retriever finds passages?", "cooking"], depth=3)
    assert ids[:, 0].tolist() == [1, 2]
    assert scores[0, 0] > 0
    assert ids[1].tolist() == [2, -1, -1]  # only one entry mentions cooking
    assert (index.bm25_search(bm25, ["qqq"], depth=3)[1] == -1).all()


def test_bm25_numbers_words_in_sorted_order_so_its_saved_index_is_reproducible() -> None:
    # bm25s's own numbering follows set order, which changes with each process's hash seed.
    vocab = index.build_bm25(PASSAGES).vocab_dict
    words = [w for w in vocab if w]  # bm25s adds "" for words it has never seen
    assert len(words) > 10 and words == sorted(words)
    assert [vocab[w] for w in words] == list(range(len(words)))
