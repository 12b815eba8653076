"""The tests' tiny models (2 layers, hidden 32), built from configs inside the tests with
`lmpipeline.testing` and saved once per session: no network, no downloads, seconds to load."""

from __future__ import annotations

import os

# Tests never reach a hub (the one test of the download path points it at a closed local port).
# Set before huggingface_hub is imported: it reads the variable once.
os.environ["HF_HUB_OFFLINE"] = "1"
# Under pytest-xdist (`make test`: a worker per core) each worker, and what it launches, computes
# on one thread: the workers' torch threads would otherwise oversubscribe the cores. Set before
# torch is imported, which reads it once.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"

from pathlib import Path

import pytest
from transformers import BartConfig, DPRContextEncoder, GPT2Config, GPT2LMHeadModel

from lmpipeline.testing import (
    random_model,
    random_rag_sequence,
    save,
    save_rag,
    tiny_bert,
    tiny_llama,
    vocab_size,
    word_level_tokenizer,
    wordpiece_tokenizer,
)
from tests.helpers import bart_tokenizer, dpr_config


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BertForMaskedLM saved as a Hugging Face directory."""
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 GPT2LMHeadModel saved as a Hugging Face directory."""
    tokenizer = word_level_tokenizer()
    config = GPT2Config(
        vocab_size=vocab_size(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64
    )
    model = random_model(GPT2LMHeadModel, config)
    return save(model, tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 LlamaForCausalLM with a ChatML chat template, like SmolLM2."""
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_rag_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RAG-sequence model like facebook/rag-sequence-nq (DPR question encoder, BART generator),
    2 layers and hidden 32 each, saved with its two tokenizers."""
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
    model = random_rag_sequence(
        dpr_config(questions), generator, retrieval_vector_size=32, max_combined_length=64
    )
    return save_rag(model, questions, answers, tmp_path_factory.mktemp("tiny-rag"))


@pytest.fixture(scope="session")
def tiny_dpr_ctx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DPR context encoder sharing the tiny RAG question encoder's vocabulary."""
    tokenizer = wordpiece_tokenizer()
    model = random_model(DPRContextEncoder, dpr_config(tokenizer), seed=1)
    return save(model, tokenizer, tmp_path_factory.mktemp("tiny-dpr-ctx"))
