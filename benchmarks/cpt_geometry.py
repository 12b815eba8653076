"""Does masked-LM CPT keep the encoder's geometry? The `cpt` stage under several settings, on the
default data and on the corpora of `benchmarks.corpora`, each run's zero-shot train-question MRR
before and after CPT (`metrics/cpt.json`) printed as one table.

It copies the project into a temporary directory per corpus (its own git repository and DVC
cache, as `make smoke` does), then for each setting writes params.yaml and runs `dvc repro cpt`:
validation and tokenization run once per corpus, the `cpt` stage once per setting. Only train
questions are read (the stage's probe); held-out questions decide nothing here. Each setting is
a space-separated list of KEY.PATH=VALUE overrides; "" is params.yaml as it is. Run it on an
otherwise idle machine (the MRR figures do not depend on that; the seconds do).

    python -m benchmarks.cpt_geometry [--corpus default --corpus pyref ...]
        [--setting "cpt.head_warmup_steps=20" ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.corpora import CORPORA
from lmpipeline.smoke import copy_project, git_commit, parse_overrides, with_overrides

SETTINGS = [
    "cpt.head_warmup_steps=0",
    "cpt.head_warmup_steps=20",
    "cpt.head_warmup_steps=40",
    "cpt.head_warmup_steps=20 cpt.lr=5.0e-5",
    "cpt.head_warmup_steps=20 cpt.lr=2.0e-5",
    "cpt.head_warmup_steps=0 cpt.lr=2.0e-5",
]


def project(corpus: str) -> Path:
    """A copy of the project whose pretrain and RAG data are `corpus`'s (default: as it is)."""
    work = Path(tempfile.mkdtemp(prefix=f"cpt-geometry-{corpus}-"))
    copy_project(Path.cwd(), work)
    if corpus != "default":
        make_passages, make_questions = CORPORA[corpus]
        passages, records = make_passages(), make_questions()
        (work / "data/pretrain.txt").write_text("\n".join(passages) + "\n", encoding="utf-8")
        with (work / "data/rag.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    git_commit(work, f"corpus {corpus}")
    return work


def run_setting(work: Path, base: dict[str, Any], setting: str) -> dict[str, Any]:
    params = with_overrides(base, parse_overrides(setting.split()))
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    start = time.perf_counter()
    subprocess.run(["dvc", "repro", "cpt"], cwd=work, check=True, capture_output=True)
    took = time.perf_counter() - start
    metrics = json.loads((work / "metrics/cpt.json").read_text(encoding="utf-8"))
    stage_s = json.loads((work / "output/timings/cpt.json").read_text(encoding="utf-8"))["stage_s"]
    return {**metrics, "seconds": took, "stage_s": stage_s}


def row(corpus: str, setting: str, m: dict[str, Any]) -> str:
    base, final = m["base"], m["final"]
    ratio = final["train_question_mrr"] / base["train_question_mrr"]
    return (
        f"| {corpus} | {setting or '(params.yaml)'} | {base['train_question_mrr']:.3f}"
        f" | {final['train_question_mrr']:.3f} | {ratio:.2f} | {final['perplexity']:.1f}"
        f" | {final['mask_accuracy']:.3f} | {m['stage_s']:.0f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", action="append", choices=["default", *sorted(CORPORA)])
    parser.add_argument("--setting", action="append", help="overrides, space-separated")
    parser.add_argument("--keep", action="store_true", help="keep the project copies")
    args = parser.parse_args(argv)
    rows = [
        "| corpus | setting | MRR base | MRR after CPT | after/base | MLM ppl after"
        " | mask acc. after | cpt s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for corpus in args.corpus or ["default", "pyref"]:
        work = project(corpus)
        base = yaml.safe_load((work / "params.yaml").read_text(encoding="utf-8"))
        for setting in args.setting or SETTINGS:
            rows.append(row(corpus, setting, run_setting(work, base, setting)))
            print(rows[-1], flush=True)
        if args.keep:
            print(f"kept in {work}")
        else:
            shutil.rmtree(work)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
