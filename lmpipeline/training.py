"""The training loop shared by the training stages (CPT, SFT, the rag stage's fine-tuning): a
Hugging Face Trainer with the stage's own loss, exact resume from checkpoints kept outside DVC's
outputs, FSDP2 sharding, throughput/MFU and dvclive curves.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from dvclive import Live
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmpipeline.metrics import perplexity
from lmpipeline.models import weights_follow_umask
from lmpipeline.params import BudgetedParams, LaunchParams, TrainingParams
from lmpipeline.runtime import (
    WEIGHTS,
    Peak,
    compute_dtype,
    end_distributed,
    fingerprint,
    is_main_process,
    matmul_peak,
)
from lmpipeline.stage import CHECKPOINTS, checkpoint_folders, remove_checkpoints

FSDP_CONFIG = {
    "version": 2,
    "auto_wrap_policy": "NO_WRAP",  # StageTrainer shards the model itself (see `shard`)
    "state_dict_type": "SHARDED_STATE_DICT",  # checkpoints: one file per process, none whole
}
# The TrainingArguments field of activation checkpointing: transformers 5.2x renamed it, and the
# old name, the only one before, is a deprecated alias there.
CHECKPOINTING = next(
    name
    for name in ("activation_checkpointing", "gradient_checkpointing")
    if name in TrainingArguments.__dataclass_fields__
)


@dataclass
class LossParts:
    loss_sum: torch.Tensor  # summed cross-entropy over the predicted tokens
    predicted: torch.Tensor  # how many tokens were predicted
    correct: torch.Tensor  # how many of them the argmax got right


LossFn = Callable[[PreTrainedModel, dict[str, torch.Tensor]], LossParts]
ParamGroups = Callable[[torch.nn.Module], list[dict[str, Any]]]


@torch.no_grad()
def score(
    loss_fn: LossFn, model: PreTrainedModel, batches: list[dict[str, torch.Tensor]]
) -> tuple[float, float]:
    """Token-weighted loss and accuracy of `model` over `batches`."""
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    for batch in batches:
        parts = loss_fn(model, {k: v.to(model.device) for k, v in batch.items()})
        total += parts.loss_sum.item()
        correct += int(parts.correct)
        count += int(parts.predicted)
    model.train(was_training)
    return total / max(count, 1), correct / max(count, 1)


def held_out_scores(
    loss_fn: LossFn, model: PreTrainedModel, batches: list[dict[str, torch.Tensor]], accuracy: str
) -> dict[str, float]:
    """Loss, perplexity and accuracy (named `accuracy`) of `model` over the held-out `batches`."""
    loss, correct = score(loss_fn, model, batches)
    return {
        "eval_loss": round(loss, 6),
        "perplexity": round(perplexity(loss), 4),
        accuracy: round(correct, 6),
    }


def describe(stage: str, label: str, scores: dict[str, float]) -> str:
    return f"{stage}: {label:<5} " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items())


class EpochSampler(torch.utils.data.Sampler[int]):
    """Orders the train split from (seed, epoch) alone, so a run resumed mid-epoch sees exactly
    the order an uninterrupted run would have. Subclasses decide what an order is."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(torch.Generator().manual_seed(self.seed + self.epoch)))

    def order(self, generator: torch.Generator) -> list[int]:
        return torch.randperm(self.size, generator=generator).tolist()


