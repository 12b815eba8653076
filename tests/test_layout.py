"""The shape of the code: stages over a library whose layers only point down, answering without the
training stack, and a dvc.yaml whose deps are exactly the code each stage runs."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lmpipeline", "stages")
TRAINING_STACK = ("dvclive", "transformers.trainer", "torch.distributed.fsdp")
# What loading any model imports: transformers' modeling_utils itself imports accelerate and
# torch.distributed.fsdp (its FSDP-aware weight loading), whoever loads the model.
MODEL_LOADING = "import transformers.modeling_utils"


def source_of(module: str) -> Path | None:
    """The file of a project module (package __init__ included), or None if it is not one."""
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imports_of(path: Path) -> set[str]:
    """The project modules `path` imports, wherever in the file (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from lmpipeline import launch` imports the module lmpipeline.launch
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return {m for m in found if m.split(".")[0] in PACKAGES and source_of(m)}


def closure(module: str) -> set[str]:
    """`module` and every project module it imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += imports_of(source_of(name))  # type: ignore[arg-type]
    return seen


def modules(package: str) -> list[str]:
    return sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / package).rglob("*.py")
    )


def test_package_inits_hold_only_their_docstring() -> None:
    # So importing a package runs nothing, and no stage depends on an __init__ file.
    for init in [*ROOT.glob("lmpipeline/**/__init__.py"), ROOT / "stages/__init__.py"]:
        body = ast.parse(init.read_text(encoding="utf-8")).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr), init


# The layers, bottom first: a module imports only from its own layer or the ones below it.
LAYERS = [
    ["errors", "params", "data", "conversations", "runtime", "metrics", "sources"],
    ["models", "chat", "stage", "report", "docs", "smoke", "tokens"],
    ["mixing"],  # what cpt_lm trains on: tokens and chats
    [
        "rag.lexical",
        "rag.knowledge",
        "rag.index",
        "rag.probe",
        "rag.system",
        "rag.refusal",
        "rag.rerank",
        "rag.cpt_sft",
        "rag.rag_sequence",
        "rag.ask",
        "testing",  # the tests' tiny models and a tiny built system
    ],
    ["training"],
    ["cpt", "cpt_lm", "sft", "text_repair", "validation"],
    [
        "rag.evaluation",
        "rag.reader",
        "rag.decisions",
        "rag.rerank_train",
        "rag.backend",
        "rag.cpt_sft_train",
        "rag.rag_sequence_train",
    ],
    ["launch"],
    # rag-serve: on top, and like rag.ask it imports no training code (tested below)
    ["serve.engine", "serve.schema", "serve.app", "serve.cli", "serve.__main__"],
]
LAYER = {f"lmpipeline.{name}": n for n, names in enumerate(LAYERS) for name in names}


def layer(module: str) -> int:
    if module.startswith("stages"):
        return len(LAYERS)
    assert module in LAYER, f"{module} has no place in LAYERS: give it one"
    return LAYER[module]


def test_layers_only_point_down() -> None:
    for module in modules("lmpipeline") + modules("stages"):
        if source_of(module).name == "__init__.py":  # type: ignore[union-attr]
            continue
        for imported in imports_of(source_of(module)):  # type: ignore[arg-type]
            if source_of(imported).name != "__init__.py":  # type: ignore[union-attr]
                assert layer(imported) <= layer(module), f"{module} imports {imported}"


def test_no_library_module_imports_a_stage() -> None:
    for module in modules("lmpipeline"):
        stages = {m for m in closure(module) if m.startswith("stages")}
        assert not stages, f"{module} imports {stages}: the library must not depend on stages"


def loaded_by(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after `statement`."""
    probe = f"import sys; {statement}; print(' '.join(sys.modules))"
    run = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return set(run.stdout.split())


def assert_no_training_code(modules: set[str]) -> None:
    build_time = {"lmpipeline.training", "lmpipeline.rag.backend", "lmpipeline.stage"}
    assert not modules & build_time, modules & build_time
    assert not {m for m in modules if m.endswith("_train")}


def test_answering_imports_no_training_code() -> None:
    """rag-ask (and what serves answers later) loads a system without the training stack:
    statically no training module of ours; at run time no Trainer, no dvclive, and nothing of
    FSDP beyond what transformers' model loading imports for everyone."""
    assert_no_training_code(closure("lmpipeline.rag.ask"))
    extra = loaded_by("import lmpipeline.rag.ask") - loaded_by(MODEL_LOADING)
    training = {m for m in extra for s in TRAINING_STACK if m == s or m.startswith(s + ".")}
    assert not training, training


def test_serving_imports_no_training_code() -> None:
    """rag-serve answers as rag-ask does: at run time it loads rag-ask's modules and the web
    server's, so the check of our own code is enough."""
    assert_no_training_code(closure("lmpipeline.serve.cli"))


def stage_commands() -> dict[str, tuple[str, list[str]]]:
    """For each stage of dvc.yaml: the module its command runs, and its deps."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    found = {}
    for name, stage in spec.items():
        module = re.search(r"python -m (\S+)", stage["cmd"])
        assert module, f"{name}: its command runs no `python -m` module"
        found[name] = (module[1], [str(d) for d in stage.get("deps", [])])
    return found


@pytest.mark.parametrize("stage", sorted(stage_commands()))
def test_dvc_yaml_lists_exactly_the_code_each_stage_runs(stage: str) -> None:
    """A module a stage imports but does not list would let `dvc repro` keep an output that
    code changed; one it lists but does not import would rerun it for nothing."""
    module, deps = stage_commands()[stage]
    code = {str(source_of(m).relative_to(ROOT)) for m in closure(module)}  # type: ignore[union-attr]
    code = {path for path in code if not path.endswith("__init__.py")}
    listed = {d for d in deps if d.startswith(tuple(f"{p}/" for p in PACKAGES))}
    assert listed == code, (
        f"missing: {sorted(code - listed)}; not imported: {sorted(listed - code)}"
    )


def test_every_stage_module_is_a_stage_of_dvc_yaml() -> None:
    run = {module for module, _ in stage_commands().values()}
    assert set(modules("stages")) - {"stages"} == run


def test_every_model_load_refuses_remote_code() -> None:
    """Outputs arrive by `dvc pull` from other people: no `from_pretrained` may run their code."""
    for module in modules("lmpipeline") + modules("stages"):
        tree = ast.parse(source_of(module).read_text(encoding="utf-8"))  # type: ignore[union-attr]
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "from_pretrained"
            ):
                flags = {k.arg: k.value for k in node.keywords}
                value = flags.get("trust_remote_code")
                assert isinstance(value, ast.Constant) and value.value is False, (
                    f"{module}:{node.lineno}: from_pretrained without trust_remote_code=False"
                )
