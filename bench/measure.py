"""Shared by the benchmarks: run a command and watch the resident memory of its whole process tree."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def tree_rss_kb(pid: int) -> list[int]:
    """Resident memory of a process and of each of its descendants, from /proc."""
    sizes, stack = [], [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            sizes.append(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))))
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return sizes


def run(cmd: list[str], watch: Path | None = None) -> tuple[float, int, str, float | None, int]:
    """Wall seconds, peak tree RSS in MB, stdout, the seconds until the file `watch` first had content, and
    the peak RSS in MB of the largest single process of the tree (a worker, or the main process)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, peak_process, seen = 0, 0, None
    while proc.poll() is None:
        sizes = tree_rss_kb(proc.pid)
        peak, peak_process = max(peak, sum(sizes)), max(peak_process, max(sizes, default=0))
        if watch is not None and seen is None and watch.is_file() and watch.stat().st_size:
            seen = time.perf_counter() - start
        time.sleep(0.05)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with code {proc.returncode}")
    return time.perf_counter() - start, peak // 1024, out, seen, peak_process // 1024
