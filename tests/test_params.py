import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmpipeline import docs
from lmpipeline.params import Params, ParamsError, load_params

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
    with pytest.raises(ParamsError, match=r"rag\.eval_fraction must be in \(0, 1\)"):
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
