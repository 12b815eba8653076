"""What `validate.text: repair` changes, measured: on corpora of valid text it should change
nothing (no false repair), on a corpus dirtied on purpose it should give back every original
line, and a control character must be refused whatever else the line holds. The figures are in
docs/data.md.

Corpora of valid text, each line checked as a passage of `validate_pretrain` is:
- `default`: data/pretrain.txt, sft.jsonl and rag.jsonl, validated under both policies: the
  outputs and counts must be the same bytes, and the counts those of metrics/validate/.
- `pyref`, `gnu`: the passages of `benchmarks.corpora` (gnu where Debian's info files are).
- `gettext`: every line of every message catalogue in /usr/share/locale (human translations of
  program messages in about 200 languages: Persian and Indic scripts with their joiners, CJK,
  Cyrillic, accented Latin), where there is one.

The dirty corpus: clean non-ASCII lines of `gettext` (NFC, free of what a repair removes, each
left unchanged by the repair), `SAMPLE` per artifact, each dirtied once: its UTF-8 read as
Windows-1252 the way Windows reads it (undefined bytes as C1 controls: ftfy's
sloppy-windows-1252), a U+FEFF or U+200B inside it, a soft hyphen inside a word, NFD. A line is
fixed when its repair gives the original line back, and the repair should be counted as the
artifact's kind. A U+0085 or a U+000B put into a clean line or a mojibake line must be refused.

    python -m benchmarks.text_repair [--skip-gettext]
"""

from __future__ import annotations

import argparse
import gettext
import json
import random
import tempfile
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import ftfy.bad_codecs  # noqa: F401  registers sloppy-windows-1252, the codec of real mojibake

from benchmarks.corpora import INFO, gnu_passages, pyref_passages
from lmpipeline.data import RawLine, text_problem
from lmpipeline.params import load_params
from lmpipeline.text_repair import KINDS, repair
from lmpipeline.validation import DATASETS, REPAIRS, to_frame, validate_file

ROOT = Path(__file__).resolve().parent.parent
LOCALES = Path("/usr/share/locale")
SAMPLE = 2000
CHUNK = 20_000


def catalogue_lines() -> dict[str, str]:
    """Every non-blank line of every message translation under /usr/share/locale, once, with
    the language of the first catalogue that holds it."""
    lines: dict[str, str] = {}
    for path in sorted(LOCALES.glob("*/LC_MESSAGES/*.mo")):
        try:
            with path.open("rb") as f:
                catalogue = gettext.GNUTranslations(f)
        except (OSError, UnicodeDecodeError, IndexError):  # a catalogue not in UTF-8, a bad one
            continue
        language = path.relative_to(LOCALES).parts[0]
        for message in catalogue._catalog.values():  # gettext's only way to list them all
            for line in message.split("\n"):
                if line.strip():
                    lines.setdefault(line, language)
    return lines


def as_passages(
    lines: list[str], repairing: bool = True
) -> Iterator[tuple[str, bool, tuple[str, ...]]]:
    """Each line checked as a passage is: its text, whether it is refused as no text, its
    repairs."""
    for start in range(0, len(lines), CHUNK):
        chunk = [RawLine(start + n + 1, t) for n, t in enumerate(lines[start : start + CHUNK])]
        frame = to_frame(chunk, DATASETS["pretrain"], repairing)
        refused = ~frame["is_text"].astype(bool)
        yield from zip(frame["text"], refused, frame[REPAIRS], strict=True)


def clean_row(name: str, lines: list[str], where: Counter[tuple[str, str]] | None = None) -> str:
    """Lines, repairs per kind, lines refused under each policy, lines per second under each;
    `where` counts each (kind, line) repaired, when given."""
    seconds, refused = {}, {}
    kinds: Counter[str] = Counter()
    for repairing in (False, True):
        started = time.perf_counter()
        refused[repairing] = 0
        for line, (_, no_text, made) in zip(lines, as_passages(lines, repairing), strict=True):
            refused[repairing] += no_text
            kinds.update(made)
            if where is not None:
                where.update((kind, line) for kind in made)
        seconds[repairing] = time.perf_counter() - started
    non_ascii = sum(not t.isascii() for t in lines)
    counts = " | ".join(f"{kinds[k]:,}" for k in KINDS)
    speed = " | ".join(f"{len(lines) / seconds[r]:,.0f}" for r in (False, True))
    return (
        f"| {name} | {len(lines):,} | {non_ascii:,} | {counts} | {refused[False]:,}"
        f" | {refused[True]:,} | {speed} |"
    )


