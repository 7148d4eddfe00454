"""torchrun setup: the same code runs as 1 CPU process, 1 GPU, or N processes on M nodes.

    torchrun --standalone --nproc_per_node 4 -m babyllama pretrain --config configs/baby-92m.toml
    with process_group("auto", timeout_s=1800) as dist:   # join, train, leave
        ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a single process.
GPUs talk over NCCL, CPUs over gloo. A collective that waits longer than the timeout for the
other processes (one is stuck) ends the run instead of hanging it: with one sentence on gloo, and
through NCCL's watchdog, which aborts the process, on GPUs; on gloo a process that died closes its
connections, and the others say so at once. Leaving the group ends its
threads: every rank first reaches a barrier, then the group and FSDP's device mesh are let go.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before any process group exists: imported after, it holds the group (shutdown)

from babyllama.checkpoint import pick_device
from babyllama.errors import AlreadySaid, UserError, check_out_dir, first_few, say
from babyllama.lock import holding

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    mesh: DeviceMesh | None = None  # FSDP's, from fsdp_mesh; shutdown lets go of its process groups

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto", timeout_s: float = 1800) -> Dist:
    """Pick the device (checkpoint.pick_device: cuda:N and mps honoured, a missing one refused) and,
    under torchrun, join the process group with one GPU per process (cuda:LOCAL_RANK); its
    collectives give up after timeout_s seconds."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device)
    use_cuda = dev.type == "cuda"
    if use_cuda and world > 1:
        dev = torch.device(f"cuda:{local_rank}")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None,
                                timeout=timedelta(seconds=timeout_s))
        global JOB_STORE
        JOB_STORE = job_store()
    return Dist(rank, world, dev)


STORE_TIMEOUT_S = 5.0  # how long first_to_say waits for the job's store
JOB_STORE: dist.Store | None = None  # a client of the key-value store of the torchrun job this process joined


