"""What both RAG backends share: knowledge base, indexes, fusion and scores."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from transformers import AutoModel, AutoTokenizer

from lmpipeline import metrics
from lmpipeline.rag import index, knowledge, lexical
from tests.helpers import PASSAGES


def test_chunks_overlap_and_every_chunk_adds_words() -> None:
    text = " ".join(f"w{i}" for i in range(10))
    chunks = knowledge.chunk_words(text, size=4, overlap=1)
    assert chunks == ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]
    assert knowledge.chunk_words("a b c", size=4, overlap=1) == ["a b c"]
    # A window that would only repeat the previous one's overlap is not made.
    assert knowledge.chunk_words(" ".join("abcdefg"), size=4, overlap=1) == ["a b c d", "d e f g"]


def test_knowledge_base_is_the_chunks_then_train_faq_entries_only() -> None:
    train = [{"question": "q?", "answer": "masked tokens", "gold": []}]
    kb = knowledge.knowledge_base(PASSAGES, train, size=5, overlap=2, faq=False)
    ids = [e.id for e in kb.entries]
    assert ids[:3] == ["p1.0", "p1.1", "p1.2"] and all(i.startswith("p") for i in ids)
    with_faq = knowledge.knowledge_base(PASSAGES, train, size=5, overlap=2, faq=True)
    assert with_faq.entries[-1] == knowledge.Entry("f1", "q? masked tokens")
    assert with_faq.entries[: len(ids)] == kb.entries


GOLD_PASSAGES = [
    "The Adam optimizer keeps two moments. Its default learning rate is 0.001 in PyTorch.",
    "Dropout zeroes activations at random during training. It was introduced in 2014.",
    "Adam and its default learning rate of 0.001 are used in many tutorials.",
]


def golds(answers: list[str], size: int = 50, overlap: int = 5) -> list[list[str]]:
    chunks = knowledge.passage_chunks(GOLD_PASSAGES, size, overlap)
    return knowledge.GoldRule(chunks, GOLD_PASSAGES)(answers)


def test_gold_is_every_chunk_holding_the_answer_phrase() -> None:
    # Case, punctuation and articles do not matter (SQuAD normalization), as for scoring.
    assert golds(["0.001", "In 2014."]) == [["p1.0", "p3.0"], ["p2.0"]]


def test_gold_falls_back_to_the_chunk_of_the_sentence_stating_the_answer() -> None:
    # Not a phrase of any passage, but one sentence holds most of its content words.
    assert golds(["Dropout zeroes random activations while training."]) == [["p2.0"]]
    # Chunks of 6 words overlapping by 2 (words 1-6, 5-10, 9-14): the stating sentence, words
    # 7-14 of passage 1, lies whole in no chunk; the one holding most of it (6 words) is gold.
    assert golds(["default learning rate PyTorch"], size=6, overlap=2) == [["p1.2"]]


def test_an_answer_no_sentence_states_has_no_gold() -> None:
    # Shares a word with the corpus (Adam) but most of its content words are nowhere.
    assert golds(["Adam was proposed by Kingma and Ba.", "the", "zzz"]) == [[], [], []]


def test_recall_mrr_and_ndcg_with_several_golds() -> None:
    ranked = np.array([[3, 1, 2, 0], [0, 1, 2, 3], [1, 0, -1, -1]])
    ranks = metrics.gold_ranks(ranked, [[3], [2, 3], [2]])
    assert [r.tolist() for r in ranks] == [[1], [3, 4], [0]]  # gold 2 of query 3 not retrieved
    scores = metrics.retrieval_scores(ranks)
    assert scores["recall@1"] == pytest.approx(1 / 3, abs=1e-6)
    assert scores["recall@5"] == pytest.approx(2 / 3, abs=1e-6)
    assert scores["mrr"] == pytest.approx((1 + 1 / 3 + 0) / 3, abs=1e-6)
    # Query 2: golds at 3 and 4 of an ideal 1 and 2.
    second = (1 / np.log2(4) + 1 / np.log2(5)) / (1 + 1 / np.log2(3))
    assert scores["ndcg@10"] == pytest.approx((1 + second + 0) / 3, abs=1e-6)


def test_support_is_the_share_of_answer_content_words_in_the_passages() -> None:
    passages = ["The learning rate is 0.001.", "Adam keeps moments."]
    assert metrics.support("Adam's learning rate: 0.001", passages) == pytest.approx(3 / 4)
    assert metrics.support("The rate of Adam", passages) == 1.0  # stopwords do not count
    assert metrics.support("", passages) == 0.0 and metrics.support("rate", []) == 0.0


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
    bm25 = lexical.build_bm25([*PASSAGES, "an unrelated sentence about cooking"])
    scores, ids = lexical.bm25_search(bm25, ["which retriever finds passages?", "cooking"], depth=3)
    assert ids[:, 0].tolist() == [1, 2]
    assert scores[0, 0] > 0
    assert ids[1].tolist() == [2, -1, -1]  # only one entry mentions cooking
    assert (lexical.bm25_search(bm25, ["qqq"], depth=3)[1] == -1).all()


def test_bm25_numbers_words_in_sorted_order_so_its_saved_index_is_reproducible() -> None:
    # bm25s's own numbering follows set order, which changes with each process's hash seed.
    vocab = lexical.build_bm25(PASSAGES).vocab_dict
    words = [w for w in vocab if w]  # bm25s adds "" for words it has never seen
    assert len(words) > 10 and words == sorted(words)
    assert [vocab[w] for w in words] == list(range(len(words)))


def test_ivfpq_compresses_and_still_finds_the_entry() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((4000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assert index.pq_shape(32, len(vectors)) == (4, 6)  # 8-dim sub-vectors, 2**6 <= 4000 / 39
    built = index.build_index(vectors, "ivfpq")
    _, ids = index.search(built, vectors[:200], depth=10)
    assert (ids == np.arange(200)[:, None]).any(axis=1).mean() >= 0.95
    flat = index.build_index(vectors, "flat")
    assert len(faiss.serialize_index(built)) * 5 < len(faiss.serialize_index(flat))
    assert index.pq_shape(30, 10) == (5, 1)  # 6-dim sub-vectors; 1 bit on a tiny base


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
def test_an_index_streamed_in_blocks_is_the_index_built_at_once(kind: str) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    blocks = (vectors[start : start + 700] for start in range(0, len(vectors), 700))
    streamed = index.stream_index(blocks, len(vectors), kind)  # ivf kinds: via a disk spool
    at_once = index.build_index(vectors, kind)
    assert streamed.ntotal == at_once.ntotal == len(vectors)
    found, expected = (index.search(i, vectors[:100], depth=5)[1] for i in (streamed, at_once))
    if kind == "hnsw":  # its graph is built in parallel: the same neighbours, not the same ties
        assert (found[:, 0] == np.arange(100)).mean() >= 0.95
    else:
        assert (found == expected).all()
    with pytest.raises(ValueError, match="2999 vectors came, 3000 were announced"):
        index.stream_index([vectors[:2999]], len(vectors), kind)


def test_embeddings_streamed_in_small_windows_equal_those_of_one_window(
    tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = AutoModel.from_pretrained(tiny_bert_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = [" ".join(PASSAGES[: 1 + n % len(PASSAGES)]) for n in range(11)]
    whole = index.embed(encoder, tokenizer, texts, max_length=64, batch_size=2)
    monkeypatch.setattr(index, "WINDOW_BATCHES", 1)  # windows of 2 texts: 6 blocks
    blocks = list(index.embed_stream(encoder, tokenizer, iter(texts), 64, batch_size=2))
    assert [len(b) for b in blocks] == [2, 2, 2, 2, 2, 1]
    assert np.allclose(np.concatenate(blocks), whole, atol=1e-5)
    assert not np.allclose(whole[0], whole[1])  # the texts differ, so do their vectors
