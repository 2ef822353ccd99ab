from pathlib import Path

import pytest

from ffsplit.errors import FFSplitError
from ffsplit.models.packages import cache_root, ensure_package, installed_version, package_dir


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("FFSPLIT_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "ffsplit"
    monkeypatch.setenv("FFSPLIT_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_missing_package_is_not_installed_when_forbidden(monkeypatch):
    monkeypatch.setenv("FFSPLIT_NO_INSTALL", "1")
    with pytest.raises(
        FFSplitError, match=r"ffsplit-no-such-package==0\.0\.1.*pip install --no-deps"
    ):
        ensure_package("ffsplit-no-such-package", "0.0.1", "ffsplit_no_such_package", "a test")


def test_package_lookup_does_not_import():
    assert package_dir("ffsplit_no_such_package") is None
    assert installed_version("ffsplit-no-such-package") is None
    assert package_dir("json") == Path(__import__("json").__file__).parent
