"""Pretokenization: documents -> flat token shards (uint16 or uint32) + manifest.json, in parallel.

    babyllama pretokenize --input data/clean --tokenizer runs/tok --out_dir data/tokens --workers 8
    babyllama pretokenize --input part1 --tokenizer tok --out_dir t1 --num_shards 2 --shard_index 0  # machine 0
    babyllama pretokenize --merge t0 t1 --out_dir data/tokens                                        # join them

Each document becomes its ids then <eos> (and <bos> first with --bos), the recipe's layout; each bad record is
a line of bad_records.txt (`file:line: why`), as prepare writes it.
Documents go to the validation split by a hash of their text, so the split does not depend on
order, workers or machines. The main process reads and writes in order while worker processes
encode batches, at most 2 * workers batches in flight, so memory stays flat on any corpus and
`--workers 1` and `--workers 8` write identical bytes.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from functools import partial
from itertools import chain
from multiprocessing import resource_tracker
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np

from babyllama.data.shards import (
    FORMAT,
    MANIFEST,
    BinShardWriter,
    is_val,
    staged,
    swap_in,
    token_outputs,
    write_manifest,
)
from babyllama.data.sources import BAD_RECORDS, CorpusReader
from babyllama.errors import UserError, agree, children_without_ctrl_c
from babyllama.progress import bytes_bar, is_rank0
from babyllama.settings import check_fraction
from babyllama.tokenizer import PIECE_CHARS, Tokenizer, load_tokenizer, text_pieces

BATCH_CHARS = 1 << 20  # characters per batch sent to a worker
T, R = TypeVar("T"), TypeVar("R")

log = logging.getLogger(__name__)


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity, which a container or taskset narrows; os.cpu_count()
    counts the whole machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_workers(asked: int | None, setting: str) -> int:
    """The worker processes to start on this machine for `asked` (None or 0: one per core), at most one per core:
    more only share the same cores, each with its own memory (`--workers 100000` started ~1,000 processes and ran
    the machine out of memory). A count above the cores is capped, with a warning that names `setting`."""
    cores = cpu_cores()
    if asked and asked > cores and is_rank0():
        log.warning("%s %d is more than the %d CPU core%s of this machine; using %d worker process%s", setting, asked,
                    cores, "s" * (cores > 1), cores, "es" * (cores > 1))
    return min(asked or cores, cores)


# --- the worker side: a tokenizer per process, loaded once ---

_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker
    _TOKENIZER = load_tokenizer(tokenizer_path)


def _init_pool_worker(tokenizer_path: str) -> None:
    """A pool worker leaves Ctrl-C to the main process, which stops the pool: the terminal's SIGINT reaches
    the whole process group, and each worker would print its own KeyboardInterrupt traceback. It started with
    SIGINT blocked (children_without_ctrl_c), so that none came while it imported; ignored, a Ctrl-C that waits is
    dropped. It ends when the main process is gone, even killed by SIGKILL, which leaves no one to stop the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Thread(target=exit_with, args=(mp.parent_process(),), daemon=True).start()
    _init_worker(tokenizer_path)


def exit_with(parent: mp.process.BaseProcess) -> None:
    """Wait for parent to end, then end this process: an orphaned pool worker would wait for work forever,
    holding its memory (or, datatrove's, run its task on to the end)."""
    parent.join()
    os._exit(1)


def worker_tokenizer() -> Tokenizer:
    """The tokenizer of this worker process (loaded once by in_workers)."""
    assert _TOKENIZER is not None
    return _TOKENIZER


