"""Triton kernels for split FFNs at decode sizes (ffsplit/split/fused.py is their only user).

Nothing here is imported by ``import ffsplit``: Triton is optional (CPU machines run the torch
path), and importing this package itself starts no CUDA. ``ffsplit.kernels.ffn`` imports Triton.
"""

from __future__ import annotations

import functools
import importlib.util
import os


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (it is never imported just to answer this)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
