"""Stage `sft`: supervised fine-tuning of the causal LM on prompt/response pairs.

Each pair is rendered with the tokenizer's chat template (or, for a model without one such as
GPT-2, the `Human: {prompt}\\nAssistant: {response}<eos>` format, saved with the model as its chat
template so that generation uses the same format). The loss covers the response tokens only
(`completion_only_loss`); batches are grouped by length so that almost no compute goes to
padding, and the vocabulary projection runs on response positions only.

    python -m stages.sft --base output/sft_base --data output/data/sft --output output/sft \
        --metrics metrics/sft.json --plots metrics/sft --samples metrics/sft_samples.md
"""

from __future__ import annotations

import argparse
import re
import string
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
    set_seed,
)

from stages.data import file_digest, read_jsonl, write_text_atomic
from stages.launch import exit_process, is_main_process, relaunch
from stages.models import check_positions
from stages.params import LaunchParams, SftParams, load_stage_params
from stages.runtime import precision, resolve_device
from stages.training import (
    EpochSampler,
    LossParts,
    StageResult,
    StageTrainer,
    add_timings_option,
    checkpoint_dir,
    describe,
    perplexity,
    run_and_record,
    score,
    throughput,
    train_resumable,
    training_args,
    write_curves,
)

# The original spec's format, as a chat template, for tokenizers that have none (GPT-2).
HUMAN_ASSISTANT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


# --- formatting --------------------------------------------------------------------------------


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """Give the tokenizer the Human/Assistant template if it has none; say which one is used."""
    if tokenizer.chat_template:
        return "tokenizer chat template"
    tokenizer.chat_template = HUMAN_ASSISTANT_TEMPLATE
    return "Human/Assistant format"


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The prompt as the model sees it, up to where the answer starts."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens: the loss covers the response only
    truncated: bool


def encode(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> Example | None:
    """Tokenize one pair; None when truncation would leave no response token to learn."""
    head = prompt_text(tokenizer, prompt)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(head):
        raise ValueError(
            "the chat template renders the answer somewhere other than after the prompt"
        )
    prompt_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + response_ids)[:max_length]
    if len(input_ids) <= len(prompt_ids):
        return None
    labels = [-100] * len(prompt_ids) + response_ids
    return Example(input_ids, labels[:max_length], len(prompt_ids) + len(response_ids) > max_length)


def encode_all(
    tokenizer: PreTrainedTokenizerBase, records: list[dict[str, str]], max_length: int
) -> tuple[list[Example], int]:
    """Encoded examples and how many were truncated (dropped ones included)."""
    encoded = [encode(tokenizer, r["prompt"], r["response"], max_length) for r in records]
    kept = [e for e in encoded if e is not None]
    return kept, sum(e is None or e.truncated for e in encoded)


# --- batches -----------------------------------------------------------------------------------


