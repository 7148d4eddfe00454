"""MinHash of one very long document: the whole document shingled at once (before) against pieces of
MINHASH_PIECE_CHARS (clean.NearDuplicateIndex.minhash), each in a fresh process for its own peak RSS.

    python bench/minhash_long.py [--chars 17000000]

The document is random CJK characters (3,000 distinct), as a 50 MB line of a web dump would be.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import resource
import time


def document(chars: int) -> str:
    rng = random.Random(0)
    return "".join(rng.choices([chr(c) for c in range(0x4E00, 0x4E00 + 3000)], k=chars))


def measure(way: str, chars: int, out) -> None:
    from babyllama.data.clean import NearDuplicateIndex

    text, index = document(chars), NearDuplicateIndex()
    base, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    if way == "whole":  # the code before: every shingle hash of the document as one Python list
        m = index.template
        m.clear()
        hashes = index.shingle_hashes(text).tolist()
        for i in range(0, len(hashes), 4096):
            m.update_batch(hashes[i : i + 4096])
        signature = m.hashvalues
    else:
        signature = index.minhash(text)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    out.send((grown, time.perf_counter() - start, signature.tolist()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chars", type=int, default=17_000_000)
    args = ap.parse_args()
    results = {}
    for way in ("whole", "pieces"):
        recv, send = mp.Pipe(duplex=False)
        p = mp.get_context("spawn").Process(target=measure, args=(way, args.chars, send))
        p.start()
        results[way] = recv.recv()
        p.join()
        print(f"{way:6}: peak RSS +{results[way][0]:6.0f} MiB over the document, {results[way][1]:5.1f} s")
    (w_mb, w_s, w_sig), (p_mb, p_s, p_sig) = results["whole"], results["pieces"]
    print(f"pieces/whole: memory {p_mb / w_mb:.3f}x, time {p_s / w_s:.2f}x, same signature: {w_sig == p_sig}")


if __name__ == "__main__":
    main()
