"""Stage `cpt`: continued masked-LM pre-training of the encoder on the domain text.

Lines are tokenized, joined with [SEP] and cut into blocks of `cpt.max_length` tokens (no
padding), a seeded share of blocks is held out, and the encoder trains with BERT's objective:
`mlm_probability` of the tokens (or whole words) are selected, 80 % of them replaced by [MASK],
10 % by a random token, 10 % left as they are. The held-out blocks are masked once with a fixed
seed, so the base and the final model are scored on exactly the same predictions.

    python -m stages.cpt --data output/data/pretrain.txt --output output/cpt \
        --metrics metrics/cpt.json --plots metrics/cpt
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from dvclive import Live
from transformers import (
    AutoModelForMaskedLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from stages.data import eval_mask, file_digest, write_text_atomic
from stages.models import ModelNotFoundError, load_model, load_tokenizer, resolve_model
from stages.params import CptParams, load_params
from stages.runtime import fingerprint, matmul_flops, precision, resolve_device

CHECKPOINTS = Path("checkpoints")  # outside DVC's outs: survives a crash, removed on success


# --- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blocks:
    """Fixed-length token blocks, with where each word starts (for whole-word masking)."""

    input_ids: torch.Tensor  # (n_blocks, max_length) long
    word_starts: torch.Tensor  # (n_blocks, max_length) bool


def tokenize_lines(
    lines: Sequence[str], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[bool]]:
    """Token ids of all lines, each line followed by [SEP], and whether each token starts a word."""
    encoded = tokenizer(list(lines), add_special_tokens=False)
    ids: list[int] = []
    starts: list[bool] = []
    for i, line_ids in enumerate(encoded["input_ids"]):
        word_ids = encoded.word_ids(i)
        starts += [w != prev for w, prev in zip(word_ids, [None, *word_ids[:-1]], strict=True)]
        ids += [*line_ids, tokenizer.sep_token_id]
        starts.append(True)
    return ids, starts


def group_blocks(
    ids: list[int], starts: list[bool], max_length: int, cls_id: int, sep_id: int
) -> Blocks:
    """Cut the token stream into [CLS] chunk [SEP] blocks; the short remainder is dropped."""
    body = max_length - 2
    n = len(ids) // body
    chunks = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    chunk_starts = torch.tensor(starts[: n * body], dtype=torch.bool).view(n, body)
    column = torch.ones(n, 1, dtype=torch.bool)
    return Blocks(
        input_ids=torch.cat([torch.full((n, 1), cls_id), chunks, torch.full((n, 1), sep_id)], 1),
        word_starts=torch.cat([column, chunk_starts, column], 1),
    )


@dataclass(frozen=True)
class Masking:
    """What BERT's masking needs to know about the tokenizer, and the cpt.* choices."""

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]  # never selected ([CLS], [SEP], [PAD], ...)
    probability: float
    whole_word: bool


