"""Stage `cpt_lm`: domain-adaptive pre-training of the generator on the corpus, before SFT.

    python -m stages.cpt_lm --base output/sft_base --tokens output/tokens/cpt_lm \
        --output output/cpt_lm --metrics metrics/cpt_lm.json --plots metrics/cpt_lm

The packed blocks, train and held out, come from `tokenize_cpt_lm` (memory-mapped; what is
mixed into the training blocks: `lmpipeline.mixing`); the held-out perplexity is in
`lmpipeline.cpt_lm`; the Trainer, resume and timings in `lmpipeline.training`.
With `cpt_lm.enabled: false` the output is the base model unchanged, so `sft` always starts
from `output/cpt_lm`.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from transformers import AutoTokenizer, set_seed

from lmpipeline import launch, mixing
from lmpipeline.chat import load_causal_lm
from lmpipeline.cpt_lm import eval_batches, evaluate, make_trainer
from lmpipeline.models import check_positions, save_pretrained
from lmpipeline.params import Params
from lmpipeline.runtime import is_main_process, precision, resolve_device
from lmpipeline.sft import flops_per_token, with_lora
from lmpipeline.stage import INPUT, StageResult, TrainingPaths
from lmpipeline.tokens import TokenRows
from lmpipeline.tokens import load as load_tokens
from lmpipeline.training import (
    budget_of,
    checkpoint_dir,
    describe,
    throughput,
    train_resumable,
    training_args,
    within_budget,
    write_curves,
)


@dataclass(frozen=True, kw_only=True)
class CptLmPaths(TrainingPaths):
    stage: ClassVar[str] = "cpt_lm"
    base: Path = field(metadata=INPUT)
    """The causal LM to adapt (a Hugging Face directory: output/sft_base)."""
    tokens: Path = field(metadata=INPUT)
    """The corpus packed into blocks (output of tokenize_cpt_lm)."""
    output: Path
    """Where the adapted model goes (a Hugging Face directory)."""


def run(params: Params, paths: CptLmPaths) -> StageResult | None:
    """Train on the corpus, save the model, write the curves; return the held-out perplexity
    before and after, and timings (None on the ranks other than 0 of a distributed run)."""
    cfg, seed = params.cpt_lm, params.seed
    if not cfg.enabled:
        return copy_base(paths)
    set_seed(seed)
    device = resolve_device(params.device)
    mode = precision(params.fp16, device)
    tokenizer = AutoTokenizer.from_pretrained(paths.base, trust_remote_code=False)
    model = load_causal_lm(paths.base, device)
    check_positions(model, cfg.max_length, "cpt_lm.max_length")

    expected = mixing.settings(cfg, seed)
    meta, splits = load_tokens(paths.tokens, tokenizer, "cpt_lm", "tokenize_cpt_lm", expected)
    train, held_out = TokenRows(splits["train"]), TokenRows(splits["held_out"])
    budget = budget_of(cfg, shifted=True)
    batches = within_budget(eval_batches(held_out, cfg.batch_size), budget)
    print(
        f"cpt_lm: {paths.base}: {len(train)} train / {len(held_out)} held-out blocks of"
        f" {cfg.max_length} tokens on {device} ({mode or 'fp32'})"
        + (f", LoRA r={cfg.lora_r}" if cfg.lora_r else ", full fine-tune")
    )
    if is_main_process():
        base = evaluate(model, batches)
        print(describe("cpt_lm", "base", base))

    if cfg.lora_r:
        model = with_lora(model, cfg)
    config = (asdict(cfg), seed, params.device, params.fp16, params.launch.strategy)
    checkpoints = checkpoint_dir("cpt_lm", *config, meta["source"], params.sft.model)
    args = training_args(cfg, seed, device, mode, checkpoints, len(train), params.launch)
    trainer = make_trainer(model, args, train, batches, budget)
    model = train_resumable(trainer, "cpt_lm")
    if not is_main_process():
        return None
    flops = flops_per_token(model, 1.0, lora=bool(cfg.lora_r))
    if cfg.lora_r:
        model = model.merge_and_unload()  # a plain model: loads without peft

    final = evaluate(model, batches)
    print(describe("cpt_lm", "final", final))
    save_pretrained(paths.output, model, tokenizer)
    write_curves(trainer.state.log_history, paths.plots)
    speed = throughput("cpt_lm", trainer, flops, device)
    blocks = {"train": len(train), "held_out": len(held_out)}
    mixed = {k: meta[k] for k in ("reading_chats", "replayed_chats", "mixed_blocks") if k in meta}
    metrics = {"enabled": True, "base": base, "final": final, "blocks": blocks}
    if mixed:  # the training blocks that are not the corpus's (lmpipeline.mixing)
        metrics["mixed_in"] = mixed
    return StageResult(metrics, {"train": speed})


def copy_base(paths: CptLmPaths) -> StageResult:
    """cpt_lm.enabled: false: the base model is the output, as it is (SFT starts from it)."""
    if paths.output.exists():
        shutil.rmtree(paths.output)
    shutil.copytree(paths.base, paths.output)
    write_curves([], paths.plots)
    print(f"cpt_lm: disabled (cpt_lm.enabled: false): {paths.output} is {paths.base} unchanged")
    return StageResult({"enabled": False}, {})


def main(argv: list[str] | None = None) -> int:
    return launch.main(CptLmPaths, run, argv, __doc__, "stages.cpt_lm")


if __name__ == "__main__":
    launch.exit_process(main())
