"""Pretokenization throughput and memory: --workers 1 against --workers 2, 50 MB against 200 MB.

    python bench/pretokenize.py [--mb 200 --small-mb 50] [--workdir /tmp/bench_pretok]

Builds a corpus of unique Chinese documents from the demo corpus' sentences (shuffled, so
nothing repeats), trains an 8k BPE on a sample, then runs `babyllama pretokenize` in a
subprocess for each setting and polls the resident memory of its whole process tree.
Targets: >= 1.7x documents/s with 2 workers on 2 cores; peak RSS at 200 MB within 10% of
the peak at 50 MB. Results go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from measure import run


def make_corpus(path: Path, megabytes: int, sentences: list[str], seed: int) -> int:
    rng = random.Random(seed)
    n, size = 0, 0
    with path.open("w", encoding="utf-8") as f:
        while size < megabytes * 1_000_000:
            doc = "".join(rng.choices(sentences, k=rng.randint(3, 12)))
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode())
            n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--small-mb", type=int, default=50)
    parser.add_argument("--workdir", default="/tmp/bench_pretok")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    from babyllama.data.demo_corpus import build_demo_corpus
    from babyllama.tokenizer import train_bpe

    build_demo_corpus(work / "demo")
    docs = [json.loads(x)["text"] for x in (work / "demo" / "raw" / "pretrain.jsonl").open(encoding="utf-8")]
    sentences = [s + "。" for d in docs for s in d.split("。") if len(s) > 4]
    train_bpe(docs[:5000], 8192).save(work / "tok")
    sizes = {}
    for mb in (args.small_mb, args.mb):
        sizes[mb] = make_corpus(work / f"corpus_{mb}.jsonl", mb, sentences, seed=mb)
        print(f"corpus {mb} MB: {sizes[mb]} documents")

    cli = [sys.executable, "-m", "babyllama", "pretokenize", "--tokenizer", str(work / "tok")]
    results = {}
    for mb, workers in ((args.mb, 1), (args.mb, 2), (args.small_mb, 2)):
        out = work / f"out_{mb}_{workers}"
        secs, peak, stdout, _, _ = run([*cli, "--input", str(work / f"corpus_{mb}.jsonl"), "--out_dir", str(out),
                                  "--workers", str(workers)])
        tokens = sum(v["tokens"] for v in json.loads(stdout.strip().splitlines()[-1]).values() if isinstance(v, dict))
        results[mb, workers] = (secs, peak)
        print(f"{mb:4d} MB, --workers {workers}: {secs:6.1f} s, {sizes[mb] / secs:8.0f} docs/s, "
              f"{tokens / secs / 1e6:5.2f} M tokens/s, peak RSS {peak} MB")
    speedup = results[args.mb, 1][0] / results[args.mb, 2][0]
    growth = results[args.mb, 2][1] / results[args.small_mb, 2][1]
    print(f"speed-up 2 workers vs 1: {speedup:.2f}x (target >= 1.7x)")
    print(f"peak RSS {args.mb} MB vs {args.small_mb} MB corpus: {growth:.2f}x (target <= 1.10x)")


if __name__ == "__main__":
    main()
