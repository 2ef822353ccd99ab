"""Local wheels for the fetch tests: pip downloads them from a folder (PIP_NO_INDEX), offline."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest


def build_wheel(folder: Path, distribution: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel holding members (path -> bytes); returns its path."""
    name = distribution.replace("-", "_")
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        **members,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{member},,\n" for member in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as bundle:
        for member, data in files.items():
            bundle.writestr(member, data)
        bundle.writestr(f"{info}/RECORD", record)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """local_index(distribution, version, members): a wheel pip can fetch with no network."""
    folder = tmp_path / "index"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.delenv("FFSPLIT_NO_INSTALL", raising=False)

    def add(distribution: str, version: str, members: dict[str, bytes]) -> Path:
        return build_wheel(folder, distribution, version, members)

    return add
