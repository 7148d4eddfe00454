"""Cleaning: normalise text, drop short documents, remove exact and near duplicates (MinHash LSH).

    babyllama prepare --input wiki.json baike.jsonl --out_dir data/clean --dedup minhash --min_chars 50

Output: data/clean/part_00000.jsonl ... ({"text": ...} per line), stats.json (per source: records,
bad, too short, exact and near duplicates, kept, characters) and bad_records.txt (file:line of
every record that was skipped). Everything is deterministic: the first copy of a document wins.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from babyllama.data.sources import CorpusReader
from babyllama.errors import UserError, require
from babyllama.progress import progress

_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f]+")  # not \u3000: it is Chinese layout
_BLANK_LINES = re.compile(r"\n{3,}")
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # category Cc, less \t and \n


def normalize(text: str) -> str:
    """Unify newlines, drop control and zero-width characters, squeeze runs of spaces and blank lines.

    Full-width Chinese punctuation (，。！？：；“”) is left as it is: no NFKC.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_INVISIBLE)
    text = _CONTROL.sub("", text)
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


class NearDuplicateIndex:
    """MinHash over character n-grams (Chinese has no spaces) with datasketch's LSH index."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        datasketch = require("datasketch", "data")
        MinHash, MinHashLSH = datasketch.MinHash, datasketch.MinHashLSH
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.template = MinHash(num_perm=num_perm, seed=seed)  # its permutations are drawn once
        self.ngram = ngram
        self.count = 0

    def shingle_hashes(self, text: str) -> np.ndarray:
        """Unique 32-bit hashes of the character n-grams of text, computed with numpy."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        n = max(1, min(self.ngram, len(codes)))
        h = np.full(max(len(codes) - n + 1, 1), 14695981039346656037, dtype=np.uint64)  # FNV-1a, 64 bit
        for i in range(min(n, len(codes))):
            h = (h ^ codes[i : len(codes) - n + 1 + i]) * np.uint64(1099511628211)
        return np.unique(h >> np.uint64(32))

    def minhash(self, text: str):
        from datasketch import LeanMinHash, MinHash

        t = self.template
        m = MinHash(
            num_perm=len(t), seed=t.seed, hashfunc=int, permutations=t.permutations, scheme=t.scheme
        )  # hashfunc=int: the shingle hashes come in as ints
        hashes = self.shingle_hashes(text).tolist()
        for i in range(0, len(hashes), 4096):  # bounded memory for long documents
            m.update_batch(hashes[i : i + 4096])
        return LeanMinHash(m)

    def seen_before(self, text: str) -> bool:
        """True when a similar document was added before; else remember this one."""
        m = self.minhash(text)
        if self.lsh.query(m):
            return True
        self.lsh.insert(str(self.count), m, check_duplication=False)
        self.count += 1
        return False


class SubstringIndex:
    """Finds whether a text contains any of a set of strings, each at least k characters long."""

    def __init__(self, items: set[str], k: int):
        self.k = k
        self.by_prefix: dict[str, list[str]] = {}
        for item in items:
            self.by_prefix.setdefault(item[:k], []).append(item)

    def matches(self, text: str) -> Iterator[str]:
        """The items that occur in text, in order of where they start."""
        for i in range(len(text) - self.k + 1):
            for item in self.by_prefix.get(text[i : i + self.k], ()):
                if text.startswith(item, i):
                    yield item

    def found_in(self, text: str) -> bool:
        return next(self.matches(text), None) is not None


@dataclass
class SourceStats:
    schema: str = ""
    records: int = 0
    bad: int = 0
    too_short: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    kept: int = 0
    characters: int = 0


class ShardWriter:
    """JSON-lines shards of at most `docs_per_shard` documents, written to a temp name then renamed."""

    def __init__(self, out: Path, docs_per_shard: int):
        self.out, self.docs_per_shard = out, docs_per_shard
        self.index, self.in_shard, self.f = 0, 0, None
        self.files: list[str] = []

    def write(self, text: str) -> None:
        if self.f is None:
            self.f = (self.out / f".part_{self.index:05d}.jsonl.tmp").open("w", encoding="utf-8")
        self.f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        self.in_shard += 1
        if self.in_shard >= self.docs_per_shard:
            self.close()

    def close(self) -> None:
        if self.f is None:
            return
        self.f.close()
        name = f"part_{self.index:05d}.jsonl"
        (self.out / f".{name}.tmp").rename(self.out / name)
        self.files.append(name)
        self.f, self.index, self.in_shard = None, self.index + 1, 0


def clean_documents(
    documents: Iterable[tuple[str, str]],
    min_chars: int,
    dedup: str,
    threshold: float,
    stats: dict[str, SourceStats],
) -> Iterator[str]:
    """The documents that survive normalisation, the length filter and deduplication, in order.

    documents: (source, text) pairs; stats gets one SourceStats per source.
    """
    if dedup not in ("none", "exact", "minhash"):
        raise UserError(f"unknown --dedup {dedup!r}; choose none, exact or minhash.")
    seen: set[bytes] = set()
    near = NearDuplicateIndex(threshold) if dedup == "minhash" else None
    for source, raw in documents:
        s = stats.setdefault(source, SourceStats())
        text = normalize(raw)
        if len(text) < min_chars:
            s.too_short += 1
            continue
        if dedup != "none":
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if digest in seen:
                s.exact_duplicates += 1
                continue
            seen.add(digest)
        if near is not None and near.seen_before(text):
            s.near_duplicates += 1
            continue
        s.kept += 1
        s.characters += len(text)
        yield text


def prepare(
    inputs: list[str],
    out: str | Path,
    *,
    format: str | None = None,
    min_chars: int = 10,
    dedup: str = "minhash",
    threshold: float = 0.8,
    docs_per_shard: int = 100_000,
) -> dict:
    """Clean a corpus into JSON-lines shards; returns the statistics also written to stats.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, SourceStats] = {}
    writer = ShardWriter(out, docs_per_shard)
    start = time.time()
    with (out / "bad_records.txt").open("w", encoding="utf-8") as bad_log:
        reader = CorpusReader(inputs, format, bad_log)
        documents = progress(reader.documents_with_source(), desc="prepare", unit=" docs")
        for text in clean_documents(documents, min_chars, dedup, threshold, stats):
            writer.write(text)
    writer.close()
    for path, fs in reader.stats.items():
        s = stats.setdefault(path, SourceStats())
        s.schema, s.records, s.bad = fs.schema, fs.records, fs.bad
    total = {k: sum(getattr(s, k) for s in stats.values()) for k in asdict(SourceStats()) if k != "schema"}
    result = {
        "sources": {k: asdict(v) for k, v in stats.items()},
        "total": total,
        "files": writer.files,
        "settings": {"format": format, "min_chars": min_chars, "dedup": dedup, "minhash_threshold": threshold},
        "seconds": round(time.time() - start, 2),
    }
    (out / "stats.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if total["records"] and total["bad"] == total["records"]:
        raise UserError(f"every one of the {total['records']} records was bad; see {out / 'bad_records.txt'}.")
    if total["records"] == 0:
        raise UserError("the inputs hold no records; check the paths and --format.")
    return result
