"""Memory and speed of the CPT, SFT and RAG stages with models of the original spec's sizes.

These are bert-base-uncased, gpt2 (124M) and, for the RAG stage's `rag-sequence` backend, the
facebook/rag-sequence-nq that its params.yaml names; each stage runs a few optimizer steps with
them.

The weights cannot be downloaded here, so the models are built with random weights from the
architectures' default configs, which are those models exactly: `BertConfig()` is bert-base
(12 layers, hidden 768, 30522 word pieces) and is saved with the bundled MiniLM tokenizer, which
has bert-base-uncased's vocabulary; `GPT2Config()` is gpt2 small (12 layers, hidden 768, 1024
positions) but is saved with the bundled SmolLM2 byte-level BPE tokenizer, as no GPT-2 tokenizer is
available offline. That vocabulary has 49152 tokens instead of GPT-2's 50257, so the model has
0.85M parameters (0.7 %) fewer than gpt2 and its memory is within ~1 % of the real one's. The
tokenizer is made to look like GPT-2's: <|endoftext|> as its only special token (end of text,
beginning and unknown), no pad token and no chat template, so the SFT stage pads with end of text
and trains on its `Human:/Assistant:` format, as it would for gpt2.

The RAG phase runs `stages.rag build` with `rag.backend: rag-sequence` on a model of
facebook/rag-sequence-nq's size: `RagConfig.from_question_encoder_generator_configs(DPRConfig(),
BartConfig(), ...)`, a DPR question encoder (bert-base without pooler, 109M) and a bart-large
generator (406M, vocabulary 50265), 515M parameters, with `max_combined_length` 300 as
rag-sequence-nq; the DPR context encoder that embeds the knowledge base is
`DPRContextEncoder(DPRConfig())` (109M, not trained). The question and context tokenizers are the
bundled MiniLM one (bert-base-uncased's vocabulary, which is DPR's). No BART tokenizer is available
offline, so the generator's is SmolLM2's byte-level BPE (49152 tokens) set up like BART's: bos id
0, pad id 1, eos id 2 and every text wrapped as `bos text eos`. Its tokenization differs from
BART's (answers and questions split into other token counts, and embedding rows 49152-50264 are
never used), but the model keeps bart-large's exact size and the generator's input,
` / passage // question`, is padded to max_combined_length tokens per retrieved document either
way, so the encoder work of a step is the same as with BART's tokenizer. `rag.retriever_epochs` is
set so that the train questions make `--rag-steps` optimizer steps (default: `--steps`). On 2 idle
CPU cores a step of 4 questions takes ~35 s and the rest of the stage ~8 min whatever the steps
(embedding the knowledge base, the held-out marginal loss at the end, answering the held-out
questions with short generations), so a 6-step run takes ~12 min; batch 8 is not run by default, as
it would add as much again.

Each stage runs as its real entry point (`python -m stages.<stage>`), in a subprocess whose working
directory is a temporary project: data validated there by `stages.validate`, and params.yaml as the
project's with the model replaced, `max_steps` set, eval_steps/save_steps beyond it (the Trainer
still evaluates and checkpoints once at the last step) and short generations. Per run it reports
the child's peak resident memory (host RAM, from wait4's rusage; on a GPU the weights and
activations live elsewhere and are not measured), its wall time (loading, base and final
evaluation, greedy generation and saving included), the training tokens/s (CPT, SFT) and seconds
per optimizer step that the stage writes to its timings file (optimizer steps only; the first
step's warm-up weighs on a few-step run), and the share of the CPUs that other processes took
meanwhile, which makes a speed measured on a busy machine visible as such. For RAG it also
reports the stage's latency figures: knowledge-base entries embedded per second, and the median
retrieval and answer time of one held-out question.

    python benchmarks/original_models.py [--phases cpt sft rag] [--steps 6] [--rag-steps 6]
        [--cpt-batches 16] [--sft-batches 8 4] [--rag-batches 4] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tokenizers import processors
from transformers import (
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    DPRConfig,
    DPRContextEncoder,
    DPRQuestionEncoder,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerBase,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenizer,
)
from transformers.utils import logging as hf_logging

from stages.models import load_tokenizer, resolve_model

ROOT = Path(__file__).resolve().parent.parent
GPT2_VOCAB = 50257  # the real gpt2's vocabulary, for the parameter-count note
GPT2_END_OF_TEXT = "<|endoftext|>"  # GPT-2's one special token; SmolLM2's vocabulary has it too
NEVER = 10**6  # eval/save interval that a few-step run never reaches
SFT_GENERATION = {"max_new_tokens": 8, "samples": 2}  # base and final answers stay cheap
# facebook/rag-sequence-nq's RAG settings: DPR's 768-dimensional vectors, the generator's input
# (title / passage // question) padded to 300 tokens per document, 5 documents (the stage sets
# n_docs to rag.top_k)
RAG_NQ = {"retrieval_vector_size": 768, "max_combined_length": 300, "n_docs": 5}
# BART's special tokens by id (bos 0, pad 1, eos 2), played by SmolLM2's first three tokens
BART_LIKE_SPECIALS = {"bos": "<|endoftext|>", "pad": "<|im_start|>", "eos": "<|im_end|>"}
RAG_MAX_NEW_TOKENS = 4  # answering the held-out questions stays cheap


@dataclass
class Usage:
    """What running one child process cost."""

    status: int  # exit status
    wall_s: float
    peak_rss_gib: float
    other_cpu: float | None  # share of all CPUs busy with other work meanwhile (None: unknown)


@dataclass
class Run:
    """One stage run and what was measured on it."""

    name: str
    model: str
    params: int
    vocab: int
    batch: str  # sequences x tokens per sequence, as configured
    steps: int | None
    usage: Usage | None = None
    tokens_per_step: float | None = None
    tokens_per_s: float | None = None
    s_per_step: float | None = None
    latency: dict[str, float] | None = None  # the RAG stage's latency figures
    stage_s: float | None = None  # the stage's own time, from its timings file
    ctx_encoder_params: int | None = None  # RAG: the DPR context encoder, not in `params`
    empty_answers: tuple[int, int] | None = None  # RAG: (empty, all) answers with passages


# --- models ------------------------------------------------------------------------------------


def build_bert(path: Path) -> tuple[int, int]:
    """bert-base-uncased's architecture with random weights and its tokenizer; the parameters and
    the vocabulary size."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("bundled:minilm-l6").path)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig())
    if len(tokenizer) != model.config.vocab_size:
        raise SystemExit(f"MiniLM tokenizer has {len(tokenizer)} tokens, bert-base 30522")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.num_parameters(), model.config.vocab_size


