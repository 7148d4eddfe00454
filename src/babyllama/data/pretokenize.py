"""Pretokenization: documents -> flat token shards (uint16 or uint32) + manifest.json, in parallel.

    babyllama pretokenize --input data/clean --tokenizer runs/tok --out data/tokens --workers 8
    babyllama pretokenize --input part1 --tokenizer tok --out t1 --num-shards 2 --shard-index 0   # machine 0
    babyllama pretokenize --merge t0 t1 --out data/tokens                                         # join them

Each document becomes its ids then <eos> (and <bos> first with --bos), the recipe's layout.
Documents go to the validation split by a hash of their text, so the split does not depend on
order, workers or machines. The main process reads and writes in order while worker processes
encode batches, at most 2 * workers batches in flight, so memory stays flat on any corpus and
`--workers 1` and `--workers 8` write identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from babyllama.data.sources import CorpusReader
from babyllama.errors import UserError
from babyllama.progress import progress
from babyllama.tokenizer import Tokenizer, load_tokenizer

MANIFEST = "manifest.json"
BATCH_CHARS = 1 << 20  # characters per batch sent to a worker


def is_val(text: str, val_fraction: float) -> bool:
    """A stable coin flip per document: blake2b of its UTF-8 text, as a number in [0, 1)."""
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


class BinShardWriter:
    """Appends whole documents to <prefix>_00000.bin ...; a shard closes once it holds shard_tokens."""

    def __init__(self, out: Path, prefix: str, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.prefix, self.split, self.dtype, self.shard_tokens = out, prefix, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.f = None

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents (their tokens back to back, and each one's length), rolling shards between them."""
        ends = np.cumsum(lengths)  # (D,) where each document ends in tokens
        done_docs, done_tokens = 0, 0
        while done_docs < len(lengths):
            if self.f is None:
                name = f"{self.prefix}_{len(self.shards):05d}.bin"
                self.f = (self.out / f".{name}.tmp").open("wb")
                self.shards.append({"file": name, "split": self.split, "tokens": 0, "documents": 0})
            shard = self.shards[-1]
            room = self.shard_tokens - shard["tokens"]
            take = int(np.searchsorted(ends, done_tokens + room, side="right")) - done_docs
            take = max(take, 1 if shard["tokens"] == 0 else 0)  # a huge document fills a shard alone
            end_tokens = int(ends[done_docs + take - 1]) if take else done_tokens
            self.f.write(tokens[done_tokens:end_tokens].astype(self.dtype, copy=False).tobytes())
            shard["tokens"] += end_tokens - done_tokens
            shard["documents"] += take
            done_docs, done_tokens = done_docs + take, end_tokens
            if shard["tokens"] >= self.shard_tokens or done_docs < len(lengths):
                self.close()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            name = self.shards[-1]["file"]
            (self.out / f".{name}.tmp").rename(self.out / name)
            self.f = None


# --- the worker side: a tokenizer per process, loaded once ---

_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker
    _TOKENIZER = load_tokenizer(tokenizer_path)


def _encode(texts: list[str], bos: bool) -> tuple[np.ndarray, np.ndarray]:
    """All documents' ids (with eos) back to back, and each document's length."""
    assert _TOKENIZER is not None
    ids = _TOKENIZER.encode_batch(texts, bos=bos, eos=True)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((i for x in ids for i in x), dtype=np.uint32, count=int(lengths.sum()))
    return flat, lengths


def _batches(docs: Iterator[str], num_shards: int, shard_index: int) -> Iterator[list[str]]:
    batch, chars = [], 0
    for i, text in enumerate(docs):
        if i % num_shards != shard_index:
            continue
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded(batches: Iterator[list[str]], tokenizer_path: str, workers: int, bos: bool):
    """(texts, flat ids, lengths) per batch, in input order, with a bounded number in flight."""
    if workers <= 1:
        _init_worker(tokenizer_path)
        for texts in batches:
            yield (texts, *_encode(texts, bos))
        return
    ctx = mp.get_context("spawn")  # no fork: the Rust tokenizer's threads do not survive it
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        pending: deque = deque()
        for texts in batches:
            pending.append((texts, pool.apply_async(_encode, (texts, bos))))
            if len(pending) >= 2 * workers:
                texts0, result = pending.popleft()
                yield (texts0, *result.get())
        while pending:
            texts0, result = pending.popleft()
            yield (texts0, *result.get())


