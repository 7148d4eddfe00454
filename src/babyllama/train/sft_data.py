"""SFT samples for the trainer: rows read from the memory-mapped token cache, length-grouped or packed.

    train, val, stats = load_sft_data(["alpaca_gpt4_data_zh.json"], "runs/pretrain/final", cache_dir,
                                      SFTSettings(max_len=513), pack=True, dist=Dist(), workers=8)
    batch = train.collate([0, 1, 2])   # idx, targets (-1 where there is no loss), segments if packed

The samples themselves (chat format, loss mask, truncation, filters, split) are made once by
data/sft_tokens.py; under torchrun rank 0 builds the cache and the others wait, then every rank
maps the same files. Memory per process: a few arrays of one number per sample.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from babyllama.data.sft_tokens import (
    SFTSettings,
    SFTStats,
    build_sft_cache,
    cache_differences,
    cache_key,
    input_files,
    open_split,
    read_sft_cache,
    restamped,
)
from babyllama.data.sources import check_output_folder, token_cache_name
from babyllama.errors import UserError
from babyllama.lock import locked
from babyllama.tokenizer import load_tokenizer
from babyllama.train.distributed import Dist, share_refusal


class SFTData:
    """Tokenized SFT samples for the trainer; with pack=True several short ones share a row.

    ids, mask: all samples back to back (memory maps or arrays); lengths (n,): ids per sample. The attributes
    lengths and row_positions are per row (a pack of samples, or one).
    """

    def __init__(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray, max_seq_len: int, pad_id: int,
                 pack: bool = False):
        self.ids, self.mask, self.max_seq_len, self.pad_id, self.pack = ids, mask, max_seq_len, pad_id, pack
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # (n + 1,) where sample i starts
        if pack:
            self.order, self.row_starts = pack_rows(lengths, max_seq_len + 1)
        else:
            self.order, self.row_starts = np.arange(len(lengths)), np.arange(len(lengths) + 1)
        self.lengths = np.add.reduceat(lengths[self.order], self.row_starts[:-1]) if len(lengths) else lengths
        self.row_positions = self.lengths - 1  # (rows,) a row of n ids has n - 1 positions in idx: its last id is
        # no input (the padding after them is not counted)

    @classmethod
    def from_samples(cls, samples: list[tuple[list[int], list[int]]], max_seq_len: int, pad_id: int,
                     pack: bool = False) -> SFTData:
        """From (ids, mask) pairs in memory, as chat_format.render_conversation makes them."""
        lengths = np.array([len(ids) for ids, _ in samples], dtype=np.int32)
        ids = np.array([i for s, _ in samples for i in s], dtype=np.int64)
        mask = np.array([m for _, s in samples for m in s], dtype=np.uint8)
        return cls(ids, mask, lengths, max_seq_len, pad_id, pack)

    def __len__(self) -> int:
        return len(self.row_starts) - 1

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) of sample i."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.mask[a:b]

    def row(self, r: int) -> list[int]:
        """The samples packed into row r."""
        return self.order[self.row_starts[r] : self.row_starts[r + 1]].tolist()

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Rows padded on the right to the longest (packed: to max_seq_len, one shape for torch.compile).

        idx, targets (B, T) int64, targets -1 where there is no loss; segments (B, T) int64 if packed:
        the sample each position belongs to (-1: padding), from which the model masks attention.
        """
        rows = [[self.sample(i) for i in self.row(r)] for r in indices]
        T = self.max_seq_len if self.pack else max(sum(len(ids) for ids, _ in row) for row in rows) - 1
        idx = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), T), -1, dtype=torch.long)
        segments = torch.full((len(rows), T), -1, dtype=torch.long)
        for b, row in enumerate(rows):
            ids = torch.from_numpy(np.concatenate([s for s, _ in row]).astype(np.int64))
            mask = torch.from_numpy(np.concatenate([m for _, m in row]).astype(bool))
            seg = torch.repeat_interleave(torch.arange(len(row)), torch.tensor([len(s) for s, _ in row]))
            n = len(ids) - 1
            idx[b, :n] = ids[:-1]
            keep = mask[1:] & (seg[1:] == seg[:-1])  # a sample never predicts the next one's first id
            targets[b, :n] = torch.where(keep, ids[1:], -1)
            segments[b, :n] = seg[:-1]
        batch = {"idx": idx, "targets": targets}
        if self.pack:
            batch["segments"] = segments
        return batch


