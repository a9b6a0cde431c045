"""Errors that reach users as one clear line instead of a traceback."""


class R7BError(ValueError):
    """A problem with the user's input or environment; the CLI prints it and exits non-zero."""
