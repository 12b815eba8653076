"""The pipeline, unchanged, on a corpus no one here wrote: Python's language reference.

CPython ships its reference's topics as plain text (`pydoc_data.topics`: 79 topics, about 65k
words). The passages are its paragraphs, packed up to about 120 words per line, each kept once
(topics repeat each other's sections): 590 passages, 56,615 words with Python 3.11. The
questions are templated from the reference itself: for each documented signature
(`str.split(sep=None, ...)`, `object.__len__(self)`, ...) "what does it do", answered by the
first sentence of its description, which the corpus states word for word. No answer was written
or chosen here.

It copies the project into a temporary directory (its own git repository and DVC cache, as
`make smoke` does), puts this corpus and these questions in place of `data/pretrain.txt` and
`data/rag.jsonl` (SFT keeps the default data), and runs `dvc repro rag`. By default it measures
retrieval, which is what this corpus tests: the generator is left as the base model (`cpt_lm`
off, one SFT step, the reader untaught); `-S key=value` changes any param, e.g.
`-S cpt_lm.enabled=true -S sft.max_steps=0 -S rag.reader.enabled=true` for the full defaults.
Run it on an otherwise idle machine (about 11 minutes on 2 cores with the defaults here).

    python -m benchmarks.second_corpus [-S KEY.PATH=VALUE ...] [--keep]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import yaml

from lmpipeline.smoke import copy_project, git_commit, parse_overrides, with_overrides

WORDS_PER_PASSAGE = 120
# Only what the figures measured here need; the retriever and CPT keep their defaults.
RETRIEVAL_ONLY = {
    "cpt_lm": {"enabled": False},
    "sft": {"max_steps": 1, "samples": 0},
    "rag": {"reader": {"enabled": False}},
}
SIGNATURE = re.compile(r"^ {0,3}([A-Za-z_][\w.]*\([^)]*\))\s*$")


def passages() -> list[str]:
    """The reference's paragraphs, whitespace folded, packed up to WORDS_PER_PASSAGE words, each
    passage once."""
    lines: list[str] = []
    for text in topics.values():
        current: list[str] = []
        for paragraph in re.split(r"\n\s*\n", text):
            words = paragraph.split()
            if current and len(current) + len(words) > WORDS_PER_PASSAGE:
                lines.append(" ".join(current))
                current = []
            current += words
        if current:
            lines.append(" ".join(current))
    # Topics repeat sections of each other: keep each passage once (validation refuses copies).
    return list(dict.fromkeys(line for line in lines if len(line) >= 20))


def questions() -> list[dict[str, str]]:
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


def figures(work: Path) -> str:
    """The held-out figures of the run, as a short markdown table."""
    rag = json.loads((work / "metrics/rag.json").read_text(encoding="utf-8"))
    gold = json.loads((work / "metrics/validate/rag.json").read_text(encoding="utf-8"))["gold"]
    rows = ["| retriever | recall@1 | recall@5 | MRR | nDCG@10 |", "|---|---:|---:|---:|---:|"]
    for name, scores in rag["retrieval"].items():
        rows.append(
            f"| {name} | {scores['recall@1']:.3f} | {scores['recall@5']:.3f}"
            f" | {scores['mrr']:.3f} | {scores['ndcg@10']:.3f} |"
        )
    answers = rag["answers"]
    return "\n".join(
        [
            f"golds (validate_rag): {json.dumps(gold)}",
            f"questions: {json.dumps(rag['questions'])}",
            f"retriever start: {json.dumps(rag.get('start'))}",
            *rows,
            f"answer F1 closed-book {answers['closed_book']['f1']:.3f}"
            f" -> with passages {answers['rag']['f1']:.3f};"
            f" supported {answers['closed_book']['supported']:.3f}"
            f" -> {answers['rag']['supported']:.3f}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--keep", action="store_true", help="keep the project copy")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="second-corpus-"))  # ours: removed at the end
    copy_project(Path.cwd(), work)
    corpus, records = passages(), questions()
    (work / "data/pretrain.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    with (work / "data/rag.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    params: dict[str, Any] = yaml.safe_load((work / "params.yaml").read_text(encoding="utf-8"))
    params = with_overrides(params, RETRIEVAL_ONLY, parse_overrides(args.set))
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    git_commit(work, "second corpus")
    words = sum(len(p.split()) for p in corpus)
    print(f"second corpus: {len(corpus)} passages, {words} words, {len(records)} questions")

    start = time.perf_counter()
    status = subprocess.call(["dvc", "repro", "rag"], cwd=work)
    took = time.perf_counter() - start
    if status != 0:
        print(f"second corpus: dvc repro failed after {took:.0f} s; kept in {work}")
        return status
    print(figures(work))
    timings = sorted((work / "output/timings").glob("*.json"))
    stage_s = {p.stem: json.loads(p.read_text())["stage_s"] for p in timings}
    print(f"dvc repro rag: {took:.0f} s; stage seconds {json.dumps(stage_s)}")
    if args.keep:
        print(f"kept in {work}")
    else:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