def gpt2_like_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's byte-level BPE with GPT-2's special-token setup: end of text only, no pad token,
    no chat template."""
    tokenizer = load_tokenizer(resolve_model("bundled:smollm2-135m-instruct"))
    tokenizer.eos_token = tokenizer.bos_token = tokenizer.unk_token = GPT2_END_OF_TEXT
    tokenizer.pad_token = None
    tokenizer.chat_template = None
    return tokenizer


def build_gpt2(path: Path) -> tuple[int, int]:
    """gpt2 small's architecture with random weights, on the GPT-2-like tokenizer; the parameters
    and the vocabulary size. Only the vocabulary (and so the end-of-text id) differs from gpt2's."""
    tokenizer = gpt2_like_tokenizer()
    eot = tokenizer.convert_tokens_to_ids(GPT2_END_OF_TEXT)
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.num_parameters(), config.vocab_size


def minilm_tokenizer(vocab_size: int) -> PreTrainedTokenizerBase:
    """The bundled MiniLM tokenizer: bert-base-uncased's vocabulary, which DPR's encoders use."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("bundled:minilm-l6").path)
    if len(tokenizer) != vocab_size:
        raise SystemExit(f"MiniLM tokenizer has {len(tokenizer)} tokens, the model {vocab_size}")
    return tokenizer


def bart_like_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's byte-level BPE with BART's special-token layout: bos 0, pad 1, eos 2, no chat
    template, and every text wrapped as `bos text eos` (pairs as BART's `bos A eos eos B eos`)."""
    tokenizer = load_tokenizer(resolve_model("bundled:smollm2-135m-instruct"))
    bos, pad, eos = (BART_LIKE_SPECIALS[k] for k in ("bos", "pad", "eos"))
    ids = tokenizer.convert_tokens_to_ids([bos, pad, eos])
    if ids != [0, 1, 2]:
        raise SystemExit(f"SmolLM2's {bos}, {pad}, {eos} have ids {ids}, BART's layout 0, 1, 2")
    tokenizer.bos_token, tokenizer.pad_token, tokenizer.eos_token = bos, pad, eos
    tokenizer.unk_token = bos  # byte-level BPE never produces it; BART has its own at id 3
    tokenizer.chat_template = None
    tokenizer.padding_side = "right"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, 0), (eos, 2)],
    )
    return tokenizer


