"""Build what the offline GPU machine lacks for the pipeline (issue 15), as carry folders.

The GPU machine (Python 3.12, no network, KINDS.md) has torch and transformers but no Ray, Prefect or
MLflow, and one device call carries at most 64 MiB. This script:

1. resolves the closure of ray 2.60.0, prefect 3.9.1 and mlflow 3.17.2 for CPython 3.12 on
   manylinux x86-64 (`pip install --dry-run --report`, one version of each package);
2. keeps what the GPU image lacks (IMAGE_PACKAGES, read off the image on IMAGE_DATE) and, as
   fallbacks, small wheels of image packages that the closure pins: installed there only when the
   image's own version misses a pin (checked on the machine, bench/flow_gpu.py install);
3. downloads them and trims what a local run never reads (TRIMMED: Ray's Java worker and the
   dashboard's source maps, MLflow's and Prefect's web UIs, which their servers start without, and
   test suites inside packages), rewriting each wheel's RECORD so pip installs it as the original;
4. adds the run's assets: the packaged model (minilm-l6, fp32 as the registry pins it) and the
   corpus files in the FFSPLIT_CACHE layout (models/, files/, corpora/), and SmolLM2's tokenizer
   for the 7B-config model built there;
5. packs it all into one tar.xz stream split into parts of at most --part-mib, one carry folder
   each (.gpucarry/part-N, git-ignored), every folder with the manifest: sha256 of each part, of
   the stream and of every file inside.

    python scripts/build_gpu_wheels.py              # -> .gpucarry/part-1 ... part-N
    python scripts/build_gpu_wheels.py --ray-only   # the slim Ray wheel and its dependencies only

Never commit the output: it holds wheels and model weights.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[1]
RAY_VERSION = "2.60.0"
TOP_LEVEL = {"ray": RAY_VERSION, "prefect": "3.9.1", "mlflow": "3.17.2"}
PYTHON_VERSION = "3.12"
# Ray publishes cp312 wheels tagged manylinux2014; others may be manylinux_2_28 only (the GPU
# image's torch wheels need glibc >= 2.28 too, so every tag up to 2.28 is safe there).
RAY_PLATFORM = "manylinux2014_x86_64"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
)
DEPENDENCY_PLATFORMS = PLATFORMS  # the name the Ray-only build has always used
# The per-call transfer limit is 64 MiB including the working tree (~5 MiB, others' files too): the
# 133 MiB stream goes as 3 parts of at most 45 MiB, leaving room for the tree to grow.
PART_MIB = 45.0
MAX_MIB = 60.0  # --ray-only: the slim Ray wheel and its dependencies in one folder
# Markers of the target interpreter (CPython 3.12 on x86_64 Linux), to pick Requires-Dist entries.
TARGET_MARKERS = {
    "python_version": PYTHON_VERSION,
    "python_full_version": f"{PYTHON_VERSION}.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}

# The GPU image's Python packages, as KINDS.md "Python packages already there" lists them
# (read off a machine running the image 'cuda' on this date).
IMAGE_DATE = "2026-11-17"
IMAGE_PACKAGES = frozenset(
    canonicalize_name(name)
    for name in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch
grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp
""".split()
)
# Versions a session's pip list showed there (KINDS.md); the resolution keeps to them.
IMAGE_VERSIONS = {"numpy": "2.5.2"}
# Image packages never carried as fallbacks: the image's own scientific stack (large binaries that
# torch, pandas or matplotlib there are built against).
IMAGE_ONLY = frozenset(
    {
        "numpy",
        "scipy",
        "pandas",
        "pyarrow",
        "matplotlib",
        "scikit-learn",
        "pillow",
        "fonttools",
        "kiwisolver",
        "contourpy",
    }
)
FALLBACK_MAX_MIB = 2.0

# What a local run never reads, by path inside the wheels (any distribution).
TRIMMED_PREFIXES = (
    "ray/jars/",  # the Java worker (~31 MiB)
    "mlflow/server/js/",  # MLflow's web UI (the server answers /health and the API without it)
    "prefect/server/ui/",  # Prefect's web UIs (skipped at start when absent)
    "prefect/server/ui-v2/",
)
_TESTS = re.compile(r"^[^/]+/(?:[^/]+/)*tests?/")  # a test suite inside a package


