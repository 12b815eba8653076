"""What each phase adds: the pipeline run with each phase on and with it off, on the default data
and on a second corpus (Python's language reference: `benchmarks.corpora`), in one table written
to docs/phase-value.md.

Each run is `dvc exp run -S ...` in a copy of the project (its own git repository; one DVC cache
shared by the copies, so a stage whose inputs match an earlier run's is restored, not rerun):

- all: params.yaml as it is;
- no CPT: `rag.start_encoder=base` (the CPT stage still runs; nothing uses its output);
- cpt_lm: `cpt_lm.enabled=true` with replay 0.25 and one reading chat per passage (the setting
  docs/training.md measured, chosen before any run);
- no SFT: `sft.enabled=false` (RAG's generator is the base model, or cpt_lm's);
- no reader: `rag.reader.enabled=false` (the generator is not taught to read passages);
- no retriever fine-tuning: `rag.train.enabled=false` (the start encoder ranks as it is).

A phase's row compares the run with it on against the run with it off: the held-out figures of
what the system retrieves (recall@5, MRR), answer F1 closed-book and with passages, and the
minutes the phase adds to the training stages' time (their sum with it on, minus their sum with it
off; a stage whose output goes unused counts as nothing; a stage that ran in several runs with
the same inputs counts with its mean time). DVC reruns a stage whose inputs differ from the
workspace's last run (its run cache skips stages with uncached outputs, as every training stage
has), so a stage may run more than once; how far its times spread says how noisy the minutes are.

Every run's figures, the seconds each training stage took, the date, the machine and the commit
are kept in benchmarks/phase_value.json, so the table fills over several sessions: a run already
there is not run again (`--rerun` redoes it). Run it on an otherwise idle machine; each run
records the share of the CPUs other processes took meanwhile.

    python -m benchmarks.phase_value [--corpus default pyref] [--runs NAME ...] [--rerun]
        [--cache DIR] [--table-only] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.corpora import CORPORA, prepare
from benchmarks.measure import run_child
from lmpipeline.data import write_text_atomic
from lmpipeline.runtime import fingerprint, matmul_peak
from lmpipeline.smoke import copy_project, git_commit

RESULTS = Path(__file__).with_name("phase_value.json")
DOC = Path(__file__).resolve().parent.parent / "docs" / "phase-value.md"
TIMED = ("cpt", "cpt_lm", "sft", "rag")  # the training stages; each writes its stage_s


@dataclass(frozen=True)
class Run:
    settings: tuple[str, ...]  # `dvc exp run -S` arguments
    unused: tuple[str, ...] = ()  # stages that run but whose output nothing downstream reads


RUNS: dict[str, Run] = {
    "all": Run(()),
    "no CPT": Run(("rag.start_encoder=base",), unused=("cpt",)),
    "cpt_lm": Run(("cpt_lm.enabled=true", "cpt_lm.replay=0.25", "cpt_lm.reading=1")),
    "no SFT": Run(("sft.enabled=false",)),
    "no reader": Run(("rag.reader.enabled=false",)),
    "no retriever fine-tuning": Run(("rag.train.enabled=false",)),
}
# phase -> (the run with it on, the run with it off)
PHASES: dict[str, tuple[str, str]] = {
    "CPT (encoder)": ("all", "no CPT"),
    "cpt_lm (generator)": ("cpt_lm", "all"),
    "SFT": ("all", "no SFT"),
    "reader (RAFT)": ("all", "no reader"),
    "retriever fine-tuning": ("all", "no retriever fine-tuning"),
}
CORPUS_NAMES = {"default": "the default data", "pyref": "Python's language reference"}
FIGURES = (
    ("recall@5", "recall@5"),
    ("mrr", "MRR"),
    ("closed_book_f1", "closed-book F1"),
    ("rag_f1", "RAG answer F1"),
)


def load_results() -> dict[str, Any]:
    if RESULTS.is_file():
        return json.loads(RESULTS.read_text(encoding="utf-8"))
    return {"runs": {}, "stage_s": {}}


def save_results(results: dict[str, Any]) -> None:
    write_text_atomic(RESULTS, json.dumps(results, indent=1, sort_keys=True) + "\n")


def machine() -> str:
    """The CPU (or GPU), its cores and its matmul speed today: how fast the minutes were made."""
    cpu = platform.processor() or "unknown CPU"
    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = [ln for ln in info.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        cpu = f"{torch.cuda.get_device_name(device)} (with {cpu})"
    return f"{cpu}, {os.cpu_count()} cores, {matmul_peak(device, None).describe()}"


def commit() -> str:
    """The project's commit, marked where tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], capture_output=True, text=True)
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def lock_keys(work: Path) -> dict[str, str]:
    """Each training stage's inputs as dvc.lock records them (command, deps, params), hashed:
    the same key is the same computation, whichever run made it."""
    stages = yaml.safe_load((work / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    return {
        name: fingerprint(entry.get("cmd"), entry.get("deps"), entry.get("params"))
        for name, entry in stages.items()
        if name in TIMED
    }


def project(corpus: str, cache: Path) -> Path:
    """A committed copy of the project with `corpus`'s data, sharing the DVC cache `cache`."""
    work = Path(tempfile.mkdtemp(prefix=f"phase-value-{corpus}-"))
    if corpus == "default":
        copy_project(Path.cwd(), work)
    else:
        prepare(corpus, work)
    git_commit(work, f"phase_value {corpus}")
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dvc", "cache", "dir", "--local", str(cache.resolve())], cwd=work, check=True)
    return work


def run_once(work: Path, name: str, results: dict[str, Any], where: dict[str, str]) -> dict:
    """`dvc exp run` with the run's settings on the committed params; its figures."""
    subprocess.run(["git", "checkout", "-q", "--", "params.yaml"], cwd=work, check=True)
    # An earlier run's checkpoints would be resumed from, and the minutes would not be measured.
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    command = ["dvc", "exp", "run", "--name", "pv-" + name.replace(" ", "-")]
    for setting in RUNS[name].settings:
        command += ["-S", setting]
    log = work / f"{name.replace(' ', '-')}.log"
    print(f"phase_value: {' '.join(command)} (log: {log})", flush=True)
    started = time.time()
    usage = run_child(command, work, log)
    if usage.status:
        raise SystemExit(f"phase_value: run {name!r} failed ({usage.status}); log {log}")
    keys = lock_keys(work)
    for stage, key in keys.items():
        timing = work / "output/timings" / f"{stage}.json"
        if timing.is_file() and timing.stat().st_mtime >= started:  # ran now, not restored
            seconds = json.loads(timing.read_text())["stage_s"]
            results["stage_s"].setdefault(key, []).append(seconds)  # each time it ran
    rag = json.loads((work / "metrics/rag.json").read_text(encoding="utf-8"))
    system, answers = rag["retrieval"]["system"], rag["answers"]
    return {
        "settings": list(RUNS[name].settings),
        **where,
        "date": time.strftime("%Y-%m-%d"),
        "wall_s": round(usage.wall_s),
        "other_cpu": None if usage.other_cpu is None else round(usage.other_cpu, 3),
        "recall@5": system["recall@5"],
        "mrr": system["mrr"],
        "closed_book_f1": answers["closed_book"]["f1"],
        "rag_f1": answers["rag"]["f1"],
        "supported": answers["rag"]["supported"],
        "start": rag.get("start", {}).get("encoder"),
        "stages": keys,
    }


def stage_seconds(results: dict[str, Any], run: str, figures: dict[str, Any]) -> float | None:
    """The training stages' seconds in `run` (a stage that ran more than once: the mean), an
    unused stage's as nothing; None if a stage's time is unknown (restored from a cache whose
    run was not recorded)."""
    times = [
        results["stage_s"].get(key)
        for stage, key in figures["stages"].items()
        if stage not in RUNS[run].unused
    ]
    return None if None in times else sum(sum(t) / len(t) for t in times)


def phase_rows(results: dict[str, Any], corpus: str) -> list[str]:
    runs = results["runs"].get(corpus, {})
    rows = [
        "| phase | "
        + " | ".join(f"{label}: with → without" for _, label in FIGURES)
        + " | minutes it adds |",
        "|---|" + "---:|" * (len(FIGURES) + 1),
    ]
    for phase, (on, off) in PHASES.items():
        if on not in runs or off not in runs:
            missing = ", ".join(r for r in (on, off) if r not in runs)
            cells = ["-"] * len(FIGURES) + [f"not yet run: {missing}"]
            rows.append(f"| {phase} | " + " | ".join(cells) + " |")
            continue
        cells = [f"{runs[on][key]:.3f} → {runs[off][key]:.3f}" for key, _ in FIGURES]
        with_s, without_s = (stage_seconds(results, r, runs[r]) for r in (on, off))
        added = "?" if with_s is None or without_s is None else f"{(with_s - without_s) / 60:.1f}"
        rows.append(f"| {phase} | " + " | ".join(cells) + f" | {added} |")
    return rows


def run_notes(results: dict[str, Any], corpus: str) -> list[str]:
    notes = []
    for name, r in results["runs"].get(corpus, {}).items():
        other = "unknown" if r["other_cpu"] is None else f"{r['other_cpu']:.0%}"
        notes.append(
            f"- {name} ({' '.join(r['settings']) or 'params.yaml'}): {r['date']}, commit"
            f" {r['commit']}, {r['machine']}; other processes took {other} of the CPUs;"
            f" the retriever started from the {r['start']} encoder"
            + (f". {r['note']}" if r.get("note") else "")  # what the figures cannot say
        )
    return notes


def document(results: dict[str, Any]) -> str:
    lines = [
        "# What each phase adds",
        "",
        "Written by `python -m benchmarks.phase_value` from `benchmarks/phase_value.json`; do not"
        " edit. What each run sets and how the minutes are counted: the script's docstring. Every"
        " figure is on held-out questions: what the system retrieves (recall@5, MRR) and the"
        " answers' token F1 without and with passages.",
    ]
    for corpus in results["runs"]:
        lines += ["", f"## {CORPUS_NAMES.get(corpus, corpus)}", "", *phase_rows(results, corpus)]
        lines += ["", "Runs:", "", *run_notes(results, corpus)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", nargs="+", default=["default", "pyref"])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--rerun", action="store_true", help="run again what is recorded")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir(), "phase-value"))
    parser.add_argument("--table-only", action="store_true", help="write the table, run nothing")
    parser.add_argument("--keep", action="store_true", help="keep the project copies")
    args = parser.parse_args(argv)
    for corpus in args.corpus:
        if corpus != "default" and corpus not in CORPORA:
            parser.error(f"--corpus {corpus}: default or one of {', '.join(sorted(CORPORA))}")

    results = load_results()
    if not args.table_only:
        where = {"machine": machine(), "commit": commit()}
        for corpus in args.corpus:
            recorded = results["runs"].setdefault(corpus, {})
            todo = [r for r in args.runs if args.rerun or r not in recorded]
            if not todo:
                continue
            work = project(corpus, args.cache)
            for name in sorted(todo, key=list(RUNS).index):  # "all" first: the others reuse it
                recorded[name] = run_once(work, name, results, where)
                save_results(results)  # each run kept as soon as it is done
            if args.keep:
                print(f"phase_value: {corpus}'s copy kept in {work}")
            else:
                shutil.rmtree(work)
    DOC.write_text(document(results), encoding="utf-8")
    print(DOC.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
