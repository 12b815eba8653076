"""Memory and speed of the CPT, SFT and RAG stages with models of the original spec's sizes:
bert-base-uncased, gpt2 (124M) and, for the `rag-sequence` backend, facebook/rag-sequence-nq.

Each stage runs as its real entry point (`python -m stages.<stage>`) for a few optimizer steps,
in a subprocess whose working directory is a temporary project (data validated there, params as
the project's with the model replaced), on random-weight stand-ins of exactly those
architectures (`benchmarks/stand_ins.py`). It prints each run's peak resident memory, wall time,
tokens/s and s/step, the RAG stage's latency, and the share of the CPUs other processes took.
What the columns mean and the figures measured here: docs/original-models.md.

    python -m benchmarks.original_models [--phases cpt sft rag] [--steps 6] [--rag-steps 6]
        [--cpt-batches 16] [--sft-batches 8 4] [--rag-batches 4] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from transformers.utils import logging as hf_logging

from benchmarks.measure import ROOT, run_child
from benchmarks.report import Run, latency_table, notes, table
from benchmarks.stand_ins import RAG_NQ, build_bert, build_dpr_ctx, build_gpt2, build_rag

NEVER = 10**6  # eval/save interval that a few-step run never reaches
SFT_GENERATION = {"max_new_tokens": 8, "samples": 2}  # base and final answers stay cheap
RAG_MAX_NEW_TOKENS = 4  # answering the held-out questions stays cheap


# --- the temporary project ---------------------------------------------------------------------


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
        blocks = tokenized(project, "cpt", project / "output/data/pretrain.txt", params)
        command = stage("cpt", f"--tokens={blocks}", *outputs)
        run = Run(name, "bert-base (random)", n_params, vocab, f"{batch} x {max_length}", steps)
        runs.append(measure(run, project, command, timings))
    return runs


def tokenized(project: Path, kind: str, data: Path, params: Path, *base: str) -> Path:
    """The tokens `tokenize_<kind>` makes (not measured), unless an earlier run made them."""
    output = project / "output/tokens" / kind
    if not output.exists():
        command = stage("tokenize", kind, f"--data={data}", f"--output={output}", *base)
        usage = run_child([*command, f"--params={params}"], project, project / f"{kind}.log")
        if usage.status:
            raise SystemExit(f"tokenize {kind} failed: {project / f'{kind}.log'}")
    return output


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
        data = project / "output/data/sft"
        examples = tokenized(project, "sft", data, params, f"--base={base}")
        command = stage(
            "sft",
            f"--base={base}",
            f"--tokens={examples}",
            f"--data={data}",
            f"--samples={project / 'metrics' / name}-samples.md",
            *outputs,
        )
        run = Run(name, "gpt2 (random)", n_params, vocab, f"{batch} x {max_length} max", steps)
        runs.append(measure(run, project, command, timings))
    return runs


def rag_runs(project: Path, steps: int, batches: list[int]) -> list[Run]:
    validated(project, "pretrain", "pretrain.txt", "output/data/pretrain.txt")
    validated(project, "rag", "rag.jsonl", "output/data/rag")
    data = project / "output/data/rag"
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
            # held-out marginal loss and checkpoint every 10 steps, as the defaults
            "train": {**project_params()["rag"]["train"], "batch_size": batch, "max_steps": steps},
            "max_new_tokens": RAG_MAX_NEW_TOKENS,
        }
        params = write_params(project, name, "rag", overrides)
        outputs, timings = run_outputs(project, name, params)
        command = stage(
            "rag",
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
        "--rag-batches", nargs="+", type=int, default=[4], help="rag.train.batch_size"
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
    params = project_params()
    for line in notes(runs, params.get("device", "auto"), params.get("fp16", "auto")):
        print(f"- {line}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
