"""benchmarks/phase_value.py's table: what each phase adds, from recorded runs."""

from __future__ import annotations

from typing import Any

from benchmarks import phase_value


def run(recall: float, rag_f1: float, stages: dict[str, str]) -> dict[str, Any]:
    return {
        "settings": [],
        "machine": "a test",
        "commit": "0000000",
        "date": "2026-12-07",
        "wall_s": 1,
        "other_cpu": 0.0,
        "recall@5": recall,
        "mrr": recall - 0.1,
        "closed_book_f1": 0.1,
        "rag_f1": rag_f1,
        "supported": 1.0,
        "start": "cpt",
        "stages": stages,
    }


def row(rows: list[str], phase: str) -> str:
    return next(r for r in rows if r.startswith(f"| {phase} |"))


def test_a_phase_adds_its_stages_minutes_an_unused_stage_counting_as_nothing() -> None:
    stages = {"cpt": "cpt", "cpt_lm": "off", "sft": "sft", "rag": "rag"}
    results = {
        "runs": {
            "default": {
                "all": run(0.9, 0.5, stages),
                # The CPT stage still runs, but nothing reads its output: its 120 s are saved.
                "no CPT": run(0.85, 0.45, {**stages, "rag": "rag from base"}),
                "no reader": run(0.9, 0.3, {**stages, "rag": "rag untaught"}),
            }
        },
        # The SFT stage ran twice with the same inputs: its mean counts.
        "stage_s": {
            "cpt": [120],
            "off": [6],
            "sft": [280, 320],
            "rag": [600],
            "rag from base": [540],
        },
    }
    rows = phase_value.phase_rows(results, "default")
    cpt = row(rows, "CPT (encoder)")
    assert "| 0.900 → 0.850 | 0.800 → 0.750 | 0.100 → 0.100 | 0.500 → 0.450 |" in cpt
    assert cpt.endswith("| 3.0 |")  # (120 + 6 + 300 + 600) - (6 + 300 + 540) s
    # A stage restored from a cache whose run was never timed: the minutes are unknown.
    assert row(rows, "reader (RAFT)").endswith("| ? |")
    assert "not yet run: no SFT" in row(rows, "SFT")
    assert "not yet run: cpt_lm" in row(rows, "cpt_lm (generator)")
    doc = phase_value.document(results)
    assert "## the default data" in doc and cpt in doc
    assert "- no CPT (params.yaml): 2026-12-07, commit 0000000, a test;" in doc  # settings: none
