import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from lmpipeline import cpt
from lmpipeline.chat import load_causal_lm
from lmpipeline.models import (
    ModelNotFoundError,
    export_base,
    load_model,
    load_tokenizer,
    resolve_model,
)
from lmpipeline.rag import cpt_sft_train
from tests.helpers import hub_cache_entry


def test_local_directory_loads_with_auto_classes(tiny_bert_dir: Path) -> None:
    source = resolve_model(str(tiny_bert_dir))
    assert source.path == tiny_bert_dir and source.gguf_file is None
    model = load_model(AutoModelForMaskedLM, source)
    assert model.config.num_hidden_layers == 2
    assert load_tokenizer(source).mask_token == "[MASK]"


def test_directory_without_config_or_missing_directory_fails(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))


def test_uncached_hub_id_fails_fast_naming_the_model_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    # A closed loopback port stands in for an unreachable hub; nothing leaves this machine.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("bert-base-uncased")
    assert time.perf_counter() - start < 30
    message = str(info.value)
    assert "'bert-base-uncased'" in message and "bundled:minilm-l6" in message
    assert "Connect" in message or "127.0.0.1" in message  # it did try, and was refused


def test_cached_hub_id_resolves_without_network(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_gpt2_dir: Path
) -> None:
    snapshot = hub_cache_entry(tmp_path, "tiny/gpt", tiny_gpt2_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model("tiny/gpt").path == snapshot


def test_a_model_with_pickled_weights_only_loads_them_as_tensors(
    tmp_path: Path, tiny_gpt2_dir: Path
) -> None:
    snapshot = hub_cache_entry(tmp_path, "tiny/gpt", tiny_gpt2_dir, pickled=True)
    source = resolve_model(str(snapshot))
    assert "use_safetensors" not in source.load_kwargs()  # safetensors are not demanded of it
    loaded = load_model(AutoModelForCausalLM, source).state_dict()
    original = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).state_dict()
    assert all(torch.equal(loaded[k], original[k]) for k in original)
    assert resolve_model(str(tiny_gpt2_dir)).load_kwargs()["use_safetensors"] is True


def test_offline_mode_is_named_when_the_model_is_not_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set"):
        resolve_model("gpt2")


def test_unknown_bundled_name_lists_the_known_ones() -> None:
    with pytest.raises(ModelNotFoundError, match="known: bundled:minilm-l6"):
        resolve_model("bundled:bert-huge")


def test_bundled_minilm_is_an_uncased_bert_with_safetensors() -> None:
    source = resolve_model("bundled:minilm-l6")
    assert (source.path / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    assert tokenizer.tokenize("Hello World") == ["hello", "world"]
    assert AutoModel.from_pretrained(source.path).config.num_hidden_layers == 6


def test_sft_base_writes_a_plain_directory_that_auto_classes_load(
    tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "base"
    assert export_base(str(tiny_gpt2_dir), out) > 0
    assert (out / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    original = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


@pytest.mark.slow
def test_bundled_smollm2_gguf_exports_to_safetensors_with_same_outputs(tmp_path: Path) -> None:
    source = resolve_model("bundled:smollm2-135m-instruct")
    assert source.gguf_file
    out = tmp_path / "smollm2"
    export_base(source.ref, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template  # the template travels with the model
    exported = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    gguf = load_model(AutoModelForCausalLM, source)
    batch = tokenizer("Masked language modelling predicts", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(exported(**batch).logits, gguf(**batch).logits)


def test_every_loader_gives_fp32_weights_whatever_the_checkpoint_holds(
    tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """A bf16 checkpoint (as many on the hub are) still trains on fp32 master weights: mixed
    precision is autocast's, never the weights'. transformers 5 keeps a checkpoint's dtype."""
    halves = {}
    for name, source, auto in [
        ("bert", tiny_bert_dir, AutoModelForMaskedLM),
        ("llama", tiny_llama_dir, AutoModelForCausalLM),
    ]:
        halves[name] = tmp_path / name
        auto.from_pretrained(source).to(torch.bfloat16).save_pretrained(halves[name])
        AutoTokenizer.from_pretrained(source).save_pretrained(halves[name])
    loaded = [
        load_model(AutoModelForMaskedLM, resolve_model(str(halves["bert"]))),
        cpt.load_mlm(resolve_model(str(halves["bert"])))[0],
        load_causal_lm(halves["llama"], torch.device("cpu")),
        cpt_sft_train.load_encoder(halves["bert"], torch.device("cpu")),
    ]
    for model in loaded:
        assert {p.dtype for p in model.parameters()} == {torch.float32}, type(model).__name__
