"""SFT stage vs TRL's SFTTrainer: same base model, data split, epochs, max_length, batch size,
learning rate and schedule, same device and precision (`--device`; the precision is what
params.yaml's fp16 chooses there: fp32 on a CPU, bf16 on a recent GPU), without gradient
checkpointing. benchmarks/gpu_check.sh runs it on a GPU machine (`run --trl`).

Prints wall time of training, response tokens/s, held-out loss on response tokens and (on a GPU)
peak memory for each, and the ratios. Both held-out losses come from the same function on the
same batches. Needs the bench extra (`pip install -e '.[bench]'`) and the outputs of
`dvc repro sft_base validate_sft`.

    python benchmarks/sft_vs_trl.py [--limit N] [--seed S] [--device cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    TrainingArguments,
    set_seed,
)
from trl import SFTConfig, SFTTrainer

from lmpipeline import sft, tokens
from lmpipeline.chat import ensure_chat_template
from lmpipeline.data import read_jsonl
from lmpipeline.params import SftParams, load_params
from lmpipeline.runtime import precision, resolve_device
from lmpipeline.training import score, training_args


def held_out_loss(model: PreTrainedModel, batches: list[dict[str, torch.Tensor]]) -> float:
    return score(sft.causal_loss, model, batches)[0]


def peak_mib(device: torch.device) -> float | None:
    """Peak GPU memory since the last call (None on a CPU)."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def run_stage(
    base: Path, train: list[tokens.Example], batches: list, args: TrainingArguments, pad_id: int
) -> tuple[float, float]:
    set_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    args = dataclasses.replace(args, eval_strategy="no", save_strategy="no", logging_steps=10**6)
    trainer = sft.make_trainer(model, args, train, batches, pad_id)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, held_out_loss(model, batches)


def run_trl(
    base: Path,
    records: list[dict[str, str]],
    batches: list,
    cfg: SftParams,
    seed: int,
    warmup_steps: int,
    mode: str | None,
    device: torch.device,
) -> tuple[float, float]:
    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    ensure_chat_template(tokenizer)
    # Conversational prompt-completion records: TRL applies the chat template and, with
    # completion_only_loss, trains on the completion tokens only, as the stage does.
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["response"]}],
            }
            for r in records
        ]
    )
    config = SFTConfig(
        output_dir="/tmp/bench-sft-trl",
        max_length=cfg.max_length,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        lr_scheduler_type="linear",
        warmup_steps=warmup_steps,
        weight_decay=cfg.weight_decay,
        completion_only_loss=True,
        packing=False,
        gradient_checkpointing=False,
        bf16=mode == "bf16",
        fp16=mode == "fp16",
        use_cpu=device.type == "cpu",
        seed=seed,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10**6,
        report_to="none",
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, held_out_loss(model, batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=Path("output/sft_base"))
    parser.add_argument("--data", type=Path, default=Path("output/data/sft"))
    parser.add_argument("--limit", type=int, default=0, help="train on the first N records only")
    parser.add_argument("--seed", type=int, help="seed of both runs (default: params.yaml)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    args = parser.parse_args()

    params = load_params()
    cfg, seed = params.sft, params.seed if args.seed is None else args.seed
    device = resolve_device(args.device)
    mode = precision(params.fp16, device)
    records = read_jsonl(args.data / "train.jsonl")
    records = records[: args.limit] if args.limit else records
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    ensure_chat_template(tokenizer)
    train, _ = tokens.encode_all(tokenizer, records, cfg.max_length)
    held_out, _ = tokens.encode_all(tokenizer, read_jsonl(args.data / "eval.jsonl"), cfg.max_length)
    batches = sft.eval_batches(held_out, cfg.batch_size, tokenizer.pad_token_id)
    response_tokens = cfg.epochs * sum(len(e.labels) - e.labels.count(-100) for e in train)
    print(
        f"{len(train)} examples x {cfg.epochs:g} epochs, max_length {cfg.max_length}, batch"
        f" {cfg.batch_size}, lr {cfg.lr:g}; {response_tokens:.0f} response tokens; torch threads"
        f" {torch.get_num_threads()}; {device}, {mode or 'fp32'}"
    )
    stage_args = training_args(cfg, seed, device, mode, Path("/tmp/bench-sft-stage"), len(train))
    peak_mib(device)
    stage = run_stage(args.base, train, batches, stage_args, tokenizer.pad_token_id)
    peaks = {"stage": peak_mib(device)}
    trl = run_trl(args.base, records, batches, cfg, seed, stage_args.warmup_steps, mode, device)
    peaks["trl"] = peak_mib(device)
    results = {"stage": stage, "trl": trl}
    print(f"\n{'':<6} {'wall s':>8} {'resp tok/s':>11} {'eval loss':>10} {'peak MiB':>9}")
    for name, (wall, loss) in results.items():
        peak = f"{peaks[name]:>9.0f}" if peaks[name] is not None else f"{'-':>9}"
        print(f"{name:<6} {wall:>8.1f} {response_tokens / wall:>11.1f} {loss:>10.4f} {peak}")
    (stage_wall, stage_loss), (trl_wall, trl_loss) = results["stage"], results["trl"]
    print(
        f"\nstage is {trl_wall / stage_wall:.2f}x faster than TRL's SFTTrainer;"
        f" held-out loss {stage_loss:.4f} vs {trl_loss:.4f}"
    )


if __name__ == "__main__":
    main()
