"""Memory of a process and everything it started (Ray's GCS, raylet, actors): PSS from /proc, sampled."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

MIB = 2**20


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc/*/stat."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(parent, []).append(int(entry))
    return kids


def _pss_kib(pid: int) -> int:
    """Proportional set size: shared pages (torch's libraries, Ray's object store) split between users."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_mib(root: int) -> tuple[float, float, int]:
    """(total PSS MiB, largest process's PSS MiB, processes) of `root` and all its descendants."""
    kids, stack, sizes = _children(), [root], []
    while stack:
        pid = stack.pop()
        sizes.append(_pss_kib(pid))
        stack.extend(kids.get(pid, []))
    return sum(sizes) / 1024, max(sizes, default=0) / 1024, len(sizes)


@dataclass
class TreePeak:
    """Peak PSS of this process's tree, sampled every `every_s` in a thread while the block runs."""

    every_s: float = 0.5
    total_mib: float = 0.0
    largest_mib: float = 0.0
    processes: int = 0

    def __enter__(self) -> TreePeak:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        root = os.getpid()
        while not self._stop.is_set():
            total, largest, n = tree_pss_mib(root)
            if total > self.total_mib:
                self.total_mib, self.processes = total, n
            self.largest_mib = max(self.largest_mib, largest)
            self._stop.wait(self.every_s)


def max_rss_mib() -> float:
    """This process's peak resident set over its life (getrusage ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def rss_mib() -> float:
    """This process's resident set now (VmRSS)."""
    return _status_mib("VmRSS")


def reset_peak() -> None:
    """Start the peak resident set (VmHWM) again from now (Linux: "5" to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def peak_rss_mib() -> float:
    """This process's peak resident set since the last `reset_peak` (VmHWM)."""
    return _status_mib("VmHWM")


def run_child(module: str, *args: str, cwd: Path) -> dict[str, Any]:
    """`python -m module args` in a fresh process (its memory and imports its own); the JSON on its
    last stdout line, or RuntimeError with the last line it wrote to stderr."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1][:160])
    return dict(json.loads(lines[-1]))
