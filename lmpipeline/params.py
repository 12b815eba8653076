"""The one typed loader for params.yaml, and the single source of its defaults.

Every key is a dataclass field with a default and a docstring (the string under it), from which
`make docs` writes docs/params.md; a test checks that params.yaml holds exactly these defaults.
Unknown keys and values of the wrong type fail at load time with the key's dotted name, so a
typo in `dvc exp run -S sft.lrr=...` never trains silently with the default.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_origin, get_type_hints

import yaml

from lmpipeline.errors import StageError

PARAMS_FILE = Path("params.yaml")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
FP16_CHOICES = ("auto", "true", "false")
TEXT_POLICIES = ("repair", "strict")


class ParamsError(StageError, ValueError):
    """params.yaml is missing, malformed, or holds an unknown or mistyped key."""


# Every number a user can set, by key name, and the closed range it must lie in: all finite, so
# NaN, inf or a typo's 1e300 stops at load time with the key's name. Checks in the dataclasses
# narrow some further (a learning rate > 0, max_length >= 8 for CPT).
RANGES: dict[str, tuple[float, float]] = {
    "seed": (0, 2**32 - 1),  # what numpy accepts as a seed
    "max_errors": (1, 1_000_000),
    "chunk_lines": (1, 10**8),
    "max_tokens_per_batch": (0, 10**9),
    "min_chars": (0, 10**9),
    "max_chars": (0, 10**9),
    "batch_size": (1, 1_000_000),
    "grad_accum": (1, 1_000_000),
    "lr": (0, 10),
    "head_lr": (0, 10),
    "head_warmup_steps": (0, 10**9),
    "epochs": (0, 1_000_000),
    "max_steps": (0, 10**9),
    "warmup_ratio": (0, 1),
    "weight_decay": (0, 10),
    "eval_steps": (1, 10**9),
    "save_steps": (1, 10**9),
    "max_length": (1, 10**7),
    "mlm_probability": (0, 1),
    "eval_fraction": (0, 1),
    "replay": (0, 10),  # tokens replayed per corpus token: past 10 the corpus is the side dish
    "reading": (0, 8),  # questions per passage: few passages have more sentences to ask about
    "lora_r": (0, 100_000),
    "lora_alpha": (1, 1_000_000),
    "lora_dropout": (0, 1),
    "max_new_tokens": (1, 1_000_000),
    "samples": (0, 1_000_000),
    "chunk_words": (1, 1_000_000),
    "chunk_overlap": (0, 1_000_000),
    "top_k": (1, 10_000),
    "hard_negatives": (0, 1_000),
    "calibration_fraction": (0, 1),
    "candidates": (1, 10_000),
    "negatives": (1, 1_000),
    "nproc_per_node": (1, 100_000),
    "nnodes": (1, 100_000),
    "node_rank": (0, 100_000),
    "master_port": (1, 65_535),
}


def _check_fraction(key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ParamsError(f"{key} must be in [0, 1), got {value}")


def _check_eval_fraction(value: float) -> None:
    """A held-out share: without held-out data a loss of 0 would read as a perfect score."""
    if not 0.0 < value < 1.0:
        raise ParamsError(f"eval_fraction must be in (0, 1), got {value}")


@dataclass(frozen=True)
class Bounds:
    min_chars: int = 1
    """Shortest accepted value, in characters after stripping."""
    max_chars: int = 4000
    """Longest accepted value, in characters after stripping."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_chars <= self.max_chars:
            raise ParamsError(f"min_chars must be in [0, max_chars], got {self}")


@dataclass(frozen=True)
class PretrainBounds:
    text: Bounds = Bounds(min_chars=20, max_chars=5000)
    """Length bounds of a passage (one per line)."""


@dataclass(frozen=True)
class SftBounds:
    prompt: Bounds = Bounds(min_chars=2, max_chars=4000)
    """Length bounds of a prompt (of a conversation: every system and user turn)."""
    response: Bounds = Bounds(min_chars=1, max_chars=8000)
    """Length bounds of a response (of a conversation: every assistant turn)."""