class BuildError(Exception):
    """A step failed; the message says which and why."""


# ----------------------------------------------------------------------------------- wheel edits


def is_removed(name: str) -> bool:
    """Whether a wheel member is trimmed (TRIMMED_PREFIXES, dashboard source maps, test suites)."""
    if ".dist-info/" in name or ".data/" in name:
        return False
    if name.startswith(TRIMMED_PREFIXES):
        return True
    if name.startswith("ray/dashboard/") and name.endswith(".map"):
        return True
    return _TESTS.match(name) is not None


def record_hash(data: bytes) -> str:
    """RECORD's hash format (PEP 376/427): sha256=urlsafe-base64 without padding."""
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _record_name(names: Iterable[str]) -> str:
    found = [n for n in names if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
    if len(found) != 1:
        raise BuildError(f"expected one top-level .dist-info/RECORD, found {found}")
    return found[0]


@dataclass(frozen=True)
class SlimReport:
    """What trimming removed and kept."""

    original_bytes: int
    slim_bytes: int
    removed_files: int
    removed_raw_bytes: int
    kept_files: int


def trim_wheel(
    source: Path,
    target: Path,
    removed: Callable[[str], bool] = is_removed,
    stored: bool = False,
) -> SlimReport:
    """Copy a wheel without the removed members; entries keep their ZipInfo (permissions of
    gcs_server, raylet etc.), RECORD loses the removed rows and is written last. stored: no zip
    compression (the carry stream is compressed as a whole, which packs better)."""
    compression = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    level = None if stored else 9
    with zipfile.ZipFile(source) as zin:
        infos = zin.infolist()
        record_name = _record_name(i.filename for i in infos)
        dropped = [i for i in infos if removed(i.filename)]
        dropped_names = {i.filename for i in dropped}
        rows = list(csv.reader(io.StringIO(zin.read(record_name).decode())))
        record = io.StringIO()
        csv.writer(record, lineterminator="\n").writerows(
            r for r in rows if r and r[0] not in dropped_names
        )
        tmp = target.with_name(target.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression, compresslevel=level) as zout:
            for info in infos:
                if info.filename in dropped_names or info.filename == record_name:
                    continue
                zout.writestr(info, zin.read(info), compress_type=compression, compresslevel=level)
            zout.writestr(
                zin.getinfo(record_name), record.getvalue().encode(), compress_type=compression
            )
        tmp.replace(target)
    return SlimReport(
        original_bytes=source.stat().st_size,
        slim_bytes=target.stat().st_size,
        removed_files=len(dropped),
        removed_raw_bytes=sum(i.file_size for i in dropped),
        kept_files=len(infos) - len(dropped),
    )


def slim_wheel(source: Path, target: Path) -> SlimReport:
    """The Ray wheel without its Java worker and dashboard source maps (trim_wheel)."""
    with zipfile.ZipFile(source) as z:
        if not any(n.startswith("ray/jars/") for n in z.namelist()):
            raise BuildError(f"{source.name}: no ray/jars/ inside; is this a Ray wheel?")
    return trim_wheel(source, target)


def check_wheel(path: Path, removed: Callable[[str], bool] = is_removed) -> int:
    """Zip CRCs valid; RECORD lists exactly the files in the wheel, with matching hash and size;
    nothing trimmed is left. Returns the number of files checked."""
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
        if any(removed(n) for n in names):
            raise BuildError(f"{path.name}: still holds files meant to be removed")
        return len(names)


def wheel_metadata(wheel: Path) -> tuple[str, str, list[Requirement]]:
    """(canonical name, version, unconditional Requires-Dist for the target interpreter)."""
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(
            n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1
        )
        meta = z.read(meta_name).decode()
    name = re.search(r"^Name: *(.+)$", meta, re.M)
    version = re.search(r"^Version: *(.+)$", meta, re.M)
    if name is None or version is None:
        raise BuildError(f"{wheel.name}: METADATA lacks Name or Version")
    requirements = []
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(TARGET_MARKERS):
                req.marker = None
                requirements.append(req)
    return canonicalize_name(name.group(1).strip()), version.group(1).strip(), requirements


def ray_requirements(wheel: Path) -> list[str]:
    """Ray's unconditional Requires-Dist for the target interpreter (no extras)."""
    return [str(r) for r in wheel_metadata(wheel)[2]]


# ------------------------------------------------------------------------------- pip and the closure


def _pip(args: list[str]) -> str:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(
            f"`pip {' '.join(args)}` failed:\n{(result.stdout + result.stderr)[-2000:]}"
        )
    return result.stdout


def target_args(platforms: Iterable[str] = PLATFORMS) -> list[str]:
    """pip options that select CPython 3.12 manylinux x86-64 binaries (the GPU machine)."""
    args = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    args += ["--abi", "cp" + PYTHON_VERSION.replace(".", ""), "--abi", "abi3", "--abi", "none"]
    for platform in platforms:
        args += ["--platform", platform]
    return args


_target_args = target_args  # the Ray-only build's name


@dataclass(frozen=True)
class Resolved:
    """One package of the closure: its pinned version, wheel file name and where it comes from."""

    name: str
    version: str
    filename: str
    in_image: bool

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


def resolve(workdir: Path, top_level: dict[str, str] = TOP_LEVEL) -> list[Resolved]:
    """The closure of the top-level packages for the target (pip's resolver, metadata only)."""
    report = workdir / "report.json"
    constraints = workdir / "constraints.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in IMAGE_VERSIONS.items()))
    _pip(
        [
            "install",
            "--dry-run",
            "--quiet",
            "--ignore-installed",
            "--target",
            str(workdir / "unused"),
            *target_args(),
            "--constraint",
            str(constraints),
            "--report",
            str(report),
            *(f"{n}=={v}" for n, v in top_level.items()),
        ]
    )
    items = json.loads(report.read_text())["install"]
    out = []
    for item in items:
        name = canonicalize_name(item["metadata"]["name"])
        url = item["download_info"]["url"]
        out.append(
            Resolved(
                name=name,
                version=item["metadata"]["version"],
                filename=url.rsplit("/", 1)[-1],
                in_image=name in IMAGE_PACKAGES,
            )
        )
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise BuildError(f"the closure holds a package twice: {sorted(names)}")
    return sorted(out, key=lambda r: r.name)


def download(packages: list[Resolved], folder: Path) -> list[Path]:
    """The pinned wheels (no dependencies), downloaded once into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not (folder / p.filename).is_file()]
    if missing:
        requirements = folder / ".requirements.txt"
        requirements.write_text("".join(p.requirement + "\n" for p in missing))
        try:
            _pip(
                [
                    "download",
                    "--quiet",
                    "--no-deps",
                    *target_args(),
                    "-d",
                    str(folder),
                    "-r",
                    str(requirements),
                ]
            )
        finally:
            requirements.unlink(missing_ok=True)
    paths = [folder / p.filename for p in packages]
    absent = [p.name for p in paths if not p.is_file()]
    if absent:
        raise BuildError(f"{folder}: pip did not save {absent}")
    return paths


def image_pins(carried: list[Path]) -> dict[str, list[list[str]]]:
    """For each image package, what the carried packages require of it: [[required by, spec]]."""
    pins: dict[str, list[list[str]]] = {}
    names = set()
    metas = []
    for wheel in carried:
        name, _, requirements = wheel_metadata(wheel)
        names.add(name)
        metas.append((name, requirements))
    for name, requirements in metas:
        for req in requirements:
            dep = canonicalize_name(req.name)
            if dep not in names:
                pins.setdefault(dep, []).append([name, str(req.specifier)])
    return {k: sorted(v) for k, v in sorted(pins.items())}


def verify_install(wheels: list[Path]) -> dict[str, Any]:
    """Install the wheels as the GPU machine will (--no-index --no-deps --target, for CPython 3.12
    x86-64), then check what must survive: Ray's binaries with their executable bit, the trimmed
    folders absent, the console scripts the services start (prefect, mlflow, ray)."""
    with tempfile.TemporaryDirectory(prefix="gpuwheels-") as tmp:
        _pip(
            ["install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--target", tmp]
            + target_args()
            + [str(w) for w in wheels]
        )
        root = Path(tmp)
        checks: dict[str, Any] = {}
        if (root / "ray").is_dir():
            if not (root / "ray" / "_raylet.so").is_file() or (root / "ray" / "jars").exists():
                raise BuildError("installed tree lacks ray/_raylet.so or still has ray/jars")
            for binary in ("ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet"):
                if not (root / binary).stat().st_mode & 0o111:
                    raise BuildError(f"{binary} lost its executable bit")
            checks["ray_binaries_executable"] = True
        for gone in ("mlflow/server/js", "prefect/server/ui", "prefect/server/ui-v2"):
            if (root / gone).exists():
                raise BuildError(f"installed tree still has {gone}")
        scripts = (
            sorted(p.name for p in (root / "bin").iterdir()) if (root / "bin").is_dir() else []
        )
        for script in TOP_LEVEL:
            if (root / script).is_dir() and script not in scripts:
                raise BuildError(f"installed tree lacks the {script} console script")
        checks["scripts"] = [s for s in scripts if s in TOP_LEVEL]
        checks["installed_mib"] = round(
            sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20, 1
        )
        return checks


# ----------------------------------------------------------------------------------------- assets


def stage_assets(payload: Path, model: str) -> dict[str, Any]:
    """The run's assets into payload: the packaged model and corpora in the FFSPLIT_CACHE layout
    (cache/models/NAME, cache/files/SHA16/FILE, cache/corpora/...), SmolLM2's tokenizer files
    (tokenizers/smollm2-135m). Taken from this machine's cache through the library (fetched and
    sha256-checked there first), so the layout is the library's own."""
    sys.path.insert(0, str(REPO_ROOT))
    from ffsplit.data.corpora import CORPORA, WIKI_PARSER_VERSION, corpus_file, wikipedia_articles
    from ffsplit.models.folder import TOKENIZER_FILES
    from ffsplit.models.packages import cache_root, sha256_file
    from ffsplit.models.registry import MODELS, materialize, verify_cache

    cache = payload / "cache"
    root = cache_root()
    folder = materialize(model)
    verify_cache(folder, MODELS[model])
    shutil.copytree(folder, cache / "models" / model)
    files = {}
    for name in CORPORA:
        source = corpus_file(name)
        target = cache / source.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        files[name] = str(target.relative_to(payload))
    wikipedia_articles()  # parsed once here: the GPU image has no mwparserfromhell
    digest = sha256_file(corpus_file("wikipedia"))[:16]
    parsed = root / "corpora" / f"wikipedia-v{WIKI_PARSER_VERSION}-{digest}.jsonl"
    (cache / "corpora").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(parsed, cache / "corpora" / parsed.name)
    tokenizer = payload / "tokenizers" / "smollm2-135m"
    tokenizer.mkdir(parents=True)
    smollm2 = materialize("smollm2-135m")
    for name in TOKENIZER_FILES:
        if (smollm2 / name).is_file():
            shutil.copyfile(smollm2 / name, tokenizer / name)
    return {
        "model": model,
        "model_dir": f"cache/models/{model}",
        "corpora": files,
        "wikipedia_parsed": f"cache/corpora/{parsed.name}",
        "tokenizer": "tokenizers/smollm2-135m",
        "tokenizer_files": sorted(p.name for p in tokenizer.iterdir()),
    }


