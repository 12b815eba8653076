"""The pipeline's training stages on a bare GPU machine, a few steps each, with assertions.

`benchmarks/gpu_check.sh` drives it. Three commands:

- `pack` (here, with the full environment): into `.gpucheck/` (at most 64 MiB with the working
  tree), the cp312 wheels of what the stages import and the GPU machine lacks (datasets, dvclive
  and the DVC modules it imports, faiss-cpu, bm25s, PyStemmer, trl; transformers too, as the
  image's 5.17 is older than the floor, 5.24), the default models' configs and
  tokenizers (no weights), the data validated by the `validate_*` stages, and the check's params.
- `run` (on the GPU machine, after the wheels are installed): random fp32 weights from the
  configs, then the `dvc.yaml` commands of tokenize_cpt, cpt, sft_base, tokenize_cpt_lm, cpt_lm,
  tokenize_sft, sft and rag with `device: cuda` and the smoke profile's step counts, then SFT
  again with `fp16: true`. Each stage runs under a probe that records, inside every training
  loss, whether autocast was on and the loss finite, and for every linear layer of a training
  forward the activation and weight dtypes. Asserted: finite losses, autocast on in each loss,
  activations in the precision chosen (bf16, or fp16 when forced), fp32 weights, MFU <= 1
  against a peak measured in that dtype. Printed: seconds, tokens/s, MFU and peak GPU memory per
  stage.
- `dry-run` (here, CI's slow tests): `pack`, then `run` with `device: cpu`, where the precision
  expected is fp32; imports of any package neither on the GPU machine's image nor carried fail,
  as they would there.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.metadata
import json
import math
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from functools import reduce
from operator import getitem
from pathlib import Path
from typing import Any

import torch
import yaml

from lmpipeline.smoke import SMOKE_PARAMS, with_overrides

ROOT = Path(__file__).resolve().parent.parent
PACK = ROOT / ".gpucheck"
LIMIT_MIB = 64  # what one device call carries, working tree included
STAGES = [
    "tokenize_cpt",
    "cpt",
    "sft_base",
    "tokenize_cpt_lm",
    "cpt_lm",
    "tokenize_sft",
    "sft",
    "rag",
]
TRAINING = {"cpt", "cpt_lm", "sft", "rag"}
# Models: random weights built on the device from the default models' configs.
MODELS = {"encoder": ("cpt", "AutoModel"), "generator": ("sft", "AutoModelForCausalLM")}
CHECK_PARAMS: dict[str, Any] = {
    "cpt": {"model": "./models/encoder"},
    "sft": {"model": "./models/generator"},
    "cpt_lm": {"enabled": True},
    "rag": {"train": {"max_steps": 4}},
}
# What the stages import that the GPU machine's image lacks, at the versions of constraints.txt.
CARRIED = [
    # the image's transformers (5.17) predates the floor (5.24: `cache` in generate and outputs)
    "transformers",
    "datasets",
    "dill",
    "multiprocess",
    # dvclive, and the DVC modules it imports when it writes the curves
    "dvclive",
    "dvc",
    "dvc-render",
    "dvc-studio-client",
    "funcy",
    "flatten-dict",
    "ruamel.yaml",
    "voluptuous",
    "scmrepo",
    "pygtrie",
    "dulwich",
    "dvc-http",
    "dvc-objects",
    "dvc-data",
    "sqltrie",
    "diskcache",
    "dpath",
    "flufl.lock",
    "atpublic",
    "zc.lockfile",
    "platformdirs",
    "configobj",
    "faiss-cpu",
    "bm25s",
    "PyStemmer",
    "trl",  # `run --trl` only: benchmarks/sft_vs_trl.py
]
# The GPU machines' image: one package name per line ("#" starts a comment).
GPU_IMAGE = [
    line
    for line in (Path(__file__).with_name("gpu_image.txt")).read_text().splitlines()
    if line and not line.startswith("#")
]
OWN = {"lmpipeline", "stages", "benchmarks"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- pack (here) ---------------------------------------------------------------------------------


def check_params(device: str, fp16: str) -> dict[str, Any]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    return with_overrides(params, SMOKE_PARAMS, CHECK_PARAMS, {"device": device, "fp16": fp16})


TEMPLATE = re.compile(r"\$\{([\w.]+)\}")  # DVC's templating of params.yaml values


def stage_commands() -> dict[str, list[str]]:
    """Each stage's command from dvc.yaml, its `${key.path}` filled in from params.yaml as DVC
    fills it in, run by this interpreter."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    commands = {}
    for name, stage in stages.items():
        cmd = TEMPLATE.sub(lambda m: str(reduce(getitem, m[1].split("."), params)), stage["cmd"])
        words = shlex.split(cmd)
        assert words[:2] == ["python", "-m"], f"{name}: {stage['cmd']}"
        commands[name] = words[2:]  # module and arguments
    return commands


