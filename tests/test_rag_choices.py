"""What the `cpt-sft` build decides on its train questions: the first-stage retriever, the
reranker, the refusal threshold; and that no held-out record reaches any of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lmpipeline.rag import ask, backend, cpt_sft, cpt_sft_train, decisions, refusal
from lmpipeline.rag.cpt_sft_train import CptSftBackend as Backend
from lmpipeline.rag.index import hybrid
from lmpipeline.rag.knowledge import Questions
from lmpipeline.rag.lexical import bm25_search, build_bm25
from lmpipeline.testing import word_level_tokenizer
from tests.helpers import RAG_RECORDS, build_rag, tiny_rag

# --- the first stage -----------------------------------------------------------------------------

ENTRIES = [
    "tokenizers split text into pieces",
    "optimizers update the weights",
    "schedulers change the learning rate",
    "checkpoints save the training state",
    "retrievers rank the passages",
    "readers answer from passages",
]


def choose(questions: list[str], golds: list[list[int]], dense: np.ndarray) -> str:
    """`decisions.choose_retriever` over a real BM25 of ENTRIES and a given dense ranking,
    fused as the system fuses them."""
    bm25 = build_bm25(ENTRIES)
    lexical = bm25_search(bm25, questions, len(ENTRIES))[1]

    def rank(kind: str, weight: float | None) -> np.ndarray:
        if kind == "bm25":
            return lexical
        if kind == "dense":
            return dense
        return hybrid(dense, lexical, len(ENTRIES), len(ENTRIES), weight or 0.5)[1]

    choice = decisions.choose_retriever("auto", rank, golds)
    assert set(choice.scores) == {"dense", "bm25", "hybrid@0.5", "hybrid@0.7", "hybrid@0.3"}
    return choice.kind


def test_auto_picks_bm25_where_only_bm25_finds_the_golds() -> None:
    # Each question names its entry's rare word; the dense ranking puts every gold last.
    questions = ["what do tokenizers do?", "what do schedulers change?", "what do readers do?"]
    golds = [[0], [2], [5]]
    dense = np.array([[g for g in range(6) if g != q[0]] + q for q in golds])
    assert choose(questions, golds, dense) == "bm25"


def test_auto_picks_dense_where_only_dense_finds_the_golds() -> None:
    # The questions share no word with any entry (BM25 finds nothing); the dense ranking,
    # standing in for an encoder that knows synonyms, puts each gold first.
    questions = ["how is prose cut up?", "who moves parameters?", "what stores progress?"]
    golds = [[0], [1], [3]]
    dense = np.array([q + [g for g in range(6) if g != q[0]] for q in golds])
    assert choose(questions, golds, dense) == "dense"


def test_a_named_retriever_is_used_whatever_ranks_best() -> None:
    choice = decisions.choose_retriever("hybrid", lambda kind, weight: np.array([[0, 1]]), [[1]])
    assert (choice.kind, choice.weight) == ("hybrid", 0.5)


# --- the refusal -------------------------------------------------------------------------------


def test_the_threshold_maximizes_f1_with_refusals_and_refuses_least_on_a_tie() -> None:
    # Two prompts lack the answer and the reader is surest there: refusing exactly those two
    # scores 1 on each, and the answers score their F1 on the other two.
    logprobs = [-0.5, -1.0, -4.0, -6.0]
    f1 = [0.0, 0.1, 0.9, 0.8]
    lacking = [True, True, False, False]
    threshold = refusal.choose_threshold(logprobs, f1, lacking)
    assert threshold == pytest.approx(-2.5)
    # Refusing helps nothing where the answers are as good as a refusal: never refuse.
    assert refusal.choose_threshold(logprobs, [1.0, 1.0, 0.9, 0.8], lacking) is None
    # A tie between refusing the first only and refusing none keeps refusing none.
    assert refusal.choose_threshold([-1.0, -2.0], [0.0, 1.0], [False, False]) is None
    assert refusal.choose_threshold([], [], []) is None


def test_no_refusal_blocks_the_refusal_but_not_answers_that_start_like_it() -> None:
    opening = [7, 9]  # "The passages"
    block = refusal.NoRefusal(opening, prompt_width=3)
    prompt = torch.tensor([[1, 2, 3], [1, 2, 3]])
    scores = torch.zeros(2, 12)
    first = block(prompt, scores.clone())
    assert torch.isfinite(first).all()  # the first token is free: "The" starts answers too
    after = torch.cat([prompt, torch.tensor([[7], [5]])], dim=1)
    second = block(after, scores.clone())
    assert second[0, 9] == float("-inf")  # after "The": not "passages"
    assert torch.isfinite(second[1]).all() and torch.isfinite(second[0, :9]).all()


def test_calibration_counts_a_prompt_without_a_gold_as_lacking() -> None:
    questions = Questions(
        [{"question": "q1", "answer": "blue sky"}, {"question": "q2", "answer": "red"}],
        [[3], []],
    )
    calibrated = decisions.calibrate_refusal(
        questions, [[3, 4], [1, 2]], [-5.0, -0.1], ["blue sky", "green"]
    )
    assert calibrated.threshold is not None and -5.0 < calibrated.threshold < -0.1
    assert calibrated.figures == {
        "questions": 2,
        "lacking": 0.5,
        "refused": 0.5,
        "f1": 0.5,
        "f1_with_refusals": 1.0,
    }


# --- the stage: reranker, and no held-out record in any choice --------------------------------


# Held-out questions carry a marker no train record has; the last one's answer no passage states.
MARKER = "zebrafish"
HELD_OUT = [
    {"question": f"{MARKER} where do the tokens come from?", "answer": "tokens from context"},
    {"question": f"what does the {MARKER} generator do?", "answer": RAG_RECORDS[-1]["answer"]},
]


@pytest.fixture(scope="module")
def watched(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, tiny_llama_dir: Path
) -> tuple[Path, dict[str, list[Any]]]:
    """The stage on tiny data with the reranker forced on, every input to a choice or a trained
    model recorded: (working directory, what each one was given)."""
    root = tmp_path_factory.mktemp("rag-choices")
    seen: dict[str, list[Any]] = {}

    def spy(name: str, function: Any) -> Any:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            seen.setdefault(name, []).append((args, kwargs))
            return function(*args, **kwargs)

        return recorded

    params = {
        "cpt": {"model": str(tiny_bert_dir)},
        "rag": tiny_rag(
            train={"batch_size": 2, "epochs": 1},
            rerank={"enabled": "true", "candidates": 6, "batch_size": 2, "negatives": 2},
            reader={"batch_size": 2, "max_length": 128},
        ),
    }
    with pytest.MonkeyPatch.context() as patch:
        for module, name in [
            (cpt_sft_train, "teach_reader"),
            (cpt_sft_train, "train_reranker"),
            (cpt_sft_train, "calibrate_refusal"),
            (cpt_sft_train, "choose_retriever"),
            (backend, "make_trainer"),  # the final retriever's
            (cpt_sft_train, "make_trainer"),  # the folds'
        ]:
            patch.setattr(module, name, spy(name, getattr(module, name)))
        questions = RAG_RECORDS[:-2] + HELD_OUT
        assert build_rag(root, params, tiny_bert_dir, tiny_llama_dir, questions=questions) == 0
    return root, seen


def texts_of(value: Any) -> str:
    """Every string reachable in `value` (records, dataclasses, tuples, dicts), joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return " ".join(texts_of(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return " ".join(texts_of(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return " ".join(texts_of(getattr(value, f)) for f in value.__dataclass_fields__)
    return ""


def test_no_held_out_record_reaches_the_reader_the_reranker_or_any_choice(
    watched: tuple[Path, dict[str, list[Any]]],
) -> None:
    root, seen = watched
    # Everything was called, and each held the train questions only.
    assert set(seen) == {
        "teach_reader",
        "train_reranker",
        "calibrate_refusal",
        "choose_retriever",
        "make_trainer",
    }
    # The reader is taught the fit questions, then (the refit) the calibration ones.
    records = [r for args, _ in seen["teach_reader"] for r in args[0]]
    metrics = json.loads((root / "metrics/rag.json").read_text())
    assert len(seen["teach_reader"]) == 2
    assert len(records) == metrics["reader"]["examples"] == sum(metrics["train_questions"].values())
    inputs = {
        "reader examples": records,
        "reranker groups": seen["train_reranker"][0][0][:2],
        "refusal calibration": seen["calibrate_refusal"][0][0],
        # The retrievers' training data: the final one, then the two folds (`make_trainer`'s
        # `training.train`); its held-out loss is a score, never a choice, and is left out.
        "retriever pairs": [args[1].train for args, _ in seen["make_trainer"]],
    }
    for what, given in inputs.items():
        text = texts_of(given)
        assert text, what
        assert MARKER not in text, f"a held-out question reached the {what}"
        assert RAG_RECORDS[-1]["answer"] not in text, f"a held-out answer reached the {what}"
    # Cross-fitting: the final retriever trains on the fit questions, each fold retriever on
    # one half of them, the halves apart (each ranks the half it never saw). Fold 1 trained
    # from each candidate start (the start is chosen by how they rank the other half); the
    # chosen start's is reused, so fold 2 is the last retriever trained.
    trained = [{p.question for p in args[1].train} for args, _ in seen["make_trainer"]]
    first_cpt, first_base, final, second = trained
    assert first_cpt == first_base and not first_cpt & second
    assert first_cpt | second == final
    # The calibration questions are train questions, and the threshold was decided there.
    calibration = seen["calibrate_refusal"][0][0][0]
    train = [json.loads(line)["question"] for line in (root / "data/train.jsonl").open()]
    assert calibration.questions and set(calibration.questions) <= set(train)
    config = json.loads((root / "output/rag/config.json").read_text())
    assert config.get("refusal_threshold") == metrics["refusal"]["threshold"]
    assert metrics["refusal"]["calibration"]["questions"] == len(calibration.questions)
    # The first stage is chosen on the fit questions too (ranked by the folds), not on the
    # calibration ones alone: every train question with a gold, one ranking row each.
    (_, rank, golds), _ = seen["choose_retriever"][0]
    counts = metrics["retriever"]["questions"]
    assert counts["fit"] > counts["calibration"] >= 1
    assert len(golds) == counts["fit"] + counts["calibration"] == len(rank("hybrid", 0.5))
    assert all(golds) and len(golds) <= len(train)


@pytest.mark.slow  # trains four tiny retrievers (13 s): CI runs it with the slow tests
def test_the_start_is_the_candidate_that_ranks_best_once_fine_tuned(
    tmp_path: Path, tiny_bert_dir: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planted rankings: the CPT encoder ranks every gold last as it is and first once
    fine-tuned on half the fit questions; the base encoder the other way round. The start is
    the CPT encoder, chosen on the fit half the fold retrievers never saw."""
    labels: dict[int, str] = {}
    embed_entries, dense_ranks = Backend.embed_entries, Backend.dense_ranks
    good = {"base": True, "cpt": False, "fold 1 from cpt": True, "fold 1 from base": False}
    ranked_for_choice: list[str] = []

    def labelled(self: Backend, model: Any, tokenizer: Any, label: str) -> Any:
        encoder = embed_entries(self, model, tokenizer, label)
        labels[id(encoder)] = label
        return encoder

    def planted(self: Backend, encoder: Any, questions: Any, depth: int | None = None) -> Any:
        ranked = dense_ranks(self, encoder, questions, depth)
        label = labels.get(id(encoder), "")
        if label not in good:
            return ranked
        if label.startswith("fold"):
            ranked_for_choice.extend(questions)
        golds = dict(zip(self.all_train.questions, self.all_train.golds, strict=True))
        for row, question in enumerate(questions):
            if question not in golds:  # held-out questions, ranked to be scored: as they are
                continue
            gold = golds[question]
            rest = [e for e in range(len(self.kb.entries)) if e not in gold]
            order = gold + rest if good[label] else rest + gold
            ranked[row] = order[: ranked.shape[1]]
        return ranked

    monkeypatch.setattr(Backend, "embed_entries", labelled)
    monkeypatch.setattr(Backend, "dense_ranks", planted)
    params = {"cpt": {"model": str(tiny_bert_dir)}, "rag": tiny_rag()}
    assert build_rag(tmp_path, params, tiny_bert_dir, tiny_llama_dir) == 0
    start = json.loads((tmp_path / "metrics/rag.json").read_text())["start"]
    assert start["train_mrr"]["cpt"] < start["train_mrr"]["base"]  # as they are: base
    assert start["fine_tuned_mrr"] == {"cpt": 1.0, "base": start["fine_tuned_mrr"]["base"]}
    assert start["fine_tuned_mrr"]["base"] < 1.0 and start["encoder"] == "cpt"
    train = {json.loads(line)["question"] for line in (tmp_path / "data/train.jsonl").open()}
    assert ranked_for_choice and set(ranked_for_choice) <= train  # no held-out question


def test_the_reranker_orders_passages_by_the_cross_encoders_scores(
    watched: tuple[Path, dict[str, list[Any]]],
) -> None:
    root, _ = watched
    system = ask.load_system(root / "output/rag", "cpu")
    assert isinstance(system, cpt_sft.CptSftSystem) and system.reranker is not None
    reranker = AutoModelForSequenceClassification.from_pretrained(root / "output/rag/reranker")
    tokenizer = AutoTokenizer.from_pretrained(root / "output/rag/reranker")
    question = "where do the masked tokens come from?"
    first = [int(e) for e in system.first_stage([question], 6)[1][0] if e >= 0]
    with torch.no_grad():
        scores = [
            reranker(
                **tokenizer(question, system.entries[e].text, return_tensors="pt")
            ).logits.item()
            for e in first
        ]
    expected = [first[i] for i in np.argsort(-np.array(scores), kind="stable")]
    reranked_scores, reranked = system.rank([question], 6)
    assert reranked[0].tolist() == expected
    assert reranked_scores[0].tolist() == pytest.approx(sorted(scores, reverse=True), abs=1e-4)
    metrics = json.loads((root / "metrics/rag.json").read_text())
    assert metrics["rerank"]["used"] is True
    assert set(metrics["rerank"]["calibration"]) == {"before", "after"}
    assert metrics["retrieval"]["system"] == metrics["retrieval"]["reranked"]


def test_a_refused_answer_and_a_blocked_one_are_what_ask_gives(
    watched: tuple[Path, dict[str, list[Any]]], tmp_path: Path
) -> None:
    """With a threshold every prompt passes, every answer is the refusal; with none, no answer
    is (the refusal blocked), in batches as one by one."""
    root, _ = watched
    config = json.loads((root / "output/rag/config.json").read_text())
    questions = ["what does the model do?", "where do the tokens come from when masked?"]
    for threshold, refused in [(-1e9, True), (None, False)]:
        (root / "output/rag/config.json").write_text(
            json.dumps({**config, "refusal_threshold": threshold})
        )
        system = ask.load_system(root / "output/rag", "cpu")
        batched = system.ask_many(questions, batch_size=2)
        for question, answer in zip(questions, batched, strict=True):
            assert (answer.text == config["refusal"]) is refused
            assert answer.refusal_logprob is not None
            assert system.ask(question).text == answer.text
    (root / "output/rag/config.json").write_text(json.dumps(config))


def test_the_refusal_is_scored_on_the_tokens_the_reader_was_taught() -> None:
    tokenizer = word_level_tokenizer(chat=True)
    taught = refusal.response_ids(tokenizer, "the model learns")
    words = tokenizer("the model learns", add_special_tokens=False)["input_ids"]
    assert taught[: len(words)] == words and len(taught) > len(words)  # and the end of turn


def test_a_prompt_leaves_room_for_the_refusal_read_after_it(
    watched: tuple[Path, dict[str, list[Any]]],
) -> None:
    """The refusal's likelihood is read after the prompt: where it is longer than the answers
    (4 tokens here), the prompt is fitted to leave room for it, or a model with learned
    positions (GPT-2) would index past its last one."""
    root, _ = watched
    system = ask.load_system(root / "output/rag", "cpu")
    assert isinstance(system, cpt_sft.CptSftSystem) and system.refusal_ids is not None
    context = system.generator.config.max_position_embeddings
    assert system.config.max_new_tokens < len(system.refusal_ids)
    assert system.prompt_budget() == context - len(system.refusal_ids)
    assert system.prompt_budget(64) == context - 64
