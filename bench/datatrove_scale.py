"""The datatrove engine at 100k and 1M documents: peak RSS per worker, and documents/s of the local
executor against the embedded path, side by side in one run.

    python bench/datatrove_scale.py [--sizes 100000 1000000] [--docs_per_file 10000] [--workers 2]

Documents as bench/dedup.py makes them (200-600 random common characters, 5% near copies), in
JSON-lines files of docs_per_file each; datatrove runs a task per file, so a task's work is the
same at every size and only the number of tasks grows. Each command is `babyllama prepare
--dedup minhash` in a subprocess; a sampler reads every process of its tree from /proc and
reports the largest single process (a worker) and the tree. The embedded path runs on the
smallest size only (its index grows with the corpus: bench/dedup.py measured it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from dedup import documents
from measure import run


def write_corpus(d: Path, n: int, per_file: int) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    files, f = [], None
    for i, (_, text) in enumerate(documents(n)):
        if i % per_file == 0:
            f and f.close()
            files.append(str(d / f"part_{i // per_file:05d}.jsonl"))
            f = open(files[-1], "w", encoding="utf-8")  # noqa: SIM115
        f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    f.close()
    return files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--docs_per_file", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    cli = [sys.executable, "-m", "babyllama", "prepare"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in a.sizes:
            files = write_corpus(tmp / f"in_{n}", n, a.docs_per_file)
            runs = [("datatrove local", ["--engine", "datatrove", "--workers", str(a.workers)])]
            if n == min(a.sizes):
                runs.insert(0, ("embedded", []))
            for name, extra in runs:
                out = tmp / f"out_{n}_{name.split()[0]}"
                secs, tree_mb, stdout, _, process_mb = run([*cli, "--input", *files, "--out_dir", str(out), *extra])
                kept = json.loads(stdout.strip().splitlines()[-1])["kept"]
                rows.append({"path": name, "documents": n, "tasks": len(files) if extra else 1, "kept": kept,
                             "seconds": round(secs, 1), "docs_per_s": round(n / secs),
                             "peak_rss_process_mb": process_mb, "peak_rss_tree_mb": tree_mb})
                print(json.dumps(rows[-1]), flush=True)
    base = next(r for r in rows if r["path"] == "embedded")
    same = next(r for r in rows if r["path"] != "embedded" and r["documents"] == base["documents"])
    big = [r for r in rows if r["path"] != "embedded"]
    print(json.dumps({"docs_per_s_vs_embedded": round(same["docs_per_s"] / base["docs_per_s"], 2),
                      "worker_rss_largest_vs_smallest": round(big[-1]["peak_rss_process_mb"]
                                                              / big[0]["peak_rss_process_mb"], 2)}))


if __name__ == "__main__":
    main()
