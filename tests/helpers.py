"""What several test modules share: a BART-like tokenizer, tiny projects for the stages, and a
crash in the middle of training. The tiny models and the other tokenizers are built with
`lmpipeline.testing` (conftest.py makes the models fixtures), as the benchmarks build theirs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import DPRConfig, PreTrainedTokenizerFast

from lmpipeline import training
from lmpipeline.data import write_jsonl
from lmpipeline.params import RagParams
from lmpipeline.rag import knowledge
from lmpipeline.testing import CORPUS, TINY_ENCODER, vocab_size, word_vocab
from stages import rag, sft
from stages import tokenize as tokenize_stage

PASSAGES = [
    "the model learns to predict masked tokens from context",
    "a retriever finds passages and the generator answers the question. "
    "Fine tuning teaches the assistant style",
]


class Crash(Exception):
    """Stands in for a kill in the middle of training."""


@contextmanager
def crash_at_step(step: int) -> Iterator[None]:
    """Make the training run inside the block die right after optimizer step `step`."""

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == step:
            raise Crash

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.StepTimer, "on_step_end", on_step_end)
        with pytest.raises(Crash):
            yield


def bart_tokenizer() -> PreTrainedTokenizerFast:
    """A BART-like word-level tokenizer: <s> text </s>, with BART's special token ids."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.WordLevel(word_vocab(specials), unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def dpr_config(tokenizer: PreTrainedTokenizerFast) -> DPRConfig:
    return DPRConfig(vocab_size=vocab_size(tokenizer), **TINY_ENCODER)


# Small enough for seconds of training: 9 passages of 9 words in 2 chunks each, 6 answers.
TINY_RAG_PARAMS = {"chunk_words": 6, "chunk_overlap": 2, "max_length": 32, "top_k": 2}
TINY_RAG_TRAINING = {"epochs": 2, "lr": 1e-3}


def tiny_rag(train: dict | None = None, **overrides: object) -> dict:
    """The `rag` section of a tiny run: TINY_RAG_PARAMS and its `train` section, overridden."""
    return {
        **TINY_RAG_PARAMS,
        "max_new_tokens": 4,
        **overrides,
        "train": {**TINY_RAG_TRAINING, **(train or {})},
    }


# The tiny RAG questions: the answers of all but the last are phrases of the passages; the last
# one's answer no passage states (not in corpus), and it is always held out.
RAG_RECORDS = [
    {"question": "what does the model do?", "answer": "the model learns"},
    {"question": "what is predicted?", "answer": "masked tokens"},
    {"question": "what does it learn to do?", "answer": "learns to predict"},
    {"question": "which tokens?", "answer": "predict masked tokens"},
    {"question": "where do the tokens come from?", "answer": "tokens from context"},
    {"question": "what does the generator do?", "answer": "the generator answers the question"},
]
NOT_IN_CORPUS = RAG_RECORDS[-1]["answer"]


def tiny_passages() -> list[str]:
    """9 passages of 9 words: the rotations of CORPUS[0]."""
    words = CORPUS[0].split()
    return [" ".join(words[i:] + words[:i]) for i in range(len(words))]


def rag_project(
    root: Path,
    params: dict,
    cpt: Path,
    sft: Path,
    held_out: int = 2,
    questions: list[dict[str, str]] = RAG_RECORDS,
) -> list[str]:
    """Lay out a tiny `rag` stage in `root` and return its arguments: 9 passages, the 6
    RAG_RECORDS (or `questions`) of which the last `held_out` are held out, their golds found by
    validate_rag's rule; `params` is written to root/params.yaml."""
    pretrain = tiny_passages()
    (root / "pretrain.txt").write_text("\n".join(pretrain) + "\n", encoding="utf-8")
    cfg = RagParams(**{k: v for k, v in params.get("rag", {}).items() if k.startswith("chunk")})
    chunks = knowledge.passage_chunks(pretrain, cfg.chunk_words, cfg.chunk_overlap)
    golds = knowledge.GoldRule(chunks, pretrain)([r["answer"] for r in questions])
    records = [{**r, "gold": g} for r, g in zip(questions, golds, strict=True)]
    write_jsonl(root / "data/train.jsonl", records[: len(records) - held_out])
    write_jsonl(root / "data/eval.jsonl", records[len(records) - held_out :])
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    # As in the pipeline, the generator sits beside the rag directory: a built system may only
    # name models under the folder that holds it.
    shutil.copytree(sft, root / "output/sft", dirs_exist_ok=True)
    return [
        f"--cpt={cpt}",
        f"--sft={root / 'output/sft'}",
        f"--data={root / 'data'}",
        f"--pretrain={root / 'pretrain.txt'}",
        f"--output={root / 'output/rag'}",
        f"--metrics={root / 'metrics/rag.json'}",
        f"--plots={root / 'metrics/rag'}",
        f"--predictions={root / 'metrics/rag_predictions.jsonl'}",
        f"--params={root / 'params.yaml'}",
        f"--timings={root / 'output/timings/rag.json'}",
    ]


