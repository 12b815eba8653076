"""What every training stage needs from the machine and its process: device, precision, FLOP/s,
and its place in a distributed run."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lmpipeline.errors import SetupError


def under_launcher() -> bool:
    """True inside a process that torchrun (or accelerate launch) started."""
    return "LOCAL_RANK" in os.environ


def is_main_process() -> bool:
    """True in rank 0 of a distributed run (which alone scores and writes), or in a lone run."""
    return int(os.environ.get("RANK", "0")) == 0


def end_distributed() -> None:
    """Tear the process group down once no process needs it (rank 0 then scores and writes on
    its own)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
    if device == "mps" and not torch.backends.mps.is_available():
        raise SetupError("device: mps asked for, but torch sees no MPS device")
    return torch.device(device)


def precision(fp16: str, device: torch.device) -> str | None:
    """Mixed-precision mode for the Trainer: "bf16", "fp16" or None (plain fp32).

    `auto` turns it on for CUDA only: bf16/fp16 autocast on these CPUs runs about ten times
    slower than fp32, so a CPU never gets it by default and refuses it when asked.
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
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def matmul_flops(
    device: torch.device, shape: tuple[int, int, int] = (1024, 1024, 1024), seconds: float = 0.05
) -> float:
    """Measured fp32 FLOP/s of one (m x k) @ (k x n) matmul shape on `device`."""
    m, k, n = shape
    # A generator of its own: drawing from the global one would change the dropout masks of the
    # training that follows a measurement, and so its results.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, generator=generator)
    b = torch.randn(k, n, device=device, generator=generator)
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
    """The best fp32 matmul speed measured on a device: the denominator of MFU."""

    flops: float
    shape: tuple[int, int, int]  # the (m, k, n) that reached it

    def describe(self) -> str:
        m, k, n = self.shape
        return f"{self.flops / 1e9:.0f} GFLOP/s ({m}x{k} @ {k}x{n} fp32 matmul, best measured)"


def matmul_peak(device: torch.device, hidden: int | None) -> Peak:
    """The best of several runs of square GEMMs and of the model's own MLP shape (2,048 tokens
    x `hidden` @ `hidden` x 4 `hidden`): one sample of one shape can come out below what training
    then reaches (a busy core, a cold cache), which made MFU exceed 1. The squares grow with the
    model up to 1024 and 2048 (a tiny model's peak needs no large GEMM), so that the whole
    measurement takes about a second."""
    width = hidden or 2048
    shapes = [(s, s, s) for s in (min(1024, 8 * width), min(2048, 16 * width))]
    if hidden:
        shapes.append((2048, hidden, 4 * hidden))
    best = Peak(0.0, shapes[0])
    for _ in range(3):
        for shape in shapes:
            flops = matmul_flops(device, shape)
            if flops > best.flops:
                best = Peak(flops, shape)
    return best


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts: names a checkpoint directory per configuration."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
