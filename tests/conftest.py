"""Tiny models and tokenizers built inside the tests: no network, no downloads, seconds to load."""

from __future__ import annotations

import os

# Tests never reach a hub (the one test of the download path points it at a closed local port).
# Set before huggingface_hub is imported: it reads the variable once.
os.environ["HF_HUB_OFFLINE"] = "1"

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    DPRConfig,
    DPRContextEncoder,
    DPRQuestionEncoder,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenizer,
)

from stages import rag, training
from stages.data import write_jsonl

CORPUS = [
    "the model learns to predict masked tokens from context",
    "a retriever finds passages and the generator answers the question",
    "fine tuning on prompt and response pairs teaches the assistant style",
]


def word_vocab(specials: list[str]) -> dict[str, int]:
    words = sorted({w for line in CORPUS for w in line.split()})
    return {tok: i for i, tok in enumerate(specials + words)}


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """An uncased WordPiece tokenizer with BERT's special tokens."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(word_vocab(specials), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


CHAT_WORDS = ["human", "assistant", "user", "system", ":", "?", "."]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def word_level_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    """A GPT-2-like tokenizer (no chat template, one end-of-text token), or with `chat` a
    SmolLM2-like one: ChatML special tokens and template, <|im_end|> as end of turn."""
    specials = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = word_vocab(specials)
    vocab.update({w: len(vocab) + i for i, w in enumerate(CHAT_WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if not chat:
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|endoftext|>",
            bos_token="<|endoftext|>",
            unk_token="<unk>",
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


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


def vocab_size(tokenizer: PreTrainedTokenizerFast) -> int:
    # len() of a word-level tokenizer can undercount its ids; the embedding must cover them all.
    return max(tokenizer.get_vocab().values()) + 1


# BERT-family encoders of the tests (BERT, the DPR encoders): 2 layers, hidden 32.
TINY_ENCODER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BertForMaskedLM saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = wordpiece_tokenizer()
    config = BertConfig(vocab_size=vocab_size(tokenizer), **TINY_ENCODER)
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 GPT2LMHeadModel saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = word_level_tokenizer()
    config = GPT2Config(
        vocab_size=vocab_size(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 LlamaForCausalLM with a ChatML chat template, like SmolLM2."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = word_level_tokenizer(chat=True)
    config = LlamaConfig(
        vocab_size=vocab_size(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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


@pytest.fixture(scope="session")
def tiny_rag_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RAG-sequence model like facebook/rag-sequence-nq (DPR question encoder, BART generator),
    2 layers and hidden 32 each, saved with its two tokenizers."""
    path = tmp_path_factory.mktemp("tiny-rag")
    questions, answers = wordpiece_tokenizer(), bart_tokenizer()
    generator = BartConfig(
        vocab_size=vocab_size(answers),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    config = RagConfig.from_question_encoder_generator_configs(
        dpr_config(questions), generator, retrieval_vector_size=32, max_combined_length=64
    )
    torch.manual_seed(0)
    model = RagSequenceForGeneration(
        config,
        question_encoder=DPRQuestionEncoder(config.question_encoder),
        generator=BartForConditionalGeneration(config.generator),
    )
    model.save_pretrained(path)
    RagTokenizer(question_encoder=questions, generator=answers).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dpr_ctx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DPR context encoder sharing the tiny RAG question encoder's vocabulary."""
    path = tmp_path_factory.mktemp("tiny-dpr-ctx")
    tokenizer = wordpiece_tokenizer()
    torch.manual_seed(1)
    DPRContextEncoder(dpr_config(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# Small enough for seconds of training: 9 passages of 9 words in 2 chunks each, 6 answers.
TINY_RAG_PARAMS = {
    "chunk_words": 6,
    "chunk_overlap": 2,
    "max_length": 32,
    "retriever_epochs": 2,
    "retriever_lr": 1e-3,
    "top_k": 2,
    "max_new_tokens": 4,
}


def build_rag(root: Path, params: dict, cpt: Path, sft: Path) -> int:
    """Run `stages.rag build` in `root` on tiny data: 9 passages, 4 train and 2 held-out
    questions; `params` is written to root/params.yaml."""
    words = CORPUS[0].split()
    pretrain = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    (root / "pretrain.txt").write_text("\n".join(pretrain) + "\n", encoding="utf-8")
    records = [
        {"question": f"what does the {w} do?", "answer": f"the {w} answers the question"}
        for w in ["model", "retriever", "generator", "assistant", "passages", "context"]
    ]
    write_jsonl(root / "data/train.jsonl", records[:4])
    write_jsonl(root / "data/eval.jsonl", records[4:])
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return rag.main(
        [
            "build",
            f"--cpt={cpt}",
            f"--sft={sft}",
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
