"""The exception for mistakes a user can make (the CLI prints its message and exits 2), for a stopped run, for
an output the disk refused (and the guard of every write that raises it), and the checks shared by every command
that raise them."""

import errno
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, NoReturn


class UserError(Exception):
    """A missing file, a wrong schema, a tokenizer that does not fit: one sentence says what to do."""


class AlreadySaid(UserError):
    """A UserError that every process of a torchrun job raises alike and whose sentence the first (RANK 0) has said
    already (say), before the others ended: torchrun stops the job when its first process ends. The CLI prints nothing
    more and ends every process with exit code 2."""


def agree(n: int, one: str, many: str) -> str:
    """one when n is 1, else many: the word of a count's sentence ("1 was bad", "2 were bad"; "--bos needs",
    "--bos --format need")."""
    return one if n == 1 else many


def first_few(items: Sequence, n: int) -> str:
    """The first n of items joined by ", ", then " and K more" for the K others: "a, b, c and 2 more"."""
    return ", ".join(map(str, items[:n])) + (f" and {len(items) - n} more" if len(items) > n else "")


def say(e: UserError | str) -> None:
    """Print a UserError's sentence as the CLI does: on stderr, after "babyllama: error:"."""
    print(f"babyllama: error: {e}", file=sys.stderr, flush=True)


class Stopped(Exception):
    """A run stopped by a signal (SIGTERM, Ctrl-C) after saving a checkpoint: not done, to be resumed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def how_stopped(signum: int) -> str:
    """What the CLI calls a stop by signum: "interrupted" (SIGINT, Ctrl-C) or "stopped by SIGTERM"."""
    return "interrupted" if signum == signal.SIGINT else "stopped by SIGTERM"


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training step (which saves a checkpoint and raises Stopped): raised as Ctrl-C is, so that
    the write under way removes its temporary (writing) and the CLI says how to go on."""


REFUSED = {  # the errors of a write that the user can fix: why, in words ({} is the folder), and what to do
    errno.ENOSPC: ("no space left on the device of {}", "free space"),
    errno.EDQUOT: ("the disk quota of {} is used up", "free space"),
    errno.EROFS: ("{} is on a read-only file system", "make it writable"),
    errno.EACCES: ("no permission to write in {}", "make it writable"),
    errno.EPERM: ("no permission to write in {}", "make it writable"),
}


SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile (the GGUF writer's) when fwrite stops short


def refused(e: BaseException) -> int | None:
    """The errno of REFUSED that a failed write raised, or None: an OSError's own, or ENOSPC for a short write whose
    OSError has lost its errno (numpy's tofile says "524288 requested and 67048 written" where the disk took part
    of the bytes, as a full one does)."""
    if not isinstance(e, OSError):
        return None
    if e.errno is None and SHORT_WRITE.fullmatch(str(e)):
        return errno.ENOSPC
    return e.errno if e.errno in REFUSED else None


class CannotWrite(Exception):
    """An output the disk refused (REFUSED: full, over quota, read-only, no permission), its temporary removed.
    args: (errno, the file, a note); the CLI adds what to do and how to run again (with --resume or not)."""

    def __init__(self, code: int, path: str, note: str = ""):
        super().__init__(code, path, note)  # args as given, so that it crosses a process pool
        self.code, self.path, self.note = code, path, note

    def __str__(self) -> str:
        return f"{REFUSED[self.code][0].format(Path(self.path).parent)} while writing {self.path}{self.note}"

    @property
    def fix(self) -> str:
        return REFUSED[self.code][1]


@contextmanager
def writing(path: str | Path, temporary: Path | None = None, file: IO | None = None) -> Iterator[None]:
    """Around the writing of the output path (through temporary, a file or folder, and its open file): on any
    exception, Ctrl-C's KeyboardInterrupt too, file is closed and temporary removed (cannot_write); an OSError
    of REFUSED then becomes CannotWrite, others pass unchanged."""
    try:
        yield
    except BaseException as e:
        cannot_write(e, path, temporary, file)


def cannot_write(e: BaseException, path: str | Path, temporary: Path | None = None, file: IO | None = None) \
        -> NoReturn:
    """Close file, remove temporary, and raise CannotWrite for an OSError of REFUSED (or a short write: refused), or
    for a CannotWrite of a file inside temporary (the user knows path, not the temporary), else e: writing's work,
    for a hot loop to call from its own `except` (a `with writing(...)` per item costs microseconds)."""
    discard(temporary, file)
    if code := refused(e):
        raise CannotWrite(code, str(path)) from None
    if isinstance(e, CannotWrite) and temporary is not None and temporary in Path(e.path).parents:
        raise CannotWrite(e.code, str(path), e.note) from None
    raise e


def discard(temporary: Path | None, file: IO | None = None) -> None:
    """Close file (what it still buffers is lost) and remove temporary, a file or a folder, if there."""
    if file is not None:
        with suppress(OSError):  # the rest of its buffer fails to flush again
            file.close()
    if temporary is not None and temporary.is_dir():
        shutil.rmtree(temporary, ignore_errors=True)
    elif temporary is not None:
        temporary.unlink(missing_ok=True)


def write_whole(path: Path, text: str) -> None:
    """path's UTF-8 text, whole or not at all: written to .NAME.tmp beside it, then renamed over it. CannotWrite
    where the disk refuses it; the temporary is removed on any failure (writing)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, tmp):
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)


def require(module: str, extra: str):
    """Import an optional dependency, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"this needs the {module} package: pip install 'babyllama[{extra}]'.") from None


def check_folder(path: Path, what: str, instead: str) -> None:
    """UserError when path, which a command reads as a folder (what: "checkpoint", "run directory", or "" for the
    path alone), does not exist or is a file; instead says what to pass."""
    name = f"{what} {path}" if what else str(path)
    if not path.exists():
        raise UserError(f"{name} does not exist.")
    if not path.is_dir():
        raise UserError(f"{name} is a file, not a folder; pass {instead}.")


def not_a_file(path: Path) -> str:
    """Why path, which a command reads as a file and is not a regular file, cannot be read, in words (after its name):
    "does not exist", "is a folder, not a file" or "is not a regular file" (a device such as /dev/null, a pipe)."""
    if not path.exists():
        return "does not exist"
    return "is a folder, not a file" if path.is_dir() else "is not a regular file"


def check_out_dir(out: str | Path, flag: str = "--out_dir", folder: bool = True) -> None:
    """Raise UserError when the output folder out cannot be made because it, or a folder above it, is a file
    (mkdir's FileExistsError or NotADirectoryError, after the work); flag names the setting in the message.
    folder=False: out is a file to write, so only the folders above it are checked."""
    out = Path(out)
    file = next((p for p in (out, *out.parents)[0 if folder else 1:] if p.exists() and not p.is_dir()), None)
    if file is not None:
        where = "is" if file == out else f"is below {file}, which is"
        raise UserError(f"{flag} {out} {where} a file, not a folder; choose another {flag}.")


WHY_APART = {  # flag -> how --out_dir lies to one of its folders (overlap) -> the rest of the refusal
    "--input": dict.fromkeys(("is", "is inside"), "the --input folder {name}, which a run reads whole, so a later run "
                             "may read this one's output as input; choose an --out_dir outside it.") | {
        "holds": "--input {name}, which a run may replace or read again beside its output; choose an --out_dir that "
                 "holds none of the inputs."},
    "--merge": {"is": "the --merge folder {name}: merging into it replaces that part's shards and manifest with the "
                      "merged ones; choose an --out_dir apart from the parts.",
                "is inside": "the --merge folder {name}, so deleting that part would delete the merged shards with "
                             "it; choose an --out_dir outside it.",
                "holds": "--merge {name}, so clearing --out_dir would delete a part being merged; choose an --out_dir "
                         "that holds none of the parts."},
}


