"""Build a slimmed Ray wheel (plus Ray's small dependencies) for the offline GPU machine.

The GPU machine runs Python 3.12 with no network, and one run carries at most 64 MiB: the public
ray 2.60.0 cp312 manylinux wheel is 75.6 MiB (../shared/docs/gpu.md). Dropping ray/jars (the Java
worker, ~31 MiB) and the dashboard's JavaScript source maps leaves ~43 MiB, which fits with room
for Ray's pure-Python dependencies. The wheel is rebuilt from the public one on every run; never
commit it (the output folder .whl/ is git-ignored).

    python scripts/build_ray_wheel.py            # -> .whl/ray-2.60.0-cp312-...whl + dependencies
    # on the GPU machine (carry .whl):
    pip install --no-index --find-links .whl ray==2.60.0

The slim wheel keeps the original file name and a RECORD that matches its contents exactly, so pip
installs it like the original. Checked here: the zip, the RECORD (every file hashed), and a
`pip install --target` of ray and all its dependencies from the output folder alone.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parents[1]
RAY_VERSION = "2.60.0"
PYTHON_VERSION = "3.12"
# Ray publishes cp312 wheels tagged manylinux2014; dependencies may be manylinux_2_28 only (the GPU
# image's torch wheels need glibc >= 2.28 too, so 2.28 is safe there).
RAY_PLATFORM = "manylinux2014_x86_64"
DEPENDENCY_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
MAX_MIB = 60.0  # the per-run transfer limit is 64 MiB; keep room for the code that travels along
# Markers of the target interpreter (CPython 3.12 on x86_64 Linux), to pick Requires-Dist entries.
TARGET_MARKERS = {
    "python_version": PYTHON_VERSION,
    "python_full_version": f"{PYTHON_VERSION}.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


class BuildError(Exception):
    """A step failed; the message says which and why."""


@dataclass(frozen=True)
class SlimReport:
    """What slimming removed and kept."""

    original_bytes: int
    slim_bytes: int
    removed_files: int
    removed_raw_bytes: int
    kept_files: int


def is_removed(name: str) -> bool:
    """Files the GPU machine never needs: the Java worker and the dashboard's source maps."""
    return name.startswith("ray/jars/") or (
        name.startswith("ray/dashboard/") and name.endswith(".map")
    )