@dataclass(frozen=True)
class RagBounds:
    question: Bounds = Bounds(min_chars=5, max_chars=1000)
    """Length bounds of a question."""
    answer: Bounds = Bounds(min_chars=1, max_chars=2000)
    """Length bounds of an answer."""


@dataclass(frozen=True)
class ValidateParams:
    max_errors: int = 50
    """Per-line messages printed per file before "... and N more"."""
    chunk_lines: int = 20_000
    """Lines checked at a time: memory holds one chunk, plus 16-byte digests of every record."""
    text: str = "repair"
    """repair | strict. repair: mojibake (ftfy), zero-width characters and BOMs inside lines,
    soft hyphens and non-NFC forms are mended and counted, then the text is validated; strict:
    refused or kept as they are. Control characters are refused either way (docs/data.md)."""
    pretrain: PretrainBounds = PretrainBounds()
    sft: SftBounds = SftBounds()
    rag: RagBounds = RagBounds()

    def __post_init__(self) -> None:
        if self.text not in TEXT_POLICIES:
            raise ParamsError(f"text must be {'|'.join(TEXT_POLICIES)}, got {self.text!r}")


# The keys each dataset's records are read by, as lmpipeline.validation checks them (for SFT,
# those of every shape lmpipeline.conversations reads): what a column mapping (`data.columns`)
# may map a user's column onto.
DATASET_FIELDS: dict[str, tuple[str, ...]] = {
    "pretrain": ("text",),
    "sft": (
        *("prompt", "response"),
        *("messages", "conversations"),
        *("instruction", "input", "output", "system"),
    ),
    "rag": ("question", "answer"),
}


@dataclass(frozen=True)
class ColumnMaps:
    """Per dataset, the file's column -> ours, for files whose names differ from ours; a column
    not named keeps its name (and, not being ours, is an extra field: counted, not written)."""

    pretrain: dict[str, str] = field(default_factory=dict)
    """Onto text, the passage: `{body: text}`."""
    sft: dict[str, str] = field(default_factory=dict)
    """Onto prompt and response, or the keys of another shape of SFT data (docs/data.md):
    `{question: prompt, answer: response}`, `{dialog: messages}`."""
    rag: dict[str, str] = field(default_factory=dict)
    """Onto question and answer: `{query: question, reply: answer}`."""

    def __post_init__(self) -> None:
        for dataset, ours in DATASET_FIELDS.items():
            mapping: dict[str, str] = getattr(self, dataset)
            for theirs, target in mapping.items():
                if target not in ours:
                    raise ParamsError(
                        f"{dataset}.{theirs} maps onto {target!r}, which {dataset} records do not"
                        f" have ({dataset}'s fields: {', '.join(ours)})"
                    )
            # Two columns onto one field would leave one of them silently unread.
            for target in ours:
                sources = [theirs for theirs, t in mapping.items() if t == target]
                if len(sources) > 1:
                    raise ParamsError(
                        f"{dataset} maps {' and '.join(map(repr, sources))} both onto"
                        f" {target!r}; keep one"
                    )


@dataclass(frozen=True)
class DataParams:
    """The user's files: the validate stages read them (dvc.yaml names these paths as their
    inputs, so pointing one elsewhere reruns its stage on the new file)."""

    pretrain: str = "data/pretrain.txt"
    """The corpus: a .txt file (one passage per line), or records with a `text` column: .jsonl,
    .parquet, .csv, or a folder saved by `datasets`' `Dataset.save_to_disk`."""
    sft: str = "data/sft.jsonl"
    """Prompt/response records: .jsonl, .parquet, .csv, or a `save_to_disk` folder."""
    rag: str = "data/rag.jsonl"
    """Question/answer records: .jsonl, .parquet, .csv, or a `save_to_disk` folder."""
    columns: ColumnMaps = field(default_factory=ColumnMaps)
    """The file's column -> ours, where they differ (a JSONL file's keys too)."""


