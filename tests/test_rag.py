"""The RAG stage's default backend (cpt-sft): retriever fine-tuning, prompts, the stage end to end
and `ask`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from lmpipeline import report
from lmpipeline.chat import encode_turns, prompt_text
from lmpipeline.params import ParamsError, RagParams, RagTrainingParams, load_params
from lmpipeline.rag import ask, backend, cpt_sft, cpt_sft_train, evaluation, reader
from lmpipeline.rag.index import pooled
from lmpipeline.rag.knowledge import Entry, Questions
from lmpipeline.rag.system import Hit, SystemConfig
from lmpipeline.testing import word_level_tokenizer
from lmpipeline.training import train_resumable
from tests.helpers import NOT_IN_CORPUS, PASSAGES, build_rag, crash_at_step, tiny_rag

ANSWER_SCORES = {"em", "f1", "rougeL", "supported", "supported_answered", "refused"}
RAG_SCORES = ANSWER_SCORES | {"lacking", "f1_with_refusals"}
ROOT_METRICS = Path(__file__).resolve().parent.parent / "metrics/rag.json"  # the default run's
RETRIEVAL_SCORES = {"recall@1", "recall@3", "recall@5", "recall@10", "mrr", "ndcg@10"}


def test_scores_count_refusals_apart() -> None:
    """A refusal counts 0 in `supported`, is left out of `supported_answered` and counted in
    `refused`: the share of content words of the other answers found in their passages. Beside
    it, the share of prompts lacking the answer, and F1 in which a refusal scores 1 where they
    do and 0 where they do not."""

    def record(answer: str, supported: float, lacking: bool) -> dict[str, object]:
        mode = {"answer": answer, "supported": supported}
        return {"reference": "blue sky", "closed_book": mode, "rag": {**mode, "lacking": lacking}}

    records = [
        record("blue sky", 1.0, False),
        record("green grass", 0.5, True),
        record(f"  {reader.ABSENT_ANSWER.lower()} ", 0.0, True),
        record(reader.ABSENT_ANSWER, 0.0, False),
    ]
    scores = evaluation.scores_of(records)
    rag = scores["rag"]
    assert set(rag) == RAG_SCORES and set(scores["closed_book"]) == ANSWER_SCORES
    assert rag["supported"] == 0.375
    assert rag["supported_answered"] == 0.75
    assert rag["refused"] == 0.5 and rag["lacking"] == 0.5
    assert rag["em"] == 0.25 and rag["f1"] == 0.25
    # The right refusal scores 1, the wrong one 0, "green grass" 0 (no word in common).
    assert rag["f1_with_refusals"] == 0.5


def test_contrastive_loss_masks_a_shared_gold(tiny_bert_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    encoder = AutoModel.from_pretrained(tiny_bert_dir)
    entries = [
        Entry("a1", "the generator answers"),
        Entry("a2", "masked tokens"),
    ]
    collate = cpt_sft_train.PairCollator(tokenizer, entries, max_length=16)
    Pair = cpt_sft_train.Pair
    shared = collate([Pair("what answers", (0,)), Pair("who answers", (0,)), Pair("what", (1,))])
    parts = cpt_sft_train.contrastive_loss(encoder, shared)
    assert int(parts.predicted) == 3
    assert torch.isfinite(parts.loss_sum)
    # Identical golds are not each other's negatives: with one other gold, each question of the
    # shared pair chooses between two candidates, never three.
    q = pooled(encoder, shared["q_input_ids"], shared["q_attention_mask"])
    p = pooled(encoder, shared["p_input_ids"], shared["p_attention_mask"])
    logits = cpt_sft_train.SCALE * q @ p.T
    first = torch.logsumexp(logits[0, [0, 2]], 0) - logits[0, 0]
    second = torch.logsumexp(logits[1, [1, 2]], 0) - logits[1, 1]
    third = torch.logsumexp(logits[2], 0) - logits[2, 2]
    assert parts.loss_sum.item() == pytest.approx((first + second + third).item(), rel=1e-5)


def test_hard_negatives_skip_golds_and_chunks_stating_the_answer() -> None:
    entries = [
        Entry("p1.0", "masked tokens are predicted from context"),  # gold
        Entry("p2.0", "the model predicts masked tokens"),  # states the answer, not gold
        Entry("p3.0", "a retriever finds passages"),
        Entry("p4.0", "the generator answers the question"),
        Entry("p5.0", "fine tuning teaches the assistant style"),
    ]
    split = Questions([{"question": "what is predicted?", "answer": "masked tokens"}], [[0]])
    dense, lexical = np.array([[0, 1, 2, 3, 4]]), np.array([[1, 4, 0, 3, -1]])
    mined = cpt_sft_train.hard_negatives(split, [dense, lexical], entries, n=3)
    # In turn: dense 0 (gold), bm25 1 (states it), dense 1 (states it), bm25 4, dense 2, ...
    assert mined == [(4, 2, 3)]
    assert cpt_sft_train.hard_negatives(split, [dense, lexical], entries, n=1) == [(4,)]


def test_collator_puts_hard_negatives_after_the_positives_and_masks_own_golds(
    tiny_bert_dir: Path,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    entries = [Entry(f"p{i}.0", PASSAGES[i % 2]) for i in range(4)]
    collate = cpt_sft_train.PairCollator(tokenizer, entries, max_length=16)
    Pair = cpt_sft_train.Pair
    batch = collate([Pair("a", (0, 2), (3,)), Pair("b", (1,), (2,))])
    assert batch["p_input_ids"].shape[0] == 4  # positives 0, 1, then negatives 3, 2
    # Question a: entry 2 is its second gold, so b's negative 2 is not a's negative.
    assert batch["not_negative"].tolist() == [
        [False, False, False, True],
        [False, False, False, False],
    ]
    encoder = AutoModel.from_pretrained(tiny_bert_dir)
    parts = cpt_sft_train.contrastive_loss(encoder, batch)
    assert int(parts.predicted) == 2 and torch.isfinite(parts.loss_sum)


def tiny_config() -> SystemConfig:
    """A cpt-sft system's config with 2 passages per prompt."""
    return SystemConfig(
        generator="gen",
        retriever="dense",
        index_type="flat",
        top_k=2,
        max_length=32,
        max_new_tokens=4,
        prompt=cpt_sft.RAG_PROMPT,
        passage=cpt_sft.PASSAGE,
    )


