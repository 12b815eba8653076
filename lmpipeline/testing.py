"""Random-weight models built from configs and saved as Hugging Face directories: the tests' tiny
models (2 layers, hidden 32) and the benchmarks' full-size stand-ins of the original spec's models
(bert-base-uncased, gpt2, facebook/rag-sequence-nq), which cannot be downloaded here.

No stage imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DPRConfig,
    DPRQuestionEncoder,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenizer,
)

# BERT-family encoders of the tests (BERT, the DPR encoders): 2 layers, hidden 32.
TINY_ENCODER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}

M = TypeVar("M", bound=PreTrainedModel)


def random_model(model_type: type[M], config: PretrainedConfig, seed: int = 0) -> M:
    """`model_type(config)` with weights drawn from `seed`."""
    torch.manual_seed(seed)
    return model_type(config)


def save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> Path:
    """`model` and `tokenizer` as one Hugging Face directory."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_rag_sequence(
    question_encoder: DPRConfig, generator: BartConfig, seed: int = 0, **rag: Any
) -> RagSequenceForGeneration:
    """A RAG-sequence model (DPR question encoder + BART generator) of the given sizes, with
    random weights; `rag` sets RagConfig's own fields (retrieval_vector_size, n_docs, ...)."""
    config = RagConfig.from_question_encoder_generator_configs(question_encoder, generator, **rag)
    torch.manual_seed(seed)
    return RagSequenceForGeneration(
        config,
        question_encoder=DPRQuestionEncoder(config.question_encoder),
        generator=BartForConditionalGeneration(config.generator),
    )


def save_rag(
    model: RagSequenceForGeneration,
    questions: PreTrainedTokenizerBase,
    answers: PreTrainedTokenizerBase,
    path: Path,
) -> Path:
    """The RAG model and its two tokenizers, as `rag.model` reads them."""
    model.save_pretrained(path)
    RagTokenizer(question_encoder=questions, generator=answers).save_pretrained(path)
    return path