@dataclass(frozen=True)
class TrainingParams:
    """Optimisation keys shared by the training stages (TRL/Trainer names where they exist)."""

    batch_size: int = 16
    """Sequences per optimizer micro-step, per process."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate (AdamW, linear warmup and decay)."""
    epochs: float = 1.0
    """Passes over the train split (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps; 0 = run `epochs`."""
    warmup_ratio: float = 0.06
    """Share of the steps spent warming the learning rate up."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and norms)."""
    eval_steps: int = 20
    """Held-out loss every N optimizer steps."""
    save_steps: int = 40
    """Checkpoint every N optimizer steps (resume after a crash)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, more compute."""

    def __post_init__(self) -> None:
        for key in ("batch_size", "grad_accum", "eval_steps", "save_steps"):
            if getattr(self, key) < 1:
                raise ParamsError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("epochs", "lr"):
            if getattr(self, key) <= 0:
                raise ParamsError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.max_steps < 0:
            raise ParamsError(f"max_steps must be >= 0, got {self.max_steps}")
        _check_fraction("warmup_ratio", self.warmup_ratio)


@dataclass(frozen=True)
class BudgetedParams(TrainingParams):
    """Training whose loss is a sum over tokens, so that a batch may be split (not the
    retriever's contrastive loss, whose negatives are the rest of its batch)."""

    max_tokens_per_batch: int = 0
    """Padded tokens a forward pass may hold: a micro-batch above it is split into row chunks
    whose gradients add up to the whole micro-batch's (memory bounded by tokens, not by
    examples); 0 = no bound."""


@dataclass(frozen=True)
class CptParams(BudgetedParams):
    model: str = "bundled:minilm-l6"
    """Encoder to continue pre-training: a local directory, bundled:NAME or a Hugging Face id
    (bert-base-uncased); also the `base` retriever of the rag stage."""
    max_length: int = 128
    """Tokens per block, [CLS] and [SEP] included."""
    mlm_probability: float = 0.15
    """Share of the tokens (or words) selected for prediction."""
    whole_word_masking: bool = False
    """Select whole words instead of single word pieces."""
    eval_fraction: float = 0.1
    """Share of the blocks held out, drawn with `seed`."""
    head_lr: float = 1e-2
    """Learning rate of the head layers the checkpoint lacks (the bundled encoder's MLM head);
    0 = lr."""
    head_warmup_steps: int = 0
    """First optimizer steps that train only the head layers the checkpoint lacks, the encoder
    frozen (LP-FT); none when the checkpoint has its head. Counted in epochs/max_steps."""
    epochs: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_eval_fraction(self.eval_fraction)
        if not 0.0 < self.mlm_probability < 1.0:
            raise ParamsError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if self.head_lr < 0:
            raise ParamsError(f"head_lr must be >= 0, got {self.head_lr}")
        if self.max_length < 8:
            raise ParamsError(f"max_length must be >= 8, got {self.max_length}")


