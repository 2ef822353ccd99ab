"""Files: atomic writes, output-path checks, stale temporaries, strict JSON and content hashes.

Nothing half-written is ever taken as complete: a writer fills a temporary file or folder beside
its target and renames it into place. Temporary names carry the writer's pid, so a later run can
prove a leftover dead (its pid is gone) and remove it. A target that must not be replaced is
published with a no-replace rename: of two concurrent writers one wins whole, the other gets
FileExistsError. Used by every part that writes or checks artifacts.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ffsplit.errors import FFSplitError

# Longest suffix temp_name adds to a target's name: "." + ".<pid>-<8 hex>.tmp" (pid up to 10
# digits): output names are checked against NAME_MAX minus this.
TEMP_OVERHEAD = 1 + 1 + 10 + 1 + 8 + 4
JSON_MAX_BYTES = 256 << 20  # Gemma's tokenizer.json is 33 MB; a JSON file above this is hostile


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- temporaries


def temp_name(name: str) -> str:
    """.NAME.<pid>-<random>.tmp: hidden, unique, and naming the process that writes it."""
    return f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _writer_pid(path: Path, name: str) -> int | None:
    """The pid a temp_name(name) carries, or None when path is not such a temporary."""
    prefix, suffix = f".{name}.", ".tmp"
    entry = path.name
    if not (entry.startswith(prefix) and entry.endswith(suffix)):
        return None
    pid, _, token = entry[len(prefix) : -len(suffix)].partition("-")
    if not pid.isdigit() or len(token) != 8:
        return None
    return int(pid)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (a zombie counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_stale_temps(target: str | Path) -> list[Path]:
    """Remove the temporaries of target that dead writers left (pid gone); returns them.

    Only names temp_name made are touched, and only when their pid no longer exists here: a
    temporary of a live run, or one this rule cannot read, is left alone.
    """
    target = Path(target)
    parent = target.parent
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        pid = _writer_pid(entry, target.name)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


# ------------------------------------------------------------------------- no-replace rename

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    return function


_RENAMEAT2 = _renameat2()


def rename_noreplace(source: Path, target: Path) -> None:
    """Rename source to target unless target exists (then FileExistsError), atomically.

    renameat2(RENAME_NOREPLACE) where the kernel and filesystem have it; else a hard link for a
    file, or claiming the name with mkdir for a folder (rename may then replace the empty folder
    this process just made, and only that).
    """
    if _RENAMEAT2 is not None:
        result = _RENAMEAT2(
            _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE
        )
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(target))
    if source.is_dir():
        os.mkdir(target)  # FileExistsError when taken
        try:
            os.rename(source, target)
        except OSError:
            os.rmdir(target)
            raise
        return
    os.link(source, target)  # FileExistsError when taken
    os.unlink(source)


# ---------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(target: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temp file path beside target; on success it becomes target, else it is deleted.

    replace=False publishes with a no-replace rename: FileExistsError if target appeared.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = target.parent / temp_name(target.name)
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
    os.close(fd)
    try:
        yield tmp_path
        if replace:
            os.replace(tmp_path, target)
        else:
            rename_noreplace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside target; on success it becomes target, else it is removed.

    Without overwrite the folder is published with a no-replace rename, so of two writers racing
    for one target exactly one wins and the other gets FileExistsError.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / temp_name(target.name)
    tmp.mkdir(mode=0o777 & ~_umask())
    try:
        yield tmp
        if not overwrite:
            try:
                rename_noreplace(tmp, target)
            except FileExistsError:
                raise FileExistsError(errno.EEXIST, "already exists", str(target)) from None
        elif target.exists():
            old = target.parent / temp_name(target.name)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_hashed(path: str | Path) -> tuple[bytes, str]:
    """(content, sha256 of exactly that content): what is checked is what is used."""
    with open(path, "rb") as handle:
        data = handle.read()
    return data, hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------ display


def shown(path: str | Path) -> str:
    """A path as messages show it: as is, unless it holds control characters (a newline in a
    file name must not become a second line of an error): then Python's repr of it."""
    text = str(path)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return repr(text)
    return text


# --------------------------------------------------------------------------- output paths


