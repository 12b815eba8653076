import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmpipeline import docs
from lmpipeline.params import RANGES, Params, ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]


def leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested mapping, by dotted key."""
    found: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            found |= leaves(value, f"{prefix}{key}.")
        else:
            found[prefix + key] = value
    return found


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_repository_params_load_and_match_their_dataclasses() -> None:
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.validate.sft.prompt.max_chars == 4000
    assert params.sft.model.startswith("bundled:")


def test_params_yaml_matches_defaults() -> None:
    """The dataclasses are the one source of the defaults: params.yaml writes out every key,
    each with exactly the default value."""
    written = leaves(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")))
    defaults = leaves(dataclasses.asdict(Params()))
    assert set(written) == set(defaults)
    for key, value in defaults.items():
        loaded = written[key]
        if isinstance(value, str) and isinstance(loaded, bool):  # `enabled: false`, a name
            loaded = "true" if loaded else "false"
        assert loaded == value and type(loaded) in {type(value), int}, (key, loaded, value)
    assert load_params(ROOT / "params.yaml") == Params()


def test_the_params_reference_is_generated_from_the_dataclasses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/params.md is what `make docs` writes now: every key, its default, the stages it
    reruns and its docstring."""
    monkeypatch.chdir(ROOT)
    assert docs.main(["--check"]) == 0, "docs/params.md is out of date: run `make docs`"
    page = (ROOT / "docs/params.md").read_text(encoding="utf-8")
    for key in leaves(dataclasses.asdict(Params())):
        assert f"| `{key}` |" in page
    assert (
        "| `sft.eval_steps` | 10 | sft |" in page
        and "| `rag.train.warmup_ratio` | 0.1 | rag |" in page
    )


def test_unknown_key_is_named_with_its_dotted_path(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"unknown key 'sft\.eval_fractoin'"):
        load_params(write(tmp_path, "sft:\n  eval_fractoin: 0.2\n"))


def test_mistyped_value_is_named(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"seed must be int, got str"):
        load_params(write(tmp_path, "seed: forty-two\n"))
    with pytest.raises(ParamsError, match=r"validate\.sft\.prompt must be a mapping"):
        load_params(write(tmp_path, "validate:\n  sft:\n    prompt: 12\n"))


def test_exponent_floats_that_yaml_reads_as_strings_are_accepted(tmp_path: Path) -> None:
    # `dvc exp run -S sft.eval_fraction=5e-2` writes an unquoted 5e-2, a string to YAML 1.1.
    params = load_params(write(tmp_path, "sft:\n  eval_fraction: 5e-2\n"))
    assert params.sft.eval_fraction == pytest.approx(0.05)


def test_out_of_range_values_fail(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="device must be"):
        load_params(write(tmp_path, "device: gpu\n"))
    with pytest.raises(ParamsError, match="fp16 must be"):
        load_params(write(tmp_path, "fp16: maybe\n"))
    with pytest.raises(ParamsError, match=r"rag\.eval_fraction must be a number in \[0, 1\]"):
        load_params(write(tmp_path, "rag:\n  eval_fraction: 1.5\n"))
    with pytest.raises(
        ParamsError, match=r"validate\.rag\.answer\.min_chars must be in \[0, max_chars\]"
    ):
        load_params(
            write(tmp_path, "validate:\n  rag:\n    answer: {min_chars: 9, max_chars: 2}\n")
        )


def test_yaml_booleans_and_device_indices_are_understood(tmp_path: Path) -> None:
    params = load_params(write(tmp_path, "fp16: true\ndevice: cuda:1\n"))
    assert (params.fp16, params.device) == ("true", "cuda:1")


