"""environ sets variables for a block and restores what was there, set or unset."""

import os

import pytest

from ffsplit.environ import environ


def test_environ_is_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FFSPLIT_TEST_UNSET", raising=False)
    monkeypatch.setenv("FFSPLIT_TEST_SET", "before")
    with environ(FFSPLIT_TEST_UNSET="1", FFSPLIT_TEST_SET="during"):
        assert os.environ["FFSPLIT_TEST_UNSET"] == "1"
        assert os.environ["FFSPLIT_TEST_SET"] == "during"
    assert "FFSPLIT_TEST_UNSET" not in os.environ
    assert os.environ["FFSPLIT_TEST_SET"] == "before"
