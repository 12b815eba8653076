import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    PreTrainedTokenizerBase,
    RobertaConfig,
    RobertaForMaskedLM,
    pipeline,
    set_seed,
)

from lmpipeline import cpt, tokens
from lmpipeline.models import resolve_model
from lmpipeline.params import CptParams
from lmpipeline.testing import CORPUS, wordpiece_tokenizer
from stages import cpt as cpt_stage
from tests.helpers import crash_at_step, tokenized

ROOT = Path(__file__).resolve().parents[1]
MASK_ID, VOCAB = 4, 1000
SPECIALS = (0, 1, 2, 3, 4)


def masking(probability: float = 0.15, whole_word: bool = False) -> cpt.Masking:
    return cpt.Masking(MASK_ID, VOCAB, SPECIALS, probability, whole_word)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tokenized_lines(
    lines: list[str], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[bool]]:
    batch = tokens.line_tokenizer(tokenizer)({"text": lines})
    return list(itertools.chain(*batch["ids"])), list(itertools.chain(*batch["starts"]))


def test_lines_are_grouped_into_full_blocks_with_cls_and_sep() -> None:
    tokenizer = wordpiece_tokenizer()
    ids, _ = tokenized_lines(CORPUS * 4, tokenizer)
    assert ids.count(tokenizer.sep_token_id) == len(CORPUS) * 4  # one [SEP] after each line
    input_ids = tokens.blocks_of(CORPUS * 4, tokenizer, 16).column("input_ids")
    assert input_ids.shape == (len(ids) // 14, 16)
    assert (input_ids[:, 0] == tokenizer.cls_token_id).all()
    assert (input_ids[:, -1] == tokenizer.sep_token_id).all()
    # The blocks hold the token stream in order, without padding or gaps.
    assert input_ids[:, 1:-1].flatten().tolist() == ids[: input_ids.shape[0] * 14]


def test_word_starts_follow_the_tokenizer_words() -> None:
    tokenizer = wordpiece_tokenizer()
    ids, starts = tokenized_lines(["the model learns"], tokenizer)
    assert len(ids) == len(starts) == 4 and all(starts)


def random_ids(rows: int = 400, cols: int = 128) -> torch.Tensor:
    return torch.randint(
        len(SPECIALS), VOCAB, (rows, cols), generator=torch.Generator().manual_seed(0)
    )


def test_masking_selects_the_configured_share_with_the_80_10_10_rule() -> None:
    ids = random_ids()
    ids[:, 0] = 2  # [CLS]: never selected
    masked, labels = cpt.mask_tokens(
        ids, torch.ones_like(ids, dtype=torch.bool), masking(), generator(1)
    )
    selected = labels != -100
    assert selected.float().mean().item() == pytest.approx(0.15 * 127 / 128, abs=0.005)
    assert not selected[:, 0].any()
    assert torch.equal(labels[selected], ids[selected])
    as_mask = (masked[selected] == MASK_ID).float().mean().item()
    kept = (masked[selected] == ids[selected]).float().mean().item()
    assert as_mask == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1, abs=0.02)  # a random replacement rarely hits the original
    assert torch.equal(masked[~selected], ids[~selected])


def test_whole_word_masking_selects_every_piece_of_a_word_together() -> None:
    ids = random_ids()
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, ::4] = True  # words of four pieces
    _, labels = cpt.mask_tokens(ids, starts, masking(whole_word=True), generator(2))
    per_word = (labels != -100).view(ids.shape[0], -1, 4)
    assert (per_word.all(-1) | ~per_word.any(-1)).all()
    assert per_word[..., 0].float().mean().item() == pytest.approx(0.15, abs=0.01)


@pytest.mark.parametrize(
    "model",
    [
        BertForMaskedLM(
            BertConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
            )
        ),
        RobertaForMaskedLM(
            RobertaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
            )
        ),
    ],
    ids=["bert-sparse-head", "roberta-full-head"],
)
def test_mlm_loss_equals_the_models_own_loss(model: torch.nn.Module) -> None:
    model.eval()
    ids = random_ids(4, 16)
    masked, labels = cpt.mask_tokens(
        ids, torch.ones_like(ids, dtype=torch.bool), masking(0.3), generator(3)
    )
    parts = cpt.mlm_loss(model, {"input_ids": masked, "labels": labels})
    expected = model(input_ids=masked, labels=labels).loss
    assert (parts.loss_sum / parts.predicted).item() == pytest.approx(expected.item(), rel=1e-5)


