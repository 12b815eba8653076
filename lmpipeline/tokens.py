"""Token datasets: validated data tokenized once, by the `tokenize_*` stages, into memory-mapped
Arrow datasets (`datasets`) under `output/tokens/`, which the training stages read.

A token dataset is a directory: one Arrow dataset per split (`datasets.save_to_disk`) and
`tokens.json`, which says what made it (the tokenizer's fingerprint, the params that change tokens)
and what it holds. Tokenizing runs in `num_proc` processes (`Dataset.map`); the source is read
as a stream into Arrow files first, so memory holds a batch at a time, whatever the file's size.
A training stage checks the fingerprint against its own model's tokenizer before it reads a row:
tokens made by another tokenizer are a one-line error, never silent garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from datasets.arrow_writer import ArrowWriter
from transformers import PreTrainedTokenizerBase

from lmpipeline.chat import Example, encode_chat
from lmpipeline.conversations import conversation
from lmpipeline.data import open_input, publishing_dir
from lmpipeline.errors import StageError

META_FILE = "tokens.json"
BATCH = 1000  # rows per batch handed to a tokenizing process
Row = dict[str, Any]
BatchFn = Callable[[Row], Row]  # a batch of rows (column -> values) -> a batch of tokenized rows
RegroupFn = Callable[[Iterator[Row]], Iterator[Row]]  # rows in order -> new rows (packing)


class TokenRows(torch.utils.data.Dataset):
    """Rows of a token dataset as tensors, each read when it is asked for: memory-mapped from a
    `tokenize_*` stage's Arrow files, or in memory (`of`). `select` takes a subset without
    copying; `column` reads one column of every row into memory (held-out sets)."""

    def __init__(self, rows: datasets.Dataset) -> None:
        self.rows = rows.with_format("torch")

    @classmethod
    def of(cls, rows: list[Row], features: datasets.Features) -> TokenRows:
        columns = {name: [r[name] for r in rows] for name in features}
        return cls(datasets.Dataset.from_dict(columns, features=features))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[int(i)]

    def column(self, name: str) -> torch.Tensor:
        """Column `name` of every row, stacked: (rows, length)."""
        if not len(self):
            return torch.zeros(0, 0, dtype=torch.long)
        return self.rows[:][name]  # a formatted batch of every row: one stacked tensor

    def select(self, indices: np.ndarray) -> TokenRows:
        return TokenRows(self.rows.select(indices))


def fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of everything that decides token ids: the tokenizer's full definition
    (vocabulary, merges, normalizer, added and special tokens) and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = (
        backend.to_str()
        if backend is not None
        else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    state = [
        type(tokenizer).__name__,
        definition,
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        tokenizer.chat_template or "",
    ]
    return hashlib.sha256("\0".join(state).encode()).hexdigest()


def processes() -> int:
    """Tokenizing processes: one per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _text_lines(path: str) -> Iterator[Row]:
    with open(path, encoding="utf-8", newline="\n") as f:  # a line ends at "\n" only
        for line in f:
            yield {"text": line.removesuffix("\n")}


def rows_of(path: Path, work: Path) -> datasets.Dataset:
    """The lines of a validated text file (column `text`), streamed into an Arrow file under
    `work`."""
    open_input(path).close()  # a missing input: the one-line error, before `datasets` sees it
    return datasets.Dataset.from_generator(
        _text_lines,
        gen_kwargs={"path": str(path)},
        features=datasets.Features({"text": datasets.Value("string")}),
        cache_dir=str(work),
    )


def token_count(rows: datasets.Dataset, column: str) -> int:
    """Tokens in a list column of `rows`, counted over the Arrow data without reading it into
    Python."""
    return int(pc.sum(pc.list_value_length(rows.data.column(column))).as_py() or 0)