@dataclass(frozen=True)
class AdaptedParams(BudgetedParams):
    """Training of the causal LM (cpt_lm, sft): the whole model, or LoRA adapters merged on save."""

    lora_r: int = 0
    """0 = full fine-tune; > 0 = LoRA rank on all linear layers, merged into the saved model."""
    lora_alpha: int = 16
    """LoRA scaling numerator."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fraction("lora_dropout", self.lora_dropout)
        if self.lora_r < 0:
            raise ParamsError(f"lora_r must be >= 0, got {self.lora_r}")


@dataclass(frozen=True)
class CptLmParams(AdaptedParams):
    """Domain-adaptive pre-training of the generator: causal-LM training of the SFT base model
    (sft.model) on the validated corpus, before SFT."""

    enabled: bool = False
    """Train on the corpus; false = output/cpt_lm is the base model unchanged (SFT starts there).
    Off by default: on the default data it costs 6 of make repro's minutes and lowered RAG answer
    F1 (docs/training.md)."""
    max_length: int = 512
    """Tokens per packed block: passages joined with the end-of-text token, no padding."""
    eval_fraction: float = 0.1
    """Share of the blocks held out for the before/after perplexity, drawn with `seed`."""
    replay: float = 0.0
    """Tokens of SFT train conversations (chat template applied) replayed per corpus train token,
    packed into the training blocks alone (replay in continual pre-training); 0 = none."""
    reading: int = 0
    """Templated reading-comprehension questions per train passage, asked after the passage in a
    chat and answered from it (AdaptLLM), packed into the training blocks alone; 0 = none."""
    batch_size: int = 8
    lr: float = 5e-5
    eval_steps: int = 5
    save_steps: int = 50  # as sft's

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_eval_fraction(self.eval_fraction)  # the before/after perplexity needs blocks
        if self.max_length < 8:
            raise ParamsError(f"max_length must be >= 8, got {self.max_length}")


@dataclass(frozen=True)
class SftParams(AdaptedParams):
    enabled: bool = True
    """Fine-tune on the SFT train split; false = output/sft is output/cpt_lm unchanged (to
    measure what SFT adds: benchmarks/phase_value.py)."""
    model: str = "bundled:smollm2-135m-instruct"
    """Causal LM to fine-tune: a local directory, bundled:NAME or a Hugging Face id (gpt2); the
    cpt_lm stage adapts it to the corpus first (cpt_lm.enabled)."""
    eval_fraction: float = 0.1
    """Share of the records held out, drawn with `seed`."""
    max_length: int = 512
    """Tokens per example, template included; longer ones are truncated."""
    batch_size: int = 8
    lr: float = 5e-5
    eval_steps: int = 10
    # A checkpoint of a 135M generator is 1.6 GB (weights and AdamW state), 6-15 s here, as long
    # as 1-2 optimizer steps: every 10 steps cost the default data's sft and reader 8% of their
    # time (sft 268 -> 246 s, reader 313 -> 290 s with 50; docs/experiments.md).
    save_steps: int = 50
    max_new_tokens: int = 64
    """Greedy answer length for the held-out prompts (gen_f1, gen_rougeL)."""
    samples: int = 5
    """Held-out answers written to the samples file."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_eval_fraction(self.eval_fraction)
        for key in ("max_length", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ParamsError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.samples < 0:
            raise ParamsError(f"samples must be >= 0, got {self.samples}")


START_ENCODERS = ("auto", "cpt", "base")
RETRIEVERS = ("auto", "dense", "bm25", "hybrid")
SWITCHES = ("auto", "true", "false")
INDEX_TYPES = ("flat", "hnsw", "ivf", "ivfpq")
RAG_BACKENDS = ("cpt-sft", "rag-sequence")


@dataclass(frozen=True)
class RagTrainingParams(TrainingParams):
    """Fine-tuning of the rag stage on the train questions: the retriever, contrastively
    (cpt-sft), or the whole RAG model by marginal likelihood (rag-sequence)."""

    enabled: bool = True
    """Fine-tune on the train questions; false = the start is used as it is (to measure what
    fine-tuning adds: benchmarks/phase_value.py). cpt-sft then chooses its start as is."""
    batch_size: int = 32
    """Questions per micro-step, per process; cpt-sft: the other positives of a batch are each
    question's negatives, so at least 2."""
    epochs: float = 3.0
    warmup_ratio: float = 0.1
    eval_steps: int = 10
    save_steps: int = 10
    hard_negatives: int = 1
    """cpt-sft: negatives per train question mined from BM25's and the starting encoder's top 30
    (never a chunk holding a quarter of its answer), beside the in-batch ones; 0 = in-batch only."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hard_negatives < 0:
            raise ParamsError(f"hard_negatives must be >= 0, got {self.hard_negatives}")


@dataclass(frozen=True)
class RagRerankParams(TrainingParams):
    """The cross-encoder reranker (cpt-sft): the base encoder (cpt.model) fine-tuned to score a
    question and a passage read together, on the fit questions, their gold chunk against
    `negatives` chunks mined from the first stage's ranking."""

    enabled: str = "false"
    """auto = train it, and rerank where it raises nDCG@10 on the calibration questions (a slice
    of train held apart) | true | false = no reranker. Off by default: on the default data it
    ranks the calibration questions worse than the first stage (docs/rag.md) and costs minutes."""
    candidates: int = 20
    """First-stage passages the reranker reorders; the top `rag.top_k` of its order are used."""
    negatives: int = 3
    """Mined negatives per question (a chunk silent on its answer), each scored against the gold
    in one softmax."""
    max_length: int = 256
    """Tokens of a question and a passage together."""
    batch_size: int = 8
    """Questions per micro-step (each with its gold and negatives)."""
    lr: float = 2e-4
    """High for a fine-tune: the one-logit head starts from nothing (at 5e-5 for an epoch it
    learned nothing on the default data's fit questions)."""
    epochs: float = 3.0
    eval_steps: int = 10
    save_steps: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.enabled not in SWITCHES:
            raise ParamsError(f"enabled must be {'|'.join(SWITCHES)}, got {self.enabled!r}")
        for key in ("candidates", "negatives", "max_length"):
            if getattr(self, key) < 1:
                raise ParamsError(f"{key} must be >= 1, got {getattr(self, key)}")


@dataclass(frozen=True)
class RagReaderParams(BudgetedParams):
    """Teaching the generator to read (cpt-sft; RAFT): the SFT model fine-tuned on the fit
    questions in `ask`'s prompt with the passages a retriever not trained on them retrieves:
    the answer where they hold it, "The passages do not say." where they do not."""

    enabled: bool = True
    """Fine-tune the generator on the fit questions with passages (`output/rag/generator`)."""
    refuse: bool = True
    """Teach "The passages do not say." where the passages lack the answer, and refuse where the
    reader's likelihood of it passes the threshold that maximizes answer F1 on the calibration
    questions; false = always answer (the missing gold is put among the passages instead)."""
    max_length: int = 1024
    """Tokens per example, template and passages included."""
    batch_size: int = 8
    lr: float = 5e-5
    epochs: float = 1.0
    eval_steps: int = 10
    save_steps: int = 50  # as sft's: a generator's checkpoint

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length < 1:
            raise ParamsError(f"max_length must be >= 1, got {self.max_length}")


@dataclass(frozen=True)
class RagParams:
    backend: str = "cpt-sft"
    """cpt-sft: the CPT encoder retrieves, the SFT model answers; rag-sequence: transformers'
    RagSequenceForGeneration (`model`) over an index of the entries embedded by `ctx_encoder`."""
    model: str = "facebook/rag-sequence-nq"
    """rag-sequence: the RAG model (local directory or Hugging Face id)."""
    ctx_encoder: str = "facebook/dpr-ctx_encoder-multiset-base"
    """rag-sequence: the DPR context encoder that embeds the knowledge base."""
    eval_fraction: float = 0.2
    """Share of the questions held out, drawn with `seed`."""
    calibration_fraction: float = 0.2
    """cpt-sft: share of the train questions held apart (drawn with `seed`) to decide the
    retriever, the reranker and the refusal threshold; the rest (fit) trains every model."""
    chunk_words: int = 100
    """Words per knowledge-base chunk of a pretrain passage."""
    chunk_overlap: int = 20
    """Words shared by neighbouring chunks of one passage."""
    faq: bool = False
    """Add each *train* question with its answer as an entry (FAQ style); held-out ones never."""
    start_encoder: str = "auto"
    """cpt-sft: where the retriever's fine-tuning starts: auto = the CPT encoder where, fine-tuned
    on half the fit questions, it ranks the other half's gold chunks better (MRR) than the base
    encoder (cpt.model) fine-tuned the same way; else the base | cpt | base."""
    max_length: int = 256
    """Encoder tokens per question or entry; longer ones are truncated."""
    retriever: str = "auto"
    """What the final system retrieves with: auto = whichever of dense, bm25 and hybrid (dense
    weights 0.5, 0.7, 0.3) ranks the train questions' golds best (nDCG@10; fit questions by
    the cross-fitted retrievers, calibration ones by the final one; a tie goes to the first in
    that order) | dense | bm25 | hybrid (weight 0.5: plain reciprocal-rank fusion).
    rag-sequence: dense."""
    index: str = "flat"
    """FAISS index: flat (exact) | hnsw | ivf (approximate, for large corpora) | ivfpq (IVF with
    product-quantized vectors: about 1/32 of flat's memory, for knowledge bases of millions)."""
    train: RagTrainingParams = RagTrainingParams()
    """Fine-tuning on the train questions."""
    rerank: RagRerankParams = RagRerankParams()
    """The cross-encoder reranker (cpt-sft)."""
    reader: RagReaderParams = RagReaderParams()
    """Teaching the generator to read the passages (cpt-sft)."""
    top_k: int = 3
    """Passages given to the generator (rag-sequence: entries retrieved and marginalized)."""
    max_new_tokens: int = 32
    """Greedy answer length."""
    batch_size: int = 16
    """Batch of embedding and of closed-book generation."""

    def __post_init__(self) -> None:
        if self.backend not in RAG_BACKENDS:
            raise ParamsError(f"backend must be {'|'.join(RAG_BACKENDS)}, got {self.backend!r}")
        _check_eval_fraction(self.eval_fraction)  # retrieval and answers are scored on held-out
        if not 0.0 < self.calibration_fraction < 1.0:  # decisions need questions, so does fitting
            raise ParamsError(
                f"calibration_fraction must be in (0, 1), got {self.calibration_fraction}"
            )
        if self.retriever not in RETRIEVERS:
            raise ParamsError(f"retriever must be {'|'.join(RETRIEVERS)}, got {self.retriever!r}")
        if self.backend == "rag-sequence" and self.retriever not in ("auto", "dense"):
            # RAG-sequence marginalizes over the question encoder's scores of what it retrieved.
            raise ParamsError(
                f"retriever must be dense with backend rag-sequence, got {self.retriever!r}"
            )
        if self.start_encoder not in START_ENCODERS:
            raise ParamsError(
                f"start_encoder must be {'|'.join(START_ENCODERS)}, got {self.start_encoder!r}"
            )
        if self.index not in INDEX_TYPES:
            raise ParamsError(f"index must be {'|'.join(INDEX_TYPES)}, got {self.index!r}")
        if not 0 <= self.chunk_overlap < self.chunk_words:
            raise ParamsError(
                f"chunk_overlap must be in [0, chunk_words), got {self.chunk_overlap}"
            )
        if self.backend == "cpt-sft" and self.train.batch_size < 2:  # in-batch negatives
            raise ParamsError(
                f"train.batch_size must be >= 2 with backend cpt-sft, got {self.train.batch_size}"
            )
        for key in ("max_length", "top_k", "max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise ParamsError(f"{key} must be >= 1, got {getattr(self, key)}")


BACKENDS = ("auto", "gloo", "nccl")
STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class LaunchParams:
    """How the training stages (cpt, sft, the rag stage's fine-tuning) run: more than one
    process runs them under torchrun; batch_size is per process."""

    nproc_per_node: int = 1
    """Processes per machine (one per GPU); > 1 runs the training stages under torchrun."""
    nnodes: int = 1
    """Machines; each runs the stage with its own node_rank."""
    node_rank: int = 0
    """This machine's rank, in [0, nnodes)."""
    master_addr: str = "127.0.0.1"
    """Rank 0's machine."""
    master_port: int = 29500
    """Port rank 0 listens on."""
    backend: str = "auto"
    """auto (NCCL on GPUs, gloo on CPUs) | gloo | nccl."""
    strategy: str = "ddp"
    """ddp: a full model copy per process | fsdp: parameters, gradients and optimizer state
    sharded across CUDA GPUs (FSDP2), for training state that does not fit one GPU."""

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ParamsError("nproc_per_node and nnodes must be >= 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ParamsError(f"node_rank must be in [0, nnodes), got {self.node_rank}")
        if self.backend not in BACKENDS:
            raise ParamsError(f"backend must be {'|'.join(BACKENDS)}, got {self.backend!r}")
        if self.strategy not in STRATEGIES:
            raise ParamsError(f"strategy must be {'|'.join(STRATEGIES)}, got {self.strategy!r}")


@dataclass(frozen=True)
class Params:
    seed: int = 42
    """Feeds python, numpy and torch, and every train/eval split and mask."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps."""
    fp16: str = "auto"
    """Mixed precision, on CUDA only: auto = bf16 where the GPU has it natively, else fp16 |
    true = fp16 (loss-scaled) | false = fp32 (true on a CPU is refused: CPU autocast is about
    10x slower here)."""
    data: DataParams = field(default_factory=DataParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    cpt: CptParams = field(default_factory=CptParams)
    cpt_lm: CptLmParams = field(default_factory=CptLmParams)
    sft: SftParams = field(default_factory=SftParams)
    rag: RagParams = field(default_factory=RagParams)
    launch: LaunchParams = field(default_factory=LaunchParams)

    def __post_init__(self) -> None:
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ParamsError(f"device must be auto|cpu|cuda|cuda:N|mps, got {self.device!r}")
        if self.fp16 not in FP16_CHOICES:
            raise ParamsError(f"fp16 must be one of {'|'.join(FP16_CHOICES)}, got {self.fp16!r}")
        for section in ("cpt_lm", "sft"):
            if self.launch.strategy == "fsdp" and getattr(self, section).lora_r:
                # LoRA's merge on save needs the whole base model in one process, the one thing
                # FSDP is chosen to avoid; LoRA's trainable state is small enough for DDP.
                raise ParamsError(
                    f"launch.strategy fsdp does not combine with {section}.lora_r > 0: use ddp"
                )
        if self.launch.strategy == "fsdp" and self.rag.backend == "rag-sequence":
            # accelerate's FSDP2 asks the model for its input embeddings, which transformers'
            # RAG models do not expose.
            raise ParamsError(
                "launch.strategy fsdp does not combine with rag.backend rag-sequence: use ddp"
            )


T = TypeVar("T")


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read params.yaml into `Params`, failing on unknown keys and mistyped values."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ParamsError(f"{path}: not found (run from the project root)") from err
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    if raw is None:  # an empty file would silently mean every default
        raise ParamsError(f"{path}: empty; `git checkout params.yaml` restores the defaults")
    try:
        return build(Params, raw, prefix="")
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings of a dataclass's fields (the string literal under each), base classes
    first, each folded to one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0]
        assert isinstance(body, ast.ClassDef)
        for node, after in zip(body.body, body.body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def build(cls: type[T], data: Any, prefix: str) -> T:
    """Build dataclass `cls` from a mapping, recursing into nested dataclasses."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise ParamsError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        known = ", ".join(sorted(prefix + n for n in names))
        raise ParamsError(f"unknown key '{prefix}{unknown[0]}' (known keys: {known})")
    values = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    try:
        return cls(**values)
    except ParamsError as err:  # checks name the key without its section; add it
        raise ParamsError(f"{prefix}{err}") from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build(hint, value, prefix=key + ".")
    if get_origin(hint) is dict:  # a column mapping, the one mapping of str -> str
        return _names(value, key)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads `3e-5` (no dot) as a string, and `dvc exp run -S` passes it through.
        with contextlib.suppress(ValueError):  # not a number: the type check below says so
            value = float(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is str and isinstance(value, bool):
        return "true" if value else "false"  # `fp16: true` is the natural way to write it
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ParamsError(f"{key} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    if hint in (int, float):
        _check_range(key, value)
    return value


def _names(value: Any, key: str) -> dict[str, str]:
    """A mapping of names to names: YAML reads `yes: prompt` with a bool key, `1: prompt` with
    an int one, and `prompt:` with a null value; each stops here with its key."""
    if not isinstance(value, dict):
        raise ParamsError(f"{key} must be a mapping, got {type(value).__name__} {value!r}")
    for name, target in value.items():
        if not isinstance(name, str) or not isinstance(target, str):
            raise ParamsError(
                f"{key}.{name} must map a column name onto one of ours, both strings, got"
                f" {name!r}: {target!r} (quote a name YAML reads as a number or a boolean)"
            )
    return value


def _check_range(key: str, value: float) -> None:
    low, high = RANGES[key.rsplit(".", 1)[-1]]
    if not (math.isfinite(value) and low <= value <= high):
        raise ParamsError(f"{key} must be a number in [{low}, {high}], got {value!r}")
