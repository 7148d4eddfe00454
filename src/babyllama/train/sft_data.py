"""SFT samples: the chat format, the loss mask, truncation, length-grouped batches and packing.

The chat format (DESIGN.md), one function for training and inference alike:

    [system "\n"] user₁ <bos> answer₁ <eos> user₂ <bos> answer₂ <eos> ...

Loss falls on the answer tokens and their <eos>, nothing else. At inference the same
function builds `... user_k <bos>` and the model writes the answer.

Truncation, when a conversation is longer than max_seq_len + 1 tokens, cuts in this order:
  1. whole turns, oldest first (the last turn always stays);
  2. the beginning of the remaining prompt (the text nearest the answer stays);
  3. the end of the last answer, before its <eos>: the <eos> of a kept answer is never cut.

    data = SFTData.from_files(["alpaca_gpt4_data_zh.json"], tokenizer, max_seq_len=512)
    batch = data.collate([0, 1, 2])   # idx, targets (-1 where there is no loss), attn_mask if packed
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from babyllama.data.pretokenize import is_val
from babyllama.data.sources import expand_inputs, iter_records, prompt_answer_of_instruction, turns_of_conversation
from babyllama.errors import UserError
from babyllama.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Conversation:
    turns: list[tuple[str, str]]  # (user, answer) pairs
    system: str = ""


def conversation_of(record: dict) -> Conversation | None:
    """A conversation from an instruction record, a prompt/answer row, or a `conversations` list."""
    if "conversations" in record:
        turns = turns_of_conversation(record)
        if not turns:
            return None
        system = "\n".join(c for role, c in turns if role == "system")
        rest = [(r, c) for r, c in turns if r != "system"]
        pairs = list(zip(rest[::2], rest[1::2], strict=False))
        if not pairs or any(u[0] != "user" or a[0] != "assistant" for u, a in pairs):
            return None
        return Conversation([(u[1], a[1]) for u, a in pairs], system)
    if isinstance(record.get("prompt"), str) and isinstance(record.get("answer"), str):
        return Conversation([(record["prompt"], record["answer"])])
    pair = prompt_answer_of_instruction(record)
    return None if pair is None else Conversation([pair])


def chat_ids(tokenizer: Tokenizer, conv: Conversation, answer_last: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and, per id, 1 where it carries loss (answers and their <eos>).

    answer_last=False leaves the last answer out and ends with <bos>: the prompt for inference.
    """
    ids, mask = [], []
    for i, (user, answer) in enumerate(conv.turns):
        prompt = f"{conv.system}\n{user}" if i == 0 and conv.system else user
        p = tokenizer.encode(prompt) + [tokenizer.bos_id]
        ids += p
        mask += [0] * len(p)
        if i == len(conv.turns) - 1 and not answer_last:
            break
        a = tokenizer.encode(answer) + [tokenizer.eos_id]
        ids += a
        mask += [1] * len(a)
    return ids, mask


def truncate(tokenizer: Tokenizer, conv: Conversation, max_len: int) -> tuple[list[int], list[int]]:
    """chat_ids cut to at most max_len ids in the documented order."""
    for start in range(len(conv.turns)):  # 1. drop the oldest turns
        ids, mask = chat_ids(tokenizer, Conversation(conv.turns[start:], conv.system))
        if len(ids) <= max_len:
            return ids, mask
    prompt_len = mask.index(1)  # the last turn alone: prompt ids (ending in <bos>), then answer ids
    prompt, answer = ids[:prompt_len], ids[prompt_len:]
    keep_prompt = max(max_len - len(answer), min(prompt_len, max_len // 2))
    prompt = prompt[len(prompt) - keep_prompt :]  # 2. the prompt's beginning goes
    room = max_len - len(prompt)
    answer = answer[: room - 1] + [tokenizer.eos_id]  # 3. the answer's end goes, its <eos> stays
    return prompt + answer, [0] * len(prompt) + [1] * len(answer)


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
            conv = conversation_of(record) if record is not None else None
            if conv is None:
                stats.bad += 1
                if len(stats.bad_examples) < 5:
                    stats.bad_examples.append(where)
                    log.warning("%s: skipped a record that is not an instruction or conversation", where)
                continue
            if any(not _fits(len(u), min_prompt, max_prompt) or not _fits(len(a), min_answer, max_answer)
                   for u, a in conv.turns):
                stats.filtered += 1
                continue
            out.append(conv)
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
        ids, mask = chat_ids(tokenizer, conv)
        if len(ids) > max_seq_len + 1:
            ids, mask = truncate(tokenizer, conv, max_seq_len + 1)
            stats.truncated += 1
        (val if is_val("\x00".join(u for u, _ in conv.turns), val_fraction) else train).append((ids, mask))
    stats.samples, stats.val_samples = len(train), len(val)
    if not train:
        raise UserError("every SFT sample landed in the validation split; lower --val_fraction.")
    return (SFTData(train, max_seq_len, tokenizer.pad_id, pack),
            SFTData(val, max_seq_len, tokenizer.pad_id, pack) if val else None, stats)
