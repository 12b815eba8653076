"""The RAG stage: knowledge base, retrieval scores, index, fine-tuning, and `ask` end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModel, AutoTokenizer

from stages import rag
from stages.data import write_jsonl
from stages.params import ParamsError, RagParams, load_params
from stages.sft import prompt_text
from tests.conftest import crash_at_step, word_level_tokenizer

PASSAGES = [
    "the model learns to predict masked tokens from context",
    "a retriever finds passages and the generator answers the question. "
    "Fine tuning teaches the assistant style",
]


def test_chunks_overlap_and_every_chunk_adds_words() -> None:
    text = " ".join(f"w{i}" for i in range(10))
    chunks = rag.chunk_words(text, size=4, overlap=1)
    assert chunks == ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]
    assert rag.chunk_words("a b c", size=4, overlap=1) == ["a b c"]
    # A window that would only repeat the previous one's overlap is not made.
    assert rag.chunk_words(" ".join("abcdefg"), size=4, overlap=1) == ["a b c d", "d e f g"]


def test_knowledge_base_has_chunks_then_distinct_answers_as_gold() -> None:
    cfg = RagParams(chunk_words=5, chunk_overlap=2, answer_context=False)
    kb = rag.knowledge_base(PASSAGES, ["the generator", "masked tokens", "the generator "], cfg)
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
    kb = rag.knowledge_base(PASSAGES, ["The assistant style.", "zzz unknown"], cfg)
    stated, unknown = kb.entries[-2:]
    assert stated.text == "The assistant style. — Fine tuning teaches the assistant style"
    assert unknown.text == "zzz unknown"  # no sentence shares a word: no context


def test_recall_and_mrr_on_known_rankings() -> None:
    ranked = np.array([[3, 1, 2, 0], [0, 1, 2, 3], [1, 0, -1, -1]])
    ranks = rag.gold_ranks(ranked, [3, 2, 2])
    assert ranks.tolist() == [1, 3, 0]  # gold 2 of the last query was not retrieved
    scores = rag.retrieval_scores(ranks)
    assert scores["recall@1"] == pytest.approx(1 / 3, abs=1e-6)
    assert scores["recall@5"] == pytest.approx(2 / 3, abs=1e-6)
    assert scores["mrr"] == pytest.approx((1 + 1 / 3 + 0) / 3, abs=1e-6)


def test_answer_scores_exact_match_f1_and_rouge() -> None:
    scores = rag.answer_scores(
        ["The epsilon of 0.1.", "beta two", "nothing"], ["an Epsilon of 0.1", "beta one", "x"]
    )
    assert scores["em"] == pytest.approx(1 / 3, abs=1e-6)  # articles, case, punctuation ignored
    assert scores["f1"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-6)
    # ROUGE-L keeps articles: "the epsilon of 0 1" against "an epsilon of 0 1" shares 4 of 5.
    assert scores["rougeL"] == pytest.approx((0.8 + 0.5 + 0) / 3, abs=1e-6)


def test_reciprocal_rank_fusion_prefers_entries_both_rank_high() -> None:
    dense = np.array([[0, 1, 2]])
    lexical = np.array([[1, 2, 0]])
    scores, order = rag.fuse([dense, lexical], n_entries=4, depth=4)
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
    index = rag.build_index(vectors, kind)
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    loaded = faiss.read_index(str(tmp_path / "index.faiss"))
    scores, ids = rag.search(loaded, vectors[:20], depth=5)
    assert ids.shape == (20, 5)
    assert (ids[:, 0] == np.arange(20)).mean() >= 0.9  # each vector is its own nearest entry
    assert np.allclose(scores[:, 0][ids[:, 0] == np.arange(20)], 1.0, atol=1e-5)


def test_bm25_ranks_the_entry_sharing_rare_words_first_and_lists_no_non_match() -> None:
    bm25 = rag.build_bm25([*PASSAGES, "an unrelated sentence about cooking"])
    scores, ids = rag.bm25_search(bm25, ["which retriever finds passages?", "cooking"], depth=3)
    assert ids[:, 0].tolist() == [1, 2]
    assert scores[0, 0] > 0
    assert ids[1].tolist() == [2, -1, -1]  # only one entry mentions cooking
    assert (rag.bm25_search(bm25, ["qqq"], depth=3)[1] == -1).all()


def test_bm25_numbers_words_in_sorted_order_so_its_saved_index_is_reproducible() -> None:
    # bm25s's own numbering follows set order, which changes with each process's hash seed.
    vocab = rag.build_bm25(PASSAGES).vocab_dict
    words = [w for w in vocab if w]  # bm25s adds "" for words it has never seen
    assert len(words) > 10 and words == sorted(words)
    assert [vocab[w] for w in words] == list(range(len(words)))


def test_contrastive_loss_masks_a_shared_gold(tiny_bert_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    encoder = AutoModel.from_pretrained(tiny_bert_dir)
    entries = [rag.Entry("a1", "the generator answers"), rag.Entry("a2", "masked tokens")]
    collate = rag.PairCollator(tokenizer, entries, max_length=16)
    shared = collate([("what answers", 0), ("who answers", 0), ("what is masked", 1)])
    parts = rag.contrastive_loss(encoder, shared)
    assert int(parts.predicted) == 3
    assert torch.isfinite(parts.loss_sum)
    # Identical golds are not each other's negatives: with one other gold, each question of the
    # shared pair chooses between two candidates, never three.
    q = rag.pooled(encoder, shared["q_input_ids"], shared["q_attention_mask"])
    p = rag.pooled(encoder, shared["p_input_ids"], shared["p_attention_mask"])
    logits = rag.SCALE * q @ p.T
    first = torch.logsumexp(logits[0, [0, 2]], 0) - logits[0, 0]
    second = torch.logsumexp(logits[1, [1, 2]], 0) - logits[1, 1]
    third = torch.logsumexp(logits[2], 0) - logits[2, 2]
    assert parts.loss_sum.item() == pytest.approx((first + second + third).item(), rel=1e-5)


def test_passages_are_shortened_to_fit_the_generator_context() -> None:
    tokenizer = word_level_tokenizer(chat=True)
    config = rag.RagConfig("gen", "dense", "flat", top_k=2, max_length=32, max_new_tokens=4)
    hits = [rag.Hit(rag.Entry(f"p{i}.0", " ".join([PASSAGES[0]] * 8)), 1.0) for i in range(2)]
    full = rag.fitted_prompt(config, "what does the model learn?", hits, tokenizer, None)
    fitted = rag.fitted_prompt(config, "what does the model learn?", hits, tokenizer, 60)
    assert len(tokenizer(prompt_text(tokenizer, full))["input_ids"]) > 60
    assert len(tokenizer(prompt_text(tokenizer, fitted))["input_ids"]) <= 60
    assert "Passage 1: the model" in fitted and "Passage 2: the model" in fitted
    assert fitted.endswith("Question: what does the model learn?")


def test_retriever_fine_tuning_resumes_exactly_after_a_crash(
    tiny_bert_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # checkpoints/ lands here
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    entries = [rag.Entry(f"a{i}", line) for i, line in enumerate(PASSAGES * 3)]
    pairs = [(f"question {i} about {e.text[:20]}", i) for i, e in enumerate(entries)]
    cfg = RagParams(retriever_epochs=5, retriever_batch_size=2, retriever_lr=1e-3)  # 15 steps

    def train(checkpoints: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # as the stage's set_seed: the unused pooler starts the same
        encoder = rag.load_encoder(tiny_bert_dir, torch.device("cpu"))
        collate = rag.PairCollator(tokenizer, entries, max_length=16)
        args = (collate, pairs, pairs[:2], cfg, 0, torch.device("cpu"), None, Path(checkpoints))
        rag.finetune_retriever(encoder, *args)
        return encoder.state_dict()

    clean = train("clean")
    with crash_at_step(12):  # after the checkpoint of step 10
        train("resumed")
    capsys.readouterr()
    resumed = train("resumed")
    assert "rag: resuming from resumed/checkpoint-10" in capsys.readouterr().out
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)


# --- the stage end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_llama_dir: Path
) -> tuple[Path, dict]:
    """The stage run on tiny models and data: (working directory, metrics)."""
    root = tmp_path_factory.mktemp("rag")
    words = PASSAGES[0].split()
    pretrain = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    (root / "pretrain.txt").write_text("\n".join(pretrain) + "\n", encoding="utf-8")
    records = [
        {"question": f"what does the {w} do?", "answer": f"the {w} answers the question"}
        for w in ["model", "retriever", "generator", "assistant", "passages", "context"]
    ]
    write_jsonl(root / "data/train.jsonl", records[:4])
    write_jsonl(root / "data/eval.jsonl", records[4:])
    params = {
        "cpt": {"model": str(tiny_bert_dir)},
        "rag": {
            "chunk_words": 6,
            "chunk_overlap": 2,
            "max_length": 32,
            "retriever_epochs": 2,
            "retriever_lr": 1e-3,
            "retriever_batch_size": 2,
            "top_k": 2,
            "max_new_tokens": 4,
            "retriever": "hybrid",
        },
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    before = {
        k: v.clone() for k, v in AutoModel.from_pretrained(tiny_bert_dir).state_dict().items()
    }
    code = rag.main(
        [
            "build",
            f"--cpt={tiny_bert_dir}",
            f"--sft={tiny_llama_dir}",
            f"--data={root / 'data'}",
            f"--pretrain={root / 'pretrain.txt'}",
            f"--output={root / 'output/rag'}",
            f"--metrics={root / 'metrics/rag.json'}",
            f"--plots={root / 'metrics/rag'}",
            f"--predictions={root / 'metrics/rag_predictions.jsonl'}",
            f"--params={root / 'params.yaml'}",
            f"--timings={root / 'output/timings/rag.json'}",
        ]
    )
    assert code == 0
    tuned = AutoModel.from_pretrained(root / "output/rag/retriever").state_dict()
    assert any(not torch.equal(before[k], tuned[k]) for k in tuned if k in before)
    return root, json.loads((root / "metrics/rag.json").read_text())


def test_metrics_have_every_key_of_the_spec(built: tuple[Path, dict]) -> None:
    root, metrics = built
    assert set(metrics["retrieval"]) == {"base", "cpt", "finetuned", "bm25", "hybrid"}
    for scores in metrics["retrieval"].values():
        assert set(scores) == {"recall@1", "recall@5", "recall@10", "mrr"}
        assert 0.0 <= scores["recall@1"] <= scores["recall@5"] <= scores["recall@10"] <= 1.0
    assert set(metrics["answers"]) == {"closed_book", "rag"}
    assert set(metrics["answers"]["rag"]) == {"em", "f1", "rougeL"}
    latency = json.loads((root / "output/timings/rag.json").read_text())["latency"]
    assert set(latency) == {"embed_passages_per_s", "retrieve_ms_p50", "answer_ms_p50"}
    assert latency["answer_ms_p50"] > 0
    # 9 passages of 9 words in chunks of 6 overlapping by 2: 2 chunks each; 6 distinct answers.
    assert metrics["index"] == {"entries": 9 * 2 + 6, "dim": 32, "type": "flat"}


def test_outputs_hold_a_loadable_system_and_readable_predictions(built: tuple[Path, dict]) -> None:
    root, _ = built
    out = root / "output/rag"
    assert {p.name for p in out.iterdir()} >= {
        "retriever",
        "index.faiss",
        "bm25",
        "passages.jsonl",
        "config.json",
    }
    config = json.loads((out / "config.json").read_text())
    assert config["retriever"] == "hybrid" and config["top_k"] == 2
    assert (out / config["generator"] / "config.json").is_file()
    predictions = [json.loads(line) for line in (root / "metrics/rag_predictions.jsonl").open()]
    assert len(predictions) == 2
    first = predictions[0]
    assert first["question"] == "what does the passages do?"
    assert first["gold"].startswith("a")
    assert len(first["rag"]["passages"]) == 2 and {"id", "score", "text"} <= set(
        first["rag"]["passages"][0]
    )
    assert "answer" in first["closed_book"]
    curve = (root / "metrics/rag/recall.csv").read_text().splitlines()
    assert curve[0] == "k,base,cpt,finetuned,bm25,hybrid" and len(curve) == 1 + rag.CURVE_DEPTH


def test_ask_answers_from_the_output_directory_alone(
    built: tuple[Path, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = built
    system = rag.RagSystem.load(root / "output/rag", "cpu")
    answer = system.ask("what does the retriever do?")
    assert len(answer.passages) == 2
    assert [h.score for h in answer.passages] == sorted(
        (h.score for h in answer.passages), reverse=True
    )
    assert rag.main(["ask", "what does the retriever do?", f"--rag={root / 'output/rag'}"]) == 0
    printed = capsys.readouterr().out
    assert answer.text in printed
    for hit in answer.passages:
        assert f"[{hit.entry.id}]" in printed


def test_ask_without_a_built_system_says_how_to_build_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rag.main(["ask", "anything?", f"--rag={tmp_path}"]) == 1
    assert "dvc repro rag" in capsys.readouterr().err


def test_ask_names_a_missing_generator(
    built: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = built
    moved = tmp_path / "rag"
    shutil.copytree(root / "output/rag", moved)  # without the generator it names
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "generator": "../sft"}))
    assert rag.main(["ask", "what?", f"--rag={moved}"]) == 1
    assert "names the generator" in capsys.readouterr().err


def test_rag_params_refuse_what_cannot_run() -> None:
    for bad in ({"eval_fraction": 0.0}, {"retriever": "sparse"}, {"chunk_overlap": 100}):
        with pytest.raises(ParamsError, match=next(iter(bad))):
            RagParams(**bad)


def test_default_params_load_with_rag_keys() -> None:
    cfg = load_params(Path(__file__).resolve().parents[1] / "params.yaml").rag
    assert cfg.retriever in {"dense", "bm25", "hybrid"} and cfg.index == "flat"