def check_output_path(path: str | Path, what: str = "--out") -> Path:
    """Refuse an output path that cannot be written, before any work is done; sweep the
    temporaries dead writers left beside it. Returns the path (absolute)."""
    raw = os.fspath(path)
    if not raw:
        raise FFSplitError(f"{what} is empty: give a path to write")
    target = Path(os.path.abspath(raw))
    name = target.name
    if not name or name in (".", ".."):
        raise FFSplitError(f"{what} {shown(raw)}: name a file or folder to create")
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise FFSplitError(f"{what} {shown(raw)}: control characters in a path; choose another")
    path_max = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096
    if len(os.fsencode(target)) + TEMP_OVERHEAD >= path_max:
        raise FFSplitError(
            f"{what} is {len(os.fsencode(target))} bytes long; paths must stay under "
            f"{path_max - TEMP_OVERHEAD}: choose a shorter one"
        )
    if os.path.lexists(target):
        kind = "a dangling symlink" if not target.exists() else "already exists"
        raise FFSplitError(f"{what} {shown(target)}: {kind}; choose another {what} or remove it")
    ancestor = _existing_ancestor(target, what)
    name_max = _name_max(ancestor)
    if len(os.fsencode(name)) + TEMP_OVERHEAD > name_max:
        raise FFSplitError(
            f"{what} {shown(name[:40])}...: the name is {len(os.fsencode(name))} bytes; names "
            f"must stay under {name_max - TEMP_OVERHEAD} here: choose a shorter one"
        )
    _check_writable(ancestor, what)
    sweep_stale_temps(target)
    return target


def _existing_ancestor(target: Path, what: str) -> Path:
    """The nearest existing ancestor of target, which must be a folder; every missing one
    between must be creatable (no file or dangling symlink in the way)."""
    for parent in target.parents:
        if os.path.lexists(parent):
            if not parent.exists():
                raise FFSplitError(f"{what}: {shown(parent)} is a dangling symlink")
            if not parent.is_dir():
                raise FFSplitError(f"{what}: {shown(parent)} is a file, not a folder")
            return parent
    return Path("/")


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _check_writable(folder: Path, what: str) -> None:
    try:
        flags = os.statvfs(folder).f_flag
    except OSError:
        flags = 0
    if flags & getattr(os, "ST_RDONLY", 1):
        raise FFSplitError(f"{what}: {shown(folder)} is on a read-only filesystem")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FFSplitError(f"{what}: no permission to write in {shown(folder)}")


def _lock_dir() -> Path:
    from ffsplit.models.packages import cache_root

    for folder in (cache_root() / "locks", Path(tempfile.gettempdir()) / f"ffsplit-{os.getuid()}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK | os.X_OK):
            return folder
    raise FFSplitError("no writable folder for output locks (the cache and the temp folder)")


@contextlib.contextmanager
def claim_output(target: str | Path, what: str = "--out") -> Iterator[None]:
    """Hold the one claim on an output path for the whole run: a second run writing the same
    path fails at once, in one line, instead of racing the first (last writer wins)."""
    key = hashlib.sha256(os.fsencode(os.path.abspath(target))).hexdigest()[:32]
    lock = _lock_dir() / f"{key}.lock"
    while True:
        handle = open(lock, "a+")  # noqa: SIM115 - held until the with block ends
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise FFSplitError(
                f"{what} {shown(target)}: another ffsplit run (pid {holder}) is writing it; "
                "wait for it or choose another path"
            ) from None
        try:  # the file may have been unlinked by its last holder between open and lock
            same = os.fstat(handle.fileno()).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        handle.close()


# ------------------------------------------------------------------------------ strict JSON


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_constant(name: str) -> Any:
    raise _BadConstant(name)


class _BadConstant(ValueError):
    pass


def regular_file(path: Path, what: str) -> os.stat_result:
    """stat of path, which must be a regular file (not a folder, device, fifo or socket)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FFSplitError(f"{shown(path)}: missing ({what})") from None
    except OSError as exc:
        raise FFSplitError(f"{shown(path)}: unreadable ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise FFSplitError(f"{shown(path)}: not a regular file ({what})")
    return info


def parse_json_strict(data: bytes, where: str) -> Any:
    """JSON that means one thing: UTF-8, no duplicate keys (the last would silently win), no
    NaN/Infinity; nesting is bounded by the parser's recursion limit. Every problem is one
    FFSplitError line naming where."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FFSplitError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _DuplicateKey as exc:
        raise FFSplitError(
            f"{where}: duplicate key {exc.key!r}; a JSON key must appear once"
        ) from None
    except _BadConstant as exc:
        raise FFSplitError(f"{where}: {exc} is not a JSON number") from None
    except json.JSONDecodeError as exc:
        raise FFSplitError(
            f"{where}: invalid or truncated JSON ({exc.msg} at line {exc.lineno})"
        ) from None
    except RecursionError:
        raise FFSplitError(f"{where}: JSON nested too deeply") from None


def read_json_strict(path: str | Path, what: str, max_bytes: int = JSON_MAX_BYTES) -> Any:
    """A JSON file read through parse_json_strict, refused when it is not a regular file or is
    larger than max_bytes (checked before reading)."""
    path = Path(path)
    info = regular_file(path, what)
    if info.st_size > max_bytes:
        raise FFSplitError(
            f"{shown(path)}: {info.st_size} bytes is too large for {what} (at most {max_bytes})"
        )
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    return parse_json_strict(data, shown(path))