def pack_rows(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing bin packing of samples into rows of capacity ids: (order, row_starts).

    Row r holds the samples order[row_starts[r]:row_starts[r + 1]]. Longest first, each sample
    joins the row it fills most tightly, or starts a new one (Johnson, 1973). Rows with the same
    room left are interchangeable, so the work goes by (length, room) counts, not by sample: a
    million samples pack in about a second. Rows come out over 99% full on the demo's SFT.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    row_of = np.empty(len(lengths), dtype=np.int64)
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]  # by_room[r]: the rows with r ids free
    has_room = np.zeros(capacity + 1, dtype=bool)  # has_room[r]: by_room[r] is not empty
    n_rows = 0
    order = np.argsort(-lengths, kind="stable")
    for left in np.split(order, np.flatnonzero(np.diff(lengths[order])) + 1):  # one length, longest first
        n = int(lengths[left[0]]) if len(left) else 0
        while len(left):
            fits = np.flatnonzero(has_room[n:])
            if len(fits):  # the tightest rows that fit; each takes samples until its room is under n
                room = n + int(fits[0])
                k = min(len(by_room[room]), -(-len(left) // (room // n)))
                rows = by_room[room][-k:]
                del by_room[room][-k:]
                has_room[room] = bool(by_room[room])
            else:  # new rows
                room = capacity
                k = -(-len(left) // (room // n))
                rows, n_rows = list(range(n_rows, n_rows + k)), n_rows + k
            per_row = room // n
            take, left = left[: k * per_row], left[k * per_row :]
            which = np.arange(len(take)) // per_row  # (len(take),) index into rows
            row_of[take] = np.asarray(rows)[which]
            for row, count in zip(rows, np.bincount(which, minlength=k).tolist(), strict=True):
                by_room[room - count * n].append(row)
                has_room[room - count * n] = True
    order = np.argsort(row_of, kind="stable")
    return order, np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=n_rows))])


def load_sft_data(inputs: list[str | Path], tokenizer_path: str | Path, cache_dir: str | Path,
                  settings: SFTSettings, pack: bool, dist: Dist, workers: int = 1, kind: str = "sft",
                  started_with: dict | None = None) -> tuple[SFTData, SFTData | None, SFTStats]:
    """Train and validation SFTData from the token cache, built first (by rank 0) when there is none.

    kind "dpo": the cache of preference pairs, samples 2i and 2i + 1 the chosen and rejected of pair i.
    started_with: for a resumed run, the manifest (less its stats) of the cache it started with.
    Raises UserError when cache_dir is another babyllama output (check_output_folder: token shards, a checkpoint,
    the other kind's cache), when the cache holds the tokens of other inputs, another tokenizer or settings, or
    when those are not the ones the run started with (checked before any cache is built); a cache that another run
    built while this one waited for it is checked alike (opened_cache). Under torchrun a refusal of rank 0 reaches
    every rank (share_refusal): it says it once, and all end (AlreadySaid).
    """
    check_cache_folder(cache_dir, kind)
    tokenizer = load_tokenizer(tokenizer_path)
    key = cache_key(input_files(inputs, kind), tokenizer.record(), settings, kind, cache_dir)
    changed = cache_differences(confirmed(started_with, cache_dir), key) if started_with is not None else []
    if changed:  # a rebuilt cache would resume the run on other samples
        if "version of babyllama" in changed[0]:  # a version is all that is said: it cannot be restored
            why = f"{changed[0]}, whose SFT/DPO samples this version makes otherwise; finish it with that version"
        else:
            why = f"{', '.join(changed)}; resuming needs the same inputs and settings, so restore them"
        raise UserError(f"the run started with {why}, or start a new run without --resume in a new --out_dir.")
    opened, refused = None, None
    if dist.main:  # rank 0 first, building the cache when there is none; the others then open what it left
        try:
            opened = opened_cache(inputs, tokenizer_path, cache_dir, settings, workers, kind, key, build=True)
        except UserError as e:
            refused = e
    share_refusal(refused, dist)
    if opened is None:
        opened = opened_cache(inputs, tokenizer_path, cache_dir, settings, workers, kind, key, build=False)
    manifest, splits = opened
    T = settings.max_len - 1
    train = SFTData(*splits["train"], T, tokenizer.pad_id, pack)
    val = SFTData(*splits["val"], T, tokenizer.pad_id, pack) if "val" in splits else None
    return train, val, known_stats(manifest["stats"])


def known_stats(stats: dict) -> SFTStats:
    """A manifest's stats as SFTStats: the fields this babyllama knows, the others left out (a newer babyllama's
    cache may record more; SFTStats(**stats) was a TypeError traceback)."""
    return SFTStats(**{f.name: stats[f.name] for f in fields(SFTStats) if f.name in stats})


def confirmed(started_with: dict, cache_dir: str | Path) -> dict:
    """started_with, the manifest (less its stats) of the cache a resumed run started with, with the inputs' mtimes
    that the cache in cache_dir has recorded since (restamped: a new mtime, the same bytes hashed) where that cache
    is otherwise the same, SHA-256s too; so a resume after `touch input` hashes the input once, not on every resume.
    started_with as it is where there is no such cache or its manifest is damaged (opened_cache says so)."""
    try:
        manifest = read_sft_cache(cache_dir)
    except UserError:
        return started_with
    if manifest is None or unstamped(manifest) != unstamped(started_with):
        return started_with
    return {**started_with, "inputs": manifest["inputs"]}


