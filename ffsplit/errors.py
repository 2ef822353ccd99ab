"""User-facing errors: one line that says what went wrong, where, and what to do."""

from __future__ import annotations


class FFSplitError(Exception):
    """An error caused by input (a model, a file, a value), shown to users without a traceback.

    The message must name the offending thing (file, key, value) and, where possible, the fix.
    """


def require(condition: bool, message: str) -> None:
    """Raise FFSplitError(message) unless condition holds (validation helper)."""
    if not condition:
        raise FFSplitError(message)
