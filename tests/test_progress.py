"""Progress bars on a terminal: a log line or a print written while a bar is drawn lands above the bar, on a line
of its own, and the bar is drawn again below it (checked on a pseudo-terminal, as a user's screen shows it)."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

SCRIPT = """
import logging, sys
from babyllama.progress import progress
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
with progress(total=3, desc="work", unit=" step") as bar:
    bar.update()
    logging.getLogger("babyllama.x").warning("a warning")
    print("a print")
    print("to stderr", end="", file=sys.stderr)
    print(" too", file=sys.stderr)
    bar.update(2)
logging.getLogger("babyllama.x").warning("after")
"""


def on_a_terminal(*args: str | Path) -> str:
    """What `python ARGS` writes to a pseudo-terminal of 160 columns (stdout and stderr both), as text."""
    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    p = subprocess.Popen([sys.executable, *map(str, args)], stdin=subprocess.DEVNULL, stdout=side, stderr=side)
    os.close(side)
    out = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the process ended and closed its side
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert p.wait(timeout=60) == 0, out
    return out.decode()


def screen(out: str) -> list[str]:
    """The lines a terminal shows for out: "\\r" goes back to the line's start, later characters overwrite earlier
    ones, "\\n" starts the next line (tqdm draws a bar at position 0 with no other control sequence)."""
    assert "\x1b" not in out
    lines, row, col = [""], 0, 0
    for ch in out:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        else:
            line = lines[row].ljust(col)
            lines[row], col = line[:col] + ch + line[col + 1:], col + 1
    return [x.rstrip() for x in lines if x.strip()]


def test_a_log_line_and_a_print_land_above_a_live_bar():
    shown = screen(on_a_terminal("-c", SCRIPT))
    assert shown[:3] == ["WARNING babyllama.x: a warning", "a print", "to stderr too"], shown
    assert shown[3].startswith("work: 100%|") and shown[3].endswith(" step/s]")  # the bar, drawn below them
    assert shown[4:] == ["WARNING babyllama.x: after"]


def test_a_command_s_warning_lands_above_its_bar(tmp_path):
    """`prepare` of a GBK file warns while its bar is drawn: the warning was glued after the bar's status."""
    (tmp_path / "gbk.txt").write_bytes("第一篇中文文档的正文。\n第二篇中文文档的正文。\n".encode("gbk"))
    shown = screen(on_a_terminal("-m", "babyllama", "prepare", "--input", tmp_path / "gbk.txt", "--out_dir",
                                 tmp_path / "out", "--min_chars", "1"))
    warning = f"WARNING babyllama.data.sources: {tmp_path / 'gbk.txt'}: not UTF-8; reading it as GB18030 (detected)."
    assert len(shown) == 4 and shown[0].startswith(warning), shown  # each line whole, the bar below them
    assert shown[1].startswith(f"INFO babyllama.data.sources: {tmp_path / 'gbk.txt'}: read as text records"), shown
    assert shown[2].startswith("prepare: 100%|") and shown[2].endswith(", 2 docs]"), shown
    assert shown[3].startswith('{"out_dir": '), shown


LINES_SCRIPT = """
import time, tqdm
tqdm.tqdm.monitor_interval = 0.02  # tqdm's monitor thread, 10 s by default, and a bar's maxinterval, 10 s too
from babyllama import progress
progress.LINE_EVERY_S = 0.3  # a status line every 30 s, scaled down as the monitor's
for i in progress.progress(iter(range(60)), desc="work", unit=" it", maxinterval=0.1):
    time.sleep(0.02)
bar = progress.progress(desc="manual", unit=" it", maxinterval=0.1)
for i in range(60):
    bar.update()
    time.sleep(0.02)
bar.close()
"""


def test_a_log_gets_a_status_line_per_period_never_an_old_count():
    """Off a terminal a bar writes a line every 30 s; tqdm's monitor thread wrote another 10 s after each, with the
    count of the one before (`128143 docs [00:30, ...]`, `128143 docs [00:40, ...]`): each line now counts more."""
    import re

    r = subprocess.run([sys.executable, "-c", LINES_SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for desc in ("work", "manual"):
        counts = [int(m[1]) for m in re.finditer(rf"^{desc}: (\d+) it \[", r.stderr, re.MULTILINE)]
        assert counts[0] == 0 and counts[-1] == 60, r.stderr
        assert all(a < b for a, b in zip(counts[1:-2], counts[2:-1], strict=True)), r.stderr  # the last: its close
        assert len(counts) <= 2 + 1.2 / 0.3 + 1, r.stderr  # the first, one a period, the close


def test_the_documents_a_bar_counts_agree_with_their_number():
    """The bars of prepare and tokenizer train said `1 docs`."""
    from babyllama.progress import counted

    class Bar:  # what counted uses of a tqdm bar
        def __init__(self):
            self.n, self.postfixes = 0, []

        def set_postfix_str(self, s: str, refresh: bool = True) -> None:
            self.postfixes.append(s)

        def update(self, k: int) -> None:
            self.n += k

    for docs, said in (([], ["0 docs"]), (["a"], ["1 doc", "1 doc"]), (["a", "b"], ["1 doc", "2 docs", "2 docs"])):
        bar = Bar()
        assert list(counted(iter(docs), bar, lambda: 7)) == docs
        assert (bar.postfixes, bar.n) == (said, 7)


def test_read_metrics_keeps_the_records_and_names_the_lines_it_skips(tmp_path):
    """metrics.jsonl's one reader (the trainer's on resume, the report's): a JSON object with an int step is a record,
    bare NaN and Infinity are null; a cut line, another shape, a step that is true, or none are skipped by number."""
    from babyllama.progress import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": NaN, "x": "s"}\n[1]\n\n{"step": true}\n{"loss": 2}\n'
                    '{"step": 2, "loss": Infinity, "final": true}\n{"step": 3, "lo')
    assert read_metrics(path) == ([{"step": 1, "loss": None, "x": "s"}, {"step": 2, "loss": None, "final": True}],
                                  [2, 4, 5, 7])
