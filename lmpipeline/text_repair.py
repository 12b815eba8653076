"""Repairing real-world text before it is validated (`validate.text: repair`).

Scraped, exported and PDF text carries artifacts that are not errors of the writer: mojibake
(UTF-8 read as Windows-1252, `donâ€™t`), zero-width characters and byte-order marks inside
lines, soft hyphens, decomposed forms (NFD). Each is mended here, by rule, and named by its
kind so that validation can count it. What is no text (a control character, a lone surrogate)
is never mended: validation refuses it before and after the repair.

Only the validate stages import this module: it needs ftfy, which the training stages do not.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

import ftfy

# Zero-width characters that carry nothing: ZERO WIDTH SPACE, WORD JOINER and U+FEFF, a
# byte-order mark read as ZERO WIDTH NO-BREAK SPACE. Not ZERO WIDTH NON-JOINER and JOINER
# (U+200C, U+200D): they change how Persian and Indic scripts are shaped and join emoji
# sequences, so removing them would change the text.
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u2060\ufeff"))
_SOFT_HYPHEN = {0xAD: None}  # a hyphenation hint of typesetting, invisible unless at a break

# ftfy's encoding repair alone. Its other fixes would rewrite valid text (curly quotes,
# ligatures, full-width forms, HTML entities, line breaks, a normalization of its own: NFC is a
# separate, counted step here) or remove a control character that validation must refuse.
# `explain` stays on: its plan says how ftfy repaired (see `fix_mojibake`), and without it
# ftfy (6.0 to 6.3.1) repairs the encoding with its default options, not these.
MOJIBAKE_ONLY = ftfy.TextFixerConfig(
    unescape_html=False,
    remove_terminal_escapes=False,
    fix_encoding=True,
    restore_byte_a0=True,
    replace_lossy_sequences=True,
    decode_inconsistent_utf8=True,
    fix_c1_controls=False,
    fix_latin_ligatures=False,
    fix_character_width=False,
    uncurl_quotes=False,
    fix_line_breaks=False,
    fix_surrogates=False,
    remove_control_chars=False,
    normalization=None,
    explain=True,
)
# A C1 control (U+0080-U+009F) in a line is either a byte of mojibake (the U+009D of `â€\x9d`,
# a right double quotation mark read as Windows-1252) or a control character. Only ftfy's
# decoding of the whole line as UTF-8 tells them apart: its decoding of fragments
# (`decode_inconsistent_utf8`, which repairs them with ftfy's default options) and its reading
# of a C1 control as the Windows-1252 character of its byte (NEXT LINE, U+0085, as "…") would
# turn a control character into text.
WHOLE_LINE_ONLY = MOJIBAKE_ONLY._replace(decode_inconsistent_utf8=False)
_C1 = re.compile("[\x80-\x9f]")


def fix_mojibake(text: str) -> str:
    """`text` with its mojibake decoded back to what was written, by ftfy. A text that holds a
    C1 control is repaired only by decoding it whole as UTF-8, or left as it is (validation
    then refuses the C1 control that is left)."""
    if not _C1.search(text):
        return ftfy.fix_and_explain(text, MOJIBAKE_ONLY).text
    fixed, plan = ftfy.fix_and_explain(text, WHOLE_LINE_ONLY)
    if any(action == "decode" and not codec.startswith("utf-8") for action, codec in plan):
        return text
    return fixed


# The repairs in the order they run, each with its kind: mojibake first, since the bytes of
# a mojibake sequence may read as a soft hyphen (`í` as `Ã` and U+00AD) or a zero-width
# character; NFC last, since a removal may bring a letter and its combining mark together.
REPAIRS: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("mojibake", fix_mojibake),
    ("zero_width", lambda text: text.translate(_ZERO_WIDTH)),
    ("soft_hyphen", lambda text: text.translate(_SOFT_HYPHEN)),
    ("nfc", lambda text: unicodedata.normalize("NFC", text)),
)
KINDS = tuple(kind for kind, _ in REPAIRS)
# Passes over a line until one changes nothing: a removal may bring the characters of a
# mojibake sequence together (`Ã`, U+200B, `©`), and NFC may compose one. Every pass that
# changes a line decodes, removes or composes characters; the bound is for a line made to
# need more.
MAX_PASSES = 8


def repair(text: str) -> tuple[str, tuple[str, ...]]:
    """`text` repaired, and the kinds of repair that changed it, in the order of `KINDS`.
    What it returns stays as it is when repaired again (within `MAX_PASSES`)."""
    if text.isascii():  # nothing to repair: most lines of most corpora, at the cost of one scan
        return text, ()
    made: set[str] = set()
    for _ in range(MAX_PASSES):
        start = text
        for kind, fix in REPAIRS:
            fixed = fix(text)
            if fixed != text:
                made.add(kind)
                text = fixed
        if text == start:
            break
    return text, tuple(kind for kind in KINDS if kind in made)
