"""How the data-bound steps grow with the data: wall time and memory of validating each dataset,
tokenizing it, one training step reading its tokens and (pretrain) embedding its knowledge base
into the index, on N-fold copies of the default data and a 1 GB `pretrain.txt`.

Each run is the real stage (`python -m stages.validate ...`) or a child of this script, measured
by `benchmarks.measure.run_child`: wall time; peak RSS from wait4's rusage; peak anonymous memory
sampled from /proc (RSS also counts the pages of memory-mapped Arrow files that were read, which
the kernel takes back under pressure: anonymous memory is what a step cannot give back); and the
share of the CPUs other processes took meanwhile. The copies are distinct: copy k of a passage,
prompt or question ends with " (copy k)", so deduplication keeps every one and the checks across
lines see N times the records. The RAG questions are always checked against the 1x validated
passages (the corpus they are about), so their gold rule costs the same per question at every N.

    python -m benchmarks.scale [--folds 1 10 100] [--gigabytes 1] [--entries 1000000] [--no-kb]
                               [--sft-memory] [--keep]

The index part builds FAISS indexes over a synthetic knowledge base of `--entries` random unit
vectors of 384 dimensions (the bundled encoder's), each kind in a child process: build time,
peak RSS, the index's size, one-query search p50, and, for queries that are base vectors plus
noise, how often the source vector is in the top 10 (its true nearest entry) and how much of
flat's top 10 each kind shares. Random vectors are the hardest case for product quantization
(and their other 9 neighbours are near-ties, so the shared share says little): a real corpus,
whose embeddings cluster, quantizes better.

Run it on an otherwise idle machine: the "other CPU" column says how much else was running.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
import yaml
from datasets import load_from_disk
from torch.utils.data import default_collate
from transformers import AutoModel

from benchmarks.measure import ROOT, Usage, run_child
from lmpipeline.chat import load_causal_lm, load_chat_tokenizer
from lmpipeline.cpt import MaskedBlocks, Masking, load_mlm, mlm_loss, split_blocks
from lmpipeline.models import load_model, load_tokenizer, resolve_model
from lmpipeline.params import load_params
from lmpipeline.rag.index import build_index, embed, embed_stream, search, stream_index
from lmpipeline.rag.knowledge import passage_chunks, stream_entries, write_entries
from lmpipeline.sft import causal_loss, collate
from lmpipeline.tokens import Examples, TokenRows
from lmpipeline.tokens import load as load_tokens

SOURCES = {"pretrain": "pretrain.txt", "sft": "sft.jsonl", "rag": "rag.jsonl"}
SPLIT_KEY = {"sft": "prompt", "rag": "question"}


@dataclass
class Measured:
    step: str
    label: str
    lines: int
    megabytes: float
    usage: Usage


def copies(dataset: str, lines: list[str], k: int) -> Iterator[str]:
    """Copy `k` of a file's lines, each made distinct from every other copy's."""
    for line in lines:
        if dataset == "pretrain":
            yield f"{line} (copy {k})"
        else:
            record = json.loads(line)
            record[SPLIT_KEY[dataset]] += f" (copy {k})"
            yield json.dumps(record, ensure_ascii=False)


def build(dataset: str, path: Path, folds: int | None, size: int | None = None) -> int:
    """Write `folds` copies (or as many as reach `size` bytes) of a default file; its lines."""
    lines = [t for t in (ROOT / "data" / SOURCES[dataset]).read_text().split("\n") if t.strip()]
    written, k = 0, 0
    with path.open("w", encoding="utf-8") as f:
        while (folds is not None and k < folds) or (size is not None and f.tell() < size):
            for line in copies(dataset, lines, k):
                f.write(line + "\n")
                written += 1
            k += 1
    return written


def validate(work: Path, dataset: str, source: Path, passages: Path) -> Usage:
    out = work / "out" / dataset
    shutil.rmtree(out.parent, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "stages.validate",
        dataset,
        f"--input={source}",
        f"--output={out}",
        f"--metrics={work / 'out' / dataset}.json",
        f"--report={work / 'out' / dataset}.md",
        f"--params={ROOT / 'params.yaml'}",
    ]
    if dataset == "rag":
        command.append(f"--passages={passages}")
    usage = run_child(command, work, work / f"validate_{dataset}.log")
    if usage.status:
        raise SystemExit(f"validate {dataset} failed: {work / f'validate_{dataset}.log'}")
    return usage


def tokenize(work: Path, kind: str, data: Path) -> Usage | None:
    """`tokenize_<kind>` on validated data (sft: with `output/sft_base`'s tokenizer, when a
    `dvc repro` made it; None otherwise)."""
    base = ROOT / "output/sft_base"
    if kind == "sft" and not (base / "config.json").is_file():
        return None
    out = work / "out" / f"tokens-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "stages.tokenize", kind, f"--data={data}", f"--output={out}"]
    command += [f"--params={ROOT / 'params.yaml'}", *([f"--base={base}"] if kind == "sft" else [])]
    usage = run_child(command, work, work / f"tokenize_{kind}.log")
    if usage.status:
        raise SystemExit(f"tokenize {kind} failed: {work / f'tokenize_{kind}.log'}")
    return usage


TOKENIZED = {"pretrain": "cpt", "sft": "sft"}  # what each validated dataset is tokenized for


def steps_of(
    work: Path, dataset: str, source: Path, passages: Path, label: str, kb: bool = True
) -> list[Measured]:
    """Validate `source`; tokenize what it validated and take one training step reading the
    tokens; for pretrain (with `kb`) embed its chunks into the index. One row per step."""
    lines, mb = sum(1 for _ in source.open("rb")), source.stat().st_size / 1e6
    rows = [
        Measured(f"validate {dataset}", label, lines, mb, validate(work, dataset, source, passages))
    ]
    kind = TOKENIZED.get(dataset)
    tokenized = tokenize(work, kind, work / "out" / dataset) if kind else None
    if tokenized is not None:
        rows.append(Measured(f"tokenize {kind}", label, lines, mb, tokenized))
        tokens = work / "out" / f"tokens-{kind}"
        rows.append(
            Measured(f"one {kind} step", label, lines, mb, child(work, "step", kind, tokens))
        )
        step = json.loads((work / "step.json").read_text())
        print(
            f"(one {kind} step {label}: {step['step_s']:.2f} s of its wall time is the step;"
            f" {step['train_rows']:,} train rows)",
            flush=True,
        )
    if dataset == "pretrain" and kb:
        passages = work / "out" / "pretrain"
        rows.append(Measured("kb embed + index", label, lines, mb, child(work, "kb", passages)))
        p50 = json.loads((work / "kb.json").read_text())["retrieve_ms_p50"]
        print(f"(kb {label}: one-question retrieval p50 {p50:.1f} ms)", flush=True)
    for r in rows:
        print(row(r), flush=True)
    return rows


def child(work: Path, part: str, *args: object) -> Usage:
    """`python -m benchmarks.scale --child PART ARGS...` measured; its figures in PART.json."""
    command = [sys.executable, "-m", "benchmarks.scale", "--child", part, *map(str, args)]
    command.append(str(work / f"{part}.json"))
    usage = run_child(command, work, work / f"{part}.log")
    if usage.status:
        raise SystemExit(f"{part} {args} failed: {work / f'{part}.log'}")
    return usage


def measure(work: Path, folds: list[int], gigabytes: float, kb: bool) -> list[Measured]:
    passages = work / "passages.txt"  # the 1x validated passages, for the RAG golds
    build("pretrain", work / "pretrain-1.txt", 1)
    validate(work, "pretrain", work / "pretrain-1.txt", passages)
    shutil.copy(work / "out" / "pretrain", passages)
    results = []
    for dataset in SOURCES:
        for n in folds:
            source = work / f"{dataset}-{n}.{SOURCES[dataset].split('.')[1]}"
            build(dataset, source, n)
            results += steps_of(work, dataset, source, passages, f"{n}x", kb)
            source.unlink()
    if gigabytes:
        source = work / "pretrain-big.txt"
        build("pretrain", source, None, int(gigabytes * 1e9))
        # Not embedded: at ~300 chunks a second, a 1 GB corpus's 2.5 M chunks take hours.
        results += steps_of(work, "pretrain", source, passages, f"{gigabytes:g} GB", kb=False)
        source.unlink()
    return results


HEADER = (
    "| step | size | lines | MB | wall s | µs/line | peak RSS GiB | peak anon GiB | other CPU |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def gib(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def row(m: Measured) -> str:
    other = "?" if m.usage.other_cpu is None else f"{m.usage.other_cpu:.0%}"
    return (
        f"| {m.step} | {m.label} | {m.lines:,} | {m.megabytes:,.1f} | {m.usage.wall_s:.1f}"
        f" | {m.usage.wall_s / m.lines * 1e6:.0f} | {m.usage.peak_rss_gib:.2f}"
        f" | {gib(m.usage.peak_anon_gib)} | {other} |"
    )


def slopes(results: list[Measured]) -> list[str]:
    """Per step, each run against the previous size: how many times the lines, the time and the
    peak RSS, and the time per added line (the start-up, a few seconds of imports, cancels out)."""
    out = []
    for step in dict.fromkeys(m.step for m in results):
        runs = sorted((m for m in results if m.step == step), key=lambda m: m.lines)
        for a, b in itertools.pairwise(runs):
            added = (b.usage.wall_s - a.usage.wall_s) / max(b.lines - a.lines, 1) * 1e6
            out.append(
                f"{step}: {b.label} vs {a.label}: {b.lines / a.lines:.1f}x the lines,"
                f" {b.usage.wall_s / a.usage.wall_s:.1f}x the time ({added:.0f} µs per added"
                f" line), {b.usage.peak_rss_gib / a.usage.peak_rss_gib:.2f}x the peak RSS"
                + (
                    f", {b.usage.peak_anon_gib / a.usage.peak_anon_gib:.2f}x the peak anon"
                    if a.usage.peak_anon_gib and b.usage.peak_anon_gib
                    else ""
                )
            )
    return out


# --- SFT memory with and without a token budget ------------------------------------------------

# Four steps (the same for every run; an epoch of the longer data takes 10 minutes), no generation.
SFT_STEPS = {"max_steps": 4, "eval_steps": 100, "save_steps": 100, "max_new_tokens": 1}


def longer(work: Path, factor: int) -> Path:
    """data/sft.jsonl with every response `factor` times as long (its text repeated)."""
    path = work / f"sft-x{factor}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for line in (ROOT / "data/sft.jsonl").read_text().splitlines():
            record = json.loads(line)
            record["response"] = " ".join([record["response"]] * factor)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def sft_peak(work: Path, name: str, data: Path, overrides: dict) -> Usage:
    """Validate, tokenize and run the sft stage for a few steps on `data`; the stage's usage."""
    run = work / name
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sft"].update({**SFT_STEPS, **overrides})
    params["validate"]["sft"]["response"]["max_chars"] = 10**6
    (run / "output").mkdir(parents=True)
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    base, data_dir, tokens = ROOT / "output/sft_base", run / "data", run / "tokens"
    steps = [
        [
            "validate",
            "sft",
            f"--input={data}",
            f"--output={data_dir}",
            f"--metrics={run / 'v.json'}",
            f"--report={run / 'v.md'}",
        ],
        ["tokenize", "sft", f"--base={base}", f"--data={data_dir}", f"--output={tokens}"],
        [
            "sft",
            f"--base={base}",
            f"--tokens={tokens}",
            f"--data={data_dir}",
            f"--output={run / 'model'}",
            f"--metrics={run / 'm.json'}",
            f"--plots={run / 'plots'}",
            f"--samples={run / 's.md'}",
        ],
    ]
    for stage, *args in steps:
        command = [
            sys.executable,
            "-m",
            f"stages.{stage}",
            *args,
            f"--params={run / 'params.yaml'}",
        ]
        usage = run_child(command, run, run / "log")
        if usage.status:
            raise SystemExit(f"{name}: {stage} failed: {run / 'log'}")
    return usage


