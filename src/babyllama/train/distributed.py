"""torchrun setup: the same code runs as 1 CPU process, 1 GPU, or N processes on M nodes.

    torchrun --standalone --nproc_per_node 4 -m babyllama pretrain --config configs/baby-92m.toml

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a single process.
GPUs talk over NCCL, CPUs over gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from babyllama.checkpoint import pick_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> Dist:
    """Pick the device (checkpoint.pick_device: cuda:N and mps honoured, a missing one refused) and,
    under torchrun, join the process group with one GPU per process (cuda:LOCAL_RANK)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device)
    use_cuda = dev.type == "cuda"
    if use_cuda and world > 1:
        dev = torch.device(f"cuda:{local_rank}")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Dist(rank, world, dev)


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
