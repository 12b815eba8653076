"""The pipeline, unchanged, on two corpora that look like users' data and that no default was shaped
on; their figures are in docs/rag.md.

- `pyref`: Python's language reference as CPython ships it (`pydoc_data.topics`: 79 topics).
  The passages are its paragraphs, packed up to about 120 words per line, each kept once (topics
  repeat each other's sections): 590 passages, 56,615 words with Python 3.11. The questions are
  templated from the reference itself: for each documented signature (`str.split(sep=None,
  ...)`, `object.__len__(self)`, ...) "what does it do", answered by the first sentence of its
  description, which the corpus states word for word. No answer was written or chosen here.
- `gnu`: the GNU grep, gzip, sed and diffutils manuals as Debian ships them
  (`/usr/share/info/{grep,gzip,sed,diffutils}.info.gz`): every node but the indexes, menus and
  licences, its paragraphs packed up to about 120 words per line, curly quotes made straight,
  each passage kept once: 636 passages, 55,921 words on Debian 12. The 423 questions of
  `benchmarks/gnu_manuals.jsonl` were written for this benchmark, by the project's developers
  (an AI model writing as a user of the tools would ask, in its own words, one or two questions
  per passage), before any figure of the pipeline on them was seen: each is answered by a short
  span of one passage, SQuAD-style (an option, a number, a few words), whose text appears in at
  most 3 passages; `manual` and `passage` (its line) say where. None was changed after a run.

It copies the project into a temporary directory (its own git repository and DVC cache, as
`make smoke` does), puts the corpus and questions in place of `data/pretrain.txt` and
`data/rag.jsonl` (SFT keeps the default data) and runs `dvc repro`, every param as in
params.yaml unless `-S key=value` changes it. `--cache DIR` shares a DVC cache (the project's
`.dvc/cache`): a stage whose inputs match a run already cached there (SFT on the default data)
is restored from it, not trained again. Run it on an otherwise idle machine.

    python -m benchmarks.corpora {pyref,gnu} [-S KEY.PATH=VALUE ...] [--cache DIR] [--keep]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import yaml

from lmpipeline.smoke import copy_project, git_commit, parse_overrides, with_overrides

WORDS_PER_PASSAGE = 120
SIGNATURE = re.compile(r"^ {0,3}([A-Za-z_][\w.]*\([^)]*\))\s*$")
INFO = Path("/usr/share/info")
MANUALS = ("grep", "gzip", "sed", "diffutils")
GNU_QUESTIONS = Path(__file__).with_name("gnu_manuals.jsonl")
QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def packed(paragraphs: list[list[str]]) -> list[str]:
    """Paragraphs (as words) joined into passages of up to WORDS_PER_PASSAGE words."""
    lines: list[str] = []
    current: list[str] = []
    for words in paragraphs:
        if current and len(current) + len(words) > WORDS_PER_PASSAGE:
            lines.append(" ".join(current))
            current = []
        current += words
    if current:
        lines.append(" ".join(current))
    return lines


def once(lines: list[str]) -> list[str]:
    """Each passage once, none too short to validate (validation refuses copies)."""
    return list(dict.fromkeys(line for line in lines if len(line) >= 20))


# --- pyref: Python's language reference ----------------------------------------------------------


def pyref_passages() -> list[str]:
    lines: list[str] = []
    for text in topics.values():
        lines += packed([p.split() for p in re.split(r"\n\s*\n", text)])
    return once(lines)


def pyref_questions() -> list[dict[str, str]]:
    """One question per documented signature, answered by its description's first sentence."""
    found: dict[str, dict[str, str]] = {}
    for topic, text in topics.items():
        lines = text.split("\n")
        for i, line in enumerate(lines[:-2]):
            match = SIGNATURE.match(line)
            if not match or lines[i + 1].strip() or not lines[i + 2].startswith("   "):
                continue
            description = []
            for following in lines[i + 2 :]:
                if not following.strip():
                    break
                description.append(following.strip())
            answer = re.split(r"(?<=[.!?])\s", " ".join(description), maxsplit=1)[0]
            signature = match[1]
            section = topic.replace("-", " ")
            found.setdefault(
                signature,
                {
                    "question": f"In the Python language reference, in the section on {section},"
                    f" what does {signature} do?",
                    "answer": answer,
                },
            )
    return list(found.values())


# --- gnu: the GNU grep, gzip, sed and diffutils manuals ----------------------------------------