def test_reader_examples_answer_where_the_passages_hold_the_answer_and_refuse_where_not() -> None:
    """The target follows what the passages a retriever not trained on the question gives
    hold: a gold among them, the answer; none, and all silent, the refusal; none, but one
    holding part of the answer, the answer with the gold put in; stated nowhere, the refusal."""
    entries = [Entry(f"p{i}.0", f"passage number {i}") for i in range(6)]
    entries[4] = Entry("p4.0", "it says something partly inserted here")
    config = tiny_config()
    records = [
        {"question": "found?", "answer": "yes, found"},  # gold 1 ranked first
        {"question": "missed?", "answer": "inserted words"},  # gold 5 missed, passages silent
        {"question": "partly?", "answer": "partly inserted"},  # gold 5 missed, passage 4 holds half
        {"question": "unstated?", "answer": "nowhere"},  # no gold: stated by no chunk
    ]
    split = Questions(records, [[1], [5], [5], []])
    ranked = np.array([[1, 2, 3], [2, 3, 0], [4, 2, 3], [0, 1, 2]])
    tokenizer = word_level_tokenizer(chat=True)
    made = reader.reader_records(split, ranked, entries, config, tokenizer, None, True, seed=0)
    assert [r["response"] for r in made] == [
        "yes, found",
        reader.ABSENT_ANSWER,
        "partly inserted",
        reader.ABSENT_ANSWER,
    ]
    assert "passage number 1" in made[0]["prompt"] and "passage number 2" in made[0]["prompt"]
    assert "passage number 5" not in made[1]["prompt"]  # a refusal is taught without the gold
    assert "passage number 5" in made[2]["prompt"]  # the gold put in for the partial passage
    assert made[2]["prompt"].count("Passage ") == 2
    assert made[3]["prompt"].endswith("Question: unstated?")
    # Refusal not taught: the missed gold is put in, and a question stated nowhere is left out.
    taught = reader.reader_records(split, ranked, entries, config, tokenizer, None, False, seed=0)
    assert [r["response"] for r in taught] == ["yes, found", "inserted words", "partly inserted"]
    assert "passage number 5" in taught[1]["prompt"]