def write_project(tmp_path: Path, model_dir: Path, **overrides: object) -> Path:
    cfg = {
        "model": str(model_dir),
        "max_length": 16,
        "batch_size": 4,
        "lr": 1e-2,
        "head_lr": 1e-2,
        "epochs": 15,
        "eval_steps": 10,
        "save_steps": 10,
        "warmup_ratio": 0.0,
        "eval_fraction": 0.2,
    }
    cfg.update(overrides)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 5, "cpt": cfg}))
    (tmp_path / "pretrain.txt").write_text("\n".join(CORPUS * 12) + "\n")
    # A train question for each of the first lines, its gold the line's one chunk.
    questions = [
        {"question": f"what does line {n} say", "answer": line, "gold": [f"p{n}.0"]}
        for n, line in enumerate(CORPUS, start=1)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return tmp_path


def run_stage(tmp_path: Path, out: str = "out") -> int:
    params = tmp_path / "params.yaml"
    tokens = tokenized("cpt", tmp_path / "pretrain.txt", tmp_path / "tokens", params)
    return cpt_stage.main(
        [
            f"--tokens={tokens}",
            f"--passages={tmp_path / 'pretrain.txt'}",
            f"--questions={tmp_path / 'train.jsonl'}",
            f"--output={tmp_path / out}",
            f"--metrics={tmp_path / out}.json",
            f"--plots={tmp_path / out}-plots",
            f"--params={tmp_path / 'params.yaml'}",
        ]
    )


def test_stage_end_to_end_on_a_tiny_bert(
    tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_stage(write_project(tmp_path, tiny_bert_dir)) == 0
    metrics = json.loads((tmp_path / "out.json").read_text())
    figures = {"eval_loss", "perplexity", "mask_accuracy", "train_question_mrr"}
    assert {k: set(v) for k, v in metrics.items()} == {"base": figures, "final": figures}
    assert metrics["final"]["perplexity"] < metrics["base"]["perplexity"]
    # Three questions, each with one gold among the corpus's 36 chunks (lines repeat).
    assert all(1 / 36 <= metrics[k]["train_question_mrr"] <= 1 for k in metrics)
    speed = json.loads((tmp_path / "output/timings/cpt.json").read_text())["train"]
    assert set(speed) == {"steps", "tokens", "runtime_s", "tokens_per_s", "mfu", "peak"}
    assert speed["tokens"] > 0 and 0 < speed["mfu"] < 1
    out = tmp_path / "out"
    assert isinstance(AutoModelForMaskedLM.from_pretrained(out), BertForMaskedLM)
    assert AutoModel.from_pretrained(out).config.hidden_size == 32
    fill = pipeline("fill-mask", model=str(out), tokenizer=AutoTokenizer.from_pretrained(out))
    assert len(fill("the model learns to [MASK] masked tokens")) == 5
    curve = (tmp_path / "out-plots/plots/metrics/eval/loss.tsv").read_text().splitlines()
    assert curve[0] == "step\tloss" and len(curve) >= 3
    assert not any((tmp_path / "checkpoints").iterdir())  # removed once the stage succeeded


def test_training_masks_are_fresh_each_epoch_and_reproducible() -> None:
    rows = [{"input_ids": r.tolist(), "word_starts": [True] * 32} for r in random_ids(3, 32)]
    blocks = tokens.TokenRows.of(rows, tokens.MLM_BLOCK_FEATURES)
    data = cpt.MaskedBlocks(blocks, masking(0.5), seed=9)
    assert torch.equal(data[1]["labels"], data[1]["labels"])
    assert torch.equal(
        data[1]["input_ids"], cpt.MaskedBlocks(blocks, masking(0.5), 9)[1]["input_ids"]
    )
    assert not torch.equal(data[1]["labels"], data[1 + len(data)]["labels"])  # next epoch
    sampler = cpt.EpochKeys(3, seed=9)
    sampler.set_epoch(2)
    assert sorted(sampler) == [6, 7, 8]


def test_rerun_after_a_crash_resumes_and_ends_like_an_uninterrupted_run(
    tmp_path: Path,
    tiny_bert_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, tiny_bert_dir, epochs=2, save_steps=2)
    assert run_stage(tmp_path, "clean") == 0

    with crash_at_step(5):
        run_stage(tmp_path, "resumed")
    capsys.readouterr()
    assert run_stage(tmp_path, "resumed") == 0
    assert "resuming from" in capsys.readouterr().out
    # Masks and order depend on (seed, epoch, block) only, so the resumed run is exact.
    clean = json.loads((tmp_path / "clean.json").read_text())["final"]
    assert json.loads((tmp_path / "resumed.json").read_text())["final"] == clean


def test_fp16_on_a_cpu_is_refused_with_a_clear_message(
    tmp_path: Path,
    tiny_bert_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    write_project(tmp_path, tiny_bert_dir)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**params, "fp16": True, "device": "cpu"}))
    assert run_stage(tmp_path) == 1
    assert "fp16: true needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_head_lr_applies_only_to_layers_the_checkpoint_lacked(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    cfg = CptParams(lr=1e-4, head_lr=1e-2)
    # A full masked-LM checkpoint (bert-base-uncased): its pretrained head is fine-tuned at lr.
    model, fresh = cpt.load_mlm(resolve_model(str(tiny_bert_dir)))
    assert fresh == set()
    assert {g["lr"] for g in cpt.param_groups(model, cfg, fresh)} == {1e-4}
    # An encoder without a head (the bundled MiniLM): the new head learns at head_lr.
    AutoModel.from_pretrained(tiny_bert_dir).save_pretrained(tmp_path)
    model, fresh = cpt.load_mlm(resolve_model(str(tmp_path)))
    assert fresh and all(name.startswith("cls.") for name in fresh)
    fast = {
        id(p) for g in cpt.param_groups(model, cfg, fresh) if g["lr"] == 1e-2 for p in g["params"]
    }
    assert fast == {id(p) for name, p in model.named_parameters() if name in fresh}


