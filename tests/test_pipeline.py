"""The real `dvc` CLI on a copy of the project in a temporary git repository."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import yaml
from dvc_objects.fs.system import reflink

from lmpipeline.smoke import copy_project, git_commit, parse_overrides, with_overrides

ROOT = Path(__file__).resolve().parents[1]
VALIDATE = ["validate_pretrain", "validate_sft", "validate_rag"]
TOKENIZE = ["tokenize_cpt", "tokenize_cpt_lm", "tokenize_sft"]
STAGES = {*VALIDATE, *TOKENIZE, "cpt", "sft_base", "cpt_lm", "sft", "rag", "report"}
T = TypeVar("T")


def dvc_env() -> dict[str, str]:
    """This environment's dvc and python first on PATH, as `make` arranges."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1"}


def sh(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        args, cwd=repo, env=dvc_env(), capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_for(check: Callable[[], T], timeout: float = 120.0, every: float = 0.01) -> T:
    """Poll `check` until it returns something truthy (or time runs out); return that."""
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(every)
    return value


def digest(path: Path) -> str:
    """sha256 of a file, or of every file of a directory with its relative path."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path)).encode() if path.is_dir() else b"")
        h.update(f.read_bytes())
    return h.hexdigest()


def cache_path(repo: Path, file: Path) -> Path:
    """Where DVC 3 caches a file: under the md5 of its content."""
    md5 = hashlib.md5(file.read_bytes()).hexdigest()
    return repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]


def can_reflink(folder: Path) -> bool:
    (folder / "a").write_bytes(b"x")
    try:
        reflink(str(folder / "a"), str(folder / "b"))
    except OSError:
        return False
    return True


def ran(proc: subprocess.CompletedProcess[str]) -> set[str]:
    """Stages that `dvc repro` executed (not those it skipped as unchanged)."""
    return set(re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr))


@pytest.fixture(scope="module")
def repo(
    tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path, tiny_bert_dir: Path
) -> Path:
    repo = tmp_path_factory.mktemp("project")
    copy_project(ROOT, repo)
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
    params["cpt_lm"].update(
        enabled=True, max_length=32, batch_size=4, max_steps=2, eval_steps=2, save_steps=2
    )
    params["rag"].update(max_length=32, max_new_tokens=2)
    params["rag"]["train"].update(epochs=1)
    params["rag"]["reader"].update(batch_size=4, max_steps=2, eval_steps=2, save_steps=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit(repo, "init")
    return repo


def baseline(repo: Path) -> None:
    """Every stage up to date and committed: what `dvc exp run` and the diffs compare against."""
    sh(repo, "dvc", "repro")
    if sh(repo, "git", "status", "--porcelain").stdout:
        git_commit(repo, "baseline")


def restore(repo: Path) -> None:
    """Back to the committed baseline after a test changed params, data or outputs."""
    sh(repo, "git", "checkout", "--", ".")
    sh(repo, "dvc", "checkout", "--force")


def test_repro_runs_every_stage_then_nothing(repo: Path) -> None:
    first = sh(repo, "dvc", "repro")
    assert ran(first) == STAGES
    assert (repo / "output/data/sft/train.jsonl").is_file()
    assert (repo / "output/sft_base/model.safetensors").is_file()
    assert (repo / "metrics/validate/rag.md").is_file()
    assert (repo / "output/cpt/model.safetensors").is_file()
    assert set(json.loads((repo / "metrics/cpt.json").read_text())) == {"base", "final"}
    assert set(json.loads((repo / "metrics/sft.json").read_text())) == {"base", "final", "train"}
    cpt_lm = json.loads((repo / "metrics/cpt_lm.json").read_text())
    assert cpt_lm["enabled"] and cpt_lm["final"]["perplexity"] > 0
    assert (repo / "output/cpt_lm/model.safetensors").is_file()
    assert (repo / "output/sft/model.safetensors").is_file()
    metrics = json.loads((repo / "metrics/rag.json").read_text())
    assert set(metrics) == {
        "questions",
        "retrieval",
        "answers",
        "index",
        "train",
        "start",
        "train_questions",
        "retriever",
        "reader",
        "refusal",
    }
    assert (repo / "output/rag/index.faiss").is_file()
    for stage in (
        "cpt",
        "cpt_lm",
        "sft",
        "rag",
    ):  # speed and memory are reported beside the outputs, not hashed
        timings = json.loads((repo / f"output/timings/{stage}.json").read_text())
        assert "tokens_per_s" in timings["train"] and timings["peak_rss_gib"] > 0
    # The run ends with the table of key metrics, also kept in metrics/summary.md.
    table = (repo / "metrics/summary.md").read_text()
    assert all(f"| {stage} " in table for stage in ("cpt", "cpt_lm", "sft", "rag"))
    assert "held-out MLM loss" in first.stdout and "recall@5" in first.stdout
    assert "train-question MRR, as is" in table and "retriever start" in table
    assert ran(sh(repo, "dvc", "repro")) == set()


def test_dag_shows_every_stage(repo: Path) -> None:
    dag = sh(repo, "dvc", "dag").stdout
    for stage in STAGES:
        assert stage in dag
    edges = set(re.findall(r'"(\w+)" -> "(\w+)"', sh(repo, "dvc", "dag", "--dot").stdout))
    assert edges == {
        ("validate_pretrain", "tokenize_cpt"),  # tokenized once, read by training
        ("tokenize_cpt", "cpt"),
        ("validate_pretrain", "cpt"),  # the passages and the train questions its encoder ranks
        ("validate_rag", "cpt"),
        ("validate_sft", "tokenize_sft"),
        ("sft_base", "tokenize_sft"),  # its tokenizer
        ("tokenize_sft", "sft"),
        ("validate_sft", "sft"),  # the held-out prompts it answers
        ("sft_base", "cpt_lm"),  # the seed's chain: CPT of the generator, then SFT, then RAG
        ("validate_pretrain", "tokenize_cpt_lm"),
        ("sft_base", "tokenize_cpt_lm"),
        ("validate_sft", "tokenize_cpt_lm"),  # cpt_lm.replay replays the SFT train split
        ("tokenize_cpt_lm", "cpt_lm"),
        ("cpt_lm", "sft"),
        ("validate_pretrain", "rag"),
        ("validate_pretrain", "validate_rag"),  # the golds are chunks of the passages
        ("validate_rag", "rag"),
        ("cpt", "rag"),
        ("sft", "rag"),
        *((stage, "report") for stage in [*VALIDATE, "cpt", "cpt_lm", "sft", "rag"]),
    }


@pytest.mark.slow
def test_rerun_from_scratch_gives_byte_identical_metrics_and_outputs(repo: Path) -> None:
    baseline(repo)
    assert ran(sh(repo, "dvc", "repro", "--force")) == STAGES
    # Same metric files, same output hashes in dvc.lock: nothing downstream would rerun.
    assert sh(repo, "git", "status", "--porcelain").stdout == ""


@pytest.mark.parametrize(
    ("setting", "reruns"),
    [
        # Training params: not tokenization, nor cpt_lm, which SFT starts from.
        ("sft.lr=3e-5", {"sft", "rag"}),
        pytest.param("cpt_lm.lr=3e-5", {"cpt_lm", "sft", "rag"}, marks=pytest.mark.slow),
        pytest.param("cpt.mlm_probability=0.2", {"cpt", "rag"}, marks=pytest.mark.slow),
        pytest.param(  # what tokens are: tokenized again
            "sft.max_length=48", {"tokenize_sft", "sft", "rag"}, marks=pytest.mark.slow
        ),
        pytest.param("rag.top_k=2", {"rag"}, marks=pytest.mark.slow),
        pytest.param(  # new chunks, new golds; CPT reports how its encoder ranks them
            "rag.chunk_words=50", {"validate_rag", "cpt", "rag"}, marks=pytest.mark.slow
        ),
    ],
)
def test_exp_run_reruns_only_the_stages_a_param_reaches(
    repo: Path, setting: str, reruns: set[str]
) -> None:
    baseline(repo)
    try:
        # `report` follows only if a metrics file changed, which a tiny model may not show.
        assert ran(sh(repo, "dvc", "exp", "run", "-S", setting)) - {"report"} == reruns
    finally:
        restore(repo)


def test_rag_sequence_backend_is_an_experiment_of_the_rag_stage_only(
    repo: Path, tiny_rag_dir: Path, tiny_dpr_ctx_dir: Path
) -> None:
    baseline(repo)
    settings = [
        "rag.backend=rag-sequence",
        f"rag.model={tiny_rag_dir}",
        f"rag.ctx_encoder={tiny_dpr_ctx_dir}",
    ]
    try:
        proc = sh(repo, "dvc", "exp", "run", *(a for s in settings for a in ("-S", s)))
        assert ran(proc) == {"rag", "report"}
        assert json.loads((repo / "output/rag/config.json").read_text())["backend"] == (
            "rag-sequence"
        )
        rag = json.loads((repo / "metrics/rag.json").read_text())
        assert set(rag["retrieval"]) == {"base", "finetuned", "bm25", "hybrid", "system"}
        diff = json.loads(sh(repo, "dvc", "metrics", "diff", "--json").stdout)["metrics/rag.json"]
        assert diff["retrieval.cpt.mrr"]["new"] is None  # no CPT retriever in this backend
        assert "retrieval.base.mrr" in diff  # DPR's question encoder, not the CPT base encoder
        assert "| rag " in (repo / "metrics/summary.md").read_text()
    finally:
        restore(repo)


@pytest.mark.slow
def test_make_repro_with_the_rag_sequence_backend_ends_with_the_summary(
    repo: Path, tiny_rag_dir: Path, tiny_dpr_ctx_dir: Path
) -> None:
    """The README's `make repro` (dvc repro, then the table with this machine's timings) with
    rag.backend rag-sequence: both backends write one timings layout, which the table reads."""
    baseline(repo)
    shutil.copy(ROOT / "Makefile", repo / "Makefile")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["rag"].update(
        backend="rag-sequence", model=str(tiny_rag_dir), ctx_encoder=str(tiny_dpr_ctx_dir)
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    venv = Path(sys.executable).parent.parent
    try:
        # -o: the environment this test runs in is set up already; make must not reinstall it.
        proc = sh(repo, "make", "-o", f"{venv}/.installed", "repro", f"VENV={venv}")
        assert ran(proc) == {"rag", "report"}
        rows = {
            line.split("|")[1].strip() + line.split("|")[2].strip()
            for line in proc.stdout.splitlines()
            if line.startswith("| ")
        }
        assert {"ragrecall@5", "raganswer F1", "ragtime (this machine)"} <= rows
        timing = next(
            line
            for line in proc.stdout.splitlines()
            if "| time (this machine)" in line and line.startswith("| rag ")
        )
        assert "tokens/s" in timing and "answer p50" in timing
        assert "| rag " in (repo / "metrics/summary.md").read_text()
    finally:
        (repo / "Makefile").unlink()
        restore(repo)


@pytest.mark.slow
def test_diffs_and_exp_show_name_what_an_experiment_changed(repo: Path) -> None:
    baseline(repo)
    try:
        sh(repo, "dvc", "exp", "run", "-S", "sft.lr=3e-5", "-n", "lower-lr")
        params = json.loads(sh(repo, "dvc", "params", "diff", "--json").stdout)
        assert set(params["params.yaml"]) == {"sft.lr"}
        assert float(params["params.yaml"]["sft.lr"]["new"]) == 3e-5
        metrics = json.loads(sh(repo, "dvc", "metrics", "diff", "--json").stdout)
        assert "final.eval_loss" in metrics["metrics/sft.json"]
        assert not {"metrics/cpt.json", "metrics/validate/sft.json"} & set(metrics)
        table = sh(repo, "dvc", "exp", "show", "--csv").stdout.splitlines()
        assert {"sft.lr", "metrics/sft.json:final.eval_loss"} <= set(table[0].split(","))
        assert any(row.startswith("lower-lr,") for row in table[1:])
    finally:
        restore(repo)


@pytest.mark.slow
def test_editing_sft_data_reruns_its_validation_sft_and_rag_only(repo: Path) -> None:
    baseline(repo)
    with (repo / "data/sft.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"prompt": "What is a new test prompt?", "response": "A new answer."}\n')
    try:
        assert ran(sh(repo, "dvc", "repro")) == {
            "validate_sft",
            "tokenize_sft",
            "tokenize_cpt_lm",  # reads the train split for cpt_lm.replay; same blocks at 0
            "sft",
            "rag",
            "report",
        }
    finally:
        restore(repo)


@pytest.mark.slow
def test_editing_pretrain_data_reruns_what_reads_the_corpus(repo: Path) -> None:
    baseline(repo)
    # Long enough to add packed blocks: the adapted generator changes, so SFT reruns from it.
    passage = " ".join(["One more passage of domain text about masked language models."] * 12)
    with (repo / "data/pretrain.txt").open("a", encoding="utf-8") as f:
        f.write(passage + "\n")
    try:
        assert ran(sh(repo, "dvc", "repro")) == {
            "validate_pretrain",
            "validate_rag",
            "tokenize_cpt",
            "tokenize_cpt_lm",
            "cpt",
            "cpt_lm",
            "sft",  # starts from the generator adapted to the corpus
            "rag",
            "report",
        }
    finally:
        restore(repo)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("sft.lrr=1", "sft.lrr"),  # DVC itself refuses a key params.yaml does not have
        ("+sft.lrr=1", "sft: params.yaml: unknown key 'sft.lrr'"),
        # test_params checks each kind of mistake in the loader; these two run with the slow tests
        pytest.param(
            "sft.batch_size=abc",
            "sft: params.yaml: sft.batch_size must be int",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "sft.lr=-1",
            "sft: params.yaml: sft.lr must be a number in [0, 10], got -1.0",
            marks=pytest.mark.slow,
        ),
        ("rag.eval_fraction=1", "validate_rag: params.yaml: rag.eval_fraction must be in (0, 1)"),
        (
            "cpt.mlm_probability=1.5",
            "cpt: params.yaml: cpt.mlm_probability must be a number in [0, 1]",
        ),
    ],
)
def test_bad_params_stop_exp_run_before_training_naming_the_key(
    repo: Path, setting: str, message: str
) -> None:
    baseline(repo)
    try:
        proc = sh(repo, "dvc", "exp", "run", "-S", setting, check=False)
        assert proc.returncode != 0
        assert message in proc.stdout + proc.stderr
        assert not re.search(r"\d tokens/s", proc.stdout)  # no stage trained
        assert ran(proc) <= {message.split(":")[0]}  # the first stage to read params stopped
    finally:
        restore(repo)


@pytest.mark.slow
def test_killed_training_resumes_and_ends_as_an_uninterrupted_run(repo: Path) -> None:
    baseline(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["sft"].update(max_steps=300, save_steps=20, eval_steps=100)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    outputs = ["metrics/sft.json", "metrics/sft/plots/metrics/eval/loss.tsv"]
    try:
        killed = subprocess.Popen(
            ["dvc", "repro", "sft"],
            cwd=repo,
            env=dvc_env(),
            start_new_session=True,  # one process group: dvc and the stage it runs
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def first_checkpoint() -> list[Path]:
            assert killed.poll() is None, "the stage ended before it could be interrupted"
            return list(repo.glob("checkpoints/sft-*/*/trainer_state.json"))

        assert wait_for(first_checkpoint), "no checkpoint was written"
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        assert not (repo / "metrics/sft.json").exists()  # the killed run recorded nothing

        resumed = sh(repo, "dvc", "repro", "sft")
        step = int(re.search(r"sft: resuming from \S+/checkpoint-(\d+)", resumed.stdout)[1])
        assert 0 < step < 300
        after_crash = [(repo / path).read_bytes() for path in outputs]
        assert not list(repo.glob("checkpoints/sft-*"))  # removed once the stage succeeded

        uninterrupted = sh(repo, "dvc", "repro", "--force", "sft")
        assert "resuming" not in uninterrupted.stdout
        assert [(repo / path).read_bytes() for path in outputs] == after_crash
    finally:
        restore(repo)


def test_plots_show_renders_every_stage_on_one_page(repo: Path, tmp_path: Path) -> None:
    baseline(repo)
    sh(repo, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    assert [p.name for p in (tmp_path / "plots").glob("*.html")] == ["index.html"]
    page = (tmp_path / "plots/index.html").read_text()
    for title in ["CPT loss", "Generator CPT loss", "SFT loss", "Retriever loss", "RAG recall@k"]:
        assert title in page


def test_bad_file_fails_the_pipeline_with_file_and_line(repo: Path) -> None:
    baseline(repo)
    rag = repo / "data/rag.jsonl"
    lines = rag.read_text(encoding="utf-8").splitlines()
    rag.write_text("\n".join([*lines[:2], '{"question": "truncated', *lines[2:]]) + "\n")
    try:
        proc = sh(repo, "dvc", "repro", check=False)
        assert proc.returncode != 0
        assert "data/rag.jsonl:3: not one well-formed JSON object" in proc.stderr + proc.stdout
        assert not (repo / "output/data/rag").exists()
        assert not (repo / "metrics/validate/rag.json").exists()
        sh(repo, "git", "checkout", "--", "data/rag.jsonl")
        assert ran(sh(repo, "dvc", "repro")) <= {"validate_rag"}  # nothing downstream changed
        assert "up to date" in sh(repo, "dvc", "status").stdout
    finally:
        restore(repo)


@pytest.mark.slow
def test_queued_experiments_run_and_are_listed_with_their_metrics(repo: Path) -> None:
    baseline(repo)
    for lr in ("1e-3", "2e-3"):
        sh(repo, "dvc", "exp", "run", "--queue", "-S", f"sft.lr={lr}")
    sh(repo, "dvc", "queue", "start", "-j", "2")

    def finished() -> str:
        status = sh(repo, "dvc", "queue", "status").stdout
        return "" if "Queued" in status or "Running" in status else status

    status = wait_for(finished, timeout=600, every=3)
    assert status.count("Success") == 2, status
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    experiments = [
        exp["data"]
        for commit in shown
        for experiment in commit.get("experiments") or []
        for exp in experiment["revs"]
    ]
    queued = [
        e
        for e in experiments
        if e.get("params") and e["params"]["params.yaml"]["data"]["sft"]["lr"] >= 1e-3
    ]
    assert sorted(e["params"]["params.yaml"]["data"]["sft"]["lr"] for e in queued) == [1e-3, 2e-3]
    for e in queued:
        assert "final" in e["metrics"]["metrics/sft.json"]["data"]
        assert "answers" in e["metrics"]["metrics/rag.json"]["data"]


def test_outputs_pushed_to_a_remote_come_back_identical(repo: Path, tmp_path: Path) -> None:
    baseline(repo)
    models = ["output/cpt/model.safetensors", "output/sft/model.safetensors", "output/rag"]
    before = {path: digest(repo / path) for path in models}
    weights = repo / models[1]
    if not can_reflink(tmp_path):  # (a reflink shares the blocks too, but invisibly)
        # One copy on disk: the workspace file is a hard link to the cache's.
        assert os.path.samefile(weights, cache_path(repo, weights))

    sh(repo, "dvc", "remote", "add", "--local", "shared", str(tmp_path / "remote"))
    sh(repo, "dvc", "push", "-r", "shared")
    shutil.rmtree(repo / "output")
    shutil.rmtree(repo / ".dvc/cache")
    sh(repo, "dvc", "pull", "-r", "shared")
    assert {path: digest(repo / path) for path in models} == before
    assert "up to date" in sh(repo, "dvc", "status").stdout


def test_smoke_overrides_reach_top_level_and_nested_keys() -> None:
    # `make smoke` users pass `-S device=cuda`; the smoke profile sets rag.train.*.
    overrides = parse_overrides(["device=cuda", "rag.train.epochs=1", "sft.batch_size=2"])
    nested = {"rag": {"train": {"epochs": 1}}, "sft": {"batch_size": 2}}
    assert overrides == {"device": "cuda", **nested}
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    merged = with_overrides(params, overrides)
    assert merged["device"] == "cuda" and merged["sft"]["batch_size"] == 2
    assert merged["rag"]["train"] == {**params["rag"]["train"], "epochs": 1}
    assert merged["rag"]["top_k"] == params["rag"]["top_k"]
    with pytest.raises(SystemExit, match=r"expected key\.path=value"):
        parse_overrides(["rag..top_k=2"])