def record_hash(data: bytes) -> str:
    """RECORD's hash format (PEP 376/427): sha256=urlsafe-base64 without padding."""
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _record_name(names: Iterable[str]) -> str:
    found = [n for n in names if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
    if len(found) != 1:
        raise BuildError(f"expected one top-level .dist-info/RECORD, found {found}")
    return found[0]


def slim_wheel(source: Path, target: Path) -> SlimReport:
    """Copy source to target without the removed files; entries keep their ZipInfo (permissions of
    gcs_server, raylet etc.), RECORD loses the removed rows and is written last."""
    with zipfile.ZipFile(source) as zin:
        infos = zin.infolist()
        record_name = _record_name(i.filename for i in infos)
        removed = [i for i in infos if is_removed(i.filename)]
        if not any(i.filename.startswith("ray/jars/") for i in removed):
            raise BuildError(f"{source.name}: no ray/jars/ inside; is this a Ray wheel?")
        removed_names = {i.filename for i in removed}
        rows = list(csv.reader(io.StringIO(zin.read(record_name).decode())))
        kept_rows = [r for r in rows if r and r[0] not in removed_names]
        record = io.StringIO()
        csv.writer(record, lineterminator="\n").writerows(kept_rows)
        tmp = target.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
            for info in infos:
                if info.filename in removed_names or info.filename == record_name:
                    continue
                zout.writestr(
                    info, zin.read(info), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9
                )
            record_info = zin.getinfo(record_name)
            zout.writestr(
                record_info, record.getvalue().encode(), compress_type=zipfile.ZIP_DEFLATED
            )
        tmp.replace(target)
    return SlimReport(
        original_bytes=source.stat().st_size,
        slim_bytes=target.stat().st_size,
        removed_files=len(removed),
        removed_raw_bytes=sum(i.file_size for i in removed),
        kept_files=len(infos) - len(removed),
    )


def check_wheel(path: Path) -> int:
    """Zip CRCs valid; RECORD lists exactly the files in the wheel, with matching hash and size.
    Returns the number of files checked."""
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
        if bad is not None:
            raise BuildError(f"{path.name}: CRC error in {bad}")
        names = [i.filename for i in z.infolist() if not i.is_dir()]
        record_name = _record_name(names)
        rows = {r[0]: r for r in csv.reader(io.StringIO(z.read(record_name).decode())) if r}
        missing = sorted(set(names) - set(rows))
        extra = sorted(set(rows) - set(names))
        if missing or extra:
            raise BuildError(
                f"{path.name}: RECORD mismatch, unlisted {missing[:5]}, absent {extra[:5]}"
            )
        for name in names:
            if name == record_name:
                continue
            data = z.read(name)
            _, hash_, size = rows[name]
            if hash_ != record_hash(data) or int(size) != len(data):
                raise BuildError(f"{path.name}: RECORD hash/size wrong for {name}")
        if any(is_removed(n) for n in names):
            raise BuildError(f"{path.name}: still holds files meant to be removed")
        return len(names)


def ray_requirements(wheel: Path) -> list[str]:
    """Ray's unconditional Requires-Dist for the target interpreter (no extras)."""
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(
            n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1
        )
        meta = z.read(meta_name).decode()
    out = []
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or req.marker.evaluate(TARGET_MARKERS):
            req.marker = None
            out.append(str(req))
    return out


def _pip(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(
            f"`pip {' '.join(args)}` failed:\n{(result.stdout + result.stderr)[-2000:]}"
        )


def _target_args(platforms: Iterable[str]) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    args += ["--abi", "cp" + PYTHON_VERSION.replace(".", "")]
    for platform in platforms:
        args += ["--platform", platform]
    return args


def download_ray(cache: Path, version: str) -> Path:
    """The public wheel, downloaded once into cache (79 MB; outside the carried folder)."""
    cache.mkdir(parents=True, exist_ok=True)
    pattern = f"ray-{version}-cp{PYTHON_VERSION.replace('.', '')}-*.whl"
    found = sorted(cache.glob(pattern))
    if not found:
        _pip(
            [
                "download",
                "--no-deps",
                *_target_args([RAY_PLATFORM]),
                "-d",
                str(cache),
                f"ray=={version}",
            ]
        )
        found = sorted(cache.glob(pattern))
    if len(found) != 1:
        raise BuildError(f"{cache}: expected one {pattern}, found {[p.name for p in found]}")
    return found[0]


def verify_install(out: Path, version: str) -> None:
    """Install ray and every dependency from out alone (no index), as the GPU machine will."""
    with tempfile.TemporaryDirectory(prefix="raywheel-") as tmp:
        _pip(
            ["install", "--no-index", "--find-links", str(out), "--target", tmp, "--no-compile"]
            + _target_args(DEPENDENCY_PLATFORMS)
            + [f"ray=={version}"]
        )
        root = Path(tmp)
        if not (root / "ray" / "_raylet.so").is_file() or (root / "ray" / "jars").exists():
            raise BuildError("installed tree lacks ray/_raylet.so or still has ray/jars")
        for binary in ("ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet"):
            if not (root / binary).stat().st_mode & 0o111:
                raise BuildError(f"{binary} lost its executable bit")


def build(
    out: Path, cache: Path, version: str, max_mib: float, with_deps: bool
) -> dict[str, object]:
    """Build the slim wheel (and dependencies) into out; returns the size report."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):  # the folder is carried as a whole: nothing stale in it
        old.unlink()
    source = download_ray(cache, version)
    slim = out / source.name
    report = slim_wheel(source, slim)
    checked = check_wheel(slim)
    requirements = ray_requirements(slim)
    if with_deps:
        _pip(["download", *_target_args(DEPENDENCY_PLATFORMS), "-d", str(out), *requirements])
        verify_install(out, version)
    wheels = sorted(out.glob("*.whl"))
    total = sum(p.stat().st_size for p in wheels)
    summary = {
        "original_mib": round(report.original_bytes / 2**20, 1),
        "slim_mib": round(report.slim_bytes / 2**20, 1),
        "removed_files": report.removed_files,
        "removed_raw_mib": round(report.removed_raw_bytes / 2**20, 1),
        "record_checked_files": checked,
        "requirements": requirements,
        "wheels": {p.name: round(p.stat().st_size / 2**20, 2) for p in wheels},
        "total_mib": round(total / 2**20, 1),
        "max_mib": max_mib,
        "out": str(out),
    }
    if total > max_mib * 2**20:
        raise BuildError(f"{out}: {total / 2**20:.1f} MiB of wheels > {max_mib} MiB limit")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / ".whl", help="output folder (carried)"
    )
    parser.add_argument(
        "--cache", type=Path, default=REPO_ROOT / ".cache" / "ray-wheel", help="public wheel cache"
    )
    parser.add_argument("--ray-version", default=RAY_VERSION)
    parser.add_argument("--max-mib", type=float, default=MAX_MIB)
    parser.add_argument("--no-deps", action="store_true", help="only the slim Ray wheel")
    args = parser.parse_args(argv)
    try:
        summary = build(
            args.out.resolve(),
            args.cache.resolve(),
            args.ray_version,
            args.max_mib,
            not args.no_deps,
        )
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