def measure_sft_memory(work: Path) -> None:
    """Peak memory of 4 steps of the sft stage on the default data, and on responses 4 times
    as long (at 4 x `sft.max_length`), without and with a token budget: the padded tokens of
    the default data's largest batch (batch_size x its longest example), the most a default
    epoch holds at once."""
    if not (ROOT / "output/sft_base/config.json").is_file():
        print("sft memory: needs output/sft_base (dvc repro sft_base); skipped")
        return
    cfg = yaml.safe_load((ROOT / "params.yaml").read_text())["sft"]
    long_length = 4 * cfg["max_length"]
    default = sft_peak(work, "sft-0", ROOT / "data/sft.jsonl", {})
    longest = max(load_from_disk(str(work / "sft-0" / "tokens" / "train"))["length"])
    budget = cfg["batch_size"] * longest
    runs = [
        ("4x longer responses", {"max_length": long_length}),
        (
            f"4x longer, max_tokens_per_batch {budget} ({cfg['batch_size']} x {longest})",
            {"max_length": long_length, "max_tokens_per_batch": budget},
        ),
    ]
    print("| sft run (4 steps) | peak RSS GiB | peak anon GiB | wall s |\n|---|---:|---:|---:|")
    print(sft_row("default data", default))
    for n, (label, overrides) in enumerate(runs, start=1):
        print(sft_row(label, sft_peak(work, f"sft-{n}", longer(work, 4), overrides)), flush=True)