@dataclass(frozen=True)
class TokenBudget:
    """At most `max_tokens` padded tokens per forward pass (`max_tokens_per_batch`); `shifted`:
    the loss predicts `labels[:, 1:]` (a causal LM), else `labels` (masked LM)."""

    max_tokens: int
    shifted: bool

    def split(self, inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Row chunks of `inputs` of at most `max_tokens` padded tokens (one row at least)."""
        rows, width = inputs["input_ids"].shape
        per = max(1, self.max_tokens // width)
        return [{k: v[i : i + per] for k, v in inputs.items()} for i in range(0, rows, per)]

    def predicted(self, labels: torch.Tensor) -> int:
        return int(((labels[:, 1:] if self.shifted else labels) != -100).sum())


def budget_of(cfg: BudgetedParams, shifted: bool) -> TokenBudget | None:
    return TokenBudget(cfg.max_tokens_per_batch, shifted) if cfg.max_tokens_per_batch else None


def within_budget(
    batches: list[dict[str, torch.Tensor]], budget: TokenBudget | None
) -> list[dict[str, torch.Tensor]]:
    """Fixed held-out batches split as training splits its micro-batches, so that scoring long
    examples holds no more than a training step does. The scores are sums over tokens: the
    same, whatever the split."""
    return [chunk for batch in batches for chunk in budget.split(batch)] if budget else batches


@dataclass(frozen=True)
class WarmupOnly:
    """The first `steps` optimizer steps move only the parameters named in `trained` (a new head:
    its random gradients would otherwise flow into the pretrained weights, LP-FT's "feature
    distortion", Kumar et al. 2022); every parameter trains after.

    The frozen ones lose their gradients after each backward: AdamW skips a parameter without
    one (no update, no decay, no moment), gradient clipping measures only what trains, and
    DDP's and FSDP's hooks, which fire in backward, see the same graph as in any other step.
    """

    steps: int
    trained: frozenset[str]

    def drop_frozen_grads(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            if name not in self.trained:
                param.grad = None


class StageTrainer(Trainer):
    """Trainer with the stage's loss, evaluation and sampler, counting tokens and step time."""

    def __init__(
        self,
        *args: Any,
        loss_fn: LossFn,
        eval_fn: Callable[[PreTrainedModel], dict[str, float]],
        sampler: EpochSampler,
        param_groups: ParamGroups | None = None,
        budget: TokenBudget | None = None,
        warmup_only: WarmupOnly | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.loss_fn, self.eval_fn, self.sampler = loss_fn, eval_fn, sampler
        self.param_groups = param_groups
        self.budget = budget
        self.warmup_only = warmup_only
        self.denominator: int | None = None  # set while the chunks of one micro-batch train
        if self.is_fsdp_enabled:
            shard(self.model, self.accelerator.state.fsdp_plugin.mixed_precision_policy)
        self.tokens_seen = 0  # real (non-padding) tokens of the batches trained on
        self.predicted_seen = 0  # of which tokens the loss predicted
        self.step_seconds = 0.0
        self.peak: Peak | None = None  # matmul peak measured before training (`train_resumable`)
        self.add_callback(StepTimer(self))
        self.add_callback(ReadableCheckpoints())

    @property
    def dtype(self) -> torch.dtype:
        """What the matmuls of training run in (MFU's peak is measured in it)."""
        return compute_dtype("bf16" if self.args.bf16 else "fp16" if self.args.fp16 else None)

    def _get_train_sampler(self, train_dataset=None):  # type: ignore[override]
        return self.sampler

    def create_optimizer(self, model=None):  # type: ignore[override]
        """AdamW over the stage's own parameter groups, when it has some. Built here rather than
        passed in: the Trainer refuses an optimizer under FSDP, whose sharding replaces the
        parameters an optimizer built earlier would hold."""
        if self.param_groups is None:
            return super().create_optimizer(model)
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.param_groups(self.model))
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[override]
        """One micro-batch (`micro_batch_step`), then, during a `WarmupOnly`, no gradient for the
        parameters it keeps frozen."""
        loss = self.micro_batch_step(model, inputs, num_items_in_batch)
        if self.warmup_only and self.state.global_step < self.warmup_only.steps:
            self.warmup_only.drop_frozen_grads(self.model)
        return loss

    def micro_batch_step(self, model, inputs, num_items_in_batch):  # type: ignore[no-untyped-def]
        """Above the token budget, the micro-batch's row chunks one after the other, each loss
        divided by the count of the whole micro-batch, so that the gradients add up to the
        unsplit micro-batch's and the optimizer step is the same."""
        chunks = self.budget.split(inputs) if self.budget else [inputs]
        if len(chunks) == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        if num_items_in_batch is None:  # the Trainer leaves the count to the loss: give it all
            self.denominator = self.budget.predicted(inputs["labels"])
        losses = []
        try:
            for chunk in chunks:  # a loop: super() needs this method's own scope
                losses.append(super().training_step(model, chunk, num_items_in_batch))
        finally:
            self.denominator = None
        return torch.stack(losses).sum()

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):  # type: ignore[override]
        """Mixed precision, as the Trainer was set (`runtime.precision`), around every loss and
        held-out score. accelerate applies it by wrapping the model's forward, which the stage
        losses do not call (they call the encoder, then the head on selected positions): it is
        applied here instead, around the loss function, where the Trainer asks for it."""
        return self.accelerator.autocast()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        parts = self.stage_loss(model, inputs)
        # With gradient accumulation the Trainer passes the predicted-token count of the whole
        # accumulated batch, so every token weighs the same whatever micro-batch it falls in.
        denominator = parts.predicted if num_items_in_batch is None else num_items_in_batch
        if self.denominator is not None:  # a chunk of a micro-batch (`training_step`)
            denominator = self.denominator
        if model.training:
            self.tokens_seen += count_tokens(inputs)
            self.predicted_seen += int(parts.predicted)
        loss = parts.loss_sum / torch.as_tensor(denominator, device=parts.loss_sum.device).clamp(
            min=1
        )
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # The count is summed over processes and DDP averages their gradients: scale back up
            # so that every token of the global batch weighs the same (a no-op in one process).
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def stage_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> LossParts:
        """`loss_fn` on the model, through the DDP or FSDP model's forward when there is one.

        The loss functions call parts of the model (the encoder, then the vocabulary projection
        on selected positions only). DDP synchronizes gradients only for work done inside its
        forward, and FSDP gathers the top-level parameters (embeddings, heads) and schedules
        their gradients' reduction from hooks on the model's call, so the inner model's forward
        is pointed at the loss function for this call.
        """
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            inner = model.module
        elif isinstance(model, FSDPModule):
            inner = model
        else:
            return self.loss_fn(model, inputs)

        # The forward the model had (accelerate's mixed-precision wrapper where it set one):
        # what a call of the model must reach inside the loss, and what the model keeps after.
        own = inner.__dict__.get("forward")

        def restore() -> None:
            if own is None:
                del inner.forward  # back to the class's forward
            else:
                inner.forward = own

        def forward(**batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
            restore()  # the loss function may call the model itself: the real forward
            try:
                parts = self.loss_fn(inner, batch)
            finally:
                inner.forward = forward
            return parts.loss_sum, parts.predicted, parts.correct  # tensors DDP can trace

        inner.forward = forward
        try:
            return LossParts(*model(**inputs))
        finally:
            restore()

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):  # type: ignore[override]
        sharded = isinstance(self.model, FSDPModule)
        if sharded:  # the layers gather their own parameters; the top level's are gathered here
            self.model.unshard()
        try:
            with self.autocast_smart_context_manager():
                scores = self.eval_fn(self.model)
        finally:
            if sharded:
                self.model.reshard()
        metrics = {f"{metric_key_prefix}_{k.removeprefix('eval_')}": v for k, v in scores.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics


def shard(model: torch.nn.Module, precision: MixedPrecisionPolicy | None) -> None:
    """FSDP2 in place: one unit per transformer block (the modules of the model's layer lists),
    and the root's unit for the rest: embeddings, heads and every weight tied between them.

    Done here because accelerate, which the Trainer would let shard the model, gives the input
    and output embeddings a unit of their own, and so fails on a parameter the output embedding
    shares with another module (the bias of BERT's MLM head). accelerate leaves a model that is
    already sharded as it is."""
    # Compute in accelerate's precision, but leave outputs as computed: the root's "outputs"
    # are the loss function's fp32 sums (see `stage_loss`), which a cast to fp16 would overflow.
    policy = replace(precision or MixedPrecisionPolicy(), output_dtype=None)
    if policy.param_dtype is not None:  # FSDP2 keeps fp32 master weights and casts them
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    blocks = [block for blocks in lists for block in blocks]
    for block in reversed(blocks):  # FSDP2 shards nested modules before their parents
        fully_shard(block, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mp_policy=policy)  # the root stays gathered from forward to backward


def count_tokens(inputs: dict[str, torch.Tensor]) -> int:
    """Real tokens of a batch: those of every attention mask (a retriever batch has two), or
    every input id when the batch has no padding and so no mask."""
    masks = [v for k, v in inputs.items() if k.endswith("attention_mask")]
    return sum(int(m.sum()) for m in masks) if masks else inputs["input_ids"].numel()


class ReadableCheckpoints(TrainerCallback):
    """Each checkpoint's weights with the mode the umask gives (`weights_follow_umask`): in a
    workspace a group shares, whoever runs `dvc repro` after a crash resumes from them."""

    def on_save(self, args, state, control, **kwargs):  # type: ignore[override]
        weights_follow_umask(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


class StepTimer(TrainerCallback):
    """Seconds spent in optimizer steps only (not evaluation or checkpointing). On a GPU the
    clock is read once the queued kernels have run: otherwise a step's time is that of queuing
    them, and a short run overstates tokens/s."""

    def __init__(self, trainer: StageTrainer) -> None:
        self.trainer = trainer
        self.start = 0.0

    def now(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[override]
        self.start = self.now(args.device)

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[override]
        self.trainer.step_seconds += self.now(args.device) - self.start


def checkpoint_dir(family: str, *config: Any) -> Path:
    """One directory per configuration: a crashed run resumes, a changed experiment starts fresh.
    The number of processes is part of it: a step of 2 processes is not a step of one. Those of
    other configurations of `family` (an earlier experiment's, a crashed run's) are removed:
    nothing would ever resume from them."""
    folder = CHECKPOINTS / f"{family}-{fingerprint(*config, os.environ.get('WORLD_SIZE', '1'))}"
    if is_main_process():
        stale = [f for f in checkpoint_folders(family) if f.name.startswith(f"{family}-")]
        stale = [f for f in stale if f != folder]
        remove_checkpoints(stale, family, "of other configurations")
    return folder


def training_args(
    cfg: TrainingParams,
    seed: int,
    device: torch.device,
    mode: str | None,
    out: Path,
    n_train: int,
    launch: LaunchParams = LaunchParams(),
) -> TrainingArguments:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = launch.strategy == "fsdp" and world > 1
    steps_per_epoch = math.ceil(n_train / (cfg.batch_size * cfg.grad_accum * world))
    total = cfg.max_steps or math.ceil(steps_per_epoch * cfg.epochs)
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.batch_size,
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
        **{CHECKPOINTING: cfg.gradient_checkpointing},
        ddp_backend=None if launch.backend == "auto" else launch.backend,
        # A string: transformers 4.57 takes no bool here ("" is no FSDP in every version).
        fsdp="full_shard" if fsdp else "",
        fsdp_config=dict(FSDP_CONFIG) if fsdp else None,  # the Trainer adds its defaults
    )


def last_complete_checkpoint(out: Path) -> Path | None:
    """The latest checkpoint that was fully written. The Trainer writes trainer_state.json last,
    so a folder without it is one a crash (a SIGKILL, a lost node) interrupted mid-save."""
    complete = [
        path
        for path in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-").isdigit()
        and (path / TRAINER_STATE_NAME).is_file()
    ]
    return max(complete, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def train_resumable(trainer: StageTrainer, stage: str, keep_group: bool = False) -> torch.nn.Module:
    """Train, resuming from the last complete checkpoint of this configuration. Returns the
    trained model, whole on rank 0 (see `trained_model`). The checkpoints stay until the stage
    has written every output (`stage.execute` removes them): a crash while scoring or saving
    resumes at the last step instead of training again."""
    out = Path(trainer.args.output_dir)
    resume = last_complete_checkpoint(out)
    if resume:
        print(f"{stage}: resuming from {resume}")
    trainer.peak = matmul_peak(trainer.args.device, hidden_size(trainer.model), trainer.dtype)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.accelerator.wait_for_everyone()  # no process may still be writing a checkpoint
    model = trained_model(trainer)
    release(trainer)
    if not keep_group:  # a training whose result every rank still needs keeps it
        end_distributed()  # what follows (scoring, writing) is rank 0's alone
    return model


def trained_model(trainer: StageTrainer) -> torch.nn.Module:
    """The trained model as one process can use it: the model itself, or under FSDP a plain copy
    on rank 0 loaded with the gathered shards (every process must call this: it gathers)."""
    if not trainer.is_fsdp_enabled:
        # Without accelerate's mixed-precision forward: what follows (answers, an index) runs
        # in fp32, as a reload of the saved model would.
        return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    state = trainer.accelerator.get_state_dict(trainer.model)  # whole on rank 0, empty elsewhere
    if not trainer.is_world_process_zero():
        return trainer.model
    sharded = trainer.model
    plain = next(c for c in type(sharded).__mro__ if not issubclass(c, FSDPModule))
    model = plain.from_pretrained(
        None, config=sharded.config, state_dict=state, trust_remote_code=False, **WEIGHTS
    )
    if sharded.can_generate():
        model.generation_config = sharded.generation_config
    return model.to(trainer.args.device)


def release(trainer: StageTrainer) -> None:
    """Drop the optimizer's state and the cached GPU memory once training is over: the next
    phase of a stage (the reader after the retriever) must not share the device with them."""
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def throughput(
    stage: str, trainer: StageTrainer, flops_per_token: float | None, device: torch.device
) -> dict[str, float | None]:
    """Optimizer steps, real tokens trained on, seconds of optimizer steps, tokens/s, and MFU
    against the best matmul peak measured before and after training (None for a model whose
    FLOPs per token are not a constant the stage knows). MFU is never above 1: should training
    outrun every sample, the peak is at least the training speed and MFU is 1."""
    tokens_per_s = trainer.tokens_seen / max(trainer.step_seconds, 1e-9)
    line = f"{stage}: {trainer.tokens_seen} tokens in {trainer.step_seconds:.1f} s ="
    line += f" {tokens_per_s:.0f} tokens/s"
    out: dict[str, Any] = {
        "steps": trainer.state.global_step,
        "tokens": trainer.tokens_seen,
        "runtime_s": round(trainer.step_seconds, 2),
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": None,
    }
    if flops_per_token is not None:
        after = matmul_peak(device, hidden_size(trainer.model), trainer.dtype)
        peak = max([after, trainer.peak or after], key=lambda p: p.flops)
        achieved = flops_per_token * tokens_per_s
        out["mfu"] = round(min(achieved / peak.flops, 1.0), 4)
        out["peak"] = peak.describe()
        line += f"; MFU {out['mfu']:.3f} of {peak.describe()}"
        if achieved > peak.flops:
            line += ": training outran every sample, so the peak is at least its speed"
    print(line)
    return out


def hidden_size(model: torch.nn.Module) -> int | None:
    """The width of the model's layers, for a GEMM shaped like its MLP."""
    config = getattr(model, "config", None)
    return next(
        (v for k in ("hidden_size", "d_model", "n_embd") if (v := getattr(config, k, None))), None
    )


def write_curves(log_history: list[dict[str, Any]], plots_dir: Path) -> None:
    """Train and eval loss against step, as dvclive TSV files (no timestamps). Only the files
    dvclive writes are replaced: `plots_dir` may hold what is not ours."""
    shutil.rmtree(plots_dir / "plots" / "metrics", ignore_errors=True)
    (plots_dir / "metrics.json").unlink(missing_ok=True)
    with Live(dir=str(plots_dir), save_dvc_exp=False, dvcyaml=False) as live:
        for entry in log_history:
            live.step = entry["step"]
            if "loss" in entry:
                live.log_metric("train/loss", entry["loss"])
            if "eval_loss" in entry:
                live.log_metric("eval/loss", entry["eval_loss"])
