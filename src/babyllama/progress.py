"""Progress bars for long work: live on a terminal, a line every 30 s in a log file."""

from __future__ import annotations

import sys
from collections.abc import Iterable


def progress(iterable: Iterable | None = None, desc: str = "", unit: str = " it", total: int | None = None, **kw):
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, unit=unit, total=total, dynamic_ncols=True, mininterval=0.5 if tty else 30, **kw)
