"""`eval --qa` memory against the number of items: the peak RSS of evaluate() on N generated QA items, each N in a
fresh process. The model's answer is stubbed (the question's first characters) so that the data side alone is
measured, in seconds: reading the items, the leakage-free path of eval (answers to items.jsonl.partial), scoring
(BLEU, ROUGE-L, F1, exact match, majority baseline) and items.jsonl; --generate asks the model instead (slow).

    python bench/qa_memory.py runs/demo/sft/final [--items 20000 200000] [--generate]

The items are random CJK characters with punctuation, a question of 10 to 60 characters, an answer of 2 to 20, in two
tasks, as a tester's generator made them (36 MB for 200k items).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import resource
import tempfile
import time
from pathlib import Path

ALPHABET = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)] + ["，", "。", "、"] * 50  # CJK, punctuation


def items(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    said = lambda lo, hi: "".join(rng.choices(ALPHABET, k=rng.randint(lo, hi)))
    return [{"question": said(10, 60), "answer": said(2, 20), "task": rng.choice("ab")} for _ in range(n)]


def measure(checkpoint: str, qa: Path, out: Path, generate: bool, send) -> None:
    import babyllama.evaluate as ev
    from babyllama.sampling import Sampling

    if not generate:
        ev.answer = lambda model, tok, conv, *a: conv.turns[-1][0][:6]
    start = time.perf_counter()
    result = ev.evaluate(checkpoint, out, qa=str(qa), sampling=Sampling(max_new_tokens=1))
    seconds = time.perf_counter() - start
    send.send((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, seconds, result["qa"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--items", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--generate", action="store_true", help="the model answers (slow) instead of a stub")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.items:
            qa = Path(tmp) / f"qa_{n}.jsonl"
            qa.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items(n)), encoding="utf-8")
            recv, send = mp.Pipe(duplex=False)
            p = mp.get_context("spawn").Process(target=measure, args=(args.checkpoint, qa, Path(tmp) / f"out_{n}",
                                                                    args.generate, send))
            p.start()
            peak, seconds, scores = recv.recv()
            p.join()
            bleu = {task: round(s["bleu"], 4) for task, s in sorted(scores.items())}
            print(f"{n:>9,} items ({qa.stat().st_size / 2**20:5.1f} MB): peak RSS {peak:6.0f} MB, {seconds:6.1f} s, "
                  f"bleu {bleu}", flush=True)


if __name__ == "__main__":
    main()
