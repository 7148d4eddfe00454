"""What long work shows: progress bars (live on a terminal, a line every 30 s in a log file), whether
this process is the one of a torchrun job that speaks for all, and the reading of a training run's
metrics.jsonl (the trainer's on resume, the report's)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from babyllama.errors import agree

LINE_EVERY_S = 30  # off a terminal, long work writes its status as a line at most this often (progress, status_lines)
LIVE: list = []  # the bars drawn on the terminal now, oldest first
_redirected = contextlib.ExitStack()  # logging and prints through tqdm while LIVE is not empty
T = TypeVar("T")


def progress(iterable: Iterable | None = None, desc: str = "", unit: str = " it", total: int | None = None, **kw):
    """A tqdm bar on stderr. On a terminal it is drawn live, and while it is, logging's console handlers write
    through tqdm.write and prints (to stdout or stderr, when that is the terminal too) through Above: each line
    lands above the bar, which is drawn again below it (a warning written to the terminal as such landed after
    the bar, and the bar's next status was drawn over it). Elsewhere each status is a line (Lines), every 30 s."""
    from tqdm import tqdm

    stream = sys.stderr.stream if isinstance(sys.stderr, Above) else sys.stderr  # a bar's own writes go straight
    if not stream.isatty():  # miniters=1: see Lines
        return tqdm(iterable, desc=desc, unit=unit, total=total, dynamic_ncols=True, mininterval=LINE_EVERY_S,
                    miniters=1, file=Lines(stream), **kw)
    return live_bar()(iterable, desc=desc, unit=unit, total=total, dynamic_ncols=True, mininterval=0.5, file=stream,
                      **kw)


def bytes_bar(desc: str, total: int):
    """progress() of bytes read, of total (0: unknown), for work whose items vary in size: a percentage and an ETA
    where a count of items has neither."""
    return progress(desc=desc, unit="B", unit_scale=True, total=total or None)


def counted(items: Iterable[T], bar, position: Callable[[], int]) -> Iterator[T]:
    """items (documents) as they come; after each, bar (bytes_bar's) moves to position() and says how many there were
    as its postfix ("1,024 docs", "1 doc"), and again at their end."""
    n = 0
    for n, item in enumerate(items, 1):
        yield item
        bar.set_postfix_str(f"{n:,} {agree(n, 'doc', 'docs')}", refresh=False)
        bar.update(position() - bar.n)
    bar.set_postfix_str(f"{n:,} {agree(n, 'doc', 'docs')}", refresh=False)
    bar.update(position() - bar.n)


@contextlib.contextmanager
def status_lines(line: Callable[[float], str], say: Callable[[str], object]) -> Iterator[None]:
    """While the body runs, every LINE_EVERY_S seconds say(line(seconds since it began)), from a daemon thread, as a
    progress bar writes its status off a terminal: for work with no count to show that runs for minutes or hours
    (BPE merges, a datatrove stage), where a log showed nothing. The body may run in this thread or wait for one."""
    stop, start = threading.Event(), time.monotonic()

    def run() -> None:
        while not stop.wait(LINE_EVERY_S):
            say(line(time.monotonic() - start))

    thread = threading.Thread(target=run, name="babyllama-status", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@functools.cache
def live_bar() -> type:
    """tqdm whose bars, from their start to their close, have logging and prints go through tqdm (made at the first
    bar: importing tqdm takes ~0.1 s that a command without a bar need not spend)."""
    from tqdm import tqdm

    class LiveBar(tqdm):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            if not self.disable:  # a torchrun process other than rank 0 draws nothing
                redirect(self)

        def close(self) -> None:
            try:
                super().close()
            finally:
                release(self)

    return LiveBar


def redirect(bar) -> None:
    """Count bar as drawn; the first one sends the root logger's console handlers through tqdm.write (tqdm's
    logging_redirect_tqdm) and sys.stdout and sys.stderr, where they are the terminal, through Above."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    if not LIVE:
        _redirected.enter_context(logging_redirect_tqdm())  # first: it finds the handlers by sys.stdout, sys.stderr
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if stream is not None and stream.isatty():
                above = Above(stream, bar.fp)
                _redirected.enter_context(getattr(contextlib, f"redirect_{name}")(above))
                _redirected.callback(above.close)
    LIVE.append(bar)


def release(bar) -> None:
    """Count bar as closed (again: no harm); the last one puts logging and sys.stdout and sys.stderr back."""
    if bar in LIVE:
        LIVE.remove(bar)
        if not LIVE:
            _redirected.close()


class Above:
    """sys.stdout or sys.stderr while bars are drawn on the terminal: each whole line is written above them, as
    tqdm.write does (the bars on bars_file cleared, the line written, the bars drawn again below it); the rest of a
    line waits for its end, or for the last bar to close."""

    def __init__(self, stream, bars_file):
        self.stream, self.bars_file, self.partial = stream, bars_file, ""

    def write(self, s: str) -> int:
        from tqdm import tqdm

        whole, newline, self.partial = (self.partial + s).rpartition("\n")
        if newline:
            with tqdm.external_write_mode(file=self.bars_file):
                self.stream.write(whole + newline)
                self.stream.flush()
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        """Write what is left of a line (the stream itself stays open: it is the process's)."""
        if self.partial:
            self.stream.write(self.partial)
            self.stream.flush()
            self.partial = ""

    def __getattr__(self, name: str):  # isatty, fileno, encoding, ...: the stream's
        return getattr(self.stream, name)


class Lines:
    """tqdm's file on a stream that is not a terminal (a log file, a pipe): each status of the bar a line of its
    own. tqdm starts a status with "\r" to draw it over the one before and ends none with a newline, so a log file
    held the statuses as one line, with the next warning glued to it (`prepare: 0 docs [00:00, ? docs/s]WARNING`).

    Its bar has miniters=1, so a status is written at the first step after each LINE_EVERY_S, and only then. With
    tqdm's default, the count of steps between statuses adapts (dynamic miniters), and tqdm's monitor thread, seeing
    no status for maxinterval (10 s), writes one at once: an iterated bar's count is stored only when it writes
    one, so that line repeated the one 10 s before (`128143 docs [00:30, ...]`, `128143 docs [00:40, ...]`), and a
    bar of update() calls repeated its rate. The monitor leaves a bar of miniters 1 alone; a step costs a time()."""

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


def read_metrics(path: Path, constant: Callable[[str], float | None] = lambda name: None) \
        -> tuple[list[dict], list[int]]:
    """The records of the metrics.jsonl at path, in order, and the numbers (from 1) of the lines skipped. A record is a
    line holding a JSON object whose step is an int (not true or false), whatever its other values; the bare NaN,
    Infinity and -Infinity of metrics written before they became null are read as null (constant: how they are read;
float keeps them). Any other line is skipped:
    not JSON (the last one cut short by a kill while it was written) or of another shape (another tool's, by hand).
    Blank lines are neither. ValueError (UnicodeDecodeError) for a file that is not UTF-8; OSError where it cannot
    be read."""
    records, skipped = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=constant)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool):
            records.append(record)
        else:
            skipped.append(number)
    return records, skipped