def info_nodes(path: Path) -> list[str]:
    """The text of every node of an info file but its indexes, menus and licences."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        parts = f.read().split("\x1f")[1:]
    bodies = []
    for part in parts:
        header, _, body = part.lstrip("\n").partition("\n")
        name = re.search(r"Node: ([^,\n]+)", header)
        if name is None:
            continue  # the tag table
        title = name[1].strip()
        skip = ("index" in title.lower(), title == "Top", "License" in title, "Copying" in title)
        if not any(skip):
            bodies.append(body.split("* Menu:")[0])
    return bodies


def gnu_passages() -> list[str]:
    lines: list[str] = []
    for manual in MANUALS:
        path = INFO / f"{manual}.info.gz"
        if not path.is_file():
            raise SystemExit(f"corpora: {path} not found: this corpus is Debian's GNU manuals")
        for body in info_nodes(path):
            paragraphs = []
            for paragraph in re.split(r"\n\s*\n", body):
                # Heading underlines (***, ===, ---) are layout, not text.
                kept = [
                    ln
                    for ln in paragraph.split("\n")
                    if not re.fullmatch(r"[=*\-.]{3,}", ln.strip())
                ]
                if words := " ".join(kept).translate(QUOTES).split():
                    paragraphs.append(words)
            lines += packed(paragraphs)
    return once(lines)


def gnu_questions() -> list[dict[str, Any]]:
    return [json.loads(line) for line in GNU_QUESTIONS.read_text(encoding="utf-8").splitlines()]


CORPORA: dict[str, tuple[Callable[[], list[str]], Callable[[], list[dict[str, Any]]]]] = {
    "pyref": (pyref_passages, pyref_questions),
    "gnu": (gnu_passages, gnu_questions),
}


# --- the run -------------------------------------------------------------------------------------


def table(retrieval: dict[str, dict[str, float]]) -> list[str]:
    rows = [
        "| retriever | recall@1 | recall@3 | recall@5 | MRR | nDCG@10 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in retrieval.items():
        rows.append(
            f"| {name} | {s['recall@1']:.3f} | {s['recall@3']:.3f} | {s['recall@5']:.3f}"
            f" | {s['mrr']:.3f} | {s['ndcg@10']:.3f} |"
        )
    return rows


def figures(work: Path) -> str:
    """The run's held-out figures and the choices made on calibration questions, as markdown."""
    rag = json.loads((work / "metrics/rag.json").read_text(encoding="utf-8"))
    gold = json.loads((work / "metrics/validate/rag.json").read_text(encoding="utf-8"))["gold"]
    closed, answers = rag["answers"]["closed_book"], rag["answers"]["rag"]
    ratio = answers["f1"] / closed["f1"] if closed["f1"] else float("inf")
    chosen = {k: rag.get(k) for k in ("start", "train_questions", "retriever", "rerank")}
    return "\n".join(
        [
            f"golds (validate_rag): {json.dumps(gold)}",
            f"questions: {json.dumps(rag['questions'])}",
            *(f"{k}: {json.dumps(v)}" for k, v in chosen.items()),
            f"reader: {json.dumps(rag.get('reader'))}",
            f"refusal: {json.dumps(rag.get('refusal'))}",
            *table(rag["retrieval"]),
            f"answer F1 closed-book {closed['f1']:.3f} -> with passages {answers['f1']:.3f}"
            f" ({ratio:.2f}x); EM {closed['em']:.3f} -> {answers['em']:.3f}; supported"
            f" {closed['supported']:.3f} -> {answers['supported']:.3f}",
            f"refused {answers['refused']:.3f}; prompts lacking the answer"
            f" {answers['lacking']:.3f}; F1 with refusals {answers['f1_with_refusals']:.3f}",
        ]
    )


def prepare(name: str, work: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """A copy of the project in `work` with corpus `name`'s passages and questions in place of
    data/pretrain.txt and data/rag.jsonl (SFT keeps the default data); returns them."""
    make_passages, make_questions = CORPORA[name]
    corpus, records = make_passages(), make_questions()
    copy_project(Path.cwd(), work)
    (work / "data/pretrain.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    with (work / "data/rag.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return corpus, records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", choices=sorted(CORPORA))
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--cache", type=Path, help="a DVC cache to share (.dvc/cache)")
    parser.add_argument("--keep", action="store_true", help="keep the project copy")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix=f"corpus-{args.corpus}-"))  # ours: removed at the end
    corpus, records = prepare(args.corpus, work)
    params: dict[str, Any] = yaml.safe_load((work / "params.yaml").read_text(encoding="utf-8"))
    params = with_overrides(params, parse_overrides(args.set))
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    git_commit(work, f"corpus {args.corpus}")
    if args.cache:
        cache = str(args.cache.resolve())
        subprocess.run(["dvc", "cache", "dir", "--local", cache], cwd=work, check=True)
    words = sum(len(p.split()) for p in corpus)
    print(f"corpus {args.corpus}: {len(corpus)} passages, {words} words, {len(records)} questions")

    start = time.perf_counter()
    status = subprocess.call(["dvc", "repro"], cwd=work)
    took = time.perf_counter() - start
    if status != 0:
        print(f"corpus {args.corpus}: dvc repro failed after {took:.0f} s; kept in {work}")
        return status
    print(figures(work))
    timings = sorted((work / "output/timings").glob("*.json"))
    stage_s = {p.stem: json.loads(p.read_text())["stage_s"] for p in timings}
    print(f"dvc repro: {took:.0f} s; stage seconds {json.dumps(stage_s)}")
    if args.keep:
        print(f"kept in {work}")
    else:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