def pretokenize(
    inputs: list[str],
    tokenizer_path: str,
    out: str | Path,
    workers: int = 1,
    val_fraction: float = 0.005,
    shard_tokens: int = 100_000_000,
    num_shards: int = 1,
    shard_index: int = 0,
    bos: bool = False,
    format: str | None = None,
) -> dict:
    """Tokenize documents into shards; returns the manifest, also written to out/manifest.json."""
    if not 0 <= shard_index < num_shards:
        raise UserError(f"--shard-index must be in [0, {num_shards}), got {shard_index}.")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}.")
    tok = load_tokenizer(tokenizer_path)
    out = _fresh_output_dir(Path(out))
    reader = CorpusReader(inputs, format)
    writers = {
        split: BinShardWriter(out, prefix, split, tok.dtype, shard_tokens)
        for split, prefix in (("train", "shard"), ("val", "val"))
    }
    start = time.time()
    bar = progress(desc="pretokenize", unit=" docs")
    n_tokens = 0
    batches = _batches(reader.documents(), num_shards, shard_index)
    for texts, flat, lengths in _encoded(batches, str(tokenizer_path), workers, bos):
        val = np.fromiter((is_val(t, val_fraction) for t in texts), dtype=bool, count=len(texts))
        token_is_val = np.repeat(val, lengths)
        writers["train"].write(flat[~token_is_val], lengths[~val])
        writers["val"].write(flat[token_is_val], lengths[val])
        n_tokens += len(flat)
        bar.update(len(texts))
        bar.set_postfix(tokens_per_s=f"{n_tokens / max(time.time() - start, 1e-9):,.0f}", refresh=False)
    bar.close()
    for w in writers.values():
        w.close()
    records, bad = reader.totals()
    if records == 0 or bad == records:
        raise UserError(f"no usable documents in the inputs ({records} records, {bad} bad).")
    tok.save(out / "tokenizer")
    manifest = {
        "format": "babyllama-tokens",
        "version": 1,
        "tokenizer": {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "kind": tok.kind,
                      "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id},
        "dtype": tok.dtype.name,
        "bos": bos,
        "val_fraction": val_fraction,
        "partition": {"num_shards": num_shards, "shard_index": shard_index},
        "shards": writers["train"].shards + writers["val"].shards,
        "sources": {k: v.to_dict() for k, v in reader.stats.items()},
        "seconds": round(time.time() - start, 2),
    }
    return _write_manifest(out, manifest)


def _fresh_output_dir(out: Path) -> Path:
    """Create out/, removing the shards and manifest of an earlier run there (and nothing else)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in [*out.glob("shard_*.bin"), *out.glob("val_*.bin"), *out.glob(".*.tmp"), out / MANIFEST]:
        f.unlink(missing_ok=True)
    return out


def _write_manifest(out: Path, manifest: dict) -> dict:
    splits = ("train", "val")
    manifest["totals"] = {
        s: {k: sum(x[k] for x in manifest["shards"] if x["split"] == s) for k in ("tokens", "documents")}
        for s in splits
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    tmp.rename(out / MANIFEST)  # written last: a manifest means every shard it lists is complete
    return manifest


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    f = path / MANIFEST if path.is_dir() else path
    if not f.is_file():
        raise UserError(f"{path} has no {MANIFEST}; make one with `babyllama pretokenize`.")
    return json.loads(f.read_text())


def merge(dirs: list[str], out: str | Path) -> dict:
    """Join the outputs of several `--num-shards` runs into one directory (hard links where possible)."""
    manifests = [read_manifest(d) for d in dirs]
    first = manifests[0]
    for d, m in zip(dirs, manifests, strict=True):
        for key in ("tokenizer", "dtype", "bos", "val_fraction"):
            if m[key] != first[key]:
                raise UserError(f"cannot merge {d}: its {key} differs from {dirs[0]}'s.")
    out = _fresh_output_dir(Path(out))
    shards, sources, counters = [], {}, {"train": 0, "val": 0}
    for d, m in zip(dirs, manifests, strict=True):
        for s in m["shards"]:
            prefix = "shard" if s["split"] == "train" else "val"
            name = f"{prefix}_{counters[s['split']]:05d}.bin"
            counters[s["split"]] += 1
            _link_or_copy(Path(d) / s["file"], out / name)
            shards.append({**s, "file": name})
        for src, st in m["sources"].items():
            sources[f"{src} [{Path(d).name}]"] = st
    shards.sort(key=lambda s: (s["split"] != "train", s["file"]))
    shutil.copytree(Path(dirs[0]) / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    merged = {**first, "shards": shards, "sources": sources, "merged_from": [str(d) for d in dirs]}
    merged.pop("partition", None)
    return _write_manifest(out, merged)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
