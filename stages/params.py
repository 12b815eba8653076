"""The one typed loader for params.yaml.

Every key is a dataclass field with a default and a one-line docstring-style comment. Unknown keys
and values of the wrong type fail at load time with the key's dotted name, so a typo in
`dvc exp run -S sft.lrr=...` never trains silently with the default.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

PARAMS_FILE = Path("params.yaml")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
FP16_CHOICES = ("auto", "true", "false")


class ParamsError(ValueError):
    """params.yaml is missing, malformed, or holds an unknown or mistyped key."""


@dataclass(frozen=True)
class Bounds:
    min_chars: int = 1  # shortest accepted value, in characters after stripping
    max_chars: int = 4000  # longest accepted value, in characters after stripping

    def __post_init__(self) -> None:
        if not 0 <= self.min_chars <= self.max_chars:
            raise ParamsError(f"min_chars must be in [0, max_chars], got {self}")


@dataclass(frozen=True)
class PretrainBounds:
    text: Bounds = Bounds(min_chars=20, max_chars=5000)  # one passage per line


@dataclass(frozen=True)
class SftBounds:
    prompt: Bounds = Bounds(min_chars=2, max_chars=4000)
    response: Bounds = Bounds(min_chars=1, max_chars=8000)


@dataclass(frozen=True)
class RagBounds:
    question: Bounds = Bounds(min_chars=5, max_chars=1000)
    answer: Bounds = Bounds(min_chars=1, max_chars=2000)


@dataclass(frozen=True)
class ValidateParams:
    max_errors: int = 50  # per-line messages printed per file before "... and N more"
    pretrain: PretrainBounds = PretrainBounds()
    sft: SftBounds = SftBounds()
    rag: RagBounds = RagBounds()


@dataclass(frozen=True)
class TrainingParams:
    """Optimisation keys shared by the training stages (TRL/Trainer names where they exist)."""

    batch_size: int = 16  # sequences per optimizer micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-4  # peak learning rate, AdamW, linear decay
    epochs: float = 1.0  # passes over the train split (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps; 0 = run `epochs`
    warmup_ratio: float = 0.06  # share of steps spent warming the learning rate up
    weight_decay: float = 0.01
    eval_steps: int = 20  # evaluate the held-out split every N optimizer steps
    save_steps: int = 40  # checkpoint every N optimizer steps (resume after a crash)
    gradient_checkpointing: bool = (
        False  # recompute activations in backward: less memory, more compute
    )

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
class CptParams(TrainingParams):
    model: str = "bundled:minilm-l6"  # local dir, bundled:NAME or Hugging Face id
    max_length: int = 128  # tokens per block, [CLS] and [SEP] included
    mlm_probability: float = 0.15  # share of tokens (or words) selected for prediction
    whole_word_masking: bool = False  # select whole words instead of single word pieces
    eval_fraction: float = 0.1  # share of blocks held out, drawn with `seed`
    head_lr: float = 1e-2  # learning rate of head layers the checkpoint lacks; 0 = same as lr
    epochs: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fraction("eval_fraction", self.eval_fraction)
        if not 0.0 < self.mlm_probability < 1.0:
            raise ParamsError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if self.head_lr < 0:
            raise ParamsError(f"head_lr must be >= 0, got {self.head_lr}")
        if self.max_length < 8:
            raise ParamsError(f"max_length must be >= 8, got {self.max_length}")


@dataclass(frozen=True)
class SftParams(TrainingParams):
    model: str = "bundled:smollm2-135m-instruct"  # local dir, bundled:NAME or Hugging Face id
    eval_fraction: float = 0.1  # share of records held out, drawn with `seed`
    max_length: int = 512  # tokens per example, template included; longer ones are truncated
    batch_size: int = 8
    lr: float = 5e-5
    lora_r: int = 0  # 0 = full fine-tune; > 0 = LoRA rank (merged into the saved model)
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    max_new_tokens: int = 64  # greedy generation length for the held-out prompts
    samples: int = 5  # held-out generations written to the samples file

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fraction("eval_fraction", self.eval_fraction)
        _check_fraction("lora_dropout", self.lora_dropout)
        for key in ("max_length", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ParamsError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lora_r < 0 or self.samples < 0:
            raise ParamsError("lora_r and samples must be >= 0")


RETRIEVERS = ("dense", "bm25", "hybrid")
INDEX_TYPES = ("flat", "hnsw", "ivf")
RAG_BACKENDS = ("cpt-sft", "rag-sequence")


@dataclass(frozen=True)
class RagParams:
    # cpt-sft: the CPT encoder retrieves, the SFT model answers; rag-sequence: transformers'
    # RagSequenceForGeneration (`model`) over an index of the entries embedded by `ctx_encoder`
    backend: str = "cpt-sft"
    model: str = "facebook/rag-sequence-nq"  # rag-sequence: RAG model (local dir or hub id)
    ctx_encoder: str = "facebook/dpr-ctx_encoder-multiset-base"  # rag-sequence: DPR ctx encoder
    eval_fraction: float = 0.2  # share of questions held out, drawn with `seed`
    chunk_words: int = 100  # words per knowledge-base chunk of a pretrain passage
    chunk_overlap: int = 20  # words shared by neighbouring chunks of one passage
    answer_context: bool = True  # answer entries carry the pretrain sentence that states them
    max_length: int = 256  # encoder tokens per question or entry; longer ones are truncated
    retriever: str = "dense"  # what the final system retrieves with: dense|bm25|hybrid
    index: str = "flat"  # FAISS index: flat (exact) | hnsw | ivf (approximate, large corpora)
    # Fine-tuning on the train questions: contrastive (cpt-sft: the other golds of a batch are
    # the negatives) or the RAG-sequence marginal likelihood (question encoder and generator)
    retriever_epochs: float = 3.0
    retriever_lr: float = 1e-4
    retriever_batch_size: int = 32  # questions per step
    top_k: int = 3  # passages given to the generator (rag-sequence: documents marginalized)
    max_new_tokens: int = 32  # greedy answer length
    batch_size: int = 16  # embedding and closed-book generation batch

    def __post_init__(self) -> None:
        if self.backend not in RAG_BACKENDS:
            raise ParamsError(f"backend must be {'|'.join(RAG_BACKENDS)}, got {self.backend!r}")
        if not 0.0 < self.eval_fraction < 1.0:  # retrieval and answers are scored on held-out
            raise ParamsError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.retriever not in RETRIEVERS:
            raise ParamsError(f"retriever must be {'|'.join(RETRIEVERS)}, got {self.retriever!r}")
        if self.backend == "rag-sequence" and self.retriever != "dense":
            # RAG-sequence marginalizes over the question encoder's scores of what it retrieved.
            raise ParamsError(
                f"retriever must be dense with backend rag-sequence, got {self.retriever!r}"
            )
        if self.index not in INDEX_TYPES:
            raise ParamsError(f"index must be {'|'.join(INDEX_TYPES)}, got {self.index!r}")
        if not 0 <= self.chunk_overlap < self.chunk_words:
            raise ParamsError(
                f"chunk_overlap must be in [0, chunk_words), got {self.chunk_overlap}"
            )
        if self.retriever_epochs <= 0 or self.retriever_lr <= 0:
            raise ParamsError("retriever_epochs and retriever_lr must be > 0")
        least = 2 if self.backend == "cpt-sft" else 1  # cpt-sft needs in-batch negatives
        if self.retriever_batch_size < least:
            raise ParamsError(
                f"retriever_batch_size must be >= {least} with backend {self.backend},"
                f" got {self.retriever_batch_size}"
            )
        for key in ("max_length", "top_k", "max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise ParamsError(f"{key} must be >= 1, got {getattr(self, key)}")


BACKENDS = ("auto", "gloo", "nccl")
STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class LaunchParams:
    nproc_per_node: int = 1  # processes per machine (one per GPU); > 1 runs under torchrun
    nnodes: int = 1  # machines; each runs `dvc repro` with its own node_rank
    node_rank: int = 0
    master_addr: str = "127.0.0.1"  # rank 0's machine
    master_port: int = 29500
    backend: str = "auto"  # auto = NCCL on GPUs, gloo on CPUs
    strategy: str = "ddp"  # ddp: a full copy per process | fsdp: parameters, gradients and
    # optimizer state sharded across the processes (FSDP2), for models that do not fit one GPU

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
    seed: int = 42  # feeds python, numpy and torch, and every train/eval split
    device: str = "auto"  # auto|cpu|cuda|cuda:N|mps
    fp16: str = "auto"  # auto = mixed precision on CUDA only; true|false force it
    validate: ValidateParams = field(default_factory=ValidateParams)
    cpt: CptParams = field(default_factory=CptParams)
    sft: SftParams = field(default_factory=SftParams)
    rag: RagParams = field(default_factory=RagParams)
    launch: LaunchParams = field(default_factory=LaunchParams)

    def __post_init__(self) -> None:
        if not DEVICE_PATTERN.match(self.device):
            raise ParamsError(f"device must be auto|cpu|cuda|cuda:N|mps, got {self.device!r}")
        if self.fp16 not in FP16_CHOICES:
            raise ParamsError(f"fp16 must be one of {'|'.join(FP16_CHOICES)}, got {self.fp16!r}")
        if self.launch.strategy == "fsdp" and self.sft.lora_r:
            # LoRA's merge on save needs the whole base model in one process, the one thing
            # FSDP is chosen to avoid; LoRA's trainable state is small enough for DDP.
            raise ParamsError("launch.strategy fsdp does not combine with sft.lora_r > 0: use ddp")
        if self.launch.strategy == "fsdp" and self.rag.backend == "rag-sequence":
            # accelerate's FSDP2 asks the model for its input embeddings, which transformers'
            # RAG models do not expose.
            raise ParamsError(
                "launch.strategy fsdp does not combine with rag.backend rag-sequence: use ddp"
            )


def _check_fraction(key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ParamsError(f"{key} must be in [0, 1), got {value}")


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
    try:
        return build(Params, raw or {}, prefix="")
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None


def load_stage_params(path: Path | str, stage: str) -> Params:
    """`load_params` for a stage's entry point: a bad params.yaml (say from `dvc exp run -S`)
    stops the stage with one line naming the key, before any model is loaded."""
    try:
        return load_params(path)
    except ParamsError as err:
        raise SystemExit(f"{stage}: {err}") from None


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
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads `3e-5` (no dot) as a string, and `dvc exp run -S` passes it through.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, bool):
        return "true" if value else "false"  # `fp16: true` is the natural way to write it
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ParamsError(f"{key} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value
