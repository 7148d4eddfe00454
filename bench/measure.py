"""Shared by the benchmarks: run a command and watch the resident memory of its whole process tree."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def tree_rss_kb(pid: int) -> int:
    """Resident memory of a process and all its descendants, from /proc."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def run(cmd: list[str], watch: Path | None = None) -> tuple[float, int, str, float | None]:
    """Wall seconds, peak tree RSS in MB, stdout, and the seconds until the file `watch` first had content."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, seen = 0, None
    while proc.poll() is None:
        peak = max(peak, tree_rss_kb(proc.pid))
        if watch is not None and seen is None and watch.is_file() and watch.stat().st_size:
            seen = time.perf_counter() - start
        time.sleep(0.05)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with code {proc.returncode}")
    return time.perf_counter() - start, peak // 1024, out, seen
