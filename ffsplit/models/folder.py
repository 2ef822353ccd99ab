"""What a model folder may hold before anything in it is loaded (issue 16: no silent wrong model).

A folder is read only through these checks: no symlink leaves it, the files read are regular
files, every JSON file means one thing (strict: no duplicate keys, no NaN), config.json's sizes are
sane before any memory is allocated, the weights are model.safetensors or the shards its index
names inside the folder, and they are hashed while they are read, so the digest reported is of
the bytes actually used. Config and tokenizer files are copied, checked, into a private folder that
transformers then reads: it never sees a file that was not checked, nor one changed since.
Shared by base-model loading (loading.py) and variant loading (variant/io.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

from ffsplit.errors import FFSplitError
from ffsplit.files import parse_json_strict, read_json_strict, regular_file, shown

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Integer sizes a config may give (at any nesting, e.g. text_config), with an upper bound far
# above any real model: checked before a single tensor is allocated (a vocab_size of 10^10 asked
# transformers for 23 TB).
SIZE_BOUNDS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "n_embd": 1 << 16,
    "d_model": 1 << 16,
    "word_embed_proj_dim": 1 << 16,
    "intermediate_size": 1 << 20,
    "ffn_dim": 1 << 20,
    "n_inner": 1 << 20,
    "num_hidden_layers": 1024,
    "n_layer": 1024,
    "num_layers": 1024,
    "num_attention_heads": 1024,
    "n_head": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1 << 14,
    "max_position_embeddings": 1 << 22,
    "n_positions": 1 << 22,
    "type_vocab_size": 1 << 16,
    "relative_attention_num_buckets": 1 << 16,
    "sliding_window": 1 << 24,
}
# Positive finite numbers (a negative epsilon or rope base gives NaN or garbage silently).
POSITIVE_NUMBERS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta")


def _inside(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def check_entries(folder: Path) -> None:
    """No entry of folder is a symlink that leaves it, or a device, fifo or socket."""
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            target = Path(os.path.realpath(entry))
            if not _inside(folder, target):
                raise FFSplitError(
                    f"model folder {shown(folder)}: {shown(entry.name)} is a symlink to "
                    f"{shown(target)}, outside the folder; copy the file in (cp -L)"
                )
        try:
            mode = os.stat(entry).st_mode
        except FileNotFoundError:
            raise FFSplitError(
                f"model folder {shown(folder)}: {shown(entry.name)} is a dangling symlink"
            ) from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise FFSplitError(
                f"model folder {shown(folder)}: {shown(entry.name)} is not a regular file"
            )


def _check_sizes(config: dict[str, Any], where: str, prefix: str = "") -> None:
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _check_sizes(value, where, f"{name}.")
        elif key in SIZE_BOUNDS and value is not None:
            bound = SIZE_BOUNDS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
                raise FFSplitError(
                    f"{where}: {name} must be an integer in [1, {bound}], got {value!r}"
                )
        elif key in POSITIVE_NUMBERS and value is not None:
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value > 0)
            ):
                raise FFSplitError(f"{where}: {name} must be a positive number, got {value!r}")


def check_config(config: Any, where: str) -> dict[str, Any]:
    """config.json as a dict whose sizes are sane and that asks for no custom code."""
    if not isinstance(config, dict):
        raise FFSplitError(f"{where}: expected a JSON object")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise FFSplitError(f"{where}: model_type must be a non-empty string, got {model_type!r}")
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        custom = " and contains custom code (auto_map)" if "auto_map" in config else ""
        raise FFSplitError(
            f"{where}: model type {model_type!r} is unknown to transformers{custom}; ffsplit "
            "never runs remote code: use a supported architecture"
        )
    architectures = config.get("architectures")
    if architectures is not None and (
        not isinstance(architectures, list)
        or not all(isinstance(a, str) and a for a in architectures)
    ):
        raise FFSplitError(f"{where}: architectures must be a list of names, got {architectures!r}")
    _check_sizes(config, where)
    return config


def _plain_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and bool(name)
        and "/" not in name
        and "\\" not in name
        and not name.startswith(".")
        and "\x00" not in name
    )


def weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files a load reads: model.safetensors, else the shards the index names (each a
    plain file name inside the folder), with the index's weight map."""
    if (folder / WEIGHTS).exists() or (folder / WEIGHTS).is_symlink():
        regular_file(folder / WEIGHTS, "model weights")
        return [folder / WEIGHTS], None
    index_path = folder / INDEX
    if not index_path.exists():
        raise FFSplitError(
            f"model folder {shown(folder)} lacks *.safetensors weights ({WEIGHTS} or {INDEX}): "
            "give a folder of a HF model saved with safetensors"
        )
    index = read_json_strict(index_path, "the weights index", 64 << 20)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FFSplitError(f"{shown(index_path)}: no weight_map object")
    shards = sorted(set(weight_map.values()), key=str)
    for name in shards:
        if not _plain_name(name) or not name.endswith(".safetensors"):
            raise FFSplitError(
                f"{shown(index_path)}: shard name {name!r} is not a .safetensors file in the folder"
            )
        regular_file(folder / name, f"a shard named by {INDEX}")
    return [folder / name for name in shards], weight_map


