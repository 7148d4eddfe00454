"""What long work shows: progress bars (live on a terminal, a line every 30 s in a log file), and whether
this process is the one of a torchrun job that speaks for all."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable


def progress(iterable: Iterable | None = None, desc: str = "", unit: str = " it", total: int | None = None, **kw):
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, unit=unit, total=total, dynamic_ncols=True, mininterval=0.5 if tty else 30, **kw)


def is_rank0() -> bool:
    """Whether this is the first process of a torchrun job (RANK 0), or a process alone (no RANK): the one that
    prints results and notes what every process would note alike."""
    return os.environ.get("RANK", "0") == "0"
