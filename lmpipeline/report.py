"""The key metrics of every stage as one short table (the `report` stage), and this machine's
timings beside them (printed by `make repro`, never written to a DVC output)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Row = tuple[str, str, str]  # stage, metric, value


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def change(before: float, after: float) -> str:
    return f"{before:.3f} → {after:.3f}"


def validate_rows(metrics: Path) -> list[Row]:
    rows = []
    for name in ("pretrain", "sft", "rag"):
        m = read_json(metrics / "validate" / f"{name}.json")
        if m is not None:
            split = f" ({m['train']} train / {m['eval']} held out)" if "eval" in m else ""
            rows.append((f"validate_{name}", "records", f"{m['records']}{split}"))
    return rows


def cpt_rows(m: dict[str, Any]) -> list[Row]:
    base, final = m["base"], m["final"]
    rows = [
        ("cpt", "held-out MLM loss", change(base["eval_loss"], final["eval_loss"])),
        ("cpt", "mask accuracy", change(base["mask_accuracy"], final["mask_accuracy"])),
    ]
    if "train_question_mrr" in final:
        mrr = change(base["train_question_mrr"], final["train_question_mrr"])
        rows.append(("cpt", "train-question MRR, as is", mrr))
    return rows


def cpt_lm_rows(m: dict[str, Any]) -> list[Row]:
    if not m["enabled"]:
        return [("cpt_lm", "generator", "not adapted (cpt_lm.enabled: false)")]
    base, final = m["base"], m["final"]
    return [("cpt_lm", "held-out perplexity", change(base["perplexity"], final["perplexity"]))]


def sft_rows(m: dict[str, Any]) -> list[Row]:
    if not m.get("enabled", True):
        return [("sft", "generator", "not fine-tuned (sft.enabled: false)")]
    base, final = m["base"], m["final"]
    return [
        ("sft", "held-out loss", change(base["eval_loss"], final["eval_loss"])),
        ("sft", "answer F1", change(base["gen_f1"], final["gen_f1"])),
    ]


def used_retriever(m: dict[str, Any]) -> str:
    """What the system retrieves with: the first stage chosen, and the reranker if used."""
    chosen = m.get("retriever", {"used": "dense", "fusion_weight": None})
    used = chosen["used"]
    if chosen["fusion_weight"] is not None:
        used += f" (dense weight {chosen['fusion_weight']})"
    return used + (" + reranker" if m.get("rerank", {}).get("used") else "")


def start_rows(m: dict[str, Any]) -> list[Row]:
    """Which encoder the retriever was fine-tuned from, in words where CPT's went unused."""
    start = m.get("start")
    if start is None:  # rag-sequence: no CPT encoder involved
        return []
    after = start.get("fine_tuned_mrr")
    why = (
        f"fine-tuned, MRR on held-apart train questions: cpt {after['cpt']:.3f},"
        f" base {after['base']:.3f}"
        if after
        else f"rag.start_encoder: {start['encoder']}"
    )
    if start["encoder"] == "cpt":
        return [("rag", "retriever start", f"the CPT encoder ({why})")]
    return [("rag", "retriever start", f"the base encoder: CPT's output was not used ({why})")]


def switched_off_rows(m: dict[str, Any]) -> list[Row]:
    """The rag stage's own phases that were switched off, in words."""
    rows = []
    if "train" not in m:
        rows.append(("rag", "retriever", "not fine-tuned (rag.train.enabled: false)"))
    if "start" in m and "reader" not in m:  # cpt-sft; rag-sequence has no reader to teach
        said = "not taught to read passages (rag.reader.enabled: false)"
        rows.append(("rag", "generator", said))
    return rows


def rag_rows(m: dict[str, Any]) -> list[Row]:
    retrieval, answers, questions = m["retrieval"], m["answers"], m["questions"]
    recall = ", ".join(f"{name} {s['recall@5']:.3f}" for name, s in retrieval.items())
    closed, rag, system = answers["closed_book"], answers["rag"], retrieval["system"]
    return [
        (
            "rag",
            "held-out questions",
            f"{questions['held_out']} ({questions['not_in_corpus']} not in corpus)",
        ),
        *start_rows(m),
        *switched_off_rows(m),
        ("rag", "retriever used", used_retriever(m)),
        ("rag", "recall@5", recall),
        ("rag", "MRR, nDCG@10 (used)", f"{system['mrr']:.3f}, {system['ndcg@10']:.3f}"),
        ("rag", "answer F1", f"closed-book {closed['f1']:.3f} → with passages {rag['f1']:.3f}"),
        (
            "rag",
            "answer supported",
            f"closed-book {closed['supported']:.3f} → with passages {rag['supported']:.3f}",
        ),
        (
            "rag",
            "supported, refusals aside",
            f"closed-book {closed['supported_answered']:.3f}"
            f" → with passages {rag['supported_answered']:.3f}",
        ),
        (
            "rag",
            "answers refused",
            f"with passages {rag['refused']:.3f}; prompts lacking the answer {rag['lacking']:.3f}",
        ),
    ]


def metric_rows(metrics: Path) -> list[Row]:
    """Key metrics of every stage that has written its file (a stage not yet run is left out)."""
    rows = validate_rows(metrics)
    for name, rows_of in (
        ("cpt", cpt_rows),
        ("cpt_lm", cpt_lm_rows),
        ("sft", sft_rows),
        ("rag", rag_rows),
    ):
        if (m := read_json(metrics / f"{name}.json")) is not None:
            rows += rows_of(m)
    return rows


def timing_rows(timings: Path) -> list[Row]:
    rows = []
    for name in ("cpt", "cpt_lm", "sft", "rag"):
        if (t := read_json(timings / f"{name}.json")) is None:
            continue
        speed = f"{t['stage_s']:.0f} s"
        if "train" in t:  # a disabled cpt_lm trains nothing
            speed += f", training {t['train']['tokens_per_s']:.0f} tokens/s"
        if "reader" in t:  # the rag stage's generator, taught to read
            speed += f", reader {t['reader']['tokens_per_s']:.0f} tokens/s"
        if "latency" in t:
            speed += f", answer p50 {t['latency']['answer_ms_p50'] / 1000:.2f} s"
        rows.append((name, "time (this machine)", speed))
    return rows


def markdown(rows: list[Row]) -> str:
    """A markdown table with padded columns, so it reads the same in a terminal."""
    table = [("stage", "metric", "value"), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in table
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"