def sft_row(label: str, usage: Usage) -> str:
    return (
        f"| {label} | {usage.peak_rss_gib:.2f} | {gib(usage.peak_anon_gib)} | {usage.wall_s:.0f} |"
    )


# --- the children: one training step reading tokens; embedding a knowledge base ---------------


def step_child(kind: str, tokens: Path, result: Path) -> None:
    """One optimizer step of `kind`'s model on the first train batch, its rows read memory-mapped
    from the token dataset at `tokens`, after what a training stage does with the whole dataset
    before its first step (the split; for sft, every example's length)."""
    params = load_params(ROOT / "params.yaml")
    if kind == "cpt":
        cfg = params.cpt
        source = resolve_model(cfg.model)
        tokenizer, (model, _) = load_tokenizer(source), load_mlm(source)
        _, splits = load_tokens(
            tokens, tokenizer, kind, "tokenize_cpt", {"max_length": cfg.max_length}
        )
        train, _ = split_blocks(TokenRows(splits["blocks"]), cfg.eval_fraction, params.seed)
        rows = MaskedBlocks(train, Masking.of(tokenizer, cfg), params.seed)
        batch, loss_fn = default_collate([rows[i] for i in range(cfg.batch_size)]), mlm_loss
    else:
        cfg, base = params.sft, ROOT / "output/sft_base"
        tokenizer, _ = load_chat_tokenizer(base)
        model = load_causal_lm(base, torch.device("cpu"))
        _, splits = load_tokens(
            tokens, tokenizer, kind, "tokenize_sft", {"max_length": cfg.max_length}
        )
        train = Examples(splits["train"])
        lengths = train.lengths()  # what the length-grouped sampler reads of every example
        batch = collate([train[i] for i in range(cfg.batch_size)], tokenizer.pad_token_id)
        loss_fn = causal_loss
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    start = time.perf_counter()
    parts = loss_fn(model, batch)
    (parts.loss_sum / parts.predicted).backward()
    optimizer.step()
    figures = {"step_s": time.perf_counter() - start, "train_rows": len(train)}
    if kind == "sft":
        figures["longest"] = max(lengths)
    result.write_text(json.dumps(figures))


