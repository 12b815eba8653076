"""Tiny models and tokenizers built inside the tests: no network, no downloads, seconds to load."""

from __future__ import annotations

import os

# Tests never reach a hub (the one test of the download path points it at a closed local port).
# Set before huggingface_hub is imported: it reads the variable once.
os.environ["HF_HUB_OFFLINE"] = "1"

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from stages import training

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


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BertForMaskedLM saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = wordpiece_tokenizer()
    config = BertConfig(
        vocab_size=vocab_size(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
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