def check_apart(out: str | Path, inputs: list[str] | None, flag: str = "--input") -> None:
    """Raise UserError when the output folder out is, or is inside, a folder among inputs, or holds one of them, for
    the reason of flag, the option that named them (WHY_APART). --input (prepare, pretokenize, tokenizer train): a
    run reads its folders whole, so each run would read the output of the one before as input (prepare's records
    went 3, 6, 6, and a document deleted from the source stayed), and one held by out may be replaced or read again.
    --merge: the parts of a merge, which out must not be, hold or lie in (their shards replaced, or deleted with
    out, or out deleted with them). Paths are compared as resolved (overlap); an input that does not exist is left
    to the command to say."""
    for name in inputs or []:
        path = Path(name)
        if not path.exists():
            continue
        how = overlap(out, path)
        if how == "holds" or how in ("is", "is inside") and path.is_dir():
            raise UserError(f"--out_dir {out} {how} " + WHY_APART[flag][how].format(name=name))


def overlap(out: str | Path, path: str | Path) -> str | None:
    """How the folder out lies to path, both resolved (symbolic links, ..): "is" it, "holds" it, "is inside" it,
    or None when they are apart."""
    o, p = Path(out).resolve(), Path(path).resolve()
    return "is" if o == p else "holds" if o in p.parents else "is inside" if p in o.parents else None


class Completed(KeyboardInterrupt):
    """Ctrl-C or SIGTERM that came while a command made its output complete (signals_held(complete=...)), raised
    once it is: the CLI says the output is whole, not how to run the command again. A KeyboardInterrupt, so that a
    caller that goes on to other work (the demo) stops as for any Ctrl-C."""

    def __init__(self, output: str | Path, signum: int):
        super().__init__(str(output), signum)
        self.output, self.signum = str(output), signum


@contextmanager
def signals_held(complete: str | Path | None = None) -> Iterator[None]:
    """SIGINT and SIGTERM that come while the body runs wait for its end, then come again (the handlers are
    Python's, run by the main thread whichever thread the OS gave the signal to: a signal mask would not hold them).
    complete: the output that the body, when it ends without an error, makes complete; the KeyboardInterrupt
    (Terminated) that a held signal then raises becomes Completed. Elsewhere than in the main thread, which alone
    can set handlers, the body runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    before = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    done = None
    try:
        yield
        done = complete
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if came:
            try:
                os.kill(os.getpid(), came[0])  # its handler runs before kill returns (CPython checks for it)
            except KeyboardInterrupt:
                if done is None:
                    raise
                raise Completed(done, came[0]) from None


@contextmanager
def children_without_ctrl_c() -> Iterator[None]:
    """Processes started while the body runs, by fork or by fork and exec (multiprocessing's spawn and forkserver),
    start with SIGINT blocked, which both pass on: a terminal's Ctrl-C reaches every process of its group, and a
    worker that was still importing printed a KeyboardInterrupt traceback each before the main process's one line.
    A blocked SIGINT waits (a worker then ignores it, discarding it: _init_pool_worker; the forkserver and what it
    forks keep it blocked), and the main process, which gets it as ever, ends them. Unlike SIG_IGN, which they would
    inherit too, blocking it loses no Ctrl-C here: one that comes meanwhile is raised as the body ends. Only this
    thread blocks it (the OS may give it to another, whose handler has the main thread raise it as ever). Start
    multiprocessing's resource tracker before: its ensure_running unblocks SIGINT once it has started its process."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that started it ends (Linux)


def killed_with_parent(parent: int) -> None:
    """Linux: this process gets SIGKILL when its parent (pid parent) ends, even by kill -9 (prctl's
    PR_SET_PDEATHSIG); it exits at once if the parent has ended already. For the processes that another one
    starts and that must not outlive it: torchrun's workers (cli), datatrove's Manager (datatrove_engine)."""
    import ctypes

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before prctl
        os._exit(1)