RETRIEVAL_QUESTIONS = 50


def kb_child(passages: Path, result: Path) -> None:
    """The knowledge base of the validated `passages` as the rag stage makes it: chunked, the
    entries written to disk, then read back as a stream, embedded by the base encoder and added
    to the `rag.index` index a window at a time. Then one question at a time, what answering
    pays to retrieve: embed the question, search the index (p50 over RETRIEVAL_QUESTIONS)."""
    cfg, source = (params := load_params(ROOT / "params.yaml")).rag, resolve_model(params.cpt.model)
    encoder, tokenizer = load_model(AutoModel, source), load_tokenizer(source)
    lines = [t for t in passages.read_text(encoding="utf-8").split("\n") if t]
    kb = result.parent / "kb"
    write_entries(kb, (c.entry for c in passage_chunks(lines, cfg.chunk_words, cfg.chunk_overlap)))
    del lines
    entries = sum(1 for _ in stream_entries(kb))
    start = time.perf_counter()
    texts = (e.text for e in stream_entries(kb))
    blocks = embed_stream(encoder, tokenizer, texts, cfg.max_length, cfg.batch_size, total=entries)
    index = stream_index(blocks, entries, cfg.index)
    build_s = time.perf_counter() - start
    questions = [json.loads(line)["question"] for line in (ROOT / "data/rag.jsonl").open()]
    took = []
    for question in questions[:RETRIEVAL_QUESTIONS]:
        start = time.perf_counter()
        search(index, embed(encoder, tokenizer, [question], cfg.max_length, 1), cfg.top_k)
        took.append(time.perf_counter() - start)
    figures = {"entries": entries, "build_s": build_s, "retrieve_ms_p50": np.median(took) * 1e3}
    result.write_text(json.dumps(figures))