def check_model_folder(folder: Path, known: str = "") -> tuple[dict[str, Any], list[Path]]:
    """(config, weight files) of a local model folder, after every check that can be made
    without reading the weights."""
    check_entries(folder)
    missing = [n for n in ("config.json",) if not (folder / n).exists()]
    try:
        files, _ = weight_files(folder)
    except FFSplitError:
        if not missing:
            raise
        files = []
        missing.append("*.safetensors")
    if missing:
        names = f" or a known name ({known})" if known else ""
        raise FFSplitError(
            f"model folder {shown(folder)} lacks {' and '.join(missing)}: give a folder of a HF "
            f"model saved with safetensors{names}"
        )
    where = f"model folder {shown(folder)}: config.json"
    return check_config(read_json_strict(folder / "config.json", "config.json"), where), files


def read_safetensors(path: Path, where: str) -> tuple[dict[str, Tensor], str]:
    """(tensors, sha256) of one safetensors file, hashed from the very bytes parsed."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    regular_file(path, "weights")
    with open(path, "rb") as handle:
        data = handle.read()
    digest = hashlib.sha256(data).hexdigest()
    try:
        state = load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FFSplitError(f"{where}: {path.name} is corrupt or truncated ({reason})") from None
    return state, digest


def weights_sha256(files: list[Path], digests: dict[str, str] | None = None) -> str:
    """sha256 of a folder's weights: the file's own, or a hash over 'name sha' lines if sharded."""
    from ffsplit.files import sha256_file

    digests = digests or {f.name: sha256_file(f) for f in files}
    if len(files) == 1:
        return digests[files[0].name]
    lines = "".join(f"{f.name} {digests[f.name]}\n" for f in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def read_weights(
    files: list[Path], weight_map: dict[str, str] | None, where: str
) -> tuple[dict[str, Tensor], str]:
    """All tensors of the weight files (no name twice; with an index, exactly its weight map),
    and their digest in weights_sha256's form, computed from the bytes read."""
    state: dict[str, Tensor] = {}
    digests: dict[str, str] = {}
    for path in files:
        tensors, digests[path.name] = read_safetensors(path, where)
        for name, tensor in tensors.items():
            if name in state:
                raise FFSplitError(f"{where}: weight {name} appears in two shards")
            if weight_map is not None and weight_map.get(name) != path.name:
                raise FFSplitError(
                    f"{where}: weight {name} is in {path.name}, the index maps it to "
                    f"{weight_map.get(name)!r}"
                )
            state[name] = tensor
    if weight_map is not None and set(weight_map) != set(state):
        absent = sorted(set(weight_map) - set(state))[:3]
        raise FFSplitError(
            f"{where}: weights the index names are missing from the shards: {absent}"
        )
    return state, weights_sha256(files, digests)


@contextlib.contextmanager
def private_folder() -> Iterator[Path]:
    """A fresh folder only this process can read or write, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="ffsplit-load-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stage_files(
    folder: Path,
    names: Iterable[str],
    private: Path,
    expected: dict[str, str] | None = None,
    where: str = "",
) -> dict[str, str]:
    """Copy the named files that exist in folder into private, hashing the bytes copied; JSON
    files must be strict JSON, and a tokenizer config must not ask for custom code. expected:
    the sha256 each must have (a variant's manifest). Returns name -> sha256 of what was staged."""
    staged: dict[str, str] = {}
    for name in names:
        path = folder / name
        if not (path.exists() or path.is_symlink()):
            continue
        info = regular_file(path, where or "a model file")
        if name.endswith(".json") and info.st_size > (256 << 20):
            raise FFSplitError(f"{shown(path)}: {info.st_size} bytes is too large for JSON")
        with open(path, "rb") as handle:
            data = handle.read()
        digest = hashlib.sha256(data).hexdigest()
        if expected is not None and expected.get(name) != digest:
            raise FFSplitError(
                f"{shown(path)}: sha256 {digest[:12]}... does not match the manifest "
                f"({str(expected.get(name))[:12]}...): the file is corrupt, truncated or was changed"
            )
        if name.endswith(".json"):
            content = parse_json_strict(data, shown(path))
            if name == "tokenizer_config.json":
                check_tokenizer_config(content, shown(path))
        (private / name).write_bytes(data)
        staged[name] = digest
    return staged


def check_tokenizer_config(config: Any, where: str) -> None:
    """A tokenizer config that asks for no custom code (AutoTokenizer would refuse with a
    traceback, or with trust_remote_code run it)."""
    if not isinstance(config, dict):
        raise FFSplitError(f"{where}: expected a JSON object")
    if "auto_map" in config:
        raise FFSplitError(
            f"{where}: the tokenizer asks for custom code (auto_map); ffsplit never runs remote "
            "code: remove auto_map or use a standard tokenizer"
        )
    for key in ("tokenizer_class", "model_max_length"):
        value = config.get(key)
        if key == "tokenizer_class" and value is not None and not isinstance(value, str):
            raise FFSplitError(f"{where}: tokenizer_class must be a name, got {value!r}")


def check_dtypes(state: dict[str, Tensor], floats: set[str], where: str) -> None:
    """Weights the model holds as floats must be stored as floats: an integer or bool tensor
    would be cast to a float silently (a different model)."""
    for name, tensor in state.items():
        if name in floats and not tensor.is_floating_point():
            raise FFSplitError(
                f"{where}: weight {name} is stored as {str(tensor.dtype).removeprefix('torch.')}, "
                "not a float type; the file is not weights of this model"
            )
