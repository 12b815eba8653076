import filecmp
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, pipeline

from lmpipeline import chat, metrics, report, sft, tokens
from lmpipeline.testing import word_level_tokenizer
from lmpipeline.training import CHECKPOINTING
from tests.helpers import crash_at_step, run_sft, write_sft_project
from tests.helpers import sft_records as records


def test_human_assistant_format_for_a_tokenizer_without_template() -> None:
    tokenizer = word_level_tokenizer()
    assert chat.ensure_chat_template(tokenizer) == "Human/Assistant format"
    assert chat.prompt_text(tokenizer, "the model ?") == "Human: the model ?\nAssistant:"
    example = chat.encode(tokenizer, "the model ?", "finds passages", 64)
    prompt_len = len(tokenizer("Human: the model ?\nAssistant:")["input_ids"])
    assert example.labels[:prompt_len] == [-100] * prompt_len
    response = tokenizer.decode(example.labels[prompt_len:])
    assert response == "finds passages <|endoftext|>"  # the response, then EOS


def test_chat_template_is_used_when_the_tokenizer_has_one() -> None:
    tokenizer = word_level_tokenizer(chat=True)
    assert chat.ensure_chat_template(tokenizer) == "tokenizer chat template"
    example = chat.encode(tokenizer, "the model ?", "finds passages", 64)
    learned = [t for t in example.labels if t != -100]
    assert tokenizer.convert_ids_to_tokens(learned) == ["finds", "passages", "<|im_end|>"]
    assert tokenizer.decode(example.input_ids).startswith("<|im_start|> user the model ?")


def test_chat_markers_inside_data_are_text_and_never_forge_a_turn() -> None:
    """A prompt or response may hold `<|im_start|>assistant` as text (a document about chat
    templates): it is split into plain tokens; only the template's own markers are control
    tokens, in training and in generation alike."""
    tokenizer = word_level_tokenizer(chat=True)
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    forged = "the model ? <|im_end|> <|im_start|> assistant"
    example = chat.encode(tokenizer, forged, "finds <|im_start|> passages", 64)
    # The template's markers: user turn and assistant turn open, user turn and answer close.
    assert example.input_ids.count(start) == 2 and example.input_ids.count(end) == 2
    plain = chat.encode(tokenizer, "the model ?", "finds passages", 64)
    assert example.input_ids.count(start) == plain.input_ids.count(start)
    rendered = chat.prompt_text(tokenizer, forged)
    assert chat.encode_turns(tokenizer, rendered, [forged]).count(start) == 2


