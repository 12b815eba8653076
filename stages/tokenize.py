"""Stages `tokenize_cpt`, `tokenize_cpt_lm` and `tokenize_sft`: the validated data tokenized once
into memory-mapped Arrow datasets that the training stages read, so that a training param
(`dvc exp run -S sft.lr=...`) reruns training but never tokenization.

    python -m stages.tokenize cpt --data output/data/pretrain.txt --output output/tokens/cpt
    python -m stages.tokenize cpt_lm --base output/sft_base --data output/data/pretrain.txt \
        --output output/tokens/cpt_lm
    python -m stages.tokenize sft --base output/sft_base --data output/data/sft \
        --output output/tokens/sft

Each depends only on its data, its tokenizer and the params that change tokens (`max_length`;
for `cpt` the model it names). The formats and the checks are in `lmpipeline.tokens`; so is what a
row holds.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lmpipeline import mixing, stage, tokens
from lmpipeline.chat import load_chat_tokenizer
from lmpipeline.data import file_digest
from lmpipeline.errors import StageError
from lmpipeline.models import load_tokenizer, resolve_model
from lmpipeline.params import Params
from lmpipeline.stage import INPUT

KINDS = ("cpt", "cpt_lm", "sft")


@dataclass(frozen=True)
class TokenizePaths:
    kind: str = field(metadata={"choices": list(KINDS)})
    """Whose tokens: cpt (encoder blocks), cpt_lm (generator blocks) or sft (chat examples)."""
    data: Path = field(metadata=INPUT)
    """The validated passages (cpt, cpt_lm) or the directory of train.jsonl and eval.jsonl."""
    output: Path
    """Where the token dataset goes (a directory)."""
    base: Path | None = None
    """cpt_lm, sft: the generator whose tokenizer is used (output/sft_base)."""
    sft: Path | None = field(default=None, metadata=INPUT)
    """cpt_lm: the validated SFT splits (output/data/sft), whose train split cpt_lm.replay
    replays."""

    @property
    def stage(self) -> str:
        return f"tokenize_{self.kind}"


def generator_tokenizer(paths: TokenizePaths, chat: bool) -> PreTrainedTokenizerBase:
    if paths.base is None or not (paths.base / "config.json").is_file():
        raise StageError(
            f"--base {paths.base}: the generator's directory is needed for its tokenizer:"
            " run `dvc repro sft_base` first"
        )
    if chat:
        return load_chat_tokenizer(paths.base)[0]
    return AutoTokenizer.from_pretrained(paths.base, trust_remote_code=False)


def encoder_blocks(params: Params, paths: TokenizePaths) -> dict[str, Any]:
    """Tokenize the passages line by line in parallel, pack them into the encoder's blocks in
    order, and publish the blocks; return the counts."""
    cfg = params.cpt
    tokenizer = load_tokenizer(resolve_model(cfg.model))
    make = tokens.block_maker(cfg.max_length, tokenizer.cls_token_id, tokenizer.sep_token_id)
    with tokens.staging(paths.output) as work:
        lines = tokens.rows_of(paths.data, Path(work))
        tokenized = tokens.tokenize(lines, tokens.line_tokenizer(tokenizer), tokens.LINE_FEATURES)
        packed = tokens.regroup(tokenized, make, tokens.MLM_BLOCK_FEATURES, Path(work))
        counts = {"blocks": len(packed), "passage_tokens": tokens.token_count(tokenized, "ids")}
        info = {**meta(tokenizer, paths.data, counts), "max_length": cfg.max_length}
        tokens.save(paths.output, {"blocks": packed}, info)
    return counts


def generator_blocks(params: Params, paths: TokenizePaths) -> dict[str, Any]:
    """The passages tokenized in parallel and packed into the generator's blocks in order, a
    seeded share held out; the training blocks with what `cpt_lm.reading` and `cpt_lm.replay`
    add (`lmpipeline.mixing`). Publish both splits; return the counts."""
    cfg, seed = params.cpt_lm, params.seed
    tokenizer = generator_tokenizer(paths, chat=False)
    with tokens.staging(paths.output) as work:
        lines = tokens.rows_of(paths.data, Path(work))
        passages = tokens.tokenize(
            lines, tokens.passage_tokenizer(tokenizer), tokens.PASSAGE_FEATURES
        )
        packed = tokens.regroup(
            passages, tokens.packer(cfg.max_length), tokens.CLM_BLOCK_FEATURES, Path(work)
        )
        held_out = mixing.held_out_blocks(len(packed), cfg, seed)
        train = packed.select(np.flatnonzero(~held_out))
        counts = {
            "blocks": len(packed),
            "passage_tokens": tokens.token_count(passages, "ids"),
            "held_out_blocks": int(held_out.sum()),
        }
        if cfg.reading or cfg.replay:
            chat = generator_tokenizer(paths, chat=True)
            sft_train = paths.sft / "train.jsonl" if paths.sft else None
            if cfg.replay and sft_train is None:
                raise StageError("cpt_lm.replay needs --sft, the validated SFT splits' directory")
            extra, mixed = mixing.mixed_in(
                lines, passages, held_out, cfg, seed, chat, sft_train, Path(work)
            )
            train = datasets.concatenate_datasets([train, extra])
            counts |= mixed
        counts["train_blocks"] = len(train)
        info = {**meta(tokenizer, paths.data, counts), **mixing.settings(cfg, seed)}
        splits = {"train": train, "held_out": packed.select(np.flatnonzero(held_out))}
        tokens.save(paths.output, splits, info)
    return counts


def meta(
    tokenizer: PreTrainedTokenizerBase, source: Path, counts: dict[str, Any]
) -> dict[str, Any]:
    return {"tokenizer": tokens.fingerprint(tokenizer), "source": file_digest(source), **counts}


def run(params: Params, paths: TokenizePaths) -> None:
    if paths.kind == "cpt":
        counts = encoder_blocks(params, paths)
    elif paths.kind == "cpt_lm" and not params.cpt_lm.enabled:
        tokens.save(paths.output, {}, {"enabled": False})  # cpt_lm reads no tokens: none made
        counts = {"blocks": 0}
    elif paths.kind == "cpt_lm":
        counts = generator_blocks(params, paths)
    else:
        counts = sft_examples(params, paths)
    summary = ", ".join(f"{k} {v:,}" for k, v in counts.items())
    print(f"{paths.stage}: {paths.data} -> {paths.output}: {summary}")


def sft_examples(params: Params, paths: TokenizePaths) -> dict[str, Any]:
    cfg = params.sft
    tokenizer = generator_tokenizer(paths, chat=True)
    tokenize = tokens.chat_tokenizer(tokenizer, cfg.max_length)
    splits, counts = {}, {}
    with tokens.staging(paths.output) as work:
        for split in ("train", "eval"):
            chats = tokens.conversations_of(paths.data / f"{split}.jsonl", Path(work))
            examples = tokens.tokenize(chats, tokenize, tokens.EXAMPLE_FEATURES)
            # A conversation dropped for want of an assistant token counts as truncated too.
            dropped = len(chats) - len(examples)
            splits[split] = examples
            counts[f"{split}_examples"] = len(examples)
            truncated = examples.data.column("truncated").to_pylist()
            counts[f"{split}_truncated"] = sum(truncated) + dropped
        sources = [file_digest(paths.data / f"{s}.jsonl") for s in ("train", "eval")]
        info = {
            "tokenizer": tokens.fingerprint(tokenizer),
            "source": sources,
            "max_length": cfg.max_length,
            **counts,
        }
        tokens.save(paths.output, splits, info)
    return counts


def main(argv: list[str] | None = None) -> int:
    return stage.main(TokenizePaths, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