def unstamped(manifest: dict) -> dict:
    """A cache's manifest less its stats and its inputs' mtimes."""
    inputs = manifest.get("inputs")
    inputs = [{k: v for k, v in i.items() if k != "mtime_ns"} for i in inputs] if isinstance(inputs, list) else inputs
    return {**{k: v for k, v in manifest.items() if k != "stats"}, "inputs": inputs}


def check_cache_folder(cache_dir: str | Path, kind: str) -> None:
    """Raise UserError when cache_dir is a file, or another babyllama output than a token cache of kind."""
    check_output_folder(cache_dir, f"{kind.upper()} samples", (token_cache_name(kind),), "--sft_cache")


def opened_cache(inputs: list[str | Path], tokenizer_path: str | Path, cache_dir: str | Path,
                 settings: SFTSettings, workers: int, kind: str, key: dict, build: bool,
                 ) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """(manifest, {split: open_split's arrays}) of the token cache of kind in cache_dir, "val" only where it has
    samples, read while this process holds the folder: another run that builds a cache there (sft or dpo with other
    settings, pretokenize --sft), replacing its files, waits, so that the manifest and the files mapped are of one
    cache (the maps keep its files once that run has replaced them). A run that holds it is waited for, saying so.
    build: build the cache (build_sft_cache) when there is none (rank 0; not on the other ranks, which open what it
    built). What is there is checked as load_sft_data checked the folder before (check_cache_folder), never built
    over. Raises UserError when it is another output, when the cache differs from key (cache_differences), is
    damaged, or is missing (build False: rank 0 built it, so this rank cannot see rank 0's folder, as on another
    machine with an --sft_cache that is not shared). A complete cache in a folder this process may not write (a
    read-only mount: no lock file can be made there, and no run can replace it) is read without the lock."""
    if not os.access(cache_dir, os.W_OK):  # a read-only cache (a shared mount): no lock file can be made there, and
        manifest = read_sft_cache(cache_dir)  # no run can replace it
        if manifest is not None:
            return checked_cache(cache_dir, manifest, kind, key, say=build)
    with locked(cache_dir, f"the {kind.upper()} token cache build", f"{kind} cache: ", "--sft_cache"):
        check_cache_folder(cache_dir, kind)
        manifest = read_sft_cache(cache_dir)
        built = manifest is None and build
        if built:
            print(f"{kind} cache: building {cache_dir} with {workers} worker{'s' if workers > 1 else ''}")
            manifest = build_sft_cache(inputs, tokenizer_path, cache_dir, settings, workers, kind)
        elif manifest is None:
            raise UserError(f"the {kind.upper()} token cache {cache_dir} that the first process built is not there "
                            "on this machine; with several machines, --sft_cache must be a folder that all of them "
                            "see (shared storage).")
        return checked_cache(cache_dir, manifest, kind, key, say=build and not built, held=True)


def checked_cache(cache_dir: str | Path, manifest: dict, kind: str, key: dict, say: bool, held: bool = False
                  ) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """opened_cache's (manifest, splits) of the cache in cache_dir whose manifest is read, once it is checked
    against key (cache_differences: UserError where it differs); say: print that the run uses it; held: this process
    holds cache_dir, so it records an input's new mtime where its bytes are the same (restamped)."""
    differ = cache_differences(manifest, key)
    if differ:
        raise UserError(f"the {kind.upper()} token cache {cache_dir} was built with {'; '.join(differ)}; "
                        "delete it to rebuild, or choose another --sft_cache.")
    if held:
        manifest = restamped(Path(cache_dir), manifest, key)
    if say:  # once accepted: not before the sentence that refuses it
        print(f"{kind} cache: using {cache_dir}")
    splits = ("train", "val") if manifest["stats"]["val_samples"] else ("train",)
    return manifest, {split: open_split(cache_dir, manifest, split) for split in splits}


def check_ids_fit(cache_dir: str | Path, kind: str, stats: SFTStats, splits: list[SFTData], vocab_size: int) -> None:
    """UserError where the largest token id of the token cache of kind ("sft", "dpo") in cache_dir is at or above
    the model's vocab_size. That id is the one its manifest records (stats.max_id), the ids unread, or for a cache
    from before it was recorded the largest of its splits' ids (one pass over the memory maps). Such an id stopped
    the run at its first step with an IndexError deep in the embedding (a CUDA assert on a GPU): a cache keyed by the
    run's tokenizer, whose ids the model's vocab_size covers (check_settings), holds none unless it was built by
    other code or its manifest was edited. Ids edited in the .bin files under an unchanged manifest that records
    max_id are not caught."""
    largest = stats.max_id
    if largest is None:
        largest = max((int(d.ids.max()) for d in splits if len(d.ids)), default=0)
    if largest >= vocab_size:
        raise UserError(f"the {kind.upper()} token cache {cache_dir} holds token id {largest}, but the model's "
                        f"vocab_size is {vocab_size}; delete {cache_dir} to rebuild it with the model's tokenizer.")