# --- a synthetic index of millions -------------------------------------------------------------

DIM = 384
QUERIES = 200


def synthetic(n: int, seed: int = 0) -> np.ndarray:
    """`n` random unit vectors, made in blocks so that only the result is held."""
    out = np.empty((n, DIM), dtype=np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, n, 100_000):
        block = rng.standard_normal((min(100_000, n - start), DIM), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def index_child(kind: str, n: int, result: Path) -> None:
    """Build one index over the synthetic base, search it; write the figures to `result`."""
    vectors = synthetic(n)
    start = time.perf_counter()
    built = build_index(vectors, kind)
    build_s = time.perf_counter() - start
    queries = vectors[:QUERIES] + 0.05 * synthetic(QUERIES, seed=1)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    one = []
    for q in queries:
        start = time.perf_counter()
        search(built, q[None], 10)
        one.append(time.perf_counter() - start)
    _, found = search(built, queries, 10)
    figures = {
        "source_found": float((found == np.arange(QUERIES)[:, None]).any(axis=1).mean()),
        "build_s": build_s,
        "index_mb": len(faiss.serialize_index(built)) / 1e6,
        "search_ms_p50": float(np.median(one)) * 1000,
        "found": found.tolist(),
    }
    result.write_text(json.dumps(figures))


def measure_index(work: Path, n: int) -> list[str]:
    rows, exact = [], None
    for kind in ("flat", "ivfpq"):
        result = work / f"index-{kind}.json"
        command = [sys.executable, "-m", "benchmarks.scale", "--child", "index", kind, str(n)]
        usage = run_child([*command, str(result)], work, work / f"index-{kind}.log")
        if usage.status:
            raise SystemExit(f"index {kind} failed: {work / f'index-{kind}.log'}")
        figures = json.loads(result.read_text())
        found = np.array(figures["found"])
        exact = found if exact is None else exact
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact, strict=True)])
        rows.append(
            f"| {kind} | {n:,} | {figures['build_s']:.1f} | {usage.peak_rss_gib:.2f}"
            f" | {gib(usage.peak_anon_gib)}"
            f" | {figures['index_mb']:,.0f} | {figures['search_ms_p50']:.2f}"
            f" | {figures['source_found']:.3f} | {recall:.3f} |"
        )
        print(rows[-1], flush=True)
    return rows


INDEX_HEADER = (
    "| index | entries | build s | peak RSS GiB | peak anon GiB | index MB"
    " | search p50 ms (1 query) | source in top 10 | top 10 shared with flat |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=int, nargs="*", default=[1, 10, 100])
    parser.add_argument("--gigabytes", type=float, default=1.0, help="0: no big pretrain file")
    parser.add_argument("--entries", type=int, default=1_000_000, help="0: no index part")
    parser.add_argument("--sft-memory", action="store_true", help="SFT peak RSS with a budget")
    parser.add_argument("--no-kb", action="store_true", help="no knowledge-base embedding")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        part, *rest = args.child
        if part == "index":
            index_child(rest[0], int(rest[1]), Path(rest[2]))
        elif part == "step":
            step_child(rest[0], Path(rest[1]), Path(rest[2]))
        else:
            kb_child(Path(rest[0]), Path(rest[1]))
        return 0
    work = Path(tempfile.mkdtemp(prefix="scale-"))
    try:
        if args.folds or args.gigabytes:
            print(HEADER, flush=True)
            results = measure(work, args.folds, args.gigabytes, not args.no_kb)
            print()
            print("\n".join(slopes(results)))
        if args.entries:
            print()
            print(INDEX_HEADER, flush=True)
            measure_index(work, args.entries)
        if args.sft_memory:
            print()
            measure_sft_memory(work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
