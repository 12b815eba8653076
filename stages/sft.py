"""Stage `sft`: supervised fine-tuning of the causal LM on prompt/response pairs.

    python -m stages.sft --base output/sft_base --tokens output/tokens/sft --data output/data/sft \
        --output output/sft --metrics metrics/sft.json --plots metrics/sft \
        --samples metrics/sft_samples.md

The examples come from `tokenize_sft` (memory-mapped); formatting, the response-only loss and
batching are in `lmpipeline.sft` and `lmpipeline.chat`; the Trainer, resume and timings in
`lmpipeline.training`. With `sft.enabled: false` the output is the start model unchanged.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from transformers import set_seed

from lmpipeline import launch
from lmpipeline.chat import load_causal_lm, load_chat_tokenizer
from lmpipeline.data import read_jsonl, write_text_atomic
from lmpipeline.models import check_positions, save_pretrained
from lmpipeline.params import Params
from lmpipeline.runtime import is_main_process, precision, resolve_device
from lmpipeline.sft import (
    Examples,
    eval_batches,
    evaluate,
    flops_per_token,
    make_trainer,
    samples_markdown,
    with_lora,
)
from lmpipeline.stage import INPUT, StageResult, TrainingPaths
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
class SftPaths(TrainingPaths):
    stage: ClassVar[str] = "sft"
    base: Path = field(metadata=INPUT)
    """The model directory to fine-tune."""
    tokens: Path = field(metadata=INPUT)
    """The encoded train and eval examples (output of tokenize_sft)."""
    data: Path = field(metadata=INPUT)
    """The directory with the validated eval.jsonl, whose prompts the models answer."""
    output: Path
    """Where the fine-tuned model goes (a Hugging Face directory)."""
    samples: Path
    """Where the held-out answers of the base and the tuned model go (Markdown)."""


def run(params: Params, paths: SftPaths) -> StageResult | None:
    """Fine-tune, save the model and the samples; return metrics and timings (None on the ranks
    other than 0 of a distributed run, which train but write nothing)."""
    cfg, seed = params.sft, params.seed
    if not cfg.enabled:
        return copy_base(paths)
    main_process = is_main_process()
    set_seed(seed)
    device = resolve_device(params.device)
    mode = precision(params.fp16, device)
    tokenizer, template = load_chat_tokenizer(paths.base)
    model = load_causal_lm(paths.base, device)
    check_positions(model, cfg.max_length, "sft.max_length")

    expected = {"max_length": cfg.max_length}
    meta, splits = load_tokens(paths.tokens, tokenizer, "sft", "tokenize_sft", expected)
    train, truncated = Examples(splits["train"]), meta["train_truncated"]
    held_out_rows = Examples(splits["eval"])  # scored as fixed batches: read once, into memory
    held_out = [held_out_rows[i] for i in range(len(held_out_rows))]
    eval_records = read_jsonl(paths.data / "eval.jsonl")
    budget = budget_of(cfg, shifted=True)
    batches = within_budget(eval_batches(held_out, cfg.batch_size, tokenizer.pad_token_id), budget)
    print(
        f"sft: {paths.base} with the {template}: {len(train)} train / {len(held_out)} eval"
        f" examples, {truncated} truncated to {cfg.max_length} tokens; {device} ({mode or 'fp32'})"
        + (f", LoRA r={cfg.lora_r}" if cfg.lora_r else ", full fine-tune")
    )
    if main_process:
        base, base_answers = evaluate(model, tokenizer, batches, eval_records, cfg)
        print(describe("sft", "base", base))

    if cfg.lora_r:
        model = with_lora(model, cfg)
    config = (asdict(cfg), seed, params.device, params.fp16, params.launch.strategy)
    checkpoints = checkpoint_dir("sft", *config, meta["source"][0])  # train.jsonl's digest
    args = training_args(cfg, seed, device, mode, checkpoints, len(train), params.launch)
    trainer = make_trainer(model, args, train, batches, tokenizer.pad_token_id, budget)
    model = train_resumable(trainer, "sft")
    if not main_process:
        return None
    share = trainer.predicted_seen / max(trainer.tokens_seen, 1)
    flops = flops_per_token(model, share, lora=bool(cfg.lora_r))
    if cfg.lora_r:
        model = model.merge_and_unload()  # a plain model: loads without peft

    final, final_answers = evaluate(model, tokenizer, batches, eval_records, cfg)
    print(describe("sft", "final", final))
    save_pretrained(paths.output, model, tokenizer)
    write_curves(trainer.state.log_history, paths.plots)
    samples = samples_markdown(eval_records, base_answers, final_answers, cfg.samples)
    write_text_atomic(paths.samples, samples)
    speed = throughput("sft", trainer, flops, device)
    return StageResult(
        {"base": base, "final": final, "train": {"truncated": truncated}},
        {"train": {"response_tokens": trainer.predicted_seen, **speed}},
    )


def copy_base(paths: SftPaths) -> StageResult:
    """sft.enabled: false: the start model is the output, as it is (what SFT adds is then
    measured downstream: benchmarks/phase_value.py)."""
    if paths.output.exists():
        shutil.rmtree(paths.output)
    shutil.copytree(paths.base, paths.output)
    write_curves([], paths.plots)
    write_text_atomic(paths.samples, "SFT did not run (sft.enabled: false).\n")
    print(f"sft: disabled (sft.enabled: false): {paths.output} is {paths.base} unchanged")
    return StageResult({"enabled": False}, {})


def main(argv: list[str] | None = None) -> int:
    return launch.main(SftPaths, run, argv, __doc__, "stages.sft")


if __name__ == "__main__":
    launch.exit_process(main())
