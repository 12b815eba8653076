"""The real `dvc` CLI on a copy of the project in a temporary git repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VALIDATE = ["validate_pretrain", "validate_sft", "validate_rag"]
STAGES = {*VALIDATE, "cpt", "sft_base", "sft", "rag"}


def sh(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["DVC_NO_ANALYTICS"] = "1"
    proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def ran(proc: subprocess.CompletedProcess[str]) -> set[str]:
    """Stages that `dvc repro` executed (not those it skipped as unchanged)."""
    return set(re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr))


@pytest.fixture(scope="module")
def repo(
    tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path, tiny_bert_dir: Path
) -> Path:
    repo = tmp_path_factory.mktemp("project")
    for name in ["dvc.yaml", ".gitignore", ".dvcignore"]:
        shutil.copy(ROOT / name, repo / name)
    for name in ["stages", "data", ".dvc"]:
        shutil.copytree(
            ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "cache", "tmp")
        )
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sft"].update(
        model=str(tiny_gpt2_dir),
        max_length=64,
        batch_size=4,
        max_steps=2,
        eval_steps=2,
        save_steps=2,
        max_new_tokens=4,
        samples=1,
    )
    params["cpt"].update(
        model=str(tiny_bert_dir),
        max_length=32,
        batch_size=8,
        max_steps=3,
        eval_steps=2,
        save_steps=2,
    )
    params["rag"].update(max_length=32, retriever_epochs=1, max_new_tokens=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return repo


def test_repro_runs_every_stage_then_nothing(repo: Path) -> None:
    first = sh(repo, "dvc", "repro")
    assert ran(first) == STAGES
    assert (repo / "output/data/sft/train.jsonl").is_file()
    assert (repo / "output/sft_base/model.safetensors").is_file()
    assert (repo / "metrics/validate/rag.md").is_file()
    assert (repo / "output/cpt/model.safetensors").is_file()
    assert set(json.loads((repo / "metrics/cpt.json").read_text())) == {"base", "final", "train"}
    assert set(json.loads((repo / "metrics/sft.json").read_text())) == {"base", "final", "train"}
    assert (repo / "output/sft/model.safetensors").is_file()
    metrics = json.loads((repo / "metrics/rag.json").read_text())
    assert set(metrics) == {"retrieval", "answers", "latency", "index", "train"}
    assert (repo / "output/rag/index.faiss").is_file()
    assert ran(sh(repo, "dvc", "repro")) == set()


def test_dag_shows_every_stage(repo: Path) -> None:
    dag = sh(repo, "dvc", "dag").stdout
    for stage in STAGES:
        assert stage in dag
    edges = set(re.findall(r'"(\w+)" -> "(\w+)"', sh(repo, "dvc", "dag", "--dot").stdout))
    assert edges == {
        ("validate_pretrain", "cpt"),
        ("validate_sft", "sft"),
        ("sft_base", "sft"),
        ("validate_pretrain", "rag"),
        ("validate_rag", "rag"),
        ("cpt", "rag"),
        ("sft", "rag"),
    }


def test_editing_sft_data_reruns_its_validation_sft_and_rag_only(repo: Path) -> None:
    sh(repo, "dvc", "repro")
    with (repo / "data/sft.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"prompt": "What is a new test prompt?", "response": "A new answer."}\n')
    assert ran(sh(repo, "dvc", "repro")) == {"validate_sft", "sft", "rag"}


def test_editing_pretrain_data_does_not_rerun_sft(repo: Path) -> None:
    sh(repo, "dvc", "repro")
    with (repo / "data/pretrain.txt").open("a", encoding="utf-8") as f:
        f.write("One more passage of domain text about masked language models and retrieval.\n")
    assert ran(sh(repo, "dvc", "repro")) == {"validate_pretrain", "cpt", "rag"}


def set_param(repo: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_sft_and_rag_params_do_not_rerun_cpt(repo: Path) -> None:
    sh(repo, "dvc", "repro")
    set_param(repo, "sft", "eval_fraction", 0.2)
    set_param(repo, "rag", "eval_fraction", 0.3)
    assert ran(sh(repo, "dvc", "repro")) == {"validate_sft", "validate_rag", "sft", "rag"}
    set_param(repo, "sft", "lr", 3e-5)
    assert ran(sh(repo, "dvc", "repro")) == {"sft", "rag"}
    set_param(repo, "rag", "top_k", 2)
    assert ran(sh(repo, "dvc", "repro")) == {"rag"}


def test_cpt_params_rerun_cpt_and_rag_only(repo: Path) -> None:
    sh(repo, "dvc", "repro")
    set_param(repo, "cpt", "mlm_probability", 0.2)
    assert ran(sh(repo, "dvc", "repro")) == {"cpt", "rag"}


def test_bad_file_fails_the_pipeline_with_file_and_line(repo: Path) -> None:
    sh(repo, "dvc", "repro")
    rag = repo / "data/rag.jsonl"
    good = rag.read_text(encoding="utf-8")
    lines = good.splitlines()
    rag.write_text("\n".join([*lines[:2], '{"question": "truncated', *lines[2:]]) + "\n")
    try:
        proc = sh(repo, "dvc", "repro", check=False)
        assert proc.returncode != 0
        assert "data/rag.jsonl:3: not one well-formed JSON object" in proc.stderr + proc.stdout
        assert not (repo / "output/data/rag").exists()
        assert not (repo / "metrics/validate/rag.json").exists()
    finally:
        rag.write_text(good, encoding="utf-8")
    assert ran(sh(repo, "dvc", "repro")) == {"validate_rag"}


def test_queued_experiments_run_and_are_listed_with_their_metrics(repo: Path) -> None:
    sh(repo, "dvc", "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline")
    for lr in ("1e-3", "2e-3"):
        sh(repo, "dvc", "exp", "run", "--queue", "-S", f"sft.lr={lr}")
    sh(repo, "dvc", "queue", "start", "-j", "2")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = sh(repo, "dvc", "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert status.count("Success") == 2, status
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    experiments = [
        exp["data"]
        for commit in shown
        for experiment in commit.get("experiments") or []
        for exp in experiment["revs"]
    ]
    lrs = sorted(
        e["params"]["params.yaml"]["data"]["sft"]["lr"] for e in experiments if e.get("params")
    )
    assert lrs == [1e-3, 2e-3]
    for e in experiments:
        assert "final" in e["metrics"]["metrics/sft.json"]["data"]
        assert "answers" in e["metrics"]["metrics/rag.json"]["data"]