def in_workers(func: Callable[[T], R], batches: Iterable[T], tokenizer_path: str, workers: int
               ) -> Iterator[tuple[T, R]]:
    """(batch, func(batch)) for each batch, in input order, computed by `workers` processes that each
    load the tokenizer once; at most 2 * workers batches are in flight, so memory stays flat.
    func must be a module-level function (or a functools.partial of one): it is pickled."""
    if workers <= 1:
        _init_worker(tokenizer_path)
        for batch in batches:
            yield batch, func(batch)
        return
    ctx = mp.get_context("spawn")  # no fork: the Rust tokenizer's threads do not survive it
    resource_tracker.ensure_running()  # first: once its process is started it unblocks SIGINT in this thread
    with ExitStack() as stack:
        with children_without_ctrl_c():  # a Ctrl-C meanwhile is raised here, the pool entered: it ends the pool
            pool = stack.enter_context(ctx.Pool(workers, initializer=_init_pool_worker, initargs=(tokenizer_path,)))
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(func, (batch,))))
            if len(pending) >= 2 * workers:
                batch0, result = pending.popleft()
                yield batch0, result.get()
        while pending:
            batch0, result = pending.popleft()
            yield batch0, result.get()


class Piece(NamedTuple):
    """A piece of a document's text (text_pieces), as the workers encode it and the writers append it."""
    text: str
    val: bool  # its document goes to the val split (is_val, by the hash of the whole text)
    first: bool  # it begins its document
    last: bool  # it ends its document


def document_pieces(texts: Iterable[str], val_fraction: float, tok: Tokenizer) -> Iterator[Piece]:
    """The pieces of each document in turn: a document over PIECE_CHARS characters is cut (text_pieces), lazily, so
    that nothing but the text itself is held whole; the tokenizer, given pieces of about BATCH_CHARS characters at a
    time (text_batches), needs memory for the characters it encodes at once (~400 bytes each in one long word of BPE:
    a document of 1.28 M characters took 534 MB), and the ids go to the shards piece by piece (write_pieces)."""
    for text in texts:
        val, first = is_val(text, val_fraction), True
        pieces = text_pieces(text, PIECE_CHARS, tok)
        piece = next(pieces)
        for following in pieces:
            yield Piece(piece, val, first, False)
            piece, first = following, False
        yield Piece(piece, val, first, True)


def encode_pieces(tok: Tokenizer, pieces: list[Piece], bos: bool) -> tuple[np.ndarray, np.ndarray]:
    """The pieces' ids back to back, (N,) uint32, with <bos> before a document's first piece when asked and <eos>
    after its last, and each piece's number of ids, (P,) int64. A document's pieces' ids joined are the whole's
    (text_pieces)."""
    encoded = tok.encode_batch([p.text for p in pieces])
    ids = [[tok.bos_id] * (bos and p.first) + x + [tok.eos_id] * p.last for p, x in zip(pieces, encoded, strict=True)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return np.fromiter(chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum())), lengths


def _encode(pieces: list[Piece], bos: bool) -> tuple[np.ndarray, np.ndarray]:
    return encode_pieces(worker_tokenizer(), pieces, bos)


def text_batches(items: Iterable[T], size: Callable[[T], int] = len) -> Iterator[list[T]]:
    """Lists of items (documents; with size, anything that has a number of characters) of about BATCH_CHARS
    characters in all."""
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += size(item)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def split_writers(out: Path, dtype: np.dtype, shard_tokens: int, tag: str = "") -> dict[str, BinShardWriter]:
    """A shard writer per split: shard{tag}_00000.bin ... and val{tag}_00000.bin ..."""
    return {split: BinShardWriter(out, prefix + tag, split, dtype, shard_tokens)
            for split, prefix in (("train", "shard"), ("val", "val"))}


def write_pieces(writers: dict[str, BinShardWriter], pieces: list[Piece], flat: np.ndarray, lengths: np.ndarray
                 ) -> int:
    """Append encoded pieces (encode_pieces), in order, to the train or val writer of their documents, the pieces of a
    document as one document, which the batch's last piece may leave open for the next batch to go on with
    (BinShardWriter.write's open_end). Returns how many documents ended."""
    val = np.fromiter((p.val for p in pieces), dtype=bool, count=len(pieces))
    last = np.fromiter((p.last for p in pieces), dtype=bool, count=len(pieces))
    token_is_val = np.repeat(val, lengths)
    for split, chosen in (("train", ~val), ("val", val)):
        if chosen.any():
            ends = np.cumsum(lengths[chosen])  # where each piece ends among the split's tokens
            open_end = not last[chosen][-1]
            documents = np.diff(np.concatenate([ends[last[chosen]], ends[-1:] if open_end else []]), prepend=0)
            writers[split].write(flat[token_is_val == (split == "val")], documents.astype(np.int64), open_end)
    return int(last.sum())