class LengthGrouped(EpochSampler):
    """Batches of near-equal lengths, in random order, drawn afresh each epoch.

    Examples are shuffled, sorted by length within groups of 16 batches and cut into batches, so
    a batch pads to the length of its neighbours; the batches are then shuffled, so that long and
    short ones alternate through training. Only the last (partial) batch keeps its place, because
    the data loader cuts the order into batches itself.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        super().__init__(len(lengths), seed)
        self.lengths, self.batch_size = lengths, batch_size

    def order(self, generator: torch.Generator) -> list[int]:
        shuffled, step = super().order(generator), self.batch_size * 16
        by_length = [
            i
            for start in range(0, self.size, step)
            for i in sorted(shuffled[start : start + step], key=lambda i: -self.lengths[i])
        ]
        batches = [by_length[i : i + self.batch_size] for i in range(0, self.size, self.batch_size)]
        last = batches.pop() if batches and len(batches[-1]) < self.batch_size else []
        shuffled_batches = [batches[b] for b in torch.randperm(len(batches), generator=generator)]
        return [i for batch in [*shuffled_batches, last] for i in batch]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the batch's longest example; padding is masked from attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        pad = width - len(e.input_ids)
        batch["input_ids"].append(e.input_ids + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(e.input_ids) + [0] * pad)
        batch["labels"].append(e.labels + [-100] * pad)
    return {k: torch.tensor(v) for k, v in batch.items()}


def eval_batches(
    examples: list[Example], batch_size: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    return [
        collate(ordered[i : i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)
    ]


# --- loss and scores ---------------------------------------------------------------------------


def unwrap(model: PreTrainedModel) -> PreTrainedModel:
    """The causal LM inside a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def causal_loss(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> LossParts:
    """Next-token cross-entropy summed over response tokens.

    The decoder runs on every token, the vocabulary projection only on positions whose next
    token is a response token: prompt and padding positions never reach the 49k-way softmax.
    """
    inner = unwrap(model)
    hidden = inner.base_model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
    ).last_hidden_state
    targets = inputs["labels"][:, 1:]
    selected = targets != -100
    logits = inner.get_output_embeddings()(hidden[:, :-1][selected])
    targets = targets[selected]
    return LossParts(
        loss_sum=F.cross_entropy(logits.float(), targets, reduction="sum"),
        predicted=selected.sum(),
        correct=(logits.argmax(-1) == targets).sum(),
    )


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return float(pred == ref)
    precision_, recall = common / len(pred), common / len(ref)
    return 2 * precision_ * recall / (precision_ + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure over lower-cased alphanumeric tokens (longest common subsequence)."""
    pred = re.findall(r"[a-z0-9]+", prediction.lower())
    ref = re.findall(r"[a-z0-9]+", reference.lower())
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for p in pred:
        current = [0]
        for j, r in enumerate(ref):
            current.append(previous[j] + 1 if p == r else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(pred) + len(ref))


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy answers to `prompts`, batched with left padding."""
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [prompt_text(tokenizer, p) for p in prompts[i : i + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **batch.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            answers += [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batches: list[dict[str, torch.Tensor]],
    records: list[dict[str, str]],
    cfg: SftParams,
) -> tuple[dict[str, float], list[str]]:
    """Response-token loss, perplexity and accuracy, then greedy-generation F1 and ROUGE-L."""
    loss, accuracy = score(causal_loss, model, batches)
    answers = generate(
        model, tokenizer, [r["prompt"] for r in records], cfg.max_new_tokens, cfg.batch_size
    )
    refs = [r["response"] for r in records]
    n = max(len(refs), 1)
    return {
        "eval_loss": round(loss, 6),
        "perplexity": round(perplexity(loss), 4),
        "token_accuracy": round(accuracy, 6),
        "gen_f1": round(sum(map(token_f1, answers, refs)) / n, 6),
        "gen_rougeL": round(sum(map(rouge_l, answers, refs)) / n, 6),
    }, answers


# --- stage -------------------------------------------------------------------------------------


def with_lora(model: PreTrainedModel, cfg: SftParams) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model  # optional: only LoRA runs need peft

    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def flops_per_token(model: PreTrainedModel, response_share: float, lora: bool) -> float:
    """6 N per token for full fine-tuning (4 N with LoRA: frozen weights get no gradient), N the
    non-embedding parameters, plus the vocabulary projection on the response share of tokens."""
    inner = unwrap(model)
    head = inner.get_output_embeddings().weight.numel()
    factor = 4.0 if lora else 6.0
    return factor * (inner.num_parameters(exclude_embeddings=True) + response_share * head)


def make_trainer(
    model: PreTrainedModel,
    args: TrainingArguments,
    train: list[Example],
    batches: list[dict[str, torch.Tensor]],
    pad_id: int,
) -> StageTrainer:
    """The SFT trainer: response-only loss, length-grouped batches, held-out loss as eval."""
    return StageTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=batches,  # the Trainer wants one; StageTrainer scores it with eval_fn
        data_collator=lambda examples: collate(examples, pad_id),
        loss_fn=causal_loss,
        eval_fn=lambda m: {"eval_loss": score(causal_loss, m, batches)[0]},
        sampler=LengthGrouped(
            [len(e.input_ids) for e in train], args.per_device_train_batch_size, args.seed
        ),
    )


def samples_markdown(
    records: list[dict[str, str]], base: list[str], final: list[str], count: int
) -> str:
    parts = ["# SFT samples: greedy answers to held-out prompts", ""]
    for r, b, f in list(zip(records, base, final, strict=True))[:count]:
        parts += [
            f"## {r['prompt']}",
            "",
            f"**Reference:** {r['response']}",
            "",
            f"**Base model:** {b}",
            "",
            f"**Fine-tuned:** {f}",
            "",
        ]
    return "\n".join(parts)


def run(
    cfg: SftParams,
    seed: int,
    device_name: str,
    fp16: str,
    args: argparse.Namespace,
    launch: LaunchParams = LaunchParams(),
) -> StageResult | None:
    """Fine-tune, save the model and the samples; return metrics and timings (None on the ranks
    other than 0 of a distributed run, which train but write nothing)."""
    main_process = is_main_process()
    set_seed(seed)
    device = resolve_device(device_name)
    mode = precision(fp16, device)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    template = ensure_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.base, use_safetensors=True).to(device)
    check_positions(model, cfg.max_length, "sft.max_length")

    train_records = read_jsonl(args.data / "train.jsonl")
    eval_records = read_jsonl(args.data / "eval.jsonl")
    train, truncated = encode_all(tokenizer, train_records, cfg.max_length)
    held_out, _ = encode_all(tokenizer, eval_records, cfg.max_length)
    batches = eval_batches(held_out, cfg.batch_size, tokenizer.pad_token_id)
    print(
        f"sft: {args.base} with the {template}: {len(train)} train / {len(held_out)} eval examples,"
        f" {truncated} truncated to {cfg.max_length} tokens; {device} ({mode or 'fp32'})"
        + (f", LoRA r={cfg.lora_r}" if cfg.lora_r else ", full fine-tune")
    )
    if main_process:
        base, base_answers = evaluate(model, tokenizer, batches, eval_records, cfg)
        print(describe("sft", "base", base))

    if cfg.lora_r:
        model = with_lora(model, cfg)
    data_digest = file_digest(args.data / "train.jsonl")
    checkpoints = checkpoint_dir(
        "sft", asdict(cfg), seed, device_name, fp16, launch.strategy, data_digest
    )
    args_ = training_args(cfg, seed, device, mode, checkpoints, len(train), launch)
    trainer = make_trainer(model, args_, train, batches, tokenizer.pad_token_id)
    model = train_resumable(trainer, "sft")
    if not main_process:
        return None
    share = trainer.predicted_seen / max(trainer.tokens_seen, 1)
    flops = flops_per_token(model, share, lora=bool(cfg.lora_r))
    if cfg.lora_r:
        model = model.merge_and_unload()  # a plain model: loads without peft

    final, final_answers = evaluate(model, tokenizer, batches, eval_records, cfg)
    print(describe("sft", "final", final))
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    write_curves(trainer.state.log_history, args.plots)
    write_text_atomic(
        args.samples, samples_markdown(eval_records, base_answers, final_answers, cfg.samples)
    )
    speed = throughput("sft", trainer, flops, device)
    return StageResult(
        {"base": base, "final": final, "train": {"truncated": truncated}},
        {"train": {"response_tokens": trainer.predicted_seen, **speed}},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="model directory to fine-tune")
    parser.add_argument("--data", type=Path, required=True, help="directory with train/eval.jsonl")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    parser.add_argument("--samples", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    add_timings_option(parser, "sft")
    args = parser.parse_args(argv)

    params = load_stage_params(args.params, "sft")
    if (status := relaunch(params.launch, params.device, "stages.sft", argv)) is not None:
        return status
    return run_and_record(
        "sft",
        lambda: run(params.sft, params.seed, params.device, params.fp16, args, params.launch),
        args.metrics,
        args.timings,
    )


if __name__ == "__main__":
    exit_process(main())
