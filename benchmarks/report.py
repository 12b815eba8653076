"""The tables the original-models benchmark prints: memory and speed per run, the RAG stage's
latency, and the few notes that depend on what ran. What the columns mean, and the measured
figures, are in docs/original-models.md."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import GPT2Config

from benchmarks.measure import Usage
from benchmarks.stand_ins import GPT2_VOCAB


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


def notes(runs: list[Run], device: str, fp16: str) -> list[str]:
    """What depends on the runs: the stand-ins' sizes, empty answers, this machine."""
    lines = []
    gpt2 = next((r for r in runs if r.model.startswith("gpt2")), None)
    if gpt2:
        real = gpt2.params + (GPT2_VOCAB - gpt2.vocab) * GPT2Config().n_embd
        lines.append(
            f"gpt2 stand-in: {gpt2.vocab}-token vocabulary instead of GPT-2's {GPT2_VOCAB},"
            f" {gpt2.params:,} parameters vs gpt2's {real:,} ({(real - gpt2.params) / real:.1%}"
            " fewer)."
        )
    rag = next((r for r in runs if r.name.startswith("rag-")), None)
    if rag and rag.ctx_encoder_params is not None:
        lines.append(
            f"rag-sequence-nq stand-in: {rag.params:,} parameters, plus the"
            f" {rag.ctx_encoder_params / 1e6:.1f}M DPR context encoder (inference only)."
        )
    if rag and rag.empty_answers is not None:
        empty, total = rag.empty_answers
        lines.append(f"{empty} of {total} RAG answers are empty (random weights).")
    lines.append(
        f"All weights random. torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs,"
        f" device {device}, fp16 {fp16} (params.yaml). Columns: docs/original-models.md."
    )
    return lines