def tokenize(
    rows: datasets.Dataset, function: BatchFn, features: datasets.Features
) -> datasets.Dataset:
    """`function` (a batch of rows -> a batch of tokenized rows) over `rows`, in parallel; the
    order of the rows is kept."""
    return rows.map(
        function,
        batched=True,
        batch_size=BATCH,
        num_proc=min(processes(), max(len(rows) // BATCH, 1)),
        remove_columns=rows.column_names,
        features=features,
        desc="tokenize",
    )


def regroup(
    rows: datasets.Dataset, regrouping: RegroupFn, features: datasets.Features, work: Path
) -> datasets.Dataset:
    """The rows `regrouping` makes of `rows` (read in order, a batch at a time: packing a token
    stream into blocks), written to an Arrow file under `work` as they come (none is fine)."""
    path = Path(tempfile.mkstemp(dir=work, suffix=".arrow")[1])
    with ArrowWriter(features=features, path=str(path)) as writer:
        for row in regrouping(single_rows(rows)):
            writer.write(row)
        written, _ = writer.finalize()
    if not written:  # an Arrow file without a record batch does not load: an empty dataset
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    return datasets.Dataset.from_file(str(path))


def single_rows(rows: datasets.Dataset) -> Iterator[Row]:
    """The rows of `rows` one by one, read a batch at a time."""
    for batch in rows.iter(batch_size=BATCH):
        names = list(batch)
        for values in zip(*batch.values(), strict=True):
            yield dict(zip(names, values, strict=True))


def staging(output: Path) -> tempfile.TemporaryDirectory[str]:
    """A scratch directory beside `output` for the Arrow files made on the way (removed after)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.work.")


def save(output: Path, splits: dict[str, datasets.Dataset], meta: dict[str, Any]) -> None:
    """Publish the splits and `tokens.json` (`meta`, and the splits' names) at `output` as one
    unit."""
    with publishing_dir(output) as new:
        for name, rows in splits.items():
            # `datasets` fingerprints a dataset from the temporary paths it came through; the
            # same inputs must give the same bytes, or DVC would rerun everything downstream.
            rows._fingerprint = hashlib.sha256(
                json.dumps([meta, name], sort_keys=True).encode()
            ).hexdigest()[:16]
            if len(rows):  # an empty one would not load again: `load` makes it
                rows.save_to_disk(str(new / name))
        text = json.dumps({**meta, "splits": list(splits)}, indent=2, sort_keys=True) + "\n"
        (new / META_FILE).write_text(text, encoding="utf-8")


def load(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    stage: str,
    make: str,
    expected: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, datasets.Dataset]]:
    """The metadata and splits of the token dataset at `path` (memory-mapped), after checking
    that `tokenizer` made them with the `expected` params; `make` names the stage that does."""
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StageError(
            f"{path}: no token dataset ({err.__class__.__name__}): `dvc repro {make}` makes it"
        ) from None
    if meta.get("tokenizer") != fingerprint(tokenizer):
        raise StageError(
            f"{path} was tokenized with another tokenizer than {stage}'s model has:"
            f" `dvc repro {make}` tokenizes again"
        )
    for key, value in expected.items():
        if meta.get(key) != value:
            raise StageError(
                f"{path} was tokenized with {key} {meta.get(key)!r}, the params say {value!r}:"
                f" `dvc repro {make}` tokenizes again"
            )
    splits = {
        name: (
            datasets.load_from_disk(str(path / name))
            if (path / name).is_dir()
            else datasets.Dataset.from_dict({})  # a split with no row
        )
        for name in meta["splits"]
    }
    return meta, splits


# --- cpt: masked-LM blocks -----------------------------------------------------------------------


MLM_BLOCK_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "word_starts": datasets.Sequence(datasets.Value("bool")),
    }
)
LINE_FEATURES = datasets.Features(
    {
        "ids": datasets.Sequence(datasets.Value("int32")),
        "starts": datasets.Sequence(datasets.Value("bool")),
    }
)


def line_tokenizer(tokenizer: PreTrainedTokenizerBase) -> Callable[[Row], Row]:
    """A batch of lines (`text`) -> each line's token ids followed by [SEP] (`ids`), and whether
    each token starts a word (`starts`)."""

    def tokenize(batch: Row) -> Row:
        encoded = tokenizer(list(batch["text"]), add_special_tokens=False)
        ids, starts = [], []
        for i, line_ids in enumerate(encoded["input_ids"]):
            word_ids = encoded.word_ids(i)
            firsts = [w != prev for w, prev in zip(word_ids, [None, *word_ids[:-1]], strict=True)]
            ids.append([*line_ids, tokenizer.sep_token_id])
            starts.append([*firsts, True])
        return {"ids": ids, "starts": starts}

    return tokenize


def block_maker(
    max_length: int, cls_id: int, sep_id: int
) -> Callable[[Iterator[Row]], Iterator[Row]]:
    """Tokenized lines, in order -> [CLS] chunk [SEP] blocks of `max_length` tokens cut from
    their joined stream; the short remainder is dropped."""
    body = max_length - 2

    def blocks(lines: Iterator[Row]) -> Iterator[Row]:
        ids: list[int] = []
        starts: list[bool] = []
        for line in lines:
            ids += line["ids"]
            starts += line["starts"]
            while len(ids) >= body:
                yield {
                    "input_ids": [cls_id, *ids[:body], sep_id],
                    "word_starts": [True, *starts[:body], True],
                }
                del ids[:body], starts[:body]

    return blocks


def blocks_of(
    lines: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> TokenRows:
    """The blocks of `lines`, in memory, exactly as `tokenize_cpt` makes them."""
    tokenized = line_tokenizer(tokenizer)({"text": list(lines)})
    rows = (
        {"ids": i, "starts": s} for i, s in zip(tokenized["ids"], tokenized["starts"], strict=True)
    )
    make = block_maker(max_length, tokenizer.cls_token_id, tokenizer.sep_token_id)
    return TokenRows.of(list(make(rows)), MLM_BLOCK_FEATURES)


# --- cpt_lm: packed causal-LM blocks -------------------------------------------------------------


PASSAGE_FEATURES = datasets.Features({"ids": datasets.Sequence(datasets.Value("int32"))})
CLM_BLOCK_FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})


def passage_tokenizer(tokenizer: PreTrainedTokenizerBase) -> Callable[[Row], Row]:
    """A batch of passages (`text`) -> each passage's token ids followed by the end-of-text
    token (`ids`)."""
    if tokenizer.eos_token_id is None:
        raise StageError("the generator's tokenizer has no end-of-text token to join passages")
    eos = tokenizer.eos_token_id

    def tokenize(batch: Row) -> Row:
        # A passage may hold a marker such as <|im_end|> as text: it stays text, never a control
        # token the model would learn to emit mid-document.
        encoded = tokenizer(
            list(batch["text"]), add_special_tokens=False, split_special_tokens=True
        )
        return {"ids": [[*ids, eos] for ids in encoded["input_ids"]]}

    return tokenize


def packer(max_length: int) -> Callable[[Iterator[Row]], Iterator[Row]]:
    """Tokenized passages, in order -> blocks of `max_length` tokens cut from their joined
    stream; the remainder shorter than a block is dropped."""

    def blocks(passages: Iterator[Row]) -> Iterator[Row]:
        stream: list[int] = []
        for passage in passages:
            stream += passage["ids"]
            while len(stream) >= max_length:
                yield {"input_ids": stream[:max_length]}
                del stream[:max_length]

    return blocks


def pack(passages: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> TokenRows:
    """The blocks of `passages`, in memory, exactly as `tokenize_cpt_lm` makes them."""
    ids = passage_tokenizer(tokenizer)({"text": list(passages)})["ids"]
    blocks = packer(max_length)({"ids": i} for i in ids)
    return TokenRows.of(list(blocks), CLM_BLOCK_FEATURES)


# --- sft: chat-formatted examples ----------------------------------------------------------------


def encode_all(
    tokenizer: PreTrainedTokenizerBase, records: list[dict[str, Any]], max_length: int
) -> tuple[list[Example], int]:
    """Encoded examples of canonical records (prompt/response or messages) and how many were
    truncated (dropped ones included)."""
    encoded = [encode_chat(tokenizer, conversation(r), max_length) for r in records]
    kept = [e for e in encoded if e is not None]
    return kept, sum(e is None or e.truncated for e in encoded)


# A validated SFT record as the tokenizing processes read it: its conversation.
CONVERSATION_FEATURES = datasets.Features(
    {"messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}]}
)


def _conversations(path: str) -> Iterator[Row]:
    with open(path, encoding="utf-8", newline="\n") as f:
        for line in f:
            if line.strip():
                yield {"messages": conversation(json.loads(line))}


def conversations_of(path: Path, work: Path) -> datasets.Dataset:
    """The conversations of a validated SFT split, streamed into an Arrow file under `work`."""
    open_input(path).close()  # a missing input: the one-line error, before `datasets` sees it
    return datasets.Dataset.from_generator(
        _conversations,
        gen_kwargs={"path": str(path)},
        features=CONVERSATION_FEATURES,
        cache_dir=str(work),
    )


EXAMPLE_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "truncated": datasets.Value("bool"),
        "length": datasets.Value("int32"),
    }
)


def chat_tokenizer(tokenizer: PreTrainedTokenizerBase, max_length: int) -> Callable[[Row], Row]:
    """A batch of conversations -> their examples (`encode_chat`); one left without an assistant
    token to learn is dropped (the stage counts it as truncated)."""

    def tokenize(batch: Row) -> Row:
        encoded = (encode_chat(tokenizer, m, max_length) for m in batch["messages"])
        kept = [e for e in encoded if e is not None]
        return {
            "input_ids": [e.input_ids for e in kept],
            "labels": [e.labels for e in kept],
            "truncated": [e.truncated for e in kept],
            "length": [len(e.input_ids) for e in kept],
        }

    return tokenize


class Examples(torch.utils.data.Dataset):
    """Encoded examples, each read when it is asked for: the rows of `output/tokens/sft`'s split
    (memory-mapped Arrow)."""

    def __init__(self, rows: datasets.Dataset) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Example:
        row = self.rows[int(i)]
        return Example(row["input_ids"], row["labels"], row["truncated"])

    def lengths(self) -> list[int]:
        return self.rows.data.column("length").to_pylist()