def job_store() -> dist.Store | None:
    """A client of the key-value store that init_process_group joined (env://, its default): the TCPStore at
    MASTER_ADDR:MASTER_PORT, torchrun's agent's (TORCHELASTIC_USE_AGENT_STORE "True") or else rank 0's. A client of
    this process's own, through torch's public TCPStore, kept past the group's end for first_to_say; None where
    those variables are not set or the store cannot be reached."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    if not addr or not port.isdigit():
        return None
    try:
        return dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=STORE_TIMEOUT_S))
    except RuntimeError:  # DistNetworkError and the other DistErrors are RuntimeErrors
        return None


def first_to_say() -> bool | None:
    """Whether this process is the first of its torchrun job to say why it ends: each that says it counts itself in
    the job's store (JOB_STORE: torchrun's agent's, or rank 0's), the first counted says it. Where the store cannot
    be reached: True when it is the agent's (TORCHELASTIC_USE_AGENT_STORE "True"), which no process of the job takes
    down with it (torchrun itself has gone, and reports nothing); else False: the store was rank 0's, which ended
    with it, perhaps after saying it. None in a process that joined no job (cli.say_once)."""
    if JOB_STORE is None:
        return None
    try:
        JOB_STORE.set_timeout(timedelta(seconds=STORE_TIMEOUT_S))
        return JOB_STORE.add(f"babyllama/said/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", 1) == 1
    except RuntimeError:  # DistStoreError, DistNetworkError: the store is gone
        return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


@contextmanager
def process_group(device: str = "auto", timeout_s: float = 1800) -> Iterator[Dist]:
    """init_distributed for the body, and leave the group after it. A collective that timed out,
    or lost a process that died, raises UserError (the run ends with exit code 2, not a hang)."""
    d = init_distributed(device, timeout_s)
    try:
        yield d
        barrier(d)  # no rank leaves while another still talks to it (not after an error: that one may be gone)
    except RuntimeError as e:  # gloo's timeouts and lost peers are plain RuntimeErrors from its transport
        if not isinstance(e, dist.DistError) and "gloo/transport" not in str(e):
            raise
        if d.enabled and threading.current_thread() is threading.main_thread():
            # torchrun stops the job's other processes once one has ended: this one says why and ends by itself
            # (its SIGTERM came as a traceback, or a second sentence, after the first)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        other = f"process {1 - d.rank} of the job" if d.world == 2 else "another process of the job"
        raise UserError(f"process {d.rank} of {d.world} stopped: {why_collective_failed(str(e), timeout_s, other)}.") \
            from None
    finally:
        shutdown(d)


PEER_ENDED = re.compile(r"connection (closed|reset) by peer|broken pipe|connection refused", re.IGNORECASE)
TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)


def why_collective_failed(error: str, timeout_s: float, other: str = "another process of the job") -> str:
    """Why a collective operation failed, in words, from gloo's error (or its store's): the other process (other: in a
    job of two, "process 0 of the job") ended (its connection closed: kill -9, a crash, the kernel's out-of-memory
    killer), or it waited timeout_s for the others (ddp_timeout: one is stuck), each with gloo's words; where they
    say neither, that it was one of the two."""
    cause = error.strip().splitlines()[-1].split("] ")[-1].split(". ")[0][:200]  # gloo's first sentence
    if PEER_ENDED.search(error):
        return (f"{other} ended ({cause}), so this one cannot go on (torchrun's report names it and how it ended); "
                "--resume continues from the last checkpoint")
    if TIMED_OUT.search(error):
        return f"a collective operation waited over {timeout_s:g} s for the other processes, ddp_timeout ({cause})"
    return (f"a collective operation waited over {timeout_s:g} s for the other processes (ddp_timeout), or one of "
            f"them died ({cause})")


@contextmanager
def held_by_main(out: str | Path, command: str, d: Dist) -> Iterator[None]:
    """Rank 0 holds the run's folder out for the body (lock.holding); the other ranks, which write nothing there,
    learn whether it could, so that a refused run ends on every rank and none is left waiting in a collective. In a
    process alone the CLI holds out already, before importing torch (cli.held): then this passes through.
    Raises UserError when out is a file, AlreadySaid (rank 0 says it, then the others end) when another process
    holds it."""
    check_out_dir(out, "out_dir")
    with ExitStack() as stack:
        refused = None
        if d.main:
            try:
                stack.enter_context(holding(out, command))
            except UserError as e:
                refused = e
        share_refusal(refused, d)
        yield


def share_refusal(refused: UserError | None, d: Dist) -> None:
    """Rank 0's refusal (None where it refused nothing) reaches every rank, so that none is left waiting in a
    collective for a rank 0 that has ended: in a process alone it is raised; in a torchrun job every rank learns it
    (a collective: each must call this), rank 0 says it, and once it has (a barrier: torchrun stops the others at
    the first one's end) every rank raises AlreadySaid, ending with exit code 2."""
    if not d.enabled:
        if refused is not None:
            raise refused
        return
    box = [str(refused) if refused is not None else ""]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        if d.main:
            say(box[0])
        barrier(d)
        raise AlreadySaid(box[0])


def check_same_checkpoint(out: str | Path, ckpt: Path | None, d: Dist) -> None:
    """Every process of a torchrun job sees the same checkpoint ckpt in out (None: none), the newest there or the one
    it resumes from: on several machines an out_dir on each one's own disk let each resume from its own step,
    silently, until a collective timed out naming the wrong cause. A collective (each must call this); where they
    differ, every rank ends with one sentence, said once (share_refusal), naming process 0's and those that differ."""
    if not d.enabled:
        return
    names: list[str | None] = [None] * d.world
    dist.all_gather_object(names, ckpt.name if ckpt is not None else "none")
    differ = [f"process {r}: {name}" for r, name in enumerate(names) if r == 0 or name != names[0]]
    refused = None if len(differ) == 1 else UserError(
        f"the processes see different checkpoints in {out} ({first_few(differ, 4)}): on several machines --out_dir "
        "must be a folder that all of them see (shared storage).")
    share_refusal(refused, d)


def check_fsdp(fsdp: bool) -> None:
    """UserError for fsdp in a process that torchrun did not start (no RANK in the environment): FSDP shards the
    model over torchrun's processes, and without them fully_shard failed with torch's traceback."""
    if fsdp and "RANK" not in os.environ:
        raise UserError("fsdp shards the model over the processes of torchrun; run with torchrun (torchrun "
                        "--standalone --nproc_per_node N -m babyllama ...) or leave fsdp off.")


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def fsdp_mesh(d: Dist) -> DeviceMesh | None:
    """The 1-D device mesh of all processes that FSDP shards over (None in one process: FSDP's own),
    made here rather than inside fully_shard so that shutdown can let go of it."""
    if d.enabled and d.mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        d.mesh = init_device_mesh(d.device.type, (d.world,))
    return d.mesh


def shutdown(d: Dist) -> None:
    """Leave the process group and end its threads (gloo's run loops) while the interpreter is alive.

    destroy_process_group ends them only when nothing else holds the group. FSDP's device mesh holds
    it (DeviceMesh._pg_registry, in torch 2.13), and DTensor's caches hold the mesh for good;
    torch.distributed.nn.functional (imported by torch.distributed.checkpoint) holds it in its
    functions' defaults (group=group.WORLD) when imported after init_process_group. Either way the
    threads would run on into interpreter exit: one that drops the last reference to a collective's
    tensor then takes the GIL of a finalizing interpreter, which ends the thread inside a destructor,
    and the process aborts ("terminate called without an active exception", SIGABRT) after a run
    that went well. So the mesh lets go of its groups, and a collection frees the model's FSDP state
    (reference cycles) that holds them too.
    """
    if not (d.enabled and dist.is_initialized()):
        return
    dist.destroy_process_group()
    if d.mesh is not None:
        getattr(d.mesh, "_pg_registry", {}).clear()
        d.mesh = None
        gc.collect()
