"""Near-dedup memory and speed: the compact MinHash index at 100k and 1M documents, and the kept set
against datasketch's MinHashLSH (the index before) on the demo corpus.

    python bench/dedup.py [--sizes 100000 1000000] [--reference 100000] [--demo runs/demo/data/raw/pretrain.jsonl]

Documents of 200-600 random common Chinese characters, 5% of them near copies of an earlier one
(1% of characters changed). Each size runs exact and near dedup as `prepare` does, in a fresh
process, and reports documents/s, the index's bytes per kept document (its arrays, both indexes)
and the process's peak RSS. Results go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time

CHARS = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后"
         "多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还"
         "因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结")


def documents(n: int, seed: int = 0):
    rng = random.Random(seed)
    recent: list[str] = []
    for _ in range(n):
        if recent and rng.random() < 0.05:
            doc = "".join(c if rng.random() > 0.01 else rng.choice(CHARS) for c in rng.choice(recent))
        else:
            doc = "".join(rng.choices(CHARS, k=rng.randint(200, 600)))
            recent = (recent + [doc])[-1000:]
        yield "bench", doc


def measure(n: int) -> dict:
    """In this process: n documents through exact and near dedup, as `prepare --dedup minhash` does."""
    import hashlib

    import numpy as np

    from babyllama.data.clean import HashSets, NearDuplicateIndex

    exact, near = HashSets(1), NearDuplicateIndex(threshold=0.8)
    kept, start = 0, time.perf_counter()
    for _, text in documents(n):
        key = np.frombuffer(hashlib.blake2b(text.encode(), digest_size=8).digest(), dtype=np.uint64) | 1
        if not exact.add_unless_any(key):
            kept += not near.seen_before([text])
    seconds = time.perf_counter() - start
    return {"documents": n, "kept": kept, "docs_per_s": round(n / seconds),
            "index_bytes_per_kept_doc": round((near.tables.nbytes + exact.nbytes) / kept),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def measure_minhash_lsh(n: int) -> dict:
    """The reference, in this process: the same documents through datasketch's MinHashLSH (the index before)."""
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    from babyllama.data.clean import NearDuplicateIndex

    shingles, lsh = NearDuplicateIndex(), MinHashLSH(threshold=0.8, num_perm=128)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kept, seen, start = 0, set(), time.perf_counter()
    for _, text in documents(n):
        if text in seen:
            continue
        m = MinHash(num_perm=128, seed=1, hashfunc=int)
        m.update_batch(shingles.shingle_hashes(text).tolist())
        if not lsh.query(LeanMinHash(m)):
            lsh.insert(str(kept), LeanMinHash(m))
            kept += 1
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    return {"reference": "datasketch MinHashLSH", "documents": n, "kept": kept, "docs_per_s": round(n / seconds),
            "rss_growth_bytes_per_kept_doc": round(grown / kept),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def kept_sets(path: str) -> dict:
    """Kept documents of the demo corpus with the compact index and with datasketch's MinHashLSH."""
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    from babyllama.data.clean import NearDuplicateIndex, normalize

    texts = [normalize(json.loads(line)["text"]) for line in open(path, encoding="utf-8")]
    texts = list(dict.fromkeys(t for t in texts if len(t) >= 10))  # after the length filter and exact dedup
    index, lsh = NearDuplicateIndex(), MinHashLSH(threshold=0.8, num_perm=128)
    ours, theirs = [], []
    for i, text in enumerate(texts):
        if not index.seen_before([text]):
            ours.append(i)
        m = MinHash(num_perm=128, seed=1, hashfunc=int)
        m.update_batch(index.shingle_hashes(text).tolist())
        if not lsh.query(LeanMinHash(m)):
            lsh.insert(str(i), LeanMinHash(m))
            theirs.append(i)
    return {"documents": len(texts), "kept (compact index)": len(ours), "kept (MinHashLSH)": len(theirs),
            "same kept set": ours == theirs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--demo", default="runs/demo/data/raw/pretrain.jsonl")
    parser.add_argument("--reference", type=int, default=100_000, help="documents for datasketch's MinHashLSH")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size here
    parser.add_argument("--lsh", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_minhash_lsh(args.one) if args.lsh else measure(args.one)))
        return
    runs = [[str(n)] for n in args.sizes] + ([[str(args.reference), "--lsh"]] if args.reference else [])
    for run in runs:
        out = subprocess.run([sys.executable, __file__, "--one", *run], capture_output=True, text=True, check=True)
        print(out.stdout.strip(), flush=True)
    print(json.dumps(kept_sets(args.demo), ensure_ascii=False))


if __name__ == "__main__":
    main()
