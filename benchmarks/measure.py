"""Measuring one child process: its wall time, peak resident memory (from wait4's rusage), its
peak anonymous memory (sampled), and how much of the machine other processes took meanwhile,
which makes a speed measured on a busy machine visible as such."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Usage:
    """What running one child process cost."""

    status: int  # exit status
    wall_s: float
    peak_rss_gib: float
    other_cpu: float | None  # share of all CPUs busy with other work meanwhile (None: unknown)
    # The most anonymous memory (heap, not pages of memory-mapped files) the child and its
    # descendants held at once, sampled every SAMPLE_S; None where /proc cannot tell.
    peak_anon_gib: float | None = None


SAMPLE_S = 0.2


def children_of() -> dict[int, list[int]]:
    """Every process's children, from /proc/*/stat (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone meanwhile
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def anon_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_anon_kib(root: int) -> int:
    """RssAnon summed over `root` and its descendants, now."""
    children, tree, total = children_of(), [root], 0
    while tree:
        pid = tree.pop()
        total += anon_kib(pid)
        tree += children.get(pid, [])
    return total


class AnonPeak(threading.Thread):
    """Samples the anonymous memory of a process tree until `stop` is set.

    ru_maxrss counts the pages of memory-mapped files a process has read (Arrow datasets): they
    are page cache the kernel takes back under pressure, so they say little of what the process
    needs. RssAnon is what it cannot give back."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kib, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        if not Path(f"/proc/{self.pid}/status").is_file():
            self.peak_kib = -1  # no /proc: unknown
            return
        while not self.stop.wait(SAMPLE_S):
            self.peak_kib = max(self.peak_kib, tree_anon_kib(self.pid))


def child_env() -> dict[str, str]:
    """The working tree's stages, whatever is installed; never the hub."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine spent busy since boot, steal time included (Linux)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = values[3] + values[4]  # idle and iowait
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


def run_child(command: Sequence[str], cwd: Path, log: Path) -> Usage:
    """Run `command` with its output to `log`, and measure it.

    os.wait4 gives the rusage of this one child (RUSAGE_CHILDREN would be the maximum over every
    child reaped so far). The machine's busy time minus the child's CPU time tells how much other
    processes took from it: speeds are comparable only where that share is near 0."""
    busy_before, start = busy_cpu_seconds(), time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, cwd=cwd, env=child_env(), stdout=out, stderr=subprocess.STDOUT
        )
        sampler = AnonPeak(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        sampler.stop.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    wall, busy_after = time.perf_counter() - start, busy_cpu_seconds()
    other = None
    if busy_before is not None and busy_after is not None:
        child_cpu = usage.ru_utime + usage.ru_stime
        other = max(busy_after - busy_before - child_cpu, 0.0) / (wall * (os.cpu_count() or 1))
    if proc.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        print(f"FAILED ({proc.returncode}): {' '.join(command)}\n{tail}\n", file=sys.stderr)
    anon = None if sampler.peak_kib < 0 else sampler.peak_kib / 2**20
    return Usage(proc.returncode, wall, usage.ru_maxrss / 2**20, other, anon)  # KiB (Linux)
