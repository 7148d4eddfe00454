"""The exception for mistakes a user can make (the CLI prints its message and exits 2), for a stopped run, and
the checks shared by every command that raise it."""

from pathlib import Path


class UserError(Exception):
    """A missing file, a wrong schema, a tokenizer that does not fit: one sentence says what to do."""


class Stopped(Exception):
    """A run stopped by a signal (SIGTERM, Ctrl-C) after saving a checkpoint: not done, to be resumed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def require(module: str, extra: str):
    """Import an optional dependency, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"this needs the {module} package: pip install 'babyllama[{extra}]'.") from None


def check_out_dir(out: str | Path, flag: str = "--out_dir", folder: bool = True) -> None:
    """Raise UserError when the output folder out cannot be made because it, or a folder above it, is a file
    (mkdir's FileExistsError or NotADirectoryError, after the work); flag names the setting in the message.
    folder=False: out is a file to write, so only the folders above it are checked."""
    out = Path(out)
    file = next((p for p in (out, *out.parents)[0 if folder else 1:] if p.exists() and not p.is_dir()), None)
    if file is not None:
        where = "is" if file == out else f"is below {file}, which is"
        raise UserError(f"{flag} {out} {where} a file, not a folder; choose another {flag}.")
