"""The rag-sequence backend end to end on a tiny RAG model (DPR question encoder + BART): index,
marginal-likelihood fine-tuning, evaluation into metrics/rag.json, `ask`, and loading the output
with transformers' own classes."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import (
    AutoTokenizer,
    DPRContextEncoder,
    RagRetriever,
    RagSequenceForGeneration,
    RagTokenizer,
)

from lmpipeline.data import read_jsonl
from lmpipeline.params import ParamsError, RagParams, RagTrainingParams
from lmpipeline.rag import ask, rag_sequence, rag_sequence_train
from lmpipeline.training import score
from tests.helpers import build_rag, hub_cache_entry, tiny_rag


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_rag_dir: Path,
    tiny_dpr_ctx_dir: Path,
    tiny_bert_dir: Path,
    tiny_llama_dir: Path,
) -> tuple[Path, dict]:
    """The stage with backend rag-sequence: (working directory, metrics). The CPT and SFT
    directories are passed as DVC passes them; this backend does not read them."""
    root = tmp_path_factory.mktemp("rag-sequence")
    params = {
        "rag": tiny_rag(
            train={"epochs": 3, "batch_size": 2},
            backend="rag-sequence",
            model=str(tiny_rag_dir),
            ctx_encoder=str(tiny_dpr_ctx_dir),
        )
    }
    assert build_rag(root, params, tiny_bert_dir, tiny_llama_dir) == 0
    return root, json.loads((root / "metrics/rag.json").read_text())


def test_metrics_have_the_default_backends_structure(built: tuple[Path, dict]) -> None:
    root, metrics = built
    assert set(metrics) == {"questions", "retrieval", "answers", "index", "train"}
    assert metrics["questions"] == {"held_out": 2, "in_corpus": 1, "not_in_corpus": 1}
    assert set(metrics["retrieval"]) == {"base", "finetuned", "bm25", "hybrid", "system"}
    assert metrics["retrieval"]["system"] == metrics["retrieval"]["finetuned"]  # what it retrieves
    for scores in metrics["retrieval"].values():
        assert set(scores) == {"recall@1", "recall@3", "recall@5", "recall@10", "mrr", "ndcg@10"}
        assert 0.0 <= scores["recall@1"] <= scores["recall@5"] <= scores["recall@10"] <= 1.0
    scores = {"em", "f1", "rougeL", "supported", "supported_answered", "refused"}
    assert {k: set(v) for k, v in metrics["answers"].items()} == {
        "closed_book": scores,
        "rag": scores | {"lacking", "f1_with_refusals"},
        "not_in_corpus": {"questions", "closed_book", "rag"},
    }
    # The same knowledge base as the default backend: the passages' chunks and nothing else.
    assert metrics["index"] == {"entries": 9 * 2, "dim": 32, "type": "flat"}
    assert np.isfinite(metrics["train"]["eval_loss"])
    timings = json.loads((root / "output/timings/rag.json").read_text())
    assert timings["train"]["steps"] == 6  # 4 questions, batch 2, 3 epochs
    assert timings["latency"]["answer_ms_p50"] > 0


def test_fine_tuning_changes_both_networks_and_lowers_the_held_out_loss(
    built: tuple[Path, dict], tiny_rag_dir: Path
) -> None:
    root, metrics = built
    before = RagSequenceForGeneration.from_pretrained(tiny_rag_dir)
    after = RagSequenceForGeneration.from_pretrained(root / "output/rag/model")
    for part in ("question_encoder", "generator"):
        old, new = getattr(before, part).state_dict(), getattr(after, part).state_dict()
        assert any(not torch.equal(old[k], new[k]) for k in old), part
    # The held-out loss of the untouched model, scored as the stage scores the tuned one.
    model, tokenizer = rag_sequence.load_rag(str(tiny_rag_dir), n_docs=2)
    model.set_retriever(rag_sequence.kb_retriever(model, tokenizer, root / "output/rag"))
    held_out = [(r["question"], r["answer"]) for r in read_jsonl(root / "data/eval.jsonl")]
    batch = rag_sequence_train.QACollator(tokenizer, max_length=32)(held_out)
    base_loss, _ = score(rag_sequence_train.marginal_nll, model, [batch])
    assert metrics["train"]["eval_loss"] < base_loss


def test_index_holds_the_context_encoders_vectors_of_every_entry(
    built: tuple[Path, dict], tiny_dpr_ctx_dir: Path
) -> None:
    root, _ = built
    out = root / "output/rag"
    entries = [json.loads(line) for line in (out / "passages.jsonl").open()]
    index = faiss.read_index(str(out / "index.faiss"))
    assert index.ntotal == len(entries) == 18
    encoder = DPRContextEncoder.from_pretrained(tiny_dpr_ctx_dir).eval()
    tokens = AutoTokenizer.from_pretrained(tiny_dpr_ctx_dir)(
        entries[5]["text"], return_tensors="pt"
    )
    with torch.no_grad():
        expected = encoder(**tokens).pooler_output[0].numpy()
    np.testing.assert_allclose(index.reconstruct(5), expected, rtol=1e-4, atol=1e-5)


def test_output_loads_with_transformers_own_rag_classes(built: tuple[Path, dict]) -> None:
    root, _ = built
    out = root / "output/rag"
    retriever = RagRetriever.from_pretrained(
        out / "model",
        index_name="custom",
        passages_path=str(out / "kb"),
        index_path=str(out / "index.faiss"),
    )
    model = RagSequenceForGeneration.from_pretrained(out / "model", retriever=retriever).eval()
    tokenizer = RagTokenizer.from_pretrained(out / "model")
    inputs = tokenizer.question_encoder(["what does the model do?"], return_tensors="pt")
    generated = model.generate(**inputs, num_beams=1, max_new_tokens=4)
    system = ask.load_system(out, "cpu")
    assert isinstance(system, rag_sequence.RagSequenceSystem)
    assert tokenizer.generator.batch_decode(generated, skip_special_tokens=True)[0].strip() == (
        system.ask("what does the model do?").text
    )


def test_ask_prints_the_answer_and_the_documents_it_marginalized(
    built: tuple[Path, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = built
    system = ask.load_system(root / "output/rag", "cpu")
    answer = system.ask("what does the retriever do?")
    assert len(answer.passages) == 2
    assert ask.main(["what does the retriever do?", f"--rag={root / 'output/rag'}"]) == 0
    printed = capsys.readouterr().out
    assert answer.text in printed
    assert all(f"[{hit.entry.id}]" in printed for hit in answer.passages)
    predictions = [json.loads(line) for line in (root / "metrics/rag_predictions.jsonl").open()]
    assert [len(p["rag"]["passages"]) for p in predictions] == [2, 2]


def test_a_model_that_is_not_a_rag_model_is_named(
    tmp_path: Path, tiny_gpt2_dir: Path, tiny_bert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = {"rag": tiny_rag(backend="rag-sequence", model=str(tiny_gpt2_dir))}
    assert build_rag(tmp_path, params, tiny_bert_dir, tiny_gpt2_dir) == 1
    assert f"rag.model '{tiny_gpt2_dir}' is not a RAG model directory" in capsys.readouterr().err
    assert not (tmp_path / "metrics/rag.json").exists()


def test_rag_sequence_params_refuse_a_lexical_retriever() -> None:
    with pytest.raises(ParamsError, match="dense with backend rag-sequence"):
        RagParams(backend="rag-sequence", retriever="hybrid")
    with pytest.raises(ParamsError, match="backend must be"):
        RagParams(backend="rag-token")
    one = RagTrainingParams(batch_size=1)
    assert RagParams(backend="rag-sequence", train=one).train.batch_size == 1
    with pytest.raises(ParamsError, match=r"train\.batch_size must be >= 2 with backend cpt-sft"):
        RagParams(train=one)


def test_the_default_model_names_resolve_from_the_hugging_face_cache(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_rag_dir: Path,
    tiny_dpr_ctx_dir: Path,
    tiny_bert_dir: Path,
    tiny_llama_dir: Path,
) -> None:
    """rag.model and rag.ctx_encoder left at their defaults, found in the cache as `hf download`
    leaves them; the RAG model has pickled weights only, as facebook/rag-sequence-nq's main
    branch has."""
    cache = tmp_path / "hub"
    hub_cache_entry(cache, RagParams.model, tiny_rag_dir, pickled=True)
    hub_cache_entry(cache, RagParams.ctx_encoder, tiny_dpr_ctx_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    params = {"rag": tiny_rag(train={"epochs": 1}, backend="rag-sequence")}
    assert build_rag(tmp_path, params, tiny_bert_dir, tiny_llama_dir) == 0
    assert (tmp_path / "output/rag/model/model.safetensors").is_file()  # saved as safetensors
