"""Shared by the task tests: a tiny Llama with SmolLM2's real tokenizer, and one embedded Ray.

The tiny model (4 layers, d=64, FFN 192, random weights) runs the real pipeline on real text in
seconds; it borrows the tokenizer of the packaged SmolLM2 (cached by scripts/test.sh).
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_LAYERS = 4


def make_tiny_lm(folder: Path, layers: int = TINY_LAYERS, seed: int = 0) -> Path:
    """A random tiny Llama with SmolLM2's real tokenizer (ffsplit.models.tiny.save_tiny_lm)."""
    from ffsplit.models.tiny import save_tiny_lm

    return save_tiny_lm(folder, layers=layers, seed=seed)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_lm(tmp_path_factory.mktemp("tiny-lm") / "tiny-llama"))


@pytest.fixture(scope="session")
def ray_cluster(ray_embedded: dict) -> dict:
    """The session's embedded Ray (tests/conftest.py: 3 logical CPUs).

    Custom resources cap concurrency for the worker-count tests: tasks asking for one unit of
    "one_worker" run one at a time, of "three_workers" up to three at once.
    """
    return ray_embedded
