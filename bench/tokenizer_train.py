"""BPE training time against the length of unpunctuated runs: linear whatever the punctuation.

    python bench/tokenizer_train.py [--sizes 50000 200000] [--vocab_size 1000]

The same random common Chinese characters, once with a comma every 20 characters and once as one
run, through `train_bpe`; the reference is GPT-2's unbounded ByteLevel split (the pre-tokenizer
before), in the same process, on the smallest size. Results go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import random
import time

from babyllama.tokenizer import train_bpe


def train_before(texts: list[str], vocab_size: int):
    """The reference: train_bpe as it was, with ByteLevel's unbounded GPT-2 split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def timed(train, texts: list[str], vocab_size: int) -> float:
    start = time.perf_counter()
    tok = train(texts, vocab_size)
    seconds = time.perf_counter() - start
    if train is train_bpe:
        assert all(tok.decode(tok.encode(x)) == x for x in texts)  # still lossless
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    ap.add_argument("--vocab_size", type=int, default=1000)
    a = ap.parse_args()
    rng = random.Random(0)
    common = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)]
    for n in a.sizes:
        run = "".join(rng.choices(common, k=n))
        commas = "，".join(run[i : i + 20] for i in range(0, n, 20))
        row = {"characters": n, "comma_every_20_s": round(timed(train_bpe, [commas], a.vocab_size), 2),
               "one_run_s": round(timed(train_bpe, [run], a.vocab_size), 2)}
        if n == min(a.sizes):
            row["one_run_before_s"] = round(timed(train_before, [run], a.vocab_size), 2)
        print(row, flush=True)


if __name__ == "__main__":
    main()
