"""Random-weight stand-ins of the original spec's models, exactly their architectures: bert-base-
uncased, gpt2 and facebook/rag-sequence-nq (with its DPR context encoder). The weights cannot be
downloaded here; memory and speed depend on the architecture, not on the weights.

Tokenizers: bert-base-uncased's vocabulary is the bundled MiniLM's (and DPR's). No GPT-2 or BART
tokenizer is available offline, so both use SmolLM2's byte-level BPE (49,152 tokens), set up as
GPT-2's (end of text only, no pad token, no chat template) or as BART's (bos 0, pad 1, eos 2,
`bos text eos`). docs/original-models.md says what that changes.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import processors
from transformers import (
    AutoTokenizer,
    BartConfig,
    BertConfig,
    BertForMaskedLM,
    DPRConfig,
    DPRContextEncoder,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerBase,
    RagTokenizer,
)

from lmpipeline.models import load_tokenizer, resolve_model
from lmpipeline.testing import random_model, random_rag_sequence, save, save_rag

GPT2_VOCAB = 50257  # the real gpt2's vocabulary, for the parameter-count note
GPT2_END_OF_TEXT = "<|endoftext|>"  # GPT-2's one special token; SmolLM2's vocabulary has it too
# facebook/rag-sequence-nq's RAG settings: DPR's 768-dimensional vectors, the generator's input
# (title / passage // question) padded to 300 tokens per document, 5 documents (the stage sets
# n_docs to rag.top_k)
RAG_NQ = {"retrieval_vector_size": 768, "max_combined_length": 300, "n_docs": 5}
# BART's special tokens by id (bos 0, pad 1, eos 2), played by SmolLM2's first three tokens
BART_LIKE_SPECIALS = {"bos": "<|endoftext|>", "pad": "<|im_start|>", "eos": "<|im_end|>"}


def minilm_tokenizer(vocab_size: int) -> PreTrainedTokenizerBase:
    """The bundled MiniLM tokenizer: bert-base-uncased's vocabulary, which DPR's encoders use."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("bundled:minilm-l6").path)
    if len(tokenizer) != vocab_size:
        raise SystemExit(f"MiniLM tokenizer has {len(tokenizer)} tokens, the model {vocab_size}")
    return tokenizer


def build_bert(path: Path) -> tuple[int, int]:
    """bert-base-uncased's architecture with random weights and its tokenizer; the parameters and
    the vocabulary size."""
    config = BertConfig()
    model = random_model(BertForMaskedLM, config)
    save(model, minilm_tokenizer(config.vocab_size), path)
    return model.num_parameters(), config.vocab_size


def gpt2_like_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's byte-level BPE with GPT-2's special-token setup: end of text only, no pad token,
    no chat template."""
    tokenizer = load_tokenizer(resolve_model("bundled:smollm2-135m-instruct"))
    tokenizer.eos_token = tokenizer.bos_token = tokenizer.unk_token = GPT2_END_OF_TEXT
    tokenizer.pad_token = None
    tokenizer.chat_template = None
    return tokenizer


def build_gpt2(path: Path) -> tuple[int, int]:
    """gpt2 small's architecture with random weights, on the GPT-2-like tokenizer; the parameters
    and the vocabulary size. Only the vocabulary (and so the end-of-text id) differs from gpt2's."""
    tokenizer = gpt2_like_tokenizer()
    eot = tokenizer.convert_tokens_to_ids(GPT2_END_OF_TEXT)
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=eot, eos_token_id=eot)
    model = random_model(GPT2LMHeadModel, config)
    save(model, tokenizer, path)
    return model.num_parameters(), config.vocab_size


def bart_like_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's byte-level BPE with BART's special-token layout: bos 0, pad 1, eos 2, no chat
    template, and every text wrapped as `bos text eos` (pairs as BART's `bos A eos eos B eos`)."""
    tokenizer = load_tokenizer(resolve_model("bundled:smollm2-135m-instruct"))
    bos, pad, eos = (BART_LIKE_SPECIALS[k] for k in ("bos", "pad", "eos"))
    ids = tokenizer.convert_tokens_to_ids([bos, pad, eos])
    if ids != [0, 1, 2]:
        raise SystemExit(f"SmolLM2's {bos}, {pad}, {eos} have ids {ids}, BART's layout 0, 1, 2")
    tokenizer.bos_token, tokenizer.pad_token, tokenizer.eos_token = bos, pad, eos
    tokenizer.unk_token = bos  # byte-level BPE never produces it; BART has its own at id 3
    tokenizer.chat_template = None
    tokenizer.padding_side = "right"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, 0), (eos, 2)],
    )
    return tokenizer


def check_generator_tokenizer(path: Path) -> None:
    """The saved generator tokenizer, as the stage loads it, wraps texts like BART's."""
    generator = RagTokenizer.from_pretrained(path).generator
    ids = generator("a b")["input_ids"]
    layout = (generator.bos_token_id, generator.pad_token_id, generator.eos_token_id)
    if ids[0] != 0 or ids[-1] != 2 or layout != (0, 1, 2):
        raise SystemExit(f"generator tokenizer is not BART-like: 'a b' -> {ids}, ids {layout}")


def build_rag(path: Path) -> tuple[int, int]:
    """facebook/rag-sequence-nq's architecture with random weights (DPR question encoder and
    bart-large generator) and its two tokenizers; the parameters and the generator's
    vocabulary size."""
    question_encoder, generator = DPRConfig(), BartConfig()
    questions = minilm_tokenizer(question_encoder.vocab_size)
    model = random_rag_sequence(question_encoder, generator, **RAG_NQ)
    save_rag(model, questions, bart_like_tokenizer(), path)
    check_generator_tokenizer(path)
    return model.num_parameters(), generator.vocab_size


def build_dpr_ctx(path: Path) -> int:
    """The DPR context encoder (bert-base) with random weights and its tokenizer; parameters."""
    config = DPRConfig()
    model = random_model(DPRContextEncoder, config, seed=1)
    save(model, minilm_tokenizer(config.vocab_size), path)
    return model.num_parameters()