def default_data() -> list[str]:
    """Validate data/ under both policies; the outputs and counts must be the same bytes."""
    rows = []
    params = load_params(ROOT / "params.yaml")
    for name, file in (("pretrain", "pretrain.txt"), ("sft", "sft.jsonl"), ("rag", "rag.jsonl")):
        found = []
        for policy in ("strict", "repair"):
            policy_params = replace(params, validate=replace(params.validate, text=policy))
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out"
                metrics, _ = validate_file(ROOT / "data" / file, DATASETS[name], policy_params, out)
                files = sorted(out.rglob("*")) if out.is_dir() else [out]
                found.append((metrics, [(f.name, f.read_bytes()) for f in files if f.is_file()]))
        committed = json.loads((ROOT / f"metrics/validate/{name}.json").read_text())
        committed.pop("gold", None)  # the stage's, from the passages: validate_file has none
        same = found[0] == found[1]
        rows.append(
            f"| {name} | {found[1][0]['records']} | {'yes' if same else 'NO'}"
            f" | {'yes' if found[1][0] == committed else 'NO'} |"
        )
    return rows


def _inside(text: str, rng: random.Random, char: str) -> str:
    """`text` with `char` put between two letters of a word (never at column 1)."""
    spots = [i for i in range(1, len(text)) if text[i - 1].isalpha() and text[i].isalpha()]
    i = rng.choice(spots) if spots else len(text)
    return text[:i] + char + text[i:]


def mojibake(text: str) -> str:
    return text.encode("utf-8").decode("sloppy-windows-1252")


ARTIFACTS: dict[str, tuple[str, Callable[[str, random.Random], str]]] = {
    "mojibake (UTF-8 read as Windows-1252)": ("mojibake", lambda t, _: mojibake(t)),
    "U+FEFF inside the line": ("zero_width", lambda t, r: _inside(t, r, "\ufeff")),
    "U+200B inside the line": ("zero_width", lambda t, r: _inside(t, r, "\u200b")),
    "soft hyphen inside a word": ("soft_hyphen", lambda t, r: _inside(t, r, "\u00ad")),
    "NFD": ("nfc", lambda t, _: unicodedata.normalize("NFD", t)),
}
CONTROLS: dict[str, Callable[[str, random.Random], str]] = {
    "U+0085 in a clean line": lambda t, r: _inside(t, r, "\x85"),
    "U+000B in a clean line": lambda t, r: _inside(t, r, "\x0b"),
    "U+0085 in a mojibake line": lambda t, r: _inside(mojibake(t), r, "\x85"),
    "U+000B in a mojibake line": lambda t, r: _inside(mojibake(t), r, "\x0b"),
}


def dirty_rows(catalogue: list[str]) -> list[str]:
    """Each artifact put into `SAMPLE` clean lines of `catalogue`: the lines it changed, those
    the repair gives back as they were, those counted as its kind, those refused; then each
    control character, every line of which must be refused."""
    rng = random.Random(0)
    clean = [
        t
        for t in catalogue
        if not t.isascii()
        and len(t) >= 20
        and t == t.strip()
        and text_problem(t, multiline=False) is None
        and repair(t) == (t, ())
    ]
    rows = []
    for name, (kind, dirty) in ARTIFACTS.items():
        pairs = [(t, dirty(t, random.Random(n))) for n, t in enumerate(rng.sample(clean, SAMPLE))]
        originals, changed = zip(*[(t, d) for t, d in pairs if d != t], strict=True)
        fixed = counted = refused = 0
        for original, (text, no_text, made) in zip(
            originals, as_passages(list(changed)), strict=True
        ):
            refused += no_text
            fixed += not no_text and text == original
            counted += kind in made
        rows.append(f"| {name} | {len(originals):,} | {fixed:,} | {counted:,} | {refused:,} |")
    for name, dirty in CONTROLS.items():
        originals = rng.sample(clean, SAMPLE)
        changed = [dirty(t, random.Random(n)) for n, t in enumerate(originals)]
        refused = sum(no_text for _, no_text, _ in as_passages(changed))
        rows.append(f"| {name} | {SAMPLE:,} | | | {refused:,} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-gettext", action="store_true", help="no translations corpus")
    args = parser.parse_args(argv)
    print("| default data | records | strict = repair | counts as committed (golds aside) |")
    print("|---|---:|---|---|")
    print("\n".join(default_data()))
    print()
    kinds = " | ".join(KINDS)
    print(
        f"| corpus | lines | non-ASCII | {kinds} | refused (strict) | refused (repair)"
        " | lines/s (strict) | lines/s (repair) |"
    )
    print("|---|" + "---:|" * (len(KINDS) + 6))
    print(clean_row("pyref", pyref_passages()))
    if INFO.is_dir():
        print(clean_row("gnu", gnu_passages()))
    catalogue = {} if args.skip_gettext or not LOCALES.is_dir() else catalogue_lines()
    if catalogue:
        where: Counter[tuple[str, str]] = Counter()
        print(clean_row("gettext", list(catalogue), where))
        print()
        languages = Counter((kind, catalogue[line]) for kind, line in where)
        for kind in KINDS:
            top = [f"{lang} {n:,}" for (k, lang), n in languages.most_common() if k == kind]
            print(f"- gettext, {kind}: {', '.join(top[:8]) or 'none'}")
        print()
        print("| dirty corpus | lines | fixed | kind counted | refused |")
        print("|---|---:|---:|---:|---:|")
        print("\n".join(dirty_rows(list(catalogue))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
