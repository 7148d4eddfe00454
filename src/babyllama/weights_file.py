"""Files on disk: a safetensors file written with the mode the user's umask gives a new file, as every other
file gets, and read back with every tensor checked finite, a torch.save whose failed write raises its OSError, the
SHA-256 of any file read in blocks, and the sentence for a weights file that cannot be read.

safetensors' save_file creates its file 0600 whatever the umask, so weights in a checkpoint or an export
shared with a team (umask 0022, shared storage) could be read by their owner only.

torch is imported for type hints only: the data tools hash their inputs with file_sha256 and run without it.
"""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from babyllama.errors import UserError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    import torch


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """save_file(tensors, path) with metadata {"format": "pt"} (what transformers and peft expect), then the
    file's mode made 0o666 & ~umask. The umask is read by creating the file first (os.umask would change it
    for every thread of the process while it is read). OSError where path cannot be written (safetensors'
    own error, "No space left on device (os error 28)", turned back into the OSError it reports)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    path.unlink(missing_ok=True)  # an earlier file keeps its own mode when opened, not the umask's
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        if not (m := re.search(r"\(os error (\d+)\)", str(e))):
            raise
        raise OSError(int(m[1]), os.strerror(int(m[1])), str(path)) from e
    os.chmod(path, mode)


class _Recorder:
    """A file's write and flush, keeping the OSError a write raised (torch's writer replaces it by its own)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj, path: str | Path) -> None:
    """torch.save(obj, path), but OSError where path cannot be written: torch's own writer raises a RuntimeError
    ("unexpected pos ...") that has lost the errno, of a full disk say."""
    import torch

    with open(path, "wb") as f:
        recorder = _Recorder(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is None:
                raise
            raise recorder.error from None


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, hex; read in blocks of 16 MiB, so memory stays flat whatever its size.
    OSError where path cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def read_safetensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """{name: tensor} of the safetensors file at path, on device (a torch device's name; cpu:N is cpu, which
    safetensors alone accepts: its "device cpu:0 is invalid" said a good file was damaged). Raises UserError where it
    cannot be read (unreadable), or where a floating-point tensor holds NaN or Inf (check_finite): training never
    saves such weights (Trainer.check_finite), so the file is damaged or was edited, and a model loaded with one NaN
    answered nothing in chat, scored 0 in eval and was exported with 64 NaNs, each without a word."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = "cpu" if torch.device(device).type == "cpu" else str(device)
    try:
        with held(path) as (st, name):
            key, tensors = stat_key(st), load_file(name, device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable(path, e) from None
    if key not in FOUND_FINITE:  # a file check_finite_file read already (a resume's pick, an --init) is not again
        check_finite(path, key, tensors.items())
    return tensors


def check_finite_file(path: Path) -> None:
    """UserError where the safetensors file at path cannot be read (unreadable) or a floating-point tensor in it holds
    NaN or Inf (check_finite), one tensor at a time, so that memory stays at the largest tensor. A run checks its
    --init and the checkpoint it resumes so before it builds data (minutes) or picks where to resume (a diverged
    run's newest checkpoint is skipped, as a damaged one); its load (read_safetensors) then checks them no more."""
    from safetensors import SafetensorError, safe_open

    try:
        with held(path) as (st, opened), safe_open(opened, "pt") as f:
            check_finite(path, stat_key(st), ((name, f.get_tensor(name)) for name in f.keys()))
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable(path, e) from None


FOUND_FINITE: set[tuple[int, ...]] = set()  # stat_key of each weights file this process found finite


def stat_key(st: os.stat_result) -> tuple[int, ...]:
    """(device, inode, size in bytes, mtime and ctime in ns) of a file's stat: what a process's memo of a file
    (FOUND_FINITE, checkpoint._HASHED) is keyed by. A file replaced since (a rename over it: another inode) or
    rewritten (ctime, which no one can set, even where the mtime was put back) has another."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@contextmanager
def held(path: str | Path) -> Iterator[tuple[os.stat_result, str]]:
    """(stat, name) of the file at path, held open for the body: its stat (os.fstat) and a name that opens that very
    file (/proc/self/fd/N, or /dev/fd/N; path where a system has neither), so that what is read is the file whose
    stat keys a memo (stat_key) even where another is renamed over path meanwhile. OSError where it cannot be
    opened."""
    with open(path, "rb") as f:
        fds = next((d for d in ("/proc/self/fd", "/dev/fd") if os.path.isdir(d)), None)
        yield os.fstat(f.fileno()), f"{fds}/{f.fileno()}" if fds else str(path)


def check_finite(path: Path, key: tuple[int, ...], tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """The one rule for weights read from a file: UserError (not_finite) at the first of tensors ((name, tensor),
    the file's) whose elements are not all finite; once all are, key (stat_key of the file read) is remembered in
    FOUND_FINITE, so that this process does not check that file again."""
    for name, t in tensors:
        if not finite(t):
            raise not_finite(path, name)
    FOUND_FINITE.add(key)


def not_finite(path: Path, name: str) -> UserError:
    """The UserError for the weights file at path whose tensor `name` holds NaN or Inf."""
    return UserError(f"{path} is damaged: its tensor {name} holds NaN or Inf, which training never saves; restore the "
                     "checkpoint from a copy or use another one.")


def finite(t: torch.Tensor) -> bool:
    """Whether every element of t is finite: its least and greatest (torch.aminmax: one pass, no copy; a NaN anywhere
    makes both NaN). torch.isfinite(t).all() writes a bool tensor of t's size first: 10x the time of the load of a
    218M-parameter model on a CPU, where aminmax adds a few percent (bench/RESULTS.md)."""
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def unreadable(path: Path, error: Exception) -> UserError:
    """The UserError for the weights file at path that safetensors could not read (error): gone (FileNotFoundError),
    as a checkpoint is that a running run's keep_last pruning deleted after it was found, or damaged. A pruned
    checkpoint was said to be "damaged or cut off", which sent its owner looking for damage."""
    if isinstance(error, FileNotFoundError):
        return UserError(f"{path} no longer exists (a training run may have pruned it: a run keeps only its newest "
                         "keep_last checkpoints).")
    return UserError(f"{path} cannot be read ({error}); it is damaged or was cut off.")
