"""scripts/build_gpu_wheels.py on small wheels laid out like Ray's, MLflow's and Prefect's (no
download): trimming drops the Java jars, dashboard source maps, web UIs and test suites, keeps
permissions, and leaves a RECORD that pip accepts; the carry stream splits into parts that join
back to the same bytes."""

from __future__ import annotations

import csv
import importlib.util
import io
import stat
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "build_gpu_wheels", REPO / "scripts" / "build_gpu_wheels.py"
)
gpu_wheels = importlib.util.module_from_spec(_spec)
sys.modules["build_gpu_wheels"] = gpu_wheels  # dataclasses look their module up there
_spec.loader.exec_module(gpu_wheels)

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
    rows = [[n, gpu_wheels.record_hash(d), str(len(d))] for n, d in FILES.items()]
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
    report = gpu_wheels.slim_wheel(source, target)
    assert report.removed_files == 2
    assert report.removed_raw_bytes == len(FILES["ray/jars/ray_dist.jar"]) + len(
        FILES["ray/dashboard/client/build/static/js/main.js.map"]
    )
    assert gpu_wheels.check_wheel(target) == len(FILES) - 2 + 1  # kept files + RECORD
    with zipfile.ZipFile(target) as z:
        names = z.namelist()
        assert "ray/_private/keep.map.py" in names and "ray/jars/ray_dist.jar" not in names
        assert names[-1] == "ray-2.60.0.dist-info/RECORD"
        assert (z.getinfo(EXECUTABLE).external_attr >> 16) & 0o111
        assert z.read(EXECUTABLE) == FILES[EXECUTABLE]


def test_check_wheel_catches_leftovers_and_a_stale_record(tmp_path: Path) -> None:
    source = _fake_wheel(tmp_path / "ray.whl")
    with pytest.raises(gpu_wheels.BuildError, match="RECORD mismatch|meant to be removed"):
        gpu_wheels.check_wheel(source)
    slim = tmp_path / "slim.whl"
    gpu_wheels.slim_wheel(source, slim)
    tampered = tmp_path / "tampered.whl"
    with zipfile.ZipFile(slim) as zin, zipfile.ZipFile(tampered, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, data + b"#" if info.filename == "ray/__init__.py" else data)
    with pytest.raises(gpu_wheels.BuildError, match="hash/size wrong for ray/__init__.py"):
        gpu_wheels.check_wheel(tampered)


def test_requirements_follow_the_target_interpreter(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "ray.whl")
    assert gpu_wheels.ray_requirements(wheel) == ["click>=7.0", "pyyaml"]


def _wheel(path: Path, files: dict[str, bytes], dist: str) -> Path:
    rows = [[n, gpu_wheels.record_hash(d), str(len(d))] for n, d in files.items()]
    rows.append([f"{dist}.dist-info/RECORD", "", ""])
    record = io.StringIO()
    csv.writer(record, lineterminator="\n").writerows(rows)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in {**files, f"{dist}.dist-info/RECORD": record.getvalue().encode()}.items():
            z.writestr(name, data)
    return path


def test_trimming_rules_cover_the_web_uis_and_test_suites_only() -> None:
    removed = gpu_wheels.is_removed
    assert removed("mlflow/server/js/build/index.html")
    assert removed("prefect/server/ui/index.html") and removed("prefect/server/ui-v2/a.js")
    assert removed("jsonschema/tests/test_validators.py") and removed("gitdb/test/lib.py")
    assert not removed("mlflow/server/handlers.py") and not removed("prefect/testing/utilities.py")
    assert not removed("prefect/server/api/ui/flows.py")  # the API's routes, not the web UI
    assert not removed("pkg-1.0.dist-info/tests/x") and not removed("ray/_private/test_utils.py")


def test_stored_trim_keeps_a_valid_record_and_installs_for_python_312(tmp_path: Path) -> None:
    files = {
        "prefect/__init__.py": b"__version__ = '3.9.1'\n",
        "prefect/server/ui/index.html": b"<html>" + b"x" * 2000,
        "prefect/server/api/server.py": b"app = None\n",
        "prefect/tests/test_it.py": b"def test(): pass\n",
        "prefect-3.9.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: prefect\nVersion: 3.9.1\n",
        "prefect-3.9.1.dist-info/entry_points.txt": b"[console_scripts]\nprefect = prefect:main\n",
        "prefect-3.9.1.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    (tmp_path / "src").mkdir()
    source = _wheel(tmp_path / "src" / "prefect-3.9.1-py3-none-any.whl", files, "prefect-3.9.1")
    target = tmp_path / "prefect-3.9.1-py3-none-any.whl"
    report = gpu_wheels.trim_wheel(source, target, stored=True)
    assert report.removed_files == 2
    assert gpu_wheels.check_wheel(target) == len(files) - 2 + 1
    with zipfile.ZipFile(target) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
    checks = gpu_wheels.verify_install([target])  # raises without the console script
    assert checks["scripts"] == ["prefect"]


def test_the_stream_splits_into_parts_that_join_to_the_same_bytes(tmp_path: Path) -> None:
    import hashlib
    import lzma
    import random

    payload = tmp_path / "payload"
    (payload / "wheels").mkdir(parents=True)
    rng = random.Random(0)
    (payload / "wheels" / "a.bin").write_bytes(bytes(rng.getrandbits(8) for _ in range(300_000)))
    (payload / "cache").mkdir()
    (payload / "cache" / "b.txt").write_text("text " * 1000)
    packed = gpu_wheels.pack(payload, tmp_path / "out", part_mib=0.1, preset=1)
    parts = packed["parts"]
    assert len(parts) == 3 and all(p["bytes"] <= 0.1 * 2**20 for p in parts)
    joined = b"".join((tmp_path / "out" / p["folder"] / p["file"]).read_bytes() for p in parts)
    assert hashlib.sha256(joined).hexdigest() == packed["stream_sha256"]
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(joined))) as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
    assert names == ["cache/b.txt", "wheels/a.bin"]