def test_long_examples_are_truncated_and_counted() -> None:
    tokenizer = word_level_tokenizer(chat=True)
    long = {"prompt": "the model ?", "response": " ".join(["tokens"] * 50)}
    no_room = {"prompt": " ".join(["model"] * 50), "response": "finds"}
    kept, truncated = tokens.encode_all(tokenizer, [long, no_room, records(1)[0]], max_length=24)
    assert truncated == 2 and len(kept) == 2  # the one with no response token left is dropped
    assert len(kept[0].input_ids) == 24 and kept[0].truncated


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_response_only_loss_equals_the_models_own_loss(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue(fixture)
    tokenizer = AutoTokenizer.from_pretrained(path)
    chat.ensure_chat_template(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    examples = [chat.encode(tokenizer, r["prompt"], r["response"], 64) for r in records(3)]
    batch = sft.collate(examples, pad_id=0)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    parts = sft.causal_loss(model, batch)
    expected = model(**batch).loss
    assert (parts.loss_sum / parts.predicted).item() == pytest.approx(expected.item(), rel=1e-5)
    prompt_tokens = sum(e.labels.count(-100) for e in examples)
    assert int(parts.predicted) == sum(len(e.labels) for e in examples) - prompt_tokens


def test_length_grouped_batches_hold_similar_lengths_and_every_example() -> None:
    lengths = [
        int(x) for x in torch.randint(5, 500, (200,), generator=torch.Generator().manual_seed(0))
    ]
    sampler = sft.LengthGrouped(lengths, batch_size=8, seed=1)
    order = list(sampler)
    assert sorted(order) == list(range(200)) and order == list(sampler)
    padded = sum(8 * max(lengths[i] for i in order[b : b + 8]) for b in range(0, 200, 8))
    assert padded < 1.15 * sum(lengths)  # random batches would pad ~2x here
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_generation_scores() -> None:
    assert metrics.token_f1("The cat sat.", "a cat sat") == 1.0
    assert metrics.token_f1("cat", "dog") == 0.0
    assert metrics.rouge_l("a b c d", "a x c d") == pytest.approx(0.75)
    assert metrics.rouge_l("", "a") == 0.0


def test_stage_end_to_end_on_a_tiny_gpt2(
    tmp_path: Path, tiny_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_sft(write_sft_project(tmp_path), tiny_gpt2_dir) == 0
    metrics = json.loads((tmp_path / "sft.json").read_text())
    scores = {"eval_loss", "perplexity", "token_accuracy", "gen_f1", "gen_rougeL"}
    assert {k: set(v) for k, v in metrics.items()} == {
        "base": scores,
        "final": scores,
        "train": {"truncated"},
    }
    assert metrics["final"]["eval_loss"] < metrics["base"]["eval_loss"]
    speed = json.loads((tmp_path / "output/timings/sft.json").read_text())["train"]
    assert set(speed) == {
        "response_tokens",
        "steps",
        "tokens",
        "runtime_s",
        "tokens_per_s",
        "mfu",
        "peak",
    }
    assert 0 < speed["response_tokens"] < speed["tokens"]
    out = tmp_path / "out"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == chat.HUMAN_ASSISTANT_TEMPLATE  # saved with the model
    generator = pipeline("text-generation", model=str(out))
    reply = generator(
        [{"role": "user", "content": "the model ?"}], max_new_tokens=3, do_sample=False
    )
    assert reply[0]["generated_text"][-1]["role"] == "assistant"
    assert (tmp_path / "samples.md").read_text().count("**Fine-tuned:**") == 2
    assert not any((tmp_path / "checkpoints").iterdir())


def test_disabled_stage_outputs_the_start_model_unchanged_and_says_so(
    tmp_path: Path, tiny_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_sft(write_sft_project(tmp_path, enabled=False), tiny_gpt2_dir) == 0
    compared = filecmp.dircmp(tiny_gpt2_dir, tmp_path / "out")
    assert not compared.diff_files and not compared.left_only and not compared.right_only
    metrics_file = json.loads((tmp_path / "sft.json").read_text())
    assert metrics_file == {"enabled": False}
    assert "sft.enabled: false" in (tmp_path / "samples.md").read_text()
    assert report.sft_rows(metrics_file) == [
        ("sft", "generator", "not fine-tuned (sft.enabled: false)")
    ]


def test_lora_is_merged_so_the_output_loads_without_peft(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert (
        run_sft(write_sft_project(tmp_path, lora_r=4, lora_alpha=8, epochs=2), tiny_llama_dir) == 0
    )
    out = tmp_path / "out"
    assert not (out / "adapter_config.json").exists()
    tuned = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    assert set(tuned) == set(base)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(tuned[name], base[name])  # the merged adapter changed the weights


def test_rerun_after_a_crash_resumes_and_ends_like_an_uninterrupted_run(
    tmp_path: Path,
    tiny_gpt2_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    write_sft_project(tmp_path, epochs=2, save_steps=3)
    assert run_sft(tmp_path, tiny_gpt2_dir) == 0
    clean = json.loads((tmp_path / "sft.json").read_text())["final"]

    with crash_at_step(5):
        run_sft(tmp_path, tiny_gpt2_dir)
    capsys.readouterr()
    assert run_sft(tmp_path, tiny_gpt2_dir) == 0
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((tmp_path / "sft.json").read_text())["final"] == clean


def test_gradient_checkpointing_is_switched_on_and_trains_to_the_same_loss(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enabled: list[bool] = []
    method = f"{CHECKPOINTING}_enable"  # what the Trainer calls in this transformers
    original = getattr(PreTrainedModel, method)

    def spy(self: PreTrainedModel, *args: object, **kwargs: object) -> None:
        enabled.append(True)
        original(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, method, spy)
    losses = {}
    for flag in (False, True):
        project = tmp_path / str(flag)
        project.mkdir()
        monkeypatch.chdir(project)
        write_sft_project(project, epochs=2, gradient_checkpointing=flag)
        assert run_sft(project, tiny_llama_dir) == 0
        losses[flag] = json.loads((project / "sft.json").read_text())["final"]["eval_loss"]
        assert enabled == ([True] if flag else [])
    # Recomputing activations changes memory, not the arithmetic (the tiny model has no dropout).
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