def token_manifest(tok: Tokenizer, *, bos: bool, val_fraction: float, shards: list[dict], sources: dict,
                   **extra) -> dict:
    """The manifest.json of a token directory (write_manifest adds the totals)."""
    return {
        "format": FORMAT,
        "version": 1,
        "tokenizer": {**tok.record(), "kind": tok.kind},
        "dtype": tok.dtype.name,
        "bos": bos,
        "val_fraction": val_fraction,
        **extra,
        "shards": sorted(shards, key=lambda s: (s["split"] != "train", s["file"])),
        "sources": sources,
    }


def pretokenize(
    inputs: list[str],
    tokenizer_path: str,
    out: str | Path,
    *,
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
        raise UserError(f"--shard_index must be in [0, {num_shards}), got {shard_index}.")
    check_fraction(val_fraction, "--val_fraction")  # the range of the training setting too
    tok = load_tokenizer(tokenizer_path)
    reader, out = CorpusReader(inputs, format, skip_empty=True), Path(out)  # an empty record is no document
    with staged(out, token_outputs, MANIFEST) as stage:  # the earlier shards stay until the new ones are whole
        manifest = _pretokenize(reader, tok, tokenizer_path, stage, workers, val_fraction, shard_tokens, num_shards,
                                shard_index, bos)
        swap_in(stage, out, token_outputs, MANIFEST)
    reader.say_unshown(out / BAD_RECORDS)
    return manifest


def _pretokenize(reader: CorpusReader, tok: Tokenizer, tokenizer_path: str, out: Path, workers: int,
                 val_fraction: float, shard_tokens: int, num_shards: int, shard_index: int, bos: bool) -> dict:
    """pretokenize's work, into the folder out (its stage); returns the manifest written there last."""
    writers = split_writers(out, tok.dtype, shard_tokens)
    start = time.time()
    n_tokens = n_docs = 0
    mine = (t for i, t in enumerate(reader.documents()) if i % num_shards == shard_index)
    read_at: deque[int] = deque()  # reader.bytes_read() after each batch in flight, oldest first

    def batches() -> Iterator[list[Piece]]:
        for batch in text_batches(document_pieces(mine, val_fraction, tok), size=lambda piece: len(piece.text)):
            read_at.append(reader.bytes_read())
            yield batch

    try:
        # the bar is closed on an error too, so that its message starts a line
        with reader.bad_records_to(out), bytes_bar("pretokenize", reader.total_bytes) as bar:
            for pieces, (flat, lengths) in in_workers(partial(_encode, bos=bos), batches(), str(tokenizer_path),
                                                      workers):
                n_tokens, n_docs = n_tokens + len(flat), n_docs + write_pieces(writers, pieces, flat, lengths)
                rate = n_tokens / max(time.time() - start, 1e-9)
                bar.set_postfix_str(f"{n_docs:,} {agree(n_docs, 'doc', 'docs')}, {rate:,.0f} tokens/s", refresh=False)
                bar.update(read_at.popleft() - bar.n)  # the bytes of the batches written, not of those read ahead
            bar.update(reader.bytes_read() - bar.n)
        for w in writers.values():
            w.close()
    except BaseException:  # a failure or Ctrl-C while reading or tokenizing: the open shards' temporaries go too
        for w in writers.values():
            w.discard()
        raise
    reader.check_usable()
    tok.save(out / "tokenizer")
    manifest = token_manifest(
        tok, bos=bos, val_fraction=val_fraction, shards=writers["train"].shards + writers["val"].shards,
        sources={k: v.to_dict() for k, v in reader.stats.items()},
        partition={"num_shards": num_shards, "shard_index": shard_index}, seconds=round(time.time() - start, 2))
    return write_manifest(out, manifest)
