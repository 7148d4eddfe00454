"""What long work shows: progress bars (live on a terminal, a line every 30 s in a log file), and whether
this process is the one of a torchrun job that speaks for all."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable


def progress(iterable: Iterable | None = None, desc: str = "", unit: str = " it", total: int | None = None, **kw):
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, unit=unit, total=total, dynamic_ncols=True, mininterval=0.5 if tty else 30,
                file=None if tty else Lines(sys.stderr), **kw)


class Lines:
    """tqdm's file on a stream that is not a terminal (a log file, a pipe): each status of the bar a line of its
    own. tqdm starts a status with "\r" to draw it over the one before and ends none with a newline, so a log file
    held the statuses as one line, with the next warning glued to it (`prepare: 0 docs [00:00, ? docs/s]WARNING`)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        text = s.strip("\r\n ")  # what tqdm writes to end a bar ("\n", or "\r" and spaces to clear it) is dropped
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def is_rank0() -> bool:
    """Whether this is the first process of a torchrun job (RANK 0), or a process alone (no RANK): the one that
    prints results and notes what every process would note alike."""
    return os.environ.get("RANK", "0") == "0"
