"""Readers that turn corpus files into a stream of documents (str), never loading a file whole.

    for text in iter_texts(["corpus.txt", "more.jsonl"]): ...
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from babyllama.errors import UserError

log = logging.getLogger(__name__)


def iter_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Documents of .txt files (one per non-empty line) and .jsonl files (their `text` field)."""
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"input {path} does not exist or is not a file.")
        with path.open(encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if path.suffix != ".jsonl":
                    yield line.rstrip("\n")
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    text = None
                if isinstance(text, str):
                    yield text
                else:
                    log.warning("%s:%d: skipped a record without a text field", path, lineno)
