"""What every training stage needs from the machine and its process: device, precision, FLOP/s,
and its place in a distributed run."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState, GradientState

from lmpipeline.errors import SetupError

# Every model loads in fp32, whatever dtype its checkpoint was saved in (transformers 5 keeps the
# checkpoint's own by default): training keeps fp32 master weights, mixed precision is autocast's
# alone (`precision`), and what a reload computes (an index, answers) is what the stage computed.
WEIGHTS: dict[str, Any] = {"dtype": torch.float32}


# Read once, at import: `end_distributed` later takes torchrun's variables away from rank 0.
LAUNCHED = "LOCAL_RANK" in os.environ
# What torchrun tells each process of its world; accelerate takes any of them for a distributed run.
WORLD_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


T = TypeVar("T")


def under_launcher() -> bool:
    """True inside a process that torchrun (or accelerate launch) started."""
    return LAUNCHED


def is_main_process() -> bool:
    """True in rank 0 of a distributed run (which alone scores and writes), or in a lone run."""
    return int(os.environ.get("RANK", "0")) == 0


def from_rank_zero(value: T) -> T:
    """Rank 0's `value` on every rank of a live process group (the value itself otherwise):
    a choice only rank 0 can compute, which every rank must then follow."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def end_distributed() -> None:
    """Tear the process group down once no process needs it. Rank 0, which then scores and
    writes on its own and may train again (the rag stage's folds and reader), becomes a world of
    one: without that, its next Trainer would wait for ranks that have already exited."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    if is_main_process():
        for name in WORLD_VARIABLES:
            os.environ.pop(name, None)
        # accelerate keeps its state in process-wide singletons, built from those variables;
        # its own tests start a fresh world the same way.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then the CPU; an explicit device must exist."""
    if device in ("auto", "cuda") and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return torch.device(f"cuda:{os.environ['LOCAL_RANK']}")  # one GPU per torchrun process
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SetupError(f"device: {device} asked for, but torch sees no CUDA device")
    if device.startswith("cuda:"):
        # accelerate places a lone process on the current CUDA device, which is cuda:0 unless
        # set: without this, `cuda:1` would train on cuda:0 and measure and answer on cuda:1.
        torch.cuda.set_device(torch.device(device))
    if device == "mps" and not torch.backends.mps.is_available():
        raise SetupError("device: mps asked for, but torch sees no MPS device")
    return torch.device(device)


def precision(fp16: str, device: torch.device) -> str | None:
    """Mixed-precision mode for the Trainer: "bf16", "fp16" or None (plain fp32).

    `auto` turns it on for CUDA only: bf16 where the GPU computes it natively, else fp16 (with
    loss scaling); bf16/fp16 autocast on these CPUs runs about ten times slower than fp32, so a
    CPU never gets it by default and refuses it when asked. `true` is fp16 itself.
    """
    if fp16 == "false":
        return None
    if device.type != "cuda":
        if fp16 == "true":
            raise SetupError(
                f"fp16: true needs a CUDA device, but the stage runs on {device.type}; "
                "mixed precision on a CPU is slower than fp32 here. Set fp16: auto or false."
            )
        return None
    if fp16 == "true":
        return "fp16"
    return "bf16" if native_bf16(device) else "fp16"


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 in hardware (compute capability 8.0, Ampere, and later).
    `torch.cuda.is_bf16_supported()` also counts emulation, which would put a V100 or a T4 on
    bf16 many times slower than its fp16."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def compute_dtype(mode: str | None) -> torch.dtype:
    """The dtype the matmuls of training run in, for a `precision` mode."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode or "", torch.float32)


def matmul_flops(
    device: torch.device,
    shape: tuple[int, int, int] = (1024, 1024, 1024),
    seconds: float = 0.05,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Measured FLOP/s of one (m x k) @ (k x n) matmul shape in `dtype` on `device` (fp32 with
    TF32 where torch is set to use it, as training then is)."""
    m, k, n = shape
    # A generator of its own: drawing from the global one would change the dropout masks of the
    # training that follows a measurement, and so its results.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, generator=generator).to(dtype)
    b = torch.randn(k, n, device=device, generator=generator).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm up the BLAS threads, caches and kernels
        a @ b
    sync()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        sync()
        runs += 1
    return 2 * m * k * n * runs / (time.perf_counter() - start)


@dataclass(frozen=True)
class Peak:
    """The best matmul speed measured on a device in the training's dtype: the denominator of
    MFU (a bf16 run against an fp32 peak would overstate it many times on tensor cores)."""

    flops: float
    shape: tuple[int, int, int]  # the (m, k, n) that reached it
    dtype: torch.dtype = torch.float32

    def describe(self) -> str:
        m, k, n = self.shape
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")
        return f"{self.flops / 1e9:.0f} GFLOP/s ({m}x{k} @ {k}x{n} {name} matmul, best measured)"


def matmul_peak(
    device: torch.device, hidden: int | None, dtype: torch.dtype = torch.float32
) -> Peak:
    """The best of several runs of square GEMMs and of the model's own MLP shape (2,048 tokens
    x `hidden` @ `hidden` x 4 `hidden`): one sample of one shape can come out below what training
    then reaches (a busy core, a cold cache), which made MFU exceed 1. The squares grow with the
    model up to 1024 and 2048 (a tiny model's peak needs no large GEMM), so that the whole
    measurement takes about a second."""
    width = hidden or 2048
    shapes = [(s, s, s) for s in (min(1024, 8 * width), min(2048, 16 * width))]
    if hidden:
        shapes.append((2048, hidden, 4 * hidden))
    best = Peak(0.0, shapes[0], dtype)
    for _ in range(3):
        for shape in shapes:
            flops = matmul_flops(device, shape, dtype=dtype)
            if flops > best.flops:
                best = Peak(flops, shape, dtype)
    return best


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts: names a checkpoint directory per configuration."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