def test_an_example_taught_as_absent_shows_no_passage_that_states_its_answer() -> None:
    # Chunk 2 is not gold, but it holds the answer in other words (chunks overlap, answers are
    # restated): shown with "The passages do not say." it would teach the model to abstain
    # while the answer stands before it. So a missed gold is put in instead.
    entries = [
        Entry("p0.0", "passage number zero"),
        Entry("p1.0", "the gold passage says forty two layers"),
        Entry("p2.0", "a neighbour also says forty two layers"),
        Entry("p3.0", "passage number three"),
        Entry("p4.0", "passage number four"),
    ]
    split = Questions([{"question": "how many layers?", "answer": "forty two layers"}], [[1]])
    ranked = np.array([[2, 0, 3, 4, 1]])
    tokenizer = word_level_tokenizer(chat=True)
    made = reader.reader_records(
        split, ranked, entries, tiny_config(), tokenizer, None, True, seed=0
    )
    assert made[0]["response"] == "forty two layers"
    assert "the gold passage says" in made[0]["prompt"]


def test_passages_are_shortened_to_fit_the_generator_context() -> None:
    tokenizer = word_level_tokenizer(chat=True)
    config = tiny_config()
    hits = [Hit(Entry(f"p{i}.0", " ".join([PASSAGES[0]] * 8)), 1.0) for i in range(2)]
    full = cpt_sft.fitted_prompt(config, "what does the model learn?", hits, tokenizer, None)
    fitted = cpt_sft.fitted_prompt(config, "what does the model learn?", hits, tokenizer, 60)
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
    entries = [Entry(f"a{i}", line) for i, line in enumerate(PASSAGES * 3)]
    pairs = [cpt_sft_train.Pair(f"question {i} {e.text[:20]}", (i,)) for i, e in enumerate(entries)]
    cfg = RagTrainingParams(epochs=5, batch_size=2, lr=1e-3)  # 15 steps

    def train(checkpoints: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # as the stage's set_seed: the unused pooler starts the same
        encoder = cpt_sft_train.load_encoder(tiny_bert_dir, torch.device("cpu"))
        collate = cpt_sft_train.PairCollator(tokenizer, entries, max_length=16)
        training = backend.Training(cpt_sft_train.contrastive_loss, collate, pairs, pairs[:2])
        cpu = torch.device("cpu")
        trainer = backend.make_trainer(encoder, training, cfg, 0, cpu, None, Path(checkpoints))
        train_resumable(trainer, "rag")
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
    params = {
        "cpt": {"model": str(tiny_bert_dir)},
        "rag": tiny_rag(train={"batch_size": 2}, retriever="hybrid"),
    }
    before = {
        k: v.clone() for k, v in AutoModel.from_pretrained(tiny_bert_dir).state_dict().items()
    }
    code = build_rag(root, params, tiny_bert_dir, tiny_llama_dir)
    assert code == 0
    tuned = AutoModel.from_pretrained(root / "output/rag/retriever").state_dict()
    assert any(not torch.equal(before[k], tuned[k]) for k in tuned if k in before)
    return root, json.loads((root / "metrics/rag.json").read_text())


def test_metrics_have_every_key_of_the_spec(built: tuple[Path, dict]) -> None:
    root, metrics = built
    names = {"base", "cpt", "finetuned", "bm25", "hybrid", "system"}  # no reranker by default
    assert set(metrics["retrieval"]) == names
    for scores in metrics["retrieval"].values():
        assert set(scores) == RETRIEVAL_SCORES
        assert 0.0 <= scores["recall@1"] <= scores["recall@5"] <= scores["recall@10"] <= 1.0
    # The last held-out answer is stated by no passage: counted, and its answers scored apart.
    assert metrics["questions"] == {"held_out": 2, "in_corpus": 1, "not_in_corpus": 1}
    assert set(metrics["answers"]) == {"closed_book", "rag", "not_in_corpus"}
    assert set(metrics["answers"]["rag"]) == RAG_SCORES
    assert metrics["answers"]["not_in_corpus"]["questions"] == 1
    latency = json.loads((root / "output/timings/rag.json").read_text())["latency"]
    assert set(latency) == {
        "embed_passages_per_s",
        "retrieve_ms_p50",
        "first_stage_ms_p50",
        "answer_ms_p50",
        "answer_all_s",
    }
    assert latency["answer_ms_p50"] > 0
    # 9 passages of 9 words in chunks of 6 overlapping by 2: 2 chunks each, and nothing else.
    assert metrics["index"] == {"entries": 9 * 2, "dim": 32, "type": "flat"}
    # The start was chosen on train questions, fine-tuned: the CPT encoder only if it then
    # ranks the held-apart fit half better; how each ranks as it is is reported beside.
    start = metrics["start"]
    assert set(start) == {"encoder", "train_mrr", "fine_tuned_mrr"}
    assert set(start["train_mrr"]) == set(start["fine_tuned_mrr"]) == {"cpt", "base"}
    better = start["fine_tuned_mrr"]["cpt"] > start["fine_tuned_mrr"]["base"]
    assert start["encoder"] == ("cpt" if better else "base")


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
    assert first["question"] == "where do the tokens come from?"
    assert first["gold"] and all(g.startswith("p") for g in first["gold"])
    assert predictions[1]["gold"] == []  # not in corpus
    for p in predictions:
        for mode in ("closed_book", "rag"):
            assert 0.0 <= p[mode]["supported"] <= 1.0
    assert len(first["rag"]["passages"]) == 2 and {"id", "score", "text"} <= set(
        first["rag"]["passages"][0]
    )
    assert "answer" in first["closed_book"]
    curve = (root / "metrics/rag/recall.csv").read_text().splitlines()
    assert curve[0] == "k,base,cpt,finetuned,bm25,hybrid,system"
    assert len(curve) == 1 + evaluation.CURVE_DEPTH


def test_ask_answers_from_the_output_directory_alone(
    built: tuple[Path, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = built
    system = ask.load_system(root / "output/rag", "cpu")
    assert isinstance(system, cpt_sft.CptSftSystem)
    answer = system.ask("what does the retriever do?")
    assert len(answer.passages) == 2
    assert [h.score for h in answer.passages] == sorted(
        (h.score for h in answer.passages), reverse=True
    )
    assert ask.main(["what does the retriever do?", f"--rag={root / 'output/rag'}"]) == 0
    printed = capsys.readouterr().out
    assert answer.text in printed
    for hit in answer.passages:
        assert f"[{hit.entry.id}]" in printed


def test_batched_answers_are_the_answers_of_ask_one_by_one(built: tuple[Path, dict]) -> None:
    """Prompts of different lengths in one left-padded batch: the same greedy answers."""
    root, _ = built
    system = ask.load_system(root / "output/rag", "cpu")
    questions = [
        "what does the retriever do?",
        "where do the tokens come from when the model learns the masked context?",
        "why?",
        "which passages does the generator answer the question from?",
    ]
    batched = system.ask_many(questions, batch_size=3)
    for question, answer in zip(questions, batched, strict=True):
        alone = system.ask(question)
        assert answer.text == alone.text and answer.question == question
        assert [h.entry.id for h in answer.passages] == [h.entry.id for h in alone.passages]


def test_no_held_out_answer_is_retrievable_even_with_train_faq_entries(
    tmp_path: Path, tiny_bert_dir: Path, tiny_llama_dir: Path
) -> None:
    params = {
        "cpt": {"model": str(tiny_bert_dir)},
        "rag": tiny_rag(train={"batch_size": 2, "epochs": 1}, faq=True),
    }
    assert build_rag(tmp_path, params, tiny_bert_dir, tiny_llama_dir) == 0
    entries = [json.loads(line) for line in (tmp_path / "output/rag/passages.jsonl").open()]
    held_out = [json.loads(line) for line in (tmp_path / "data/eval.jsonl").open()]
    train = [json.loads(line) for line in (tmp_path / "data/train.jsonl").open()]
    # Train questions are FAQ entries; no held-out question or answer is an entry, and the
    # answer that no passage states appears in no entry at all.
    assert [e["text"] for e in entries if e["id"].startswith("f")] == [
        f"{r['question']} {r['answer']}" for r in train
    ]
    texts = [e["text"] for e in entries]
    assert not any(r["question"] in t for r in held_out for t in texts)
    assert not any(NOT_IN_CORPUS in t for t in texts)
    # What the saved system retrieves at evaluation time is exactly those entries.
    system = ask.load_system(tmp_path / "output/rag", "cpu")
    for r in held_out:
        found = {h.entry.id for h in system.retrieve(r["question"], k=len(entries))}
        assert found <= {e["id"] for e in entries}
        assert not any(NOT_IN_CORPUS in h.entry.text for h in system.retrieve(r["question"], 50))
    predictions = [json.loads(line) for line in (tmp_path / "metrics/rag_predictions.jsonl").open()]
    assert all(NOT_IN_CORPUS not in p["text"] for r in predictions for p in r["rag"]["passages"])


def test_fine_tuning_off_uses_the_start_as_it_is_chosen_as_it_is(
    tmp_path: Path, tiny_bert_dir: Path, tiny_llama_dir: Path
) -> None:
    params = {
        "cpt": {"model": str(tiny_bert_dir)},
        "rag": tiny_rag(train={"enabled": False}, reader={"enabled": False}),
    }
    assert build_rag(tmp_path, params, tiny_bert_dir, tiny_llama_dir) == 0
    metrics = json.loads((tmp_path / "metrics/rag.json").read_text())
    start = metrics["start"]
    # Compared as they are (here the same model: a tie, so the base), never after fine-tuning.
    assert "fine_tuned_mrr" not in start and start["encoder"] == "base"
    start_weights = AutoModel.from_pretrained(tiny_bert_dir).state_dict()
    saved = AutoModel.from_pretrained(tmp_path / "output/rag/retriever").state_dict()
    # The pooler is not in the tiny checkpoint (drawn afresh at each load) and not used.
    encoder = [k for k in saved if not k.startswith("pooler.")]
    assert encoder and all(torch.equal(start_weights[k], saved[k]) for k in encoder)
    assert metrics["retrieval"]["finetuned"] == metrics["retrieval"]["base"]
    assert "train" not in metrics
    assert "train" not in json.loads((tmp_path / "output/timings/rag.json").read_text())
    assert report.switched_off_rows(metrics) == [
        ("rag", "retriever", "not fine-tuned (rag.train.enabled: false)"),
        ("rag", "generator", "not taught to read passages (rag.reader.enabled: false)"),
    ]
    assert report.switched_off_rows(json.loads(ROOT_METRICS.read_text())) == []


def test_taught_reader_is_a_plain_causal_lm_that_ask_uses(
    tmp_path: Path, tiny_bert_dir: Path, tiny_llama_dir: Path
) -> None:
    params = {
        "cpt": {"model": str(tiny_bert_dir)},
        "rag": tiny_rag(
            train={"batch_size": 2, "epochs": 1},
            reader={"enabled": True, "batch_size": 2, "max_length": 128},
        ),
    }
    assert build_rag(tmp_path, params, tiny_bert_dir, tiny_llama_dir) == 0
    out = tmp_path / "output/rag"
    config = json.loads((out / "config.json").read_text())
    assert config["generator"] == "generator"
    assert (out / config["closed_book_generator"]).resolve() == (tmp_path / "output/sft").resolve()
    taught = AutoModelForCausalLM.from_pretrained(out / "generator")
    sft = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert any(
        not torch.equal(a, b) for a, b in zip(taught.parameters(), sft.parameters(), strict=True)
    )
    metrics = json.loads((tmp_path / "metrics/rag.json").read_text())
    # The fit questions, then (once the refusal is calibrated) the calibration one: never a
    # held-out question.
    assert metrics["train_questions"] == {"fit": 3, "calibration": 1}
    assert metrics["reader"]["examples"] == 4 and metrics["reader"]["refit_examples"] == 1
    assert 0 <= metrics["reader"]["absent"] <= 4
    assert config["refusal"] == reader.ABSENT_ANSWER
    threshold = metrics["refusal"]["threshold"]
    assert config.get("refusal_threshold") == threshold
    assert metrics["refusal"]["calibration"]["questions"] == 1
    timings = json.loads((tmp_path / "output/timings/rag.json").read_text())
    assert timings["reader"]["tokens_per_s"] > 0
    system = ask.load_system(out, "cpu")
    assert isinstance(system, cpt_sft.CptSftSystem)
    assert system.generator.config.to_dict() == taught.config.to_dict()


def test_ask_without_a_built_system_says_how_to_build_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ask.main(["anything?", f"--rag={tmp_path}"]) == 1
    assert "dvc repro rag" in capsys.readouterr().err


def test_ask_names_a_missing_generator(
    built: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = built
    moved = tmp_path / "rag"
    shutil.copytree(root / "output/rag", moved)  # without the generator it names
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "generator": "../sft"}))
    assert ask.main(["what?", f"--rag={moved}"]) == 1
    assert "generator '../sft' holds no model" in capsys.readouterr().err


def test_no_held_out_question_is_refused_in_one_line(
    tmp_path: Path, tiny_bert_dir: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = {"cpt": {"model": str(tiny_bert_dir)}, "rag": tiny_rag(train={"batch_size": 2})}
    assert build_rag(tmp_path, params, tiny_bert_dir, tiny_llama_dir, held_out=0) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"rag: {tmp_path / 'data'}: 6 train and 0 held-out questions; both are needed"
        " (fine-tuning, and every score): add questions to data/rag.jsonl"
    ]
    assert not (tmp_path / "metrics/rag.json").exists()


def test_rag_params_refuse_what_cannot_run() -> None:
    for bad in ({"eval_fraction": 0.0}, {"retriever": "sparse"}, {"chunk_overlap": 100}):
        with pytest.raises(ParamsError, match=next(iter(bad))):
            RagParams(**bad)


def test_default_params_load_with_rag_keys() -> None:
    cfg = load_params(Path(__file__).resolve().parents[1] / "params.yaml").rag
    assert cfg.retriever == "auto" and cfg.index == "flat" and cfg.rerank.enabled == "false"


@pytest.mark.parametrize("question", ["", "   ", "\u200b\u200d \t"])
def test_ask_refuses_an_empty_question(
    built: tuple[Path, dict], question: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = built
    assert ask.main([question, f"--rag={root / 'output/rag'}"]) == 1
    assert capsys.readouterr().err == "ask: the question is empty\n"


@pytest.mark.parametrize("top_k", ["0", "-1", "two", "1000"])
def test_ask_refuses_a_top_k_that_is_no_count_of_passages(
    built: tuple[Path, dict], top_k: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = built
    with pytest.raises(SystemExit) as exit_:
        ask.main(["what?", f"--rag={root / 'output/rag'}", f"--top-k={top_k}"])
    assert exit_.value.code == 2
    assert "argument --top-k" in capsys.readouterr().err


def test_a_question_longer_than_the_generator_context_is_shortened_not_a_crash(
    built: tuple[Path, dict],
) -> None:
    root, _ = built
    system = ask.load_system(root / "output/rag", "cpu")
    budget = system.prompt_budget()
    assert budget is not None and budget < 200  # the tiny generator: 128 positions
    question = " ".join(["retriever"] * 5000) + " ?"
    answer = system.ask(question)
    assert isinstance(answer.text, str) and answer.passages
    prompt = cpt_sft.fitted_prompt(
        system.config, question, answer.passages, system.generator_tokenizer, budget
    )
    rendered = prompt_text(system.generator_tokenizer, prompt)
    assert len(encode_turns(system.generator_tokenizer, rendered, [prompt])) <= budget
    assert prompt.split("Question: ")[1].startswith("retriever retriever")  # cut from its end


def break_config(rag: Path) -> None:
    (rag / "config.json").write_text("{not json")


def unknown_key(rag: Path) -> None:
    config = json.loads((rag / "config.json").read_text())
    (rag / "config.json").write_text(json.dumps({**config, "temperature": 0.7}))


def absolute_generator(rag: Path) -> None:
    config = json.loads((rag / "config.json").read_text())
    (rag / "config.json").write_text(json.dumps({**config, "generator": "/usr/lib"}))


def truncate_index(rag: Path) -> None:
    data = (rag / "index.faiss").read_bytes()
    (rag / "index.faiss").write_bytes(data[: len(data) // 2])


def drop_a_passage(rag: Path) -> None:
    lines = (rag / "passages.jsonl").read_text().splitlines(keepends=True)
    (rag / "passages.jsonl").write_text("".join(lines[:-1]))


def garble_passages(rag: Path) -> None:
    (rag / "passages.jsonl").write_text('{"id": "p1.0"}\n')


def remove_bm25(rag: Path) -> None:
    shutil.rmtree(rag / "bm25")


@pytest.mark.parametrize(
    ("damage", "file", "says"),
    [
        (break_config, "config.json", "not readable JSON"),
        (unknown_key, "config.json", "unknown key 'temperature'"),
        (absolute_generator, "config.json", "generator '/usr/lib' is not a folder beside it"),
        (truncate_index, "index.faiss", "not a FAISS index"),
        (drop_a_passage, "index.faiss", "vectors for"),
        (garble_passages, "passages.jsonl", "not a passages file"),
        (remove_bm25, "bm25", "missing"),
    ],
)
def test_a_damaged_system_is_one_line_naming_the_file_and_the_fix(
    built: tuple[Path, dict],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: Callable[[Path], None],
    file: str,
    says: str,
) -> None:
    root, _ = built
    shutil.copytree(root / "output", tmp_path / "output")  # the rag directory and the models
    rag = tmp_path / "output/rag"
    damage(rag)
    assert ask.main(["what does the retriever do?", f"--rag={rag}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ask: {rag / file}: ") and says in err, err
    assert "dvc checkout output/rag" in err and err.count("\n") == 1