def check_generator_tokenizer(path: Path) -> None:
    """The saved generator tokenizer, as the stage loads it, wraps texts like BART's."""
    generator = RagTokenizer.from_pretrained(path).generator
    ids = generator("a b")["input_ids"]
    layout = (generator.bos_token_id, generator.pad_token_id, generator.eos_token_id)
    if ids[0] != 0 or ids[-1] != 2 or layout != (0, 1, 2):
        raise SystemExit(f"generator tokenizer is not BART-like: 'a b' -> {ids}, ids {layout}")


def build_rag(path: Path) -> tuple[int, int]:
    """facebook/rag-sequence-nq's architecture with random weights (DPR question encoder and
    bart-large generator) and its two tokenizers; the parameters and the generator's
    vocabulary size."""
    config = RagConfig.from_question_encoder_generator_configs(DPRConfig(), BartConfig(), **RAG_NQ)
    questions = minilm_tokenizer(config.question_encoder.vocab_size)
    torch.manual_seed(0)
    model = RagSequenceForGeneration(
        config,
        question_encoder=DPRQuestionEncoder(config.question_encoder),
        generator=BartForConditionalGeneration(config.generator),
    )
    model.save_pretrained(path)
    RagTokenizer(question_encoder=questions, generator=bart_like_tokenizer()).save_pretrained(path)
    check_generator_tokenizer(path)
    return model.num_parameters(), config.generator.vocab_size