# ---------------------------------------------------------------------------------------- packing


class _SplitWriter(io.RawIOBase):
    """A write-only stream that fills part files of at most part_bytes each, hashing as it goes."""

    def __init__(self, out: Path, part_bytes: int, name: str) -> None:
        self.out, self.part_bytes, self.name = out, part_bytes, name
        self.parts: list[dict[str, Any]] = []
        self.whole = hashlib.sha256()
        self._file: Any = None
        self._hash: Any = None
        self._size = 0

    def writable(self) -> bool:
        return True

    def _next(self) -> None:
        self._close_part()
        index = len(self.parts) + 1
        folder = self.out / f"part-{index}"
        folder.mkdir(parents=True)
        path = folder / f"{self.name}.{index:02d}"
        self._file, self._hash, self._size = open(path, "wb"), hashlib.sha256(), 0
        self.parts.append({"folder": folder.name, "file": path.name})

    def _close_part(self) -> None:
        if self._file is not None:
            self._file.close()
            self.parts[-1].update(bytes=self._size, sha256=self._hash.hexdigest())
            self._file = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            if self._file is None or self._size >= self.part_bytes:
                self._next()
            chunk = view[done : done + self.part_bytes - self._size]
            self._file.write(chunk)
            self._hash.update(chunk)
            self.whole.update(chunk)
            self._size += len(chunk)
            done += len(chunk)
        return done

    def close(self) -> None:
        self._close_part()
        super().close()


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def _write_tar(payload: Path, stream: Any) -> None:
    with tarfile.open(fileobj=stream, mode="w|") as tar:
        for path in sorted(payload.rglob("*")):
            name = str(path.relative_to(payload))
            tar.add(path, arcname=name, recursive=False, filter=_tar_filter)


