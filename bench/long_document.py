"""One very long document through deduplication: its MinHash signature and its dedup key, each computed whole
(before) against in pieces (MINHASH_PIECE_CHARS, KEY_PIECE_CHARS), each way in a fresh process; memory is the peak
that tracemalloc traces (Python's and numpy's allocations) beyond the document itself, time is with it tracing.

    python bench/long_document.py [--what minhash|key] [--chars 17000000]

The document is random CJK characters (3,000 distinct) with a ，or 。 every 20 on average, as a 50 MB line
of a web dump would be.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import time
import tracemalloc


def document(chars: int) -> str:
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)] + ["，"] * 100 + ["。"] * 50
    return "".join(rng.choices(alphabet, k=chars))


def minhash(text: str, whole: bool) -> list[int]:
    from babyllama.data.clean import NearDuplicateIndex

    index = NearDuplicateIndex()
    if not whole:
        return index.minhash([text]).tolist()
    m = index.template  # the code before: every shingle hash of the document as one Python list
    m.clear()
    hashes = index.shingle_hashes(text).tolist()
    for i in range(0, len(hashes), 4096):
        m.update_batch(hashes[i : i + 4096])
    return m.hashvalues.tolist()


def key(text: str, whole: bool) -> str:
    from babyllama.data import clean

    return clean.piece_key(text) if whole else clean.dedup_key(text)  # piece_key: the code before, at once


def measure(what: str, whole: bool, chars: int, out) -> None:
    text = document(chars)
    tracemalloc.start()
    start = time.perf_counter()
    result = (minhash if what == "minhash" else key)(text, whole)
    grown = tracemalloc.get_traced_memory()[1] / 2**20
    out.send((grown, time.perf_counter() - start, result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", choices=["minhash", "key"], default="minhash")
    ap.add_argument("--chars", type=int, default=17_000_000)
    args = ap.parse_args()
    results = {}
    for way in ("whole", "pieces"):
        recv, send = mp.Pipe(duplex=False)
        p = mp.get_context("spawn").Process(target=measure, args=(args.what, way == "whole", args.chars, send))
        p.start()
        results[way] = recv.recv()
        p.join()
        print(f"{args.what} {way:6}: peak +{results[way][0]:6.0f} MiB beyond the document, {results[way][1]:5.1f} s")
    (w_mb, w_s, w_out), (p_mb, p_s, p_out) = results["whole"], results["pieces"]
    print(f"pieces/whole: memory {p_mb / w_mb:.3f}x, time {p_s / w_s:.2f}x, the same result: {w_out == p_out}")


if __name__ == "__main__":
    main()