def build_dpr_ctx(path: Path) -> int:
    """The DPR context encoder (bert-base) with random weights and its tokenizer; parameters."""
    config = DPRConfig()
    tokenizer = minilm_tokenizer(config.vocab_size)
    torch.manual_seed(1)
    model = DPRContextEncoder(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.num_parameters()


# --- project and subprocesses ------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The working tree's stages, whatever is installed; never the hub."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine spent busy since boot, steal time included (Linux)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = values[3] + values[4]  # idle and iowait
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


def run_child(command: Sequence[str], cwd: Path, log: Path) -> Usage:
    """Run `command` with its output to `log`, and measure it.

    os.wait4 gives the rusage of this one child (RUSAGE_CHILDREN would be the maximum over every
    child reaped so far). The machine's busy time minus the child's CPU time tells how much other
    processes took from it: speeds are comparable only where that share is near 0."""
    busy_before, start = busy_cpu_seconds(), time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, cwd=cwd, env=child_env(), stdout=out, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    wall, busy_after = time.perf_counter() - start, busy_cpu_seconds()
    other = None
    if busy_before is not None and busy_after is not None:
        child_cpu = usage.ru_utime + usage.ru_stime
        other = max(busy_after - busy_before - child_cpu, 0.0) / (wall * (os.cpu_count() or 1))
    if proc.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        print(f"FAILED ({proc.returncode}): {' '.join(command)}\n{tail}\n", file=sys.stderr)
    return Usage(proc.returncode, wall, usage.ru_maxrss / 2**20, other)  # maxrss in KiB (Linux)


def stage(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"stages.{module}", *args]


def validate(project: Path, dataset: str, source: str, output: str) -> None:
    """Validate the project's data file into the temporary project, as dvc.yaml does."""
    usage = run_child(
        stage(
            "validate",
            dataset,
            f"--input={ROOT / 'data' / source}",
            f"--output={project / output}",
            f"--metrics={project / 'metrics/validate' / dataset}.json",
            f"--report={project / 'metrics/validate' / dataset}.md",
            f"--params={ROOT / 'params.yaml'}",
        ),
        project,
        project / f"validate_{dataset}.log",
    )
    if usage.status:
        raise SystemExit(f"validate {dataset} failed: see above")


def project_params() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def write_params(project: Path, name: str, section: str, overrides: dict[str, Any]) -> Path:
    """The project's params.yaml with `overrides` in `section`."""
    params = project_params()
    params[section] = {**params[section], **overrides}
    path = project / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def run_outputs(project: Path, name: str, params: Path) -> tuple[list[str], Path]:
    """The arguments every measured run passes its stage (what it writes, its params), and the
    timings file among them."""
    timings = project / f"timings/{name}.json"
    args = [
        f"--output={project / 'output' / name}",
        f"--metrics={project / 'metrics' / name}.json",
        f"--plots={project / 'metrics' / name}",
        f"--params={params}",
        f"--timings={timings}",
    ]
    return args, timings


def measure(run: Run, project: Path, command: list[str], timings: Path | None) -> Run:
    print(f"running {run.name} ...", flush=True)
    run.usage = run_child(command, project, project / f"{run.name}.log")
    if timings and not run.usage.status:
        recorded = json.loads(timings.read_text())
        train = recorded["train"]
        run.steps = train.get("steps", run.steps)  # the RAG stage reports the steps it made
        steps = max(run.steps or 1, 1)
        run.s_per_step = train["runtime_s"] / steps
        if "tokens_per_s" in train:
            run.tokens_per_s = train["tokens_per_s"]
            run.tokens_per_step = train["tokens"] / steps
        run.latency = recorded.get("latency")
        run.stage_s = recorded.get("stage_s")
    return run


def training_overrides(model: Path, steps: int, batch: int) -> dict[str, Any]:
    return {
        "model": str(model),
        "batch_size": batch,
        "grad_accum": 1,
        "max_steps": steps,
        "eval_steps": NEVER,
        "save_steps": NEVER,
    }


# --- phases ------------------------------------------------------------------------------------


def cpt_runs(project: Path, steps: int, batches: list[int]) -> list[Run]:
    validated(project, "pretrain", "pretrain.txt", "output/data/pretrain.txt")
    model = project / "models/bert-base-uncased"
    n_params, vocab = build_bert(model)
    max_length = project_params()["cpt"]["max_length"]
    runs = []
    for batch in batches:
        name = f"cpt-b{batch}"
        params = write_params(project, name, "cpt", training_overrides(model, steps, batch))
        outputs, timings = run_outputs(project, name, params)
        command = stage("cpt", f"--data={project / 'output/data/pretrain.txt'}", *outputs)
        run = Run(name, "bert-base (random)", n_params, vocab, f"{batch} x {max_length}", steps)
        runs.append(measure(run, project, command, timings))
    return runs


def validated(project: Path, dataset: str, source: str, output: str) -> None:
    """`validate`, unless an earlier phase already did."""
    if not (project / output).exists():
        validate(project, dataset, source, output)


def sft_runs(project: Path, steps: int, batches: list[int]) -> list[Run]:
    validate(project, "sft", "sft.jsonl", "output/data/sft")
    model = project / "models/gpt2"
    n_params, vocab = build_gpt2(model)
    max_length = project_params()["sft"]["max_length"]
    base = project / "output/sft_base"
    params = write_params(project, "sft_base", "sft", {"model": str(model)})
    export = Run("sft_base", "gpt2 (random)", n_params, vocab, "-", None)
    command = stage("sft_base", f"--output={base}", f"--params={params}")
    runs = [measure(export, project, command, None)]
    if export.usage is None or export.usage.status:
        return runs
    for batch in batches:
        name = f"sft-b{batch}"
        overrides = {**training_overrides(model, steps, batch), **SFT_GENERATION}
        params = write_params(project, name, "sft", overrides)
        outputs, timings = run_outputs(project, name, params)
        command = stage(
            "sft",
            f"--base={base}",
            f"--data={project / 'output/data/sft'}",
            f"--samples={project / 'metrics' / name}-samples.md",
            *outputs,
        )
        run = Run(name, "gpt2 (random)", n_params, vocab, f"{batch} x {max_length} max", steps)
        runs.append(measure(run, project, command, timings))
    return runs


def rag_epochs(n_train: int, batch: int, steps: int) -> float:
    """rag.retriever_epochs that make `steps` optimizer steps of `batch` questions: the stage
    (and the Trainer) take ceil(ceil(n_train / batch) * epochs) steps. Half a step below the
    target keeps float rounding from adding one."""
    per_epoch = math.ceil(n_train / batch)
    epochs = (steps - 0.5) / per_epoch
    if math.ceil(per_epoch * epochs) != steps:
        raise SystemExit(f"retriever_epochs {epochs} would not make {steps} steps")
    return epochs


def rag_runs(project: Path, steps: int, batches: list[int]) -> list[Run]:
    validated(project, "pretrain", "pretrain.txt", "output/data/pretrain.txt")
    validated(project, "rag", "rag.jsonl", "output/data/rag")
    data = project / "output/data/rag"
    n_train = len((data / "train.jsonl").read_text(encoding="utf-8").splitlines())
    model, ctx_encoder = project / "models/rag-sequence-nq", project / "models/dpr-ctx_encoder"
    print("building the RAG model and the DPR context encoder ...", flush=True)
    n_params, vocab = build_rag(model)
    n_ctx = build_dpr_ctx(ctx_encoder)
    top_k = project_params()["rag"]["top_k"]
    runs = []
    for batch in batches:
        name = f"rag-b{batch}"
        overrides = {
            "backend": "rag-sequence",
            "model": str(model),
            "ctx_encoder": str(ctx_encoder),
            "retriever_batch_size": batch,
            "retriever_epochs": rag_epochs(n_train, batch, steps),
            "max_new_tokens": RAG_MAX_NEW_TOKENS,
        }
        params = write_params(project, name, "rag", overrides)
        outputs, timings = run_outputs(project, name, params)
        command = stage(
            "rag",
            "build",
            f"--cpt={project / 'output/cpt'}",  # not read by the rag-sequence backend
            f"--sft={project / 'output/sft'}",
            f"--data={data}",
            f"--pretrain={project / 'output/data/pretrain.txt'}",
            f"--predictions={project / 'metrics' / name}-predictions.jsonl",
            *outputs,
        )
        shape = f"{batch} q x {top_k} docs x {RAG_NQ['max_combined_length']}"
        run = Run(name, "rag-sequence-nq (random)", n_params, vocab, shape, steps)
        run.ctx_encoder_params = n_ctx
        runs.append(measure(run, project, command, timings))
        predictions = project / f"metrics/{name}-predictions.jsonl"
        if run.usage is not None and not run.usage.status and predictions.is_file():
            lines = predictions.read_text(encoding="utf-8").splitlines()
            answers = [json.loads(line)["rag"]["answer"] for line in lines]
            run.empty_answers = (sum(not a.strip() for a in answers), len(answers))
    return runs


# --- report ------------------------------------------------------------------------------------


def table(runs: list[Run]) -> str:
    rows = [
        "| run | model | parameters | batch x tokens | steps | peak RSS GiB | wall s"
        " | tokens/step | train tokens/s | s/step | other CPU |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        u = r.usage
        if u is None or u.status:
            cells = ["failed", "exit -" if u is None else f"exit {u.status}", "", "", "", ""]
        else:
            cells = [
                f"{u.peak_rss_gib:.2f}",
                f"{u.wall_s:.0f}",
                "-" if r.tokens_per_step is None else f"{r.tokens_per_step:.0f}",
                "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.0f}",
                "-" if r.s_per_step is None else f"{r.s_per_step:.2f}",
                "?" if u.other_cpu is None else f"{u.other_cpu:.0%}",
            ]
        steps = "-" if r.steps is None else str(r.steps)
        rows.append(
            f"| {r.name} | {r.model} | {r.params / 1e6:.1f}M | {r.batch} | {steps} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(rows)


def latency_table(runs: list[Run]) -> str | None:
    """The RAG stage's latency figures, for the runs that report them."""
    measured = [r for r in runs if r.latency]
    if not measured:
        return None
    rows = [
        "| run | KB entries embedded/s | retrieve ms p50 | answer ms p50 | stage s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in measured:
        lat = r.latency or {}
        cells = [
            lat.get("embed_passages_per_s"),
            lat.get("retrieve_ms_p50"),
            lat.get("answer_ms_p50"),
            r.stage_s,
        ]
        rows.append(
            f"| {r.name} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |"
        )
    return "\n".join(rows)


def rag_notes(rag: Run) -> list[str]:
    params = project_params()["rag"]
    ctx = "?" if rag.ctx_encoder_params is None else f"{rag.ctx_encoder_params / 1e6:.1f}M"
    lines = [
        f"rag-sequence-nq here: DPR question encoder (bert-base) + bart-large generator,"
        f" {rag.params:,} parameters, random weights; the DPR context encoder ({ctx}, bert-base)"
        " embeds the knowledge base once, is not trained and is not in 'parameters'. Its"
        f" generator tokenizer is SmolLM2's byte-level BPE (49152 tokens, BART's bos 0 / pad 1 /"
        f" eos 2, `bos text eos`), not BART's: tokenization differs from BART's (other answer"
        f" lengths; embedding rows 49152-{rag.vocab - 1} unused), but the model is bart-large's"
        f" exact size and the generator's input is padded to max_combined_length"
        f" {RAG_NQ['max_combined_length']} tokens per document either way.",
        f"A RAG step: retriever_batch_size questions x top_k {params['top_k']} retrieved"
        " documents (the stage sets n_docs to rag.top_k) through the generator, marginal"
        " likelihood; rag.retriever_epochs is set to make --rag-steps steps. Besides the steps,"
        " wall s holds embedding the knowledge base, base and fine-tuned retrieval, the held-out"
        " marginal loss (every 10 steps and at the end), the last step's checkpoint (model and"
        " AdamW state), saving and reloading the model, and answering each held-out question"
        f" closed-book and with RAG-sequence decoding (max_new_tokens {RAG_MAX_NEW_TOKENS});"
        " latency: entries embedded/s by the context encoder, median retrieval and answer time"
        " of one question.",
    ]
    if rag.empty_answers is not None:
        empty, total = rag.empty_answers
        lines.append(
            f"{empty} of {total} RAG answers are empty: the random generator gives end of text or"
            " ids past SmolLM2's vocabulary (which decode to nothing); where it ends at once,"
            " decoding stops early and answer ms is mostly the generator's encoder on the"
            " documents and RAG-sequence's rescoring of the candidates, less than trained"
            " weights would take."
        )
    return lines


def notes(runs: list[Run]) -> list[str]:
    lines = []
    gpt2 = next((r for r in runs if r.model.startswith("gpt2")), None)
    if gpt2:
        real = gpt2.params + (GPT2_VOCAB - gpt2.vocab) * GPT2Config().n_embd
        lines.append(
            f"gpt2 here has a {gpt2.vocab}-token vocabulary (SmolLM2's byte-level BPE) instead of"
            f" GPT-2's {GPT2_VOCAB}: {gpt2.params:,} parameters vs gpt2's {real:,}"
            f" ({(real - gpt2.params) / real:.1%} fewer). All weights are random."
        )
    if any(r.name.startswith("sft-") for r in runs):
        lines.append(
            "SFT batches are padded to their longest example, not to max_length: tokens/step"
            " (non-padding) is what a step of the project's data holds."
        )
    rag = next((r for r in runs if r.name.startswith("rag-")), None)
    if rag:
        lines += rag_notes(rag)
    params = project_params()
    lines += [
        "Peak RSS: the stage process's host memory (model, optimizer state, activations on a"
        " CPU). Wall s: the whole stage (loading, base and final evaluation, generation,"
        " saving). Tokens/s and s/step: over optimizer steps only (tokens: non-padding; the RAG"
        " stage reports no tokens). Other CPU: share of"
        " the machine's CPUs that other processes (or the hypervisor) took during the run; speeds"
        " measured while it is well above 0 are low.",
        f"torch threads {torch.get_num_threads()}, device {params.get('device', 'auto')},"
        f" fp16 {params.get('fp16', 'auto')} (params.yaml), {os.cpu_count()} CPUs.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    phases = ["cpt", "sft", "rag"]
    parser.add_argument("--phases", nargs="+", choices=phases, default=phases)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per CPT/SFT run")
    parser.add_argument(
        "--rag-steps", type=int, default=None, help="optimizer steps per RAG run (default: --steps)"
    )
    parser.add_argument("--cpt-batches", nargs="+", type=int, default=[16])
    parser.add_argument("--sft-batches", nargs="+", type=int, default=[8, 4])
    parser.add_argument(
        "--rag-batches", nargs="+", type=int, default=[4], help="rag.retriever_batch_size"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary project")
    args = parser.parse_args()
    if args.rag_steps is None:
        args.rag_steps = args.steps
    if args.steps < 1 or args.rag_steps < 1:
        parser.error("--steps and --rag-steps must be >= 1")

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    project = Path(tempfile.mkdtemp(prefix="bench-original-"))
    runs: list[Run] = []
    try:
        if "cpt" in args.phases:
            runs += cpt_runs(project, args.steps, args.cpt_batches)
        if "sft" in args.phases:
            runs += sft_runs(project, args.steps, args.sft_batches)
        if "rag" in args.phases:
            runs += rag_runs(project, args.rag_steps, args.rag_batches)
    finally:
        if args.keep:
            print(f"temporary project kept in {project}")
        else:
            shutil.rmtree(project, ignore_errors=True)
    print()
    print(table(runs))
    print()
    if (latency := latency_table(runs)) is not None:
        print(latency)
        print()
    for line in notes(runs):
        print(f"- {line}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
