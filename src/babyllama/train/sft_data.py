"""SFT samples: conversations from files, tokenized in the chat format, length-grouped or packed rows.

    train, val, stats = build_sft_data(["alpaca_gpt4_data_zh.json"], tokenizer, max_seq_len=512)
    batch = train.collate([0, 1, 2])   # idx, targets (-1 where there is no loss), attn_mask if packed

The chat format, its loss mask and its truncation are chat_format.py's; this module reads the
records, applies the recipe's length filters, splits off validation samples by a hash of the
prompts and makes batches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from babyllama.chat_format import Conversation, conversation_from_record, render_conversation, truncate_conversation
from babyllama.data.shards import is_val
from babyllama.data.sources import expand_inputs, iter_records
from babyllama.errors import UserError
from babyllama.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class SFTStats:
    records: int = 0
    bad: int = 0
    filtered: int = 0
    truncated: int = 0
    samples: int = 0
    val_samples: int = 0
    bad_examples: list[str] = field(default_factory=list)


def read_conversations(paths: Sequence[str | Path], stats: SFTStats, min_prompt: int = 0, max_prompt: int = 0,
                       min_answer: int = 0, max_answer: int = 0) -> list[Conversation]:
    """Every usable conversation of the files; the recipe's length filters apply to each turn (0: off)."""
    out = []
    for path in expand_inputs(list(paths)):
        for where, record in iter_records(path):
            stats.records += 1
            try:
                if record is None:
                    raise ValueError("not a JSON object or a CSV row")
                conv = conversation_from_record(record)
            except ValueError as e:  # the first five are logged with their reason, then a count
                stats.bad += 1
                if len(stats.bad_examples) < 5:
                    stats.bad_examples.append(where)
                    log.warning("%s: skipped a record: %s", where, e)
                continue
            if any(not _fits(len(u), min_prompt, max_prompt) or not _fits(len(a), min_answer, max_answer)
                   for u, a in conv.turns):
                stats.filtered += 1
                continue
            out.append(conv)
    if stats.bad > len(stats.bad_examples):
        log.warning("... and %d more bad records (%d in all)", stats.bad - len(stats.bad_examples), stats.bad)
    if not out:
        raise UserError(f"no usable SFT records in {', '.join(map(str, paths))} "
                        f"({stats.records} read, {stats.bad} bad, {stats.filtered} filtered by length).")
    return out


def _fits(n: int, low: int, high: int) -> bool:
    return n >= low and (high <= 0 or n <= high)


class SFTData:
    """Tokenized SFT samples for the trainer; with pack=True several short ones share a row."""

    def __init__(self, samples: list[tuple[list[int], list[int]]], max_seq_len: int, pad_id: int, pack: bool = False):
        self.samples, self.max_seq_len, self.pad_id = samples, max_seq_len, pad_id
        self.rows = pack_rows([len(ids) for ids, _ in samples], max_seq_len + 1) if pack else [
            [i] for i in range(len(samples))]
        self.pack = pack
        self.lengths = [sum(len(samples[i][0]) for i in row) for row in self.rows]  # for length grouping

    def __len__(self) -> int:
        return len(self.rows)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Rows padded on the right to the longest (packed: to max_seq_len, one shape for torch.compile);
        targets are -1 where there is no loss."""
        rows = [[self.samples[i] for i in self.rows[r]] for r in indices]
        T = self.max_seq_len if self.pack else max(sum(len(ids) for ids, _ in row) for row in rows) - 1
        idx = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), T), -1, dtype=torch.long)
        segments = torch.full((len(rows), T), -1, dtype=torch.long)
        for b, row in enumerate(rows):
            ids = [i for s, _ in row for i in s]
            mask = [m for _, s in row for m in s]
            seg = [k for k, (s, _) in enumerate(row) for _ in s]
            n = len(ids) - 1
            idx[b, :n] = torch.tensor(ids[:-1])
            tgt = torch.tensor(ids[1:])
            keep = torch.tensor(mask[1:], dtype=torch.bool) & (torch.tensor(seg[1:]) == torch.tensor(seg[:-1]))
            targets[b, :n] = torch.where(keep, tgt, -1)  # a sample never predicts the next one's first id
            segments[b, :n] = torch.tensor(seg[:-1])
        batch = {"idx": idx, "targets": targets}
        if self.pack:
            batch["attn_mask"] = packed_attention_mask(segments)
        return batch


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best fit, in order: each sample joins the open row it fills most tightly, or starts a new one.
    Rows come out ~98% full where closing a row at the first misfit leaves ~84% (the demo's SFT)."""
    rows: list[list[int]] = []
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]  # by_room[r]: rows with r ids free
    for i, n in enumerate(lengths):
        room = next((r for r in range(n, capacity + 1) if by_room[r]), None)
        if room is None:
            rows.append([])
            row, room = len(rows) - 1, capacity
        else:
            row = by_room[room].pop()
        rows[row].append(i)
        if room - n > 0:
            by_room[room - n].append(row)
    return rows


def packed_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: causal and within one sample; padding (-1) attends to itself only."""
    B, T = segments.shape
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    diagonal = torch.eye(T, dtype=torch.bool)
    return ((same & causal) | diagonal)[:, None]


def build_sft_data(paths: Sequence[str | Path], tokenizer: Tokenizer, max_seq_len: int, val_fraction: float = 0.02,
                   pack: bool = False, **filters) -> tuple[SFTData, SFTData | None, SFTStats]:
    """Train and validation SFTData from instruction or conversation files."""
    stats = SFTStats()
    train, val = [], []
    for conv in read_conversations(paths, stats, **filters):
        ids, mask = render_conversation(tokenizer, conv)
        if len(ids) > max_seq_len + 1:
            ids, mask = truncate_conversation(tokenizer, conv, max_seq_len + 1)
            stats.truncated += 1
        (val if is_val("\x00".join(u for u, _ in conv.turns), val_fraction) else train).append((ids, mask))
    stats.samples, stats.val_samples = len(train), len(val)
    if not train:
        raise UserError("every SFT sample landed in the validation split; lower --val_fraction.")
    return (SFTData(train, max_seq_len, tokenizer.pad_id, pack),
            SFTData(val, max_seq_len, tokenizer.pad_id, pack) if val else None, stats)
