"""Environment variables set for a block of code: the one way ffsplit and its pipeline do it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def environ(**variables: str) -> Iterator[None]:
    """os.environ with these variables set for a block, restored after (unset ones unset again).

    For switches read at use time (FFSPLIT_KERNEL_PDL, per kernel launch) and for what a child
    process must inherit at its start (the variables of Ray's embedded raylet and workers).
    """
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