def test_missing_file_says_where_to_run(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_fsdp_is_chosen_by_name_and_refused_where_it_cannot_work(tmp_path: Path) -> None:
    assert load_params(write(tmp_path, "launch:\n  strategy: fsdp\n")).launch.strategy == "fsdp"
    with pytest.raises(ParamsError, match=r"launch\.strategy must be ddp\|fsdp, got 'zero3'"):
        load_params(write(tmp_path, "launch:\n  strategy: zero3\n"))
    with pytest.raises(ParamsError, match=r"fsdp does not combine with sft\.lora_r > 0"):
        load_params(write(tmp_path, "launch:\n  strategy: fsdp\nsft:\n  lora_r: 8\n"))
    with pytest.raises(ParamsError, match=r"fsdp does not combine with rag\.backend rag-sequence"):
        load_params(write(tmp_path, "launch:\n  strategy: fsdp\nrag:\n  backend: rag-sequence\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sft:\n  lr: .nan\n", r"sft\.lr must be a number in \[0, 10\], got nan"),
        ("cpt:\n  lr: .inf\n", r"cpt\.lr must be a number in \[0, 10\], got inf"),
        ("sft:\n  lr: 1e400\n", r"sft\.lr must be a number in \[0, 10\], got inf"),
        ("sft:\n  epochs: .inf\n", r"sft\.epochs must be a number in \[0, 1000000\]"),
        ("sft:\n  weight_decay: -0.1\n", r"sft\.weight_decay must be a number in \[0, 10\]"),
        ("seed: -1\n", r"seed must be a number in \[0, 4294967295\], got -1"),
        ("sft:\n  lora_alpha: 0\n", r"sft\.lora_alpha must be a number in \[1, 1000000\]"),
        (
            "launch:\n  master_port: 70000\n",
            r"launch\.master_port must be a number in \[1, 65535\]",
        ),
        ("validate:\n  max_errors: -1\n", r"validate\.max_errors must be a number in \[1, "),
        ('device: "cpu\\n"\n', "device must be auto"),
        ("cpt:\n  eval_fraction: 0\n", r"cpt\.eval_fraction must be in \(0, 1\)"),
        ("sft:\n  eval_fraction: 0\n", r"sft\.eval_fraction must be in \(0, 1\)"),
        ("rag:\n  top_k: 0\n", r"rag\.top_k must be a number in \[1, 10000\]"),
    ],
)
def test_every_number_is_finite_and_in_its_range(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        load_params(write(tmp_path, text))


def test_every_numeric_key_has_a_range() -> None:
    def numeric_fields(cls: type) -> set[str]:
        found = set()
        for f in dataclasses.fields(cls):
            kind = cls.__dataclass_fields__[f.name].type
            if dataclasses.is_dataclass(
                f.default_factory if callable(f.default_factory) else f.default
            ):
                continue
            if kind in ("int", "float"):
                found.add(f.name)
        return found

    def walk(cls: type) -> set[str]:
        names = numeric_fields(cls)
        for f in dataclasses.fields(cls):
            sub = f.default_factory() if callable(f.default_factory) else f.default
            if dataclasses.is_dataclass(sub):
                names |= walk(type(sub))
        return names

    assert walk(Params) <= set(RANGES), walk(Params) - set(RANGES)
    assert {"lr", "seed", "master_port", "max_errors", "top_k"} <= walk(Params)


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_params_file_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ParamsError, match="empty"):
        load_params(write(tmp_path, text))


def test_rag_choices_are_names_and_the_calibration_slice_a_share(tmp_path: Path) -> None:
    forced = load_params(write(tmp_path, "rag:\n  rerank:\n    enabled: true\n"))
    assert forced.rag.rerank.enabled == "true"  # YAML's boolean, read as the name
    for bad, says in [
        ("rerank:\n    enabled: sometimes", r"rag.rerank.enabled must be auto\|true\|false"),
        ("retriever: sparse", r"rag.retriever must be auto\|dense\|bm25\|hybrid"),
        ("calibration_fraction: 0", r"rag.calibration_fraction must be in \(0, 1\)"),
        ("rerank:\n    candidates: 0", r"rag.rerank.candidates must be a number in \[1"),
    ]:
        with pytest.raises(ParamsError, match=says):
            load_params(write(tmp_path, f"rag:\n  {bad}\n"))


def test_a_column_mapping_names_a_dataset_and_maps_once_onto_each_field(tmp_path: Path) -> None:
    params = load_params(
        write(tmp_path, "data:\n  sft: data/sft.csv\n  columns:\n    sft: {instruction: prompt}\n")
    )
    assert (params.data.sft, params.data.columns.sft) == ("data/sft.csv", {"instruction": "prompt"})
    with pytest.raises(ParamsError, match=r"unknown key 'data\.columns\.chat'"):
        load_params(write(tmp_path, "data:\n  columns:\n    chat: {a: prompt}\n"))
    with pytest.raises(
        ParamsError,
        match=r"data\.columns\.sft\.instruction maps onto 'promt', which sft records do not have"
        r" \(sft's fields: prompt, response, messages, conversations, instruction, input, output,"
        r" system\)",
    ):
        load_params(write(tmp_path, "data:\n  columns:\n    sft: {instruction: promt}\n"))
    with pytest.raises(
        ParamsError, match=r"data\.columns\.rag maps 'query' and 'q' both onto 'question'; keep one"
    ):
        load_params(write(tmp_path, "data:\n  columns:\n    rag: {query: question, q: question}\n"))
    with pytest.raises(ParamsError, match=r"data\.columns\.sft\.True must map a column name"):
        load_params(write(tmp_path, "data:\n  columns:\n    sft: {yes: prompt}\n"))
