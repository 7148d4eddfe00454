"""The one exception for mistakes a user can make: the CLI prints its message and exits 2."""


class UserError(Exception):
    """A missing file, a wrong schema, a tokenizer that does not fit: one sentence says what to do."""


def require(module: str, extra: str):
    """Import an optional dependency, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"this needs the {module} package: pip install 'babyllama[{extra}]'.") from None