def pack(payload: Path, out: Path, part_mib: float, preset: int) -> dict[str, Any]:
    """payload as one tar.xz stream (sorted, no owners or times) split into out/part-N folders.

    Compressed by the xz program on every core when there is one (a multi-block stream, which
    Python's lzma reads back the same), else by Python's lzma on one.
    """
    import threading

    writer = _SplitWriter(out, int(part_mib * 2**20), "payload.tar.xz")
    program = shutil.which("xz")
    if program is None:
        with lzma.open(writer, "wb", preset=preset) as xz:
            _write_tar(payload, xz)
    else:
        xz = subprocess.Popen(
            [program, f"-{preset}", "-T0", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

        def drain() -> None:
            for block in iter(lambda: xz.stdout.read(1 << 20), b""):
                writer.write(block)

        reader = threading.Thread(target=drain)
        reader.start()
        _write_tar(payload, xz.stdin)
        xz.stdin.close()
        reader.join()
        if xz.wait() != 0:
            raise BuildError(f"xz exited with {xz.returncode}")
    writer.close()
    return {"parts": writer.parts, "stream_sha256": writer.whole.hexdigest()}


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------ build


def build_carry(
    out: Path, cache: Path, part_mib: float, model: str, preset: int, with_assets: bool = True
) -> dict[str, Any]:
    """Everything above; returns the manifest (also written into every part folder)."""
    public = cache / "public"
    with tempfile.TemporaryDirectory(prefix="gpucarry-") as tmp:
        work = Path(tmp)
        closure = resolve(work)
        carried = [p for p in closure if not p.in_image]
        image = [p for p in closure if p.in_image]
        carried_wheels = download(carried, public)
        pins = image_pins(carried_wheels)
        fallback_candidates = [p for p in image if p.name not in IMAGE_ONLY and p.name in pins]
        fallback_wheels = [
            w
            for w in download(fallback_candidates, public)
            if w.stat().st_size <= FALLBACK_MAX_MIB * 2**20
        ]
        payload = work / "payload"
        report: dict[str, Any] = {"trimmed": {}}
        for group, wheels in (("wheels", carried_wheels), ("fallback", fallback_wheels)):
            (payload / group).mkdir(parents=True)
            for wheel in wheels:
                target = payload / group / wheel.name
                slim = trim_wheel(wheel, target, stored=True)
                check_wheel(target)
                if slim.removed_files:
                    report["trimmed"][wheel.name] = {
                        "files": slim.removed_files,
                        "raw_mib": round(slim.removed_raw_bytes / 2**20, 2),
                    }
        report["install_check"] = verify_install(sorted((payload / "wheels").glob("*.whl")))
        assets = stage_assets(payload, model) if with_assets else {}
        files = file_hashes(payload)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        packed = pack(payload, out, part_mib, preset)
        raw = sum((payload / f).stat().st_size for f in files)
    manifest = {
        "format": 1,
        "top_level": TOP_LEVEL,
        "python": PYTHON_VERSION,
        "image_date": IMAGE_DATE,
        "wheels": [p.filename for p in carried],
        "fallback": sorted(w.name for w in fallback_wheels),
        "from_image": {p.name: p.version for p in image},
        "image_pins": pins,
        "assets": assets,
        "files": files,
        "raw_mib": round(raw / 2**20, 1),
        **packed,
        "packed_mib": round(sum(p["bytes"] for p in packed["parts"]) / 2**20, 1),
        **report,
    }
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    (out / "manifest.json").write_text(text)
    for part in packed["parts"]:
        (out / part["folder"] / "manifest.json").write_text(text)
    return manifest


def resplit(out: Path, part_mib: float) -> dict[str, Any]:
    """Split an existing carry's stream again into parts of at most part_mib (no recompression);
    the stream and its sha256 stay the same, the parts and manifests are rewritten."""
    manifest = json.loads((out / "manifest.json").read_text())
    sources = [out / p["folder"] / p["file"] for p in manifest["parts"]]
    with tempfile.TemporaryDirectory(prefix="resplit-", dir=out) as tmp:
        writer = _SplitWriter(Path(tmp), int(part_mib * 2**20), "payload.tar.xz")
        for source in sources:
            with open(source, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    writer.write(block)
        writer.close()
        if writer.whole.hexdigest() != manifest["stream_sha256"]:
            raise BuildError(f"{out}: the parts do not join to the manifest's stream")
        for folder in out.glob("part-*"):
            shutil.rmtree(folder)
        for part in writer.parts:
            shutil.move(str(Path(tmp) / part["folder"]), out / part["folder"])
    manifest["parts"] = writer.parts
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    (out / "manifest.json").write_text(text)
    for part in writer.parts:
        (out / part["folder"] / "manifest.json").write_text(text)
    return manifest


def build_ray_only(out: Path, cache: Path, version: str, max_mib: float) -> dict[str, object]:
    """The slim Ray wheel and Ray's dependencies in one folder (the issue-5 build, .whl)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):  # the folder is carried as a whole: nothing stale in it
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="raywheel-") as tmp:
        closure = [p for p in resolve(Path(tmp), {"ray": version}) if not p.in_image]
    wheels = download(closure, cache / "public")
    for wheel in wheels:
        trim_wheel(wheel, out / wheel.name)
        check_wheel(out / wheel.name)
    total = sum(p.stat().st_size for p in out.glob("*.whl"))
    summary = {
        "wheels": {p.name: round(p.stat().st_size / 2**20, 2) for p in sorted(out.glob("*.whl"))},
        "install_check": verify_install(sorted(out.glob("*.whl"))),
        "total_mib": round(total / 2**20, 1),
        "max_mib": max_mib,
        "out": str(out),
    }
    if total > max_mib * 2**20:
        raise BuildError(f"{out}: {total / 2**20:.1f} MiB of wheels > {max_mib} MiB limit")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="carry folder (.gpucarry)")
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache" / "gpu-wheels")
    parser.add_argument("--part-mib", type=float, default=PART_MIB)
    parser.add_argument("--model", default="minilm-l6", help="packaged model to carry")
    parser.add_argument("--preset", type=int, default=9, help="xz preset (0-9)")
    parser.add_argument("--no-assets", action="store_true", help="wheels only")
    parser.add_argument("--ray-only", action="store_true", help="slim Ray + dependencies (.whl)")
    parser.add_argument(
        "--resplit", action="store_true", help="split the built carry again at --part-mib"
    )
    parser.add_argument("--ray-version", default=RAY_VERSION)
    parser.add_argument("--max-mib", type=float, default=MAX_MIB)
    args = parser.parse_args(argv)
    try:
        if args.ray_only:
            out = (args.out or REPO_ROOT / ".whl").resolve()
            summary: dict[str, Any] = build_ray_only(
                out, args.cache.resolve(), args.ray_version, args.max_mib
            )
        elif args.resplit:
            out = (args.out or REPO_ROOT / ".gpucarry").resolve()
            summary = {"parts": resplit(out, args.part_mib)["parts"], "out": str(out)}
        else:
            out = (args.out or REPO_ROOT / ".gpucarry").resolve()
            manifest = build_carry(
                out,
                args.cache.resolve(),
                args.part_mib,
                args.model,
                args.preset,
                with_assets=not args.no_assets,
            )
            summary = {
                k: manifest[k]
                for k in ("parts", "packed_mib", "raw_mib", "fallback", "trimmed", "install_check")
            }
            summary["carried_wheels"] = len(manifest["wheels"])
            summary["out"] = str(out)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