def build_rag(root: Path, params: dict, cpt: Path, sft: Path, **layout: object) -> int:
    """Run the `rag` stage of `rag_project` (`layout`: its held_out, questions) in this process;
    its exit status."""
    return rag.main(rag_project(root, params, cpt, sft, **layout))


def hub_cache_entry(cache: Path, repo_id: str, model_dir: Path, pickled: bool = False) -> Path:
    """Lay out `model_dir` as the Hugging Face cache entry of `repo_id`, as `hf download` would
    leave it; `pickled` turns its weights into a pytorch_model.bin only, like a hub model that
    was never converted to safetensors. Returns the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(model_dir, snapshot)
    if pickled:
        weights = snapshot / "model.safetensors"
        torch.save(load_file(weights), snapshot / "pytorch_model.bin")
        weights.unlink()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


# --- SFT ---------------------------------------------------------------------------------------

PROMPTS = [f"what does the model learn {w} ?" for w in ["", "from context", "to predict", "tokens"]]


def sft_records(n: int) -> list[dict[str, str]]:
    return [
        {"prompt": f"{PROMPTS[i % 4]} {'?' * (i // 4)}", "response": CORPUS[i % 3]}
        for i in range(n)
    ]


def write_sft_project(tmp_path: Path, **overrides: object) -> Path:
    """30 records (24 train, 6 held out) and params.yaml for the SFT stage in `tmp_path`."""
    data = tmp_path / "data"
    data.mkdir()
    rows = sft_records(30)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:24]))
    (data / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[24:]))
    cfg = {
        "max_length": 48,
        "batch_size": 4,
        "lr": 1e-2,
        "epochs": 8,
        "eval_steps": 10,
        "save_steps": 10,
        "warmup_ratio": 0.0,
        "max_new_tokens": 6,
        "samples": 2,
    }
    cfg.update(overrides)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 3, "sft": cfg}))
    return tmp_path


def tokenized(
    kind: str,
    data: Path,
    output: Path,
    params: Path,
    base: Path | None = None,
    sft: Path | None = None,
) -> Path:
    """`output`, made by the tokenize stage of `kind` unless it is there already; `sft`: the
    SFT splits cpt_lm.replay reads."""
    if not output.exists():
        args = [kind, f"--data={data}", f"--output={output}", f"--params={params}"]
        args += [f"--base={base}"] if base else []
        assert tokenize_stage.main(args + ([f"--sft={sft}"] if sft else [])) == 0
    return output


def sft_args(tmp_path: Path, base: Path) -> list[str]:
    """The SFT stage's command-line arguments for a project written by `write_sft_project`,
    its examples tokenized first."""
    data, params = tmp_path / "data", tmp_path / "params.yaml"
    tokens = tokenized("sft", data, tmp_path / "tokens", params, base)
    return [
        f"--base={base}",
        f"--tokens={tokens}",
        f"--data={data}",
        f"--output={tmp_path / 'out'}",
        f"--metrics={tmp_path / 'sft.json'}",
        f"--plots={tmp_path / 'plots'}",
        f"--samples={tmp_path / 'samples.md'}",
        f"--params={tmp_path / 'params.yaml'}",
    ]


def run_sft(tmp_path: Path, base: Path) -> int:
    return sft.main(sft_args(tmp_path, base))