def run_python(args: list[str], cwd: Path, label: str) -> float:
    """Run this interpreter with `args` in `cwd`, the project importable; its seconds."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, env={**os.environ, "PYTHONPATH": path}, check=False
    )
    if done.returncode:
        raise SystemExit(f"gpu_check: {label} failed ({done.returncode})")
    return time.perf_counter() - start


def pack_models(pack: Path) -> None:
    """The default models' configs and tokenizers, without their weights."""
    from transformers import AutoConfig

    from lmpipeline.models import load_tokenizer, resolve_model

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for name, (section, _) in MODELS.items():
        source = resolve_model(params[section]["model"])
        kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        config = AutoConfig.from_pretrained(source.path, **kwargs)
        config.save_pretrained(pack / "models" / name)
        load_tokenizer(source).save_pretrained(pack / "models" / name)


def pack_wheels(pack: Path) -> None:
    pins = dict(
        line.strip().split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    pins = {normalized(k): v for k, v in pins.items()}
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    platforms += ["manylinux_2_27_x86_64", "manylinux1_x86_64", "manylinux_2_5_x86_64"]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--isolated"]
    command += ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    command += [f"--platform={p}" for p in platforms] + ["-d", str(pack / "wheels")]
    command += [f"{name}=={pins[normalized(name)]}" for name in CARRIED]
    subprocess.run(command, check=True)


def size_mib(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths if p.is_file()) / 2**20


def carried_mib(pack: Path) -> tuple[float, float]:
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    tree = size_mib([ROOT / p for p in tracked.split("\0") if p])
    return size_mib(list(pack.rglob("*"))), tree


def pack(target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    (target / "params.yaml").write_text(yaml.safe_dump(check_params("cpu", "auto")))
    shutil.copytree(ROOT / "data", target / "data")
    commands = stage_commands()
    for name in ("validate_pretrain", "validate_sft", "validate_rag"):
        run_python(["-m", *commands[name]], target, name)
    shutil.rmtree(target / "metrics")
    shutil.rmtree(target / "data")
    pack_models(target)
    pack_wheels(target)
    packed, tree = carried_mib(target)
    print(f"gpu_check: packed {packed:.1f} MiB + working tree {tree:.1f} MiB", flush=True)
    if packed + tree > LIMIT_MIB:
        raise SystemExit(f"gpu_check: {packed + tree:.1f} MiB exceeds the {LIMIT_MIB} MiB carried")


# --- run (on the device) -------------------------------------------------------------------------


def build_models(pack: Path, work: Path) -> None:
    """Random fp32 weights from the packed configs, saved with the packed tokenizers."""
    import transformers

    for name, (_, auto) in MODELS.items():
        config = transformers.AutoConfig.from_pretrained(pack / "models" / name)
        torch.manual_seed(0)
        model = getattr(transformers, auto).from_config(config, dtype=torch.float32)
        shutil.copytree(pack / "models" / name, work / "models" / name)
        model.save_pretrained(work / "models" / name)


def finite(value: Any) -> bool:
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, list):
        return all(finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def speeds(timings: Any) -> list[dict[str, Any]]:
    """Every training-speed record in a timings file (rag has one per trained model)."""
    if isinstance(timings, dict):
        own = [timings] if "mfu" in timings and "tokens_per_s" in timings else []
        return own + [s for v in timings.values() for s in speeds(v)]
    if isinstance(timings, list):
        return [s for v in timings for s in speeds(v)]
    return []


def check_stage(name: str, work: Path, report: dict[str, Any], expect: str) -> list[str]:
    """What went wrong in a training stage's run, by the probe's report and its outputs."""
    problems = []
    losses = report["losses"]
    if not losses:
        problems.append("no training loss was computed")
    if not all(loss["finite"] for loss in losses):
        problems.append("a training loss was not finite")
    autocast = expect != "fp32"
    if any(loss["autocast"] != autocast for loss in losses):
        problems.append(f"autocast {'off' if autocast else 'on'} inside a loss")
    dtypes = {row["dtype"] for row in report["linear"]}
    weights = {row["weight"] for row in report["linear"]}
    want = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}[expect]
    if dtypes != {want}:
        problems.append(f"training activations {sorted(dtypes)}, expected {want}")
    if weights != {"torch.float32"}:
        problems.append(f"weights {sorted(weights)} while training, expected fp32")
    metrics = work / "metrics" / f"{name}.json"
    if metrics.is_file() and not finite(json.loads(metrics.read_text())):
        problems.append(f"{metrics.name} holds a value that is not finite")
    for speed in speeds(json.loads((work / "output/timings" / f"{name}.json").read_text())):
        if speed["mfu"] is not None and speed["mfu"] > 1:
            problems.append(f"MFU {speed['mfu']} > 1")
        if speed.get("peak") and expect != "fp32" and expect not in speed["peak"]:
            problems.append(f"MFU against {speed['peak']}, not a {expect} peak")
    return problems


def summary(name: str, work: Path, report: dict[str, Any], seconds: float) -> str:
    line = f"{name:<16} {seconds:6.1f} s"
    timings = work / "output/timings" / f"{name.split()[0]}.json"
    if timings.is_file():
        for speed in speeds(json.loads(timings.read_text()))[:1]:
            line += f"  {speed['tokens_per_s']:>10.0f} tokens/s  MFU {speed['mfu']}"
    if report.get("peak_mib") is not None:
        line += f"  peak GPU memory {report['peak_mib']:.0f} MiB"
    return line


def run_stage(words: list[str], work: Path, report: Path, guard: bool) -> float:
    probe = ["-m", "benchmarks.gpu_check", "probe", str(report)] + (["--guard"] if guard else [])
    return run_python([*probe, "--", *words], work, words[0])


def compare_with_trl(work: Path, device: str) -> None:
    """benchmarks/sft_vs_trl.py on the check's models and data, with the default SFT params."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params = with_overrides(params, CHECK_PARAMS, {"device": device, "fp16": "auto"})
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    script = str(ROOT / "benchmarks" / "sft_vs_trl.py")
    run_python([script, "--device", device], work, "sft_vs_trl")


def run(pack: Path, device: str, guard: bool, trl: bool = False) -> int:
    from lmpipeline.runtime import precision, resolve_device

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    shutil.copytree(pack / "output", work / "output")
    build_models(pack, work)
    commands = stage_commands()
    forced = "true" if device.startswith("cuda") else "false"  # a CPU refuses fp16: true
    runs = [(name, "auto") for name in STAGES] + [("sft fp16", forced)]
    failures, lines = [], []
    for name, fp16 in runs:
        params = check_params(device, fp16)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        report = work / f"probe-{name.replace(' ', '-')}.json"
        seconds = run_stage(commands[name.split()[0]], work, report, guard)
        record = json.loads(report.read_text())
        lines.append(summary(name, work, record, seconds))
        print(f"gpu_check: {lines[-1]}", flush=True)
        if name.split()[0] in TRAINING:
            expect = precision(fp16, resolve_device(device)) or "fp32"
            failures += [f"{name}: {p}" for p in check_stage(name.split()[0], work, record, expect)]
    took = time.perf_counter() - start
    if trl:
        compare_with_trl(work, device)
    print(f"\ngpu_check on {describe(device)}, {took:.0f} s for the stages")
    print("\n".join(lines))
    if failures:
        print("gpu_check: FAILED\n  " + "\n  ".join(failures))
        return 1
    print("gpu_check: PASSED (finite losses, autocast in every loss, expected dtypes, MFU <= 1)")
    shutil.rmtree(work)
    return 0


def describe(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"the CPU (torch {torch.__version__})"


# --- probe (one stage's process) -----------------------------------------------------------------


def requirements(distribution: str) -> set[str]:
    """The names `distribution` requires, extras left out (none where it is not installed)."""
    try:
        required = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    names = [re.match(r"[A-Za-z0-9_.-]+", r) for r in required if "extra ==" not in r]
    return {normalized(m[0]) for m in names if m}


class BareImage(importlib.abc.MetaPathFinder):
    """Refuse what the GPU machine would not have: a package this project or a carried one
    requires that is neither on the machine's image nor carried. (What the image's own packages
    require is the image's: its versions differ from this environment's.)"""

    def __init__(self) -> None:
        allowed = {normalized(n) for n in GPU_IMAGE + CARRIED}
        needed = requirements("lm-pipeline").union(*(requirements(n) for n in CARRIED))
        missing = needed - allowed
        self.refused = {
            module
            for module, dists in importlib.metadata.packages_distributions().items()
            if any(normalized(d) in missing for d in dists)
        } - OWN

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        top = name.partition(".")[0]
        if top in self.refused and top not in sys.stdlib_module_names:
            raise ModuleNotFoundError(f"gpu_check: {top} is not on the GPU machine", name=top)


def probe(report: Path, words: list[str], guard: bool) -> int:
    """Run the module `words` as `python -m` would, recording what `run` asserts."""
    if guard:
        sys.meta_path.insert(0, BareImage())
    from lmpipeline.training import StageTrainer

    linear: Counter[tuple[str, str]] = Counter()
    losses: list[dict[str, Any]] = []

    def record(module: torch.nn.Module, args: Any, output: Any) -> None:
        training = module.training and torch.is_grad_enabled()
        if training and isinstance(module, torch.nn.Linear) and isinstance(output, torch.Tensor):
            linear[(str(output.dtype), str(module.weight.dtype))] += 1

    compute_loss = StageTrainer.compute_loss

    def recorded_loss(self: StageTrainer, model: Any, inputs: Any, *args: Any, **kw: Any) -> Any:
        out = compute_loss(self, model, inputs, *args, **kw)
        loss = out[0] if isinstance(out, tuple) else out
        on = torch.is_autocast_enabled(self.args.device.type)
        losses.append({"finite": bool(torch.isfinite(loss).all()), "autocast": on})
        return out

    StageTrainer.compute_loss = recorded_loss  # type: ignore[method-assign]
    hook = torch.nn.modules.module.register_module_forward_hook(record)
    sys.argv = [words[0], *words[1:]]
    status: Any = 0
    try:
        runpy.run_module(words[0], run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        status = exit.code or 0
    finally:
        hook.remove()
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None
        rows = [{"dtype": d, "weight": w, "count": n} for (d, w), n in linear.items()]
        result = {"status": status, "losses": losses, "linear": rows, "peak_mib": peak}
        report.write_text(json.dumps(result))
    return status if isinstance(status, int) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pack")
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--device", default="cuda")
    run_parser.add_argument("--trl", action="store_true", help="then SFT against TRL's trainer")
    sub.add_parser("dry-run")
    probe_parser = sub.add_parser("probe")
    probe_parser.add_argument("report", type=Path)
    probe_parser.add_argument("--guard", action="store_true")
    probe_parser.add_argument("words", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "probe":
        return probe(args.report, args.words, args.guard)
    if args.command in ("pack", "dry-run"):
        pack(PACK)
    if args.command == "run":
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("gpu_check: torch sees no CUDA device")
        return run(PACK, args.device, guard=False, trl=args.trl)
    if args.command == "dry-run":
        return run(PACK, "cpu", guard=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
