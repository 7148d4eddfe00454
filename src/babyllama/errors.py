"""The exception for mistakes a user can make (the CLI prints its message and exits 2), and for a stopped run."""


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
