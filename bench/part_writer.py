"""prepare's part writer against a bare JSON-lines write: the cost of its per-document guard for a full disk.

    python bench/part_writer.py [--docs 200000]

The same documents through clean.ShardWriter.write and through a plain file's write of the same line, in the
same process; the ratio is the writer's overhead per document. Results go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from babyllama.data.clean import ShardWriter


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=200_000)
    n = p.parse_args().docs
    text = "这是一个测试文档，它有几十个汉字。" * 5
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        with open(Path(d) / "bare.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        bare = (time.perf_counter() - start) / n
        writer = ShardWriter(Path(d), docs_per_shard=n)
        start = time.perf_counter()
        for _ in range(n):
            writer.write([text])
        writer.close()
        ours = (time.perf_counter() - start) / n
    print(f"{n:,} documents: bare write {bare * 1e6:.2f} us, ShardWriter.write {ours * 1e6:.2f} us, "
          f"ratio {ours / bare:.2f}")


if __name__ == "__main__":
    main()
