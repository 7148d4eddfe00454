"""SFT at the recipe's sizes: building the token cache and training on it, 100k against 1M records.

    python bench/sft_scale.py [--sizes 100000 1000000] [--workdir /tmp/bench_sft]

Makes BELLE-shaped records (instruction 10-80 characters, output 50-400, of common Chinese
characters), an 8k BPE and a demo-sized model (max_seq_len 256), then in subprocesses:
`babyllama pretokenize --sft` with 2 workers for every size and with 1 worker for the smallest,
and `babyllama sft --max_steps 1 --pack true` on the cache, watching the peak RSS of each process
tree and the time until the first step's metrics line. Targets: build >= 1.7x faster with 2
workers; the training process at 1M within 1.1x of its RSS at 100k and under 1.5 GB; the first
step under 10 s at 1M. Results go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from measure import run

CHARS = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后"
         "多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还"
         "因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结")


def make_records(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            record = {"instruction": "".join(rng.choices(CHARS, k=rng.randint(10, 80))), "input": "",
                      "output": "".join(rng.choices(CHARS, k=rng.randint(50, 400)))}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--workdir", default="/tmp/bench_sft")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    from babyllama.checkpoint import save_checkpoint
    from babyllama.model import Transformer, preset
    from babyllama.tokenizer import train_bpe

    for n in args.sizes:
        if not (work / f"belle_{n}.jsonl").is_file():
            make_records(work / f"belle_{n}.jsonl", n)
    with open(work / f"belle_{args.sizes[0]}.jsonl", encoding="utf-8") as f:
        sample = [json.loads(line)["output"] for line, _ in zip(f, range(20_000), strict=False)]
    tok = train_bpe(sample, 8192)
    save_checkpoint(work / "init", Transformer(preset("demo")), tok)

    cli = [sys.executable, "-m", "babyllama"]
    builds = {}
    for n, workers in [(args.sizes[0], 1)] + [(n, 2) for n in args.sizes]:
        cache = work / f"cache_{n}_{workers}"
        secs, peak, out, _, _ = run([*cli, "pretokenize", "--sft", "--input", str(work / f"belle_{n}.jsonl"),
                                  "--tokenizer", str(work / "init"), "--max_seq_len", "256", "--out_dir", str(cache),
                                  "--workers", str(workers)])
        stats = json.loads(out.strip().splitlines()[-1])
        builds[n, workers] = secs
        print(f"build {n:>9,} records, {workers} workers: {secs:6.1f} s, {n / secs:7,.0f} records/s, "
              f"peak RSS {peak} MB, {stats['samples']:,} train / {stats['val_samples']:,} val samples", flush=True)
    print(f"build speed-up 2 workers vs 1 at {args.sizes[0]:,}: "
          f"{builds[args.sizes[0], 1] / builds[args.sizes[0], 2]:.2f}x (target >= 1.7x)")

    trains = {}
    for n in args.sizes:
        out_dir = work / f"run_{n}"
        data = str(work / f"belle_{n}.jsonl")
        secs, peak, _, first, _ = run([*cli, "sft", "--init", str(work / "init"), "--data", data,
                                    "--sft_cache", str(work / f"cache_{n}_2"), "--out_dir", str(out_dir),
                                    "--max_steps", "1", "--pack", "true", "--batch_size", "16", "--eval_every", "0",
                                    "--eval_batches", "1", "--log_every", "1", "--save_every", "0"],
                                   watch=out_dir / "metrics.jsonl")
        trains[n] = peak
        print(f"train {n:>9,} records: first step after {first:5.1f} s, whole run {secs:5.1f} s, "
              f"peak RSS {peak} MB", flush=True)
    small, large = args.sizes[0], args.sizes[-1]
    print(f"training RSS {large:,} vs {small:,}: {trains[large] / trains[small]:.2f}x (target <= 1.1x, "
          f"and under 1,536 MB)")


if __name__ == "__main__":
    main()
