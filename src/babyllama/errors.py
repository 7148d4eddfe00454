"""The one exception for mistakes a user can make: the CLI prints its message and exits 2."""


class UserError(Exception):
    """A missing file, a wrong schema, a tokenizer that does not fit: one sentence says what to do."""
