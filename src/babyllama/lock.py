"""An output folder held by one process at a time: flock on the hidden file out/.lock, which the OS lets go of when
the process ends however it ends, so a run killed with kill -9 leaves no stale lock.

    with holding(out, "pretokenize"):   # a command's --out_dir: a second command into it is refused at once
        ...
    with locked(out, "the SFT token cache build", "sft cache: "):  # a second build waits, saying so, then decides anew
    with holding("runs/m.gguf", "export", "--out", file=True):  # one file: the lock is runs/.m.gguf.lock

A file is held by the lock .NAME.lock beside it, so that writers of other files in its folder go on (two GGUF
exports into one folder). The lock file holds "PID COMMAND" of its holder, for the refusal's sentence, and is
removed when the holder lets go (so a command leaves no file behind). COMMAND is a babyllama command ("pretrain",
"tokenizer train"), or what a part of one holds it for, beginning with "the" ("the SFT token cache build"), said
as "the SFT token cache build of OUT"; one left by a killed process is taken over.
A process may take a folder it already holds again (pretokenize --sft holds its out_dir, then builds the token
cache there). The folders that holding made (out, or the folder of a file, and those above it) are removed again
when the command fails before writing anything. A process that locked a lock file meanwhile removed finds it gone
from the folder and locks again.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from babyllama.errors import UserError, cannot_write

LOCK = ".lock"
_HELD: set[Path] = set()  # the lock files this process holds


@contextmanager
def holding(out: str | Path, command: str, flag: str = "--out_dir", file: bool = False) -> Iterator[None]:
    """Hold folder out (made if missing) while the body writes it; command names the holder, e.g. "pretrain", and
    flag the setting that chose out (export's --out), for the refusal to say. file: out is a file (its folder made
    if missing), held by the lock .NAME.lock beside it.

    Raises UserError at once when another process holds it, or when out cannot be made or written; CannotWrite when
    the disk is full."""
    out = Path(out)
    lock = out.parent / f".{out.name}.lock" if file else out / LOCK
    made = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]  # the folders that the lock makes
    try:
        with _flock(lock, out, command, flag, waiting=None):
            yield
    except BaseException as e:
        if made and not isinstance(e, UserError):  # a stop (Ctrl-C, SIGTERM) while taking it: the lock file is ours
            lock.unlink(missing_ok=True)
        remove_empty(made)
        raise


@contextmanager
def locked(out: str | Path, command: str, says: str = "", flag: str = "--out_dir") -> Iterator[None]:
    """Hold folder out (made if missing) while the body writes it, first waiting for another process that holds it;
    then the body must decide anew from what out holds, which that process may have changed. Before it waits it
    prints one line, says + "waiting for another run building OUT (pid PID, babyllama COMMAND)" (the holder as its
    lock file records it; without the parentheses where it records none yet).
    The folders it made (out and those above it) are removed again where the body fails and leaves them empty.
    Raises UserError when out cannot be made or written, naming flag, the setting that chose out."""
    made = [p for p in (Path(out), *Path(out).parents) if not p.exists()]
    try:
        with _flock(Path(out) / LOCK, Path(out), command, flag, waiting=says):
            yield
    except BaseException:
        remove_empty(made)  # a build refused (bad data) left an empty cache folder for a rerun or report to find
        raise


def remove_empty(made: list[Path]) -> None:
    """Remove the folders made (deepest first) that are still empty, up to the first that is not (nothing written:
    as it was) or is gone; a folder that another process has locked meanwhile holds its lock file, so it stays."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # not empty, or removed already
            return


@contextmanager
def _flock(lock: Path, out: Path, command: str, flag: str, waiting: str | None) -> Iterator[None]:
    """Hold the lock file lock of out (a folder or a file); waiting: _lock_fd's."""
    key = lock.resolve()
    if key in _HELD:
        yield
        return
    fd = _lock_fd(lock, out, command, flag, waiting)
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        lock.unlink(missing_ok=True)  # still held: a process waiting on it then finds it gone, locks anew
        os.close(fd)  # lets go of the lock


def _lock_fd(lock: Path, out: Path, command: str, flag: str, waiting: str | None) -> int:
    """The open lock file of out, locked by this process, with "PID COMMAND" written in it. Where another process
    holds it: waiting None, UserError at once; else wait for it, having printed once the line that locked
    describes, beginning with waiting (on rank 0 alone in a torchrun job, whose ranks take a cache's lock in turn)."""
    waited = False
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write to {lock.parent} ({e.strerror}); choose another {flag}.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, other = os.pread(fd, 200, 0).decode(errors="replace").strip().partition(" ")
            if waiting is None:
                os.close(fd)
                raise UserError(f"{out} is in use by {_holder(other, out)} (pid {pid or '?'}); wait "
                                f"for it or choose another {flag}.") from None
            if not waited and os.environ.get("RANK", "0") == "0":  # once: the holder removes its lock file as it
                # lets go, and this one locks the next; rank 0 alone (progress.is_rank0) of a torchrun job
                holder = f" (pid {pid}, {_holder(other, out).removeprefix('another ')})" if pid else ""
                print(f"{waiting}waiting for another run building {out}{holder}", flush=True)
            waited = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:  # Ctrl-C while it waits
                os.close(fd)
                raise
        if _same_file(fd, lock):
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
            except OSError as e:  # a full disk: CannotWrite of out, the lock file removed (while still locked)
                lock.unlink(missing_ok=True)
                os.close(fd)
                cannot_write(e, out)
            return fd
        os.close(fd)  # its holder removed the folder it had made: lock the new one


def _holder(command: str, out: Path) -> str:
    """The holder as a lock file records it, in words: "another babyllama pretrain" for a command, "the SFT token cache
    build of OUT" for what a part of one holds it for (a label beginning with "the")."""
    return f"{command} of {out}" if command.startswith("the ") else f"another babyllama {command or 'command'}"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
