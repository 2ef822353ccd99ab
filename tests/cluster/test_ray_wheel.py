"""scripts/build_ray_wheel.py on a small wheel laid out like Ray's (no download): slimming drops the
Java jars and dashboard source maps, keeps permissions, and leaves a RECORD that pip would accept."""

from __future__ import annotations

import csv
import importlib.util
import io
import stat
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "build_ray_wheel", REPO / "scripts" / "build_ray_wheel.py"
)
build_ray_wheel = importlib.util.module_from_spec(_spec)
sys.modules["build_ray_wheel"] = build_ray_wheel  # dataclasses look their module up there
_spec.loader.exec_module(build_ray_wheel)

FILES = {
    "ray/__init__.py": b"__version__ = '2.60.0'\n",
    "ray/core/src/ray/gcs/gcs_server": b"\x7fELF" + bytes(range(256)) * 4,
    "ray/jars/ray_dist.jar": b"PK" + b"j" * 5000,
    "ray/dashboard/client/build/static/js/main.js": b"console.log(1)\n",
    "ray/dashboard/client/build/static/js/main.js.map": b"{" + b"m" * 3000 + b"}",
    "ray/_private/keep.map.py": b"# not a source map\n",
    "ray-2.60.0.dist-info/METADATA": (
        b"Metadata-Version: 2.1\nName: ray\nVersion: 2.60.0\n"
        b"Requires-Dist: click>=7.0\nRequires-Dist: pyyaml\n"
        b'Requires-Dist: colorama; sys_platform == "win32"\n'
        b'Requires-Dist: pandas; extra == "data"\n'
    ),
    "ray-2.60.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\n",
}
EXECUTABLE = "ray/core/src/ray/gcs/gcs_server"


def _fake_wheel(path: Path) -> Path:
    rows = [[n, build_ray_wheel.record_hash(d), str(len(d))] for n, d in FILES.items()]
    rows.append(["ray-2.60.0.dist-info/RECORD", "", ""])
    record = io.StringIO()
    csv.writer(record, lineterminator="\n").writerows(rows)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in {
            **FILES,
            "ray-2.60.0.dist-info/RECORD": record.getvalue().encode(),
        }.items():
            info = zipfile.ZipInfo(name)
            mode = 0o755 if name == EXECUTABLE else 0o644
            info.external_attr = (stat.S_IFREG | mode) << 16
            z.writestr(info, data)
    return path


def test_slim_wheel_drops_jars_and_maps_and_keeps_record_valid(tmp_path: Path) -> None:
    source = _fake_wheel(tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl")
    target = tmp_path / "out.whl"
    report = build_ray_wheel.slim_wheel(source, target)
    assert report.removed_files == 2
    assert report.removed_raw_bytes == len(FILES["ray/jars/ray_dist.jar"]) + len(
        FILES["ray/dashboard/client/build/static/js/main.js.map"]
    )
    assert build_ray_wheel.check_wheel(target) == len(FILES) - 2 + 1  # kept files + RECORD
    with zipfile.ZipFile(target) as z:
        names = z.namelist()
        assert "ray/_private/keep.map.py" in names and "ray/jars/ray_dist.jar" not in names
        assert names[-1] == "ray-2.60.0.dist-info/RECORD"
        assert (z.getinfo(EXECUTABLE).external_attr >> 16) & 0o111
        assert z.read(EXECUTABLE) == FILES[EXECUTABLE]


def test_check_wheel_catches_leftovers_and_a_stale_record(tmp_path: Path) -> None:
    source = _fake_wheel(tmp_path / "ray.whl")
    with pytest.raises(build_ray_wheel.BuildError, match="RECORD mismatch|meant to be removed"):
        build_ray_wheel.check_wheel(source)
    slim = tmp_path / "slim.whl"
    build_ray_wheel.slim_wheel(source, slim)
    tampered = tmp_path / "tampered.whl"
    with zipfile.ZipFile(slim) as zin, zipfile.ZipFile(tampered, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, data + b"#" if info.filename == "ray/__init__.py" else data)
    with pytest.raises(build_ray_wheel.BuildError, match="hash/size wrong for ray/__init__.py"):
        build_ray_wheel.check_wheel(tampered)


def test_requirements_follow_the_target_interpreter(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "ray.whl")
    assert build_ray_wheel.ray_requirements(wheel) == ["click>=7.0", "pyyaml"]
