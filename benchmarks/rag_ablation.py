"""Ablation of the `rag` stage: each component switched off (or on) alone, as `dvc exp run --temp`
experiments from the current workspace, in a table of the held-out figures.

Each row is one experiment: the params it sets, the fine-tuned retriever's recall@5 and nDCG@10,
answer F1 and supported with passages, closed-book F1, and the wall time of `dvc exp run` (only
`rag` and `report` rerun, the other stages' outputs come from the cache, except in the cpt_lm
row, which reruns `cpt_lm` and `sft` too; run it on an otherwise idle machine). Needs `dvc repro`
done first. The experiments stay listed in `dvc exp show`.

    python -m benchmarks.rag_ablation [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from typing import Any

# name -> the `-S` settings of the experiment; "default" is params.yaml as it is. The retriever
# ablations keep the generator untaught (RAFT off), whose answers depend on the passages alone:
# compare them with "generator not taught to read". Teaching the reader changes no retrieval.
OFF = "rag.reader.enabled=false"
ABLATIONS: dict[str, list[str]] = {
    "default": [],
    "reader never taught to refuse": ["rag.reader.refuse=false"],
    "dense retriever, whatever calibration says": ["rag.retriever=dense"],
    "reranker where calibration says it pays": ["rag.rerank.enabled=auto"],
    "generator adapted to the corpus first (cpt_lm)": ["cpt_lm.enabled=true"],
    "generator not taught to read": [OFF],
    "untaught, in-batch negatives only": [OFF, "rag.train.hard_negatives=0"],
    "untaught, start from the CPT encoder": [OFF, "rag.start_encoder=cpt"],
    "untaught, train FAQ entries in the index": [OFF, "rag.faq=true"],
}


def slug(name: str) -> str:
    """The experiment's name in `dvc exp show`."""
    return "abl-" + "".join(c if c.isalnum() else "-" for c in name.lower())


def run_experiment(name: str, settings: list[str]) -> float:
    """Run one experiment named after `name`; return its wall time in seconds."""
    args = ["dvc", "exp", "run", "--temp", "--name", slug(name)]
    for setting in settings:
        args += ["-S", setting]
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def experiment_metrics() -> dict[str, dict[str, Any]]:
    """metrics/rag.json of every experiment of the workspace's commit, by experiment name."""
    shown = json.loads(
        subprocess.run(
            ["dvc", "exp", "show", "--json"], check=True, capture_output=True, text=True
        ).stdout
    )
    found = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                metrics = (data.get("metrics") or {}).get("metrics/rag.json", {}).get("data")
                if metrics and rev.get("name"):
                    found[rev["name"]] = metrics
    return found


def row(name: str, m: dict[str, Any], seconds: float) -> str:
    tuned, answers = m["retrieval"]["finetuned"], m["answers"]
    cells = [
        name,
        f"{tuned['recall@5']:.3f}",
        f"{tuned['ndcg@10']:.3f}",
        f"{answers['rag']['f1']:.3f}",
        f"{answers['rag']['supported']:.3f}",
        f"{answers['closed_book']['f1']:.3f}",
        f"{seconds:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(ABLATIONS), help="run only these")
    names = parser.parse_args().only or list(ABLATIONS)
    seconds = {}
    for name in names:
        print(f"running: {name} {ABLATIONS[name]}", flush=True)
        seconds[name] = run_experiment(name, ABLATIONS[name])
    metrics = experiment_metrics()
    print(
        "| experiment | recall@5 | nDCG@10 | answer F1 | supported | closed-book F1 | exp run s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        print(row(name, metrics[slug(name)], seconds[name]))


if __name__ == "__main__":
    main()