def encoder_weights(path: Path) -> dict[str, torch.Tensor]:
    """The encoder's weights, without a pooler (no MLM checkpoint has one)."""
    return AutoModel.from_pretrained(path, add_pooling_layer=False).state_dict()


def test_head_warmup_moves_only_the_new_head_then_the_encoder_too(
    tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    headless = tmp_path / "headless"  # an encoder without its MLM head, as the bundled MiniLM
    AutoModel.from_pretrained(tiny_bert_dir).save_pretrained(headless)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(headless)
    start = encoder_weights(headless)

    def trained(steps: int) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
        write_project(tmp_path, headless, max_steps=steps, head_warmup_steps=3)
        assert run_stage(tmp_path, f"out{steps}") == 0
        metrics = json.loads((tmp_path / f"out{steps}.json").read_text())
        return encoder_weights(tmp_path / f"out{steps}"), metrics

    set_seed(5)  # as the stage draws the new head
    new_head = cpt.load_mlm(resolve_model(str(headless)))[0].cls.state_dict()
    encoder, metrics = trained(3)  # the warm-up only
    assert [k for k in start if not torch.equal(encoder[k], start[k])] == []
    head = AutoModelForMaskedLM.from_pretrained(tmp_path / "out3").cls.state_dict()
    assert all(not torch.equal(head[k], new_head[k]) for k in new_head if "decoder" not in k)
    assert metrics["final"]["train_question_mrr"] == metrics["base"]["train_question_mrr"]
    encoder, _ = trained(5)  # two joint steps after it
    assert not all(torch.equal(encoder[k], start[k]) for k in start)


def test_blocks_longer_than_the_models_positions_are_refused(
    tmp_path: Path,
    tiny_bert_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_stage(write_project(tmp_path, tiny_bert_dir, max_length=128)) == 1
    assert "cpt.max_length 128 exceeds the model's 64 positions" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_the_stage_reads_train_questions_only() -> None:
    """The encoder is probed on the train questions: no held-out one reaches a CPT figure."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["cpt"]
    questions = [d for d in stage["deps"] if d.startswith("output/data/rag")]
    assert questions == ["output/data/rag/train.jsonl"]
    assert "--questions output/data/rag/train.jsonl" in stage["cmd"]
    assert "eval" not in stage["cmd"]
