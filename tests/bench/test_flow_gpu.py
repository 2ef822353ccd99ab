"""bench/flow_gpu.py's carry handling on CPU (no download): parts packed by
scripts/build_gpu_wheels.py are found and checked by sha256, a missing or damaged part stops the
install, and a complete carry installs its wheels for Python 3.12, adding a fallback wheel only
for an image package whose version misses a pin."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import flow_gpu  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "build_gpu_wheels", REPO / "scripts" / "build_gpu_wheels.py"
)
build = importlib.util.module_from_spec(_spec)
sys.modules["build_gpu_wheels"] = build
_spec.loader.exec_module(build)


def _wheel(folder: Path, name: str, version: str, requires: list[str] = ()) -> Path:
    dist = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {
        f"{name}/__init__.py": f"__version__ = '{version}'\n".encode(),
        f"{dist}/METADATA": meta.encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    rows = [[n, build.record_hash(d), str(len(d))] for n, d in files.items()]
    rows.append([f"{dist}/RECORD", "", ""])
    record = io.StringIO()
    csv.writer(record, lineterminator="\n").writerows(rows)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, data in {**files, f"{dist}/RECORD": record.getvalue().encode()}.items():
            z.writestr(member, data)
    return path


@pytest.fixture
def carry(tmp_path: Path) -> Path:
    """A carry of two wheels: one pins packaging beyond any release (a miss, with a fallback
    wheel carried), one pins pytest loosely (met by this environment: no fallback installed)."""
    payload = tmp_path / "payload"
    ours = _wheel(payload / "wheels", "ffcarried", "1.0", ["packaging>=999", "pytest>=1"])
    _wheel(payload / "fallback", "packaging", "999.0")
    _wheel(payload / "fallback", "pytest", "999.0")
    manifest = {
        "image_pins": build.image_pins([ours]),
        "fallback": sorted(p.name for p in (payload / "fallback").iterdir()),
        "files": build.file_hashes(payload),
    }
    out = tmp_path / "carry"
    manifest.update(build.pack(payload, out, part_mib=0.0004, preset=1))
    assert len(manifest["parts"]) >= 2
    for part in manifest["parts"]:
        (out / part["folder"] / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_pins_name_the_image_packages_and_their_misses(carry: Path) -> None:
    status = flow_gpu.carry_status(carry)
    pins = status["manifest"]["image_pins"]
    assert pins == {"packaging": [["ffcarried", ">=999"]], "pytest": [["ffcarried", ">=1"]]}
    assert set(status["image_misses"]) == {"packaging"}


def test_a_missing_or_damaged_part_is_reported_and_stops_the_install(
    carry: Path, tmp_path: Path
) -> None:
    status = flow_gpu.carry_status(carry)
    assert status["ready"] and status["builds_seen"] == 1
    last = status["parts"][-1]
    moved = tmp_path / "elsewhere"
    (carry / last["folder"]).rename(moved)
    status = flow_gpu.carry_status(carry)
    assert not status["ready"] and not status["parts"][-1]["here"]
    with pytest.raises(SystemExit, match="parts missing or damaged"):
        flow_gpu.install(carry, tmp_path / "work", tmp_path / "site")
    moved.rename(carry / last["folder"])
    damaged = carry / last["folder"] / last["file"]
    data = bytearray(damaged.read_bytes())
    data[0] ^= 1
    damaged.write_bytes(bytes(data))
    status = flow_gpu.carry_status(carry)
    assert not status["ready"] and status["parts"][-1]["here"]
    assert not status["parts"][-1]["sha256_ok"]
    assert flow_gpu.carry_status(tmp_path / "nothing")["error"].startswith("no ")


def test_a_complete_carry_installs_with_only_the_needed_fallbacks(
    carry: Path, tmp_path: Path
) -> None:
    record = flow_gpu.install(carry, tmp_path / "work", tmp_path / "site")
    assert record["fallbacks_installed"] == ["packaging"]
    assert record["misses_left"] == {}
    site = tmp_path / "site"
    assert (site / "ffcarried" / "__init__.py").is_file()
    assert (site / "packaging" / "__init__.py").read_text() == "__version__ = '999.0'\n"
    assert not (site / "pytest").exists()
    assert json.loads((tmp_path / "work" / "install.json").read_text())["wheels"] == 2
    again = flow_gpu.install(carry, tmp_path / "work", tmp_path / "site")
    assert again["reused"] and again["wheels"] == 2  # a later call on the same machine
