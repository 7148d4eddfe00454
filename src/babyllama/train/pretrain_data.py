"""Pretraining samples: non-overlapping windows of max_seq_len + 1 tokens over memory-mapped shards.

    data = PretrainData("data/tokens", seq_len=512, split="train")
    batch = data.collate([0, 17, 42])     # {"idx": (3, 512), "targets": (3, 512)} int64

A window never crosses a shard; the few tokens left at a shard's end are not used. Which
windows a step sees is decided by the trainer's global order, not here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from babyllama.data.pretokenize import read_manifest
from babyllama.errors import UserError


class PretrainData:
    def __init__(self, data_dir: str | Path, seq_len: int, split: str = "train"):
        self.dir = Path(data_dir)
        self.manifest = read_manifest(self.dir)
        self.seq_len = seq_len
        shards = [s for s in self.manifest["shards"] if s["split"] == split]
        self.arrays = [np.memmap(self.dir / s["file"], dtype=self.manifest["dtype"], mode="r") for s in shards]
        for s, a in zip(shards, self.arrays, strict=True):
            if len(a) != s["tokens"]:
                raise UserError(f"{self.dir / s['file']} has {len(a)} tokens, the manifest says {s['tokens']}.")
        counts = np.array([len(a) // (seq_len + 1) for a in self.arrays], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # first window index of each shard
        if self.starts[-1] == 0:
            total = sum(len(a) for a in self.arrays)
            raise UserError(
                f"the {split} split of {self.dir} has {total} tokens, fewer than one window of "
                f"{seq_len + 1}; use more data, a smaller max_seq_len or a larger --val-fraction."
            )

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        start = (i - int(self.starts[shard])) * (self.seq_len + 1)
        return self.arrays[shard][start : start + self.seq_len + 1]

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = torch.from_numpy(np.stack([self.window(i).astype(np.int64) for i in indices]))  # (B, T+1)
        return {"idx": rows[:, :-1], "targets": rows[:, 1:]}