def mask_tokens(
    input_ids: torch.Tensor,
    word_starts: torch.Tensor,
    masking: Masking,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select `probability` of the tokens (or words), then put [MASK] in 80 % of the selected
    positions, a random token in 10 % and leave 10 % as they are.

    Returns (masked input_ids, labels), labels being -100 wherever nothing is predicted.
    """
    special = torch.isin(input_ids, torch.tensor(masking.special_ids))
    draw = torch.rand(input_ids.shape, generator=generator)
    if masking.whole_word:
        # Every piece of a word takes the draw of the word's first piece.
        word_index = word_starts.long().cumsum(dim=1) - 1
        draw = torch.gather(draw, 1, word_index.clamp(min=0))
    selected = (draw < masking.probability) & ~special
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[selected & (action < 0.8)] = masking.mask_id
    random_slot = selected & (action >= 0.8) & (action < 0.9)
    noise = torch.randint(masking.vocab_size, input_ids.shape, generator=generator)
    masked[random_slot] = noise[random_slot]
    return masked, labels


class MaskedBlocks(torch.utils.data.Dataset):
    """Training blocks, masked afresh at each epoch from (seed, epoch, block) alone.

    `EpochSampler` asks for key = epoch * len + block. Masks that depend on nothing else make a
    run resumed from a checkpoint see exactly the batches an uninterrupted run would have seen,
    whatever the data loader prefetched or the global RNG went through.
    """

    def __init__(self, blocks: Blocks, masking: Masking, seed: int) -> None:
        self.blocks, self.masking, self.seed = blocks, masking, seed

    def __len__(self) -> int:
        return len(self.blocks.input_ids)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        row = slice(key % len(self), key % len(self) + 1)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        input_ids, labels = mask_tokens(
            self.blocks.input_ids[row], self.blocks.word_starts[row], self.masking, generator
        )
        return {"input_ids": input_ids[0], "labels": labels[0]}


class EpochSampler(torch.utils.data.Sampler[int]):
    """Shuffles from (seed, epoch) alone and hands out keys `MaskedBlocks` understands."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        return iter((order + self.epoch * self.size).tolist())


# --- loss and evaluation -----------------------------------------------------------------------


def mlm_loss(
    model: PreTrainedModel, input_ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the selected tokens, and the number predicted right.

    For BERT the vocabulary projection runs on the selected ~15 % of positions only, which
    halves the cost of a training step on a CPU; other architectures take their full head.
    """
    selected = labels != -100
    if has_sparse_head(model):
        hidden = model.bert(input_ids=input_ids).last_hidden_state
        logits = model.cls(hidden[selected])
    else:
        logits = model(input_ids=input_ids).logits[selected]
    targets = labels[selected]
    loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss_sum, (logits.argmax(-1) == targets).sum()


def has_sparse_head(model: PreTrainedModel) -> bool:
    return hasattr(model, "bert") and hasattr(model, "cls")


def flops_per_token(model: PreTrainedModel, mlm_probability: float) -> float:
    """Training FLOPs per token, 6 x the parameters that do matmuls on it (Kaplan et al.).

    Embedding lookups cost no matmul; the vocabulary projection (tied to the embeddings) runs on
    every token, or only on the selected ones with the sparse BERT head.
    """
    head = model.get_output_embeddings().weight.numel()
    share = mlm_probability if has_sparse_head(model) else 1.0
    return 6.0 * (model.num_parameters(exclude_embeddings=True) + share * head)


@torch.no_grad()
def evaluate(model: PreTrainedModel, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted loss, perplexity and accuracy over pre-masked batches."""
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    for batch in batches:
        labels = batch["labels"].to(model.device)
        loss_sum, right = mlm_loss(model, batch["input_ids"].to(model.device), labels)
        total += loss_sum.item()
        correct += int(right)
        count += int((labels != -100).sum())
    model.train(was_training)
    loss = total / max(count, 1)
    return {
        "eval_loss": round(loss, 6),
        "perplexity": round(math.exp(min(loss, 700.0)), 4),
        "mask_accuracy": round(correct / max(count, 1), 6),
    }


def fixed_eval_batches(
    blocks: Blocks, masking: Masking, batch_size: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Mask the held-out blocks once, with their own generator: the same for base and final."""
    generator = torch.Generator().manual_seed(seed)
    input_ids, labels = mask_tokens(blocks.input_ids, blocks.word_starts, masking, generator)
    return [
        {"input_ids": input_ids[i : i + batch_size], "labels": labels[i : i + batch_size]}
        for i in range(0, len(input_ids), batch_size)
    ]


# --- training ----------------------------------------------------------------------------------


class MlmTrainer(Trainer):
    """Trainer with the sparse MLM loss, our fixed-mask evaluation, and token/time accounting."""

    def __init__(
        self, *args: Any, eval_batches: list[dict[str, torch.Tensor]], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.eval_batches = eval_batches
        self.tokens_seen = 0
        self.step_seconds = 0.0

    def _get_train_sampler(self, train_dataset=None):  # type: ignore[override]
        return EpochSampler(len(train_dataset or self.train_dataset), self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        labels = inputs["labels"]
        loss_sum, _ = mlm_loss(model, inputs["input_ids"], labels)
        # With gradient accumulation the Trainer passes the masked-token count of the whole
        # accumulated batch, so every token weighs the same whatever micro-batch it falls in.
        denominator = (
            num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum()
        )
        if model.training:
            self.tokens_seen += inputs["input_ids"].numel()
        loss = loss_sum / torch.as_tensor(denominator, device=loss_sum.device).clamp(min=1)
        return (loss, None) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):  # type: ignore[override]
        scores = evaluate(self.model, self.eval_batches)
        metrics = {f"{metric_key_prefix}_{k.removeprefix('eval_')}": v for k, v in scores.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics


class StepTimer(TrainerCallback):
    """Seconds spent in optimizer steps only (not evaluation or checkpointing)."""

    def __init__(self, trainer: MlmTrainer) -> None:
        self.trainer = trainer
        self.start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[override]
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[override]
        self.trainer.step_seconds += time.perf_counter() - self.start


def param_groups(model: PreTrainedModel, cfg: CptParams) -> list[dict[str, Any]]:
    """AdamW groups: the MLM head's own layers (new for a sentence encoder) learn at `head_lr`,
    the encoder at `lr`; biases and norms take no weight decay. The vocabulary projection is
    tied to the word embeddings and so belongs to the encoder."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():  # tied weights appear once, under the encoder
        is_head = name.startswith("cls.")
        decays = param.ndim > 1 and "LayerNorm" not in name
        groups.setdefault((is_head, decays), []).append(param)
    return [
        {
            "params": params,
            "lr": (cfg.head_lr or cfg.lr) if is_head else cfg.lr,
            "weight_decay": cfg.weight_decay if decays else 0.0,
        }
        for (is_head, decays), params in sorted(groups.items())
    ]


def training_args(
    cfg: CptParams, seed: int, device: torch.device, mode: str | None, out: Path, n_train: int
) -> TrainingArguments:
    steps_per_epoch = math.ceil(n_train / (cfg.batch_size * cfg.grad_accum))
    total = cfg.max_steps or math.ceil(steps_per_epoch * cfg.epochs)
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        warmup_steps=math.ceil(cfg.warmup_ratio * total),
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear",
        logging_steps=max(1, min(10, cfg.eval_steps)),
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=1,
        seed=seed,
        use_cpu=device.type == "cpu",
        fp16=mode == "fp16",
        bf16=mode == "bf16",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def write_curves(log_history: list[dict[str, Any]], plots_dir: Path) -> None:
    """Train and eval loss against step, as dvclive TSV files (no timestamps)."""
    if plots_dir.exists():
        shutil.rmtree(plots_dir)
    with Live(dir=str(plots_dir), save_dvc_exp=False, dvcyaml=False) as live:
        for entry in log_history:
            live.step = entry["step"]
            if "loss" in entry:
                live.log_metric("train/loss", entry["loss"])
            if "eval_loss" in entry:
                live.log_metric("eval/loss", entry["eval_loss"])


# --- stage -------------------------------------------------------------------------------------


def split_blocks(
    lines: Sequence[str], tokenizer: PreTrainedTokenizerBase, cfg: CptParams, seed: int
) -> tuple[Blocks, Blocks]:
    """Tokenize and group the lines, then hold out a seeded share of the blocks."""
    ids, starts = tokenize_lines(lines, tokenizer)
    blocks = group_blocks(
        ids, starts, cfg.max_length, tokenizer.cls_token_id, tokenizer.sep_token_id
    )
    held_out = torch.from_numpy(eval_mask(len(blocks.input_ids), cfg.eval_fraction, seed))
    return (
        Blocks(blocks.input_ids[~held_out], blocks.word_starts[~held_out]),
        Blocks(blocks.input_ids[held_out], blocks.word_starts[held_out]),
    )


def describe(label: str, scores: dict[str, float]) -> str:
    return f"cpt: {label:<5} " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items())


def run(
    cfg: CptParams, seed: int, device_name: str, fp16: str, data: Path, output: Path, plots: Path
) -> dict[str, Any]:
    """Train, save `output`, write curves to `plots`; return the metrics dict."""
    set_seed(seed)
    device = resolve_device(device_name)
    mode = precision(fp16, device)
    source = resolve_model(cfg.model)
    tokenizer = load_tokenizer(source)
    model = load_model(AutoModelForMaskedLM, source).to(device)

    train, heldout = split_blocks(
        data.read_text(encoding="utf-8").splitlines(), tokenizer, cfg, seed
    )
    masking = Masking(
        mask_id=tokenizer.mask_token_id,
        vocab_size=len(tokenizer),
        special_ids=tuple(tokenizer.all_special_ids),
        probability=cfg.mlm_probability,
        whole_word=cfg.whole_word_masking,
    )
    eval_batches = fixed_eval_batches(heldout, masking, cfg.batch_size, seed)
    print(
        f"cpt: {cfg.model}: {len(train.input_ids)} train / {len(heldout.input_ids)} eval blocks"
        f" of {cfg.max_length} tokens on {device} ({mode or 'fp32'})"
    )
    base = evaluate(model, eval_batches)
    print(describe("base", base))

    # One directory per configuration: a crashed run resumes, a changed experiment starts fresh.
    key = fingerprint(asdict(cfg), seed, device_name, fp16, file_digest(data))
    checkpoints = CHECKPOINTS / f"cpt-{key}"
    trainer = MlmTrainer(
        model=model,
        args=training_args(cfg, seed, device, mode, checkpoints, len(train.input_ids)),
        train_dataset=MaskedBlocks(train, masking, seed),
        eval_dataset=eval_batches,  # scored by MlmTrainer.evaluate, never re-masked
        optimizers=(torch.optim.AdamW(param_groups(model, cfg)), None),
        eval_batches=eval_batches,
    )
    trainer.add_callback(StepTimer(trainer))
    resume = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if resume:
        print(f"cpt: resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)

    final = evaluate(model, eval_batches)
    print(describe("final", final))
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    write_curves(trainer.state.log_history, plots)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return {"base": base, "final": final, "train": throughput(trainer, model, cfg, device)}


def throughput(
    trainer: MlmTrainer, model: PreTrainedModel, cfg: CptParams, device: torch.device
) -> dict[str, float]:
    """Tokens, seconds of optimizer steps, tokens/s and MFU against the measured matmul peak."""
    peak = matmul_flops(device)
    tokens_per_s = trainer.tokens_seen / max(trainer.step_seconds, 1e-9)
    mfu = flops_per_token(model, cfg.mlm_probability) * tokens_per_s / peak
    print(
        f"cpt: {trainer.tokens_seen} tokens in {trainer.step_seconds:.1f} s = {tokens_per_s:.0f}"
        f" tokens/s; MFU {mfu:.3f} of a measured {peak / 1e9:.0f} GFLOP/s fp32 matmul peak"
    )
    return {
        "tokens": trainer.tokens_seen,
        "runtime_s": round(trainer.step_seconds, 2),
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(mfu, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)

    params = load_params(args.params)
    start = time.perf_counter()
    try:
        metrics = run(
            params.cpt, params.seed, params.device, params.fp16, args.data, args.output, args.plots
        )
    except (ModelNotFoundError, RuntimeError) as err:
        print(f"cpt: {err}", file=sys.stderr)
        return 1
    write_text_atomic(args.metrics, json.dumps(metrics, indent=2) + "\n")
    print(f"cpt: done in {time.perf_counter() - start:.0f} s -> {args.output}, {args.metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
