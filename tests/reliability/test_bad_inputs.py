"""Bad inputs through the real CLI (issue 7): each must give exit code 2, exactly one line on stderr
that names the offending file, key or value, no traceback, nothing on stdout, and nothing written.

Each case builds its bad input in a folder of its own, next to the --out path; a snapshot of that
folder before and after the command proves nothing was written (no output, no temp leftovers).
The commands run in subprocesses, two at a time (startup dominates: ~2 s importing torch and
transformers, ~3 s more when a model loads).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

WORKERS = 2


@dataclass(frozen=True)
class Work:
    """One case's folder and the good inputs to spoil."""

    inputs: Any  # conftest.Inputs
    dir: Path

    @property
    def out(self) -> Path:
        return self.dir / "out"

    def file(self, name: str, data: str | bytes) -> Path:
        path = self.dir / name
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")
        return path

    def copy(self, src: Path, name: str | None = None) -> Path:
        dst = self.dir / (name or src.name)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return dst


@dataclass(frozen=True)
class Case:
    name: str
    area: str
    what: str
    build: Callable[[Work], list[str]]
    expect: str  # regex the one stderr line must match (it names what and where)
    prefix: Callable[[Work], list[str]] | None = None  # runs the command (see run_cli)


CASES: list[Case] = []


def case(
    area: str, what: str, expect: str, prefix: Callable[[Work], list[str]] | None = None
) -> Callable[[Callable[[Work], list[str]]], Any]:
    """Register the decorated builder (name from the function) as a bad-input case."""

    def register(build: Callable[[Work], list[str]]) -> Callable[[Work], list[str]]:
        CASES.append(Case(build.__name__.replace("_", "-"), area, what, build, expect, prefix))
        return build

    return register


# ------------------------------------------------------------------------------------ helpers


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data = change(data) or data
    path.write_text(json.dumps(data), encoding="utf-8")


def edit_tensors(
    path: Path,
    change: Callable[[dict[str, torch.Tensor]], None] = lambda t: None,
    metadata: Callable[[dict[str, str]], None] = lambda m: None,
) -> None:
    """Rewrite a safetensors file with changed tensors and/or metadata (still valid safetensors)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    change(tensors)
    metadata(meta)
    save_file(tensors, str(path), metadata=meta)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def rehash(variant: Path) -> None:
    """Make the manifest vouch for the files as they are now (to get past the sha256 check)."""
    from ffsplit.files import sha256_file

    edit_json(
        variant / "manifest.json",
        lambda m: m["files"].update({n: sha256_file(variant / n) for n in m["files"]}),
    )


class Unpickled:
    """Unpickling this creates a marker file: proof that something ran pickle.load."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


def first_ffn_weight(tensors: dict[str, torch.Tensor]) -> str:
    return sorted(k for k in tensors if ".mlp." in k and tensors[k].is_floating_point())[0]


def poison(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[first_ffn_weight(tensors)].view(-1)[0] = value

    return change


def compress(w: Work, model: Path, *extra: str) -> list[str]:
    return ["compress", str(model), "--out", str(w.out), *extra]


def eval_text(w: Work, model: Path, text: Path | None = None, *extra: str) -> list[str]:
    text = text or w.inputs.text
    return ["eval", str(model), "--text", str(text), "--max-tokens", "64", "--window", "32", *extra]


def profile(w: Work, model: Path, corpus: Path | str, *extra: str) -> list[str]:
    out = w.dir / "out.safetensors"
    args = ["profile", str(model), "--out", str(out), "--corpus", str(corpus)]
    return [*args, "--calib-tokens", "64", "--window", "32", *extra]


# ------------------------------------------------------------------------------ option values

for _value, _expect in (
    ("0", r"--heavy-ratio must be in \(0, 1\), got 0\.0"),
    ("1", r"--heavy-ratio must be in \(0, 1\), got 1\.0"),
    ("-0.2", r"--heavy-ratio must be in \(0, 1\), got -0\.2"),
    ("nan", r"--heavy-ratio must be in \(0, 1\), got nan"),
    ("abc", r"Invalid value for '--heavy-ratio'.*number"),
):
    CASES.append(
        Case(
            f"heavy-ratio-{_value}",
            "options",
            f"heavy ratio {_value}",
            lambda w, v=_value: compress(w, w.inputs.notok, "--heavy-ratio", v),
            _expect,
        )
    )


@case("options", "FFN reduction inf", r"--ffn-reduction must be in \(0, 1\), got inf")
def ffn_reduction_inf(w: Work) -> list[str]:
    return compress(w, w.inputs.notok, "--ffn-reduction", "inf")


@case("options", "unknown --method", r"Invalid value for '--method'.*'zip'")
def unknown_method(w: Work) -> list[str]:
    return compress(w, w.inputs.notok, "--method", "zip")


@case("options", "heavy part at 4 bits (16 or 8 only)", r"quant\.heavy_bits must be 16 or 8, got 4")
def heavy_bits_4(w: Work) -> list[str]:
    return compress(w, w.inputs.notok, "--method", "quant", "--heavy-bits", "4")


@case(
    "options",
    "impossible budget: heavy ratio 0.9 with a 50% reduction (low-rank)",
    r"budget 0\.5 cannot be met with heavy ratio 0\.9",
)
def impossible_budget_lowrank(w: Work) -> list[str]:
    budget = ["--heavy-ratio", "0.9", "--ffn-reduction", "0.5"]
    return compress(w, w.inputs.notok, "--plain-svd", "--baseline", "random", *budget)


@case(
    "options",
    "impossible budget: 99% reduction by quantization",
    r"budget 0\.99 cannot be met.* 2 bits",
)
def impossible_budget_quant(w: Work) -> list[str]:
    return compress(
        w, w.inputs.notok, "--method", "quant", "--baseline", "uniform", "--ffn-reduction", "0.99"
    )


@case(
    "options",
    "absurd size: 10^23 calibration tokens",
    r"text\.txt' \(calibration split\) gives only \d+ tokens.*asked for",
)
def absurd_calibration_tokens(w: Work) -> list[str]:
    args = profile(w, w.inputs.tok, w.inputs.text)
    args[args.index("--calib-tokens") + 1] = str(10**23)
    return args


@case("options", "zero calibration tokens", r"profile\.tokens must be >= 1, got 0")
def zero_calibration_tokens(w: Work) -> list[str]:
    args = profile(w, w.inputs.tok, w.inputs.text)
    args[args.index("--calib-tokens") + 1] = "0"
    return args


@case(
    "options", "absurd batch size 10^6", r"profile\.batch_size must be in \[1, 4096\], got 1000000"
)
def absurd_batch_size(w: Work) -> list[str]:
    return profile(w, w.inputs.tok, w.inputs.text, "--batch-size", "1000000")


@case("options", "evaluation window of 1 token", r"--window must be at least 2 tokens, got 1")
def window_of_one(w: Work) -> list[str]:
    return ["eval", str(w.inputs.notok), "--window", "1"]


@case("options", "--out folder already exists", r"--out .*/out: already exists")
def out_exists(w: Work) -> list[str]:
    w.out.mkdir()
    (w.out / "keep.txt").write_text("not to be touched")
    return compress(w, w.inputs.notok, "--plain-svd", "--baseline", "random")


# ------------------------------------------------------------------------------------ models


@case("model", "unknown model name", r"unknown model 'no-such-model'")
def unknown_model_name(w: Work) -> list[str]:
    return compress(w, Path("no-such-model"))


@case("model", "folder without config.json", r"model folder .*/model lacks config\.json")
def model_without_config(w: Work) -> list[str]:
    model = w.copy(w.inputs.notok, "model")
    (model / "config.json").unlink()
    return compress(w, model)


@case(
    "model",
    "pickle weights only (pytorch_model.bin, no safetensors)",
    r"model folder .*/model lacks \*\.safetensors",
)
def pickle_weights_only(w: Work) -> list[str]:
    model = w.copy(w.inputs.notok, "model")
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    return compress(w, model)


@case("model", "config.json is not JSON", r"/model/config\.json: invalid or truncated JSON")
def config_not_json(w: Work) -> list[str]:
    model = w.copy(w.inputs.notok, "model")
    (model / "config.json").write_text('{"architectures": ["Llama', encoding="utf-8")
    return compress(w, model)


@case(
    "model",
    "unknown architecture (model_type unknown to transformers)",
    r"model folder .*/model: config\.json: model type 'foo' is unknown to transformers",
)
def unknown_model_type(w: Work) -> list[str]:
    model = w.copy(w.inputs.notok, "model")
    edit_json(model / "config.json", lambda c: c.update(model_type="foo"))
    return compress(w, model)


@case(
    "model",
    "unsupported architecture (no ffsplit adapter)",
    r".*/model: unsupported architecture 'FooForCausalLM'; supported: ",
)
def unsupported_architecture(w: Work) -> list[str]:
    model = w.copy(w.inputs.notok, "model")
    edit_json(model / "config.json", lambda c: c.update(architectures=["FooForCausalLM"]))
    return compress(w, model, "--plain-svd", "--baseline", "random")


@case(
    "model",
    "truncated model.safetensors",
    r"model folder .*/model: model\.safetensors is corrupt or truncated",
)
def truncated_weights(w: Work) -> list[str]:
    model = w.copy(w.inputs.notok, "model")
    truncate(model / "model.safetensors")
    return compress(w, model)


@case(
    "model",
    "model.safetensors of random bytes",
    r"model folder .*/model: model\.safetensors is corrupt or truncated",
)
def garbage_weights(w: Work) -> list[str]:
    model = w.copy(w.inputs.notok, "model")
    rng = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=rng)
    (model / "model.safetensors").write_bytes(bytes(noise.tolist()))
    return compress(w, model)


@case(
    "model",
    "safetensors header claiming 10^12 bytes",
    r"model folder .*/model: model\.safetensors is corrupt or truncated",
)
def absurd_header_size(w: Work) -> list[str]:
    model = w.copy(w.inputs.notok, "model")
    (model / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    return compress(w, model)


@case(
    "model",
    "NaN in an FFN weight (compress)",
    r"model folder .*/model: weight model\.layers\.0\.mlp\.\w+\.weight holds NaN or inf",
)
def nan_weight(w: Work) -> list[str]:
    model = w.copy(w.inputs.notok, "model")
    edit_tensors(model / "model.safetensors", poison(float("nan")))
    return compress(w, model, "--plain-svd", "--baseline", "random")


@case(
    "model",
    "inf in an FFN weight (eval)",
    r"model folder .*/model: weight model\.layers\.0\.mlp\.\w+\.weight holds NaN or inf",
)
def inf_weight(w: Work) -> list[str]:
    model = w.copy(w.inputs.tok, "model")
    edit_tensors(model / "model.safetensors", poison(float("inf")))
    return eval_text(w, model)


@case(
    "model",
    "missing tokenizer (compress, recipe needs calibration text)",
    r"tiny-llama: no tokenizer files; this recipe profiles calibration text",
)
def missing_tokenizer_compress(w: Work) -> list[str]:
    return compress(w, w.inputs.notok)


@case(
    "model",
    "missing tokenizer (profile)",
    r"tiny-llama: no tokenizer files; profiling needs it",
)
def missing_tokenizer_profile(w: Work) -> list[str]:
    return profile(w, w.inputs.notok, w.inputs.text)


@case("model", "missing tokenizer (eval)", r"tiny-llama: no tokenizer files; cannot evaluate")
def missing_tokenizer_eval(w: Work) -> list[str]:
    return eval_text(w, w.inputs.notok)


@case(
    "model",
    "truncated tokenizer.json",
    r"/model/tokenizer\.json: invalid or truncated JSON",
)
def truncated_tokenizer(w: Work) -> list[str]:
    model = w.copy(w.inputs.tok, "model")
    truncate(model / "tokenizer.json", 0.01)
    return eval_text(w, model)


@case("model", "a variant given as the base to compress", r"/variant: compress a base model")
def compress_a_variant(w: Work) -> list[str]:
    return compress(w, w.inputs.variant)


@case("model", "a variant given to profile", r"/variant: profile a base model")
def profile_a_variant(w: Work) -> list[str]:
    return profile(w, w.inputs.variant, w.inputs.text)


# -------------------------------------------------------------------------------------- text


@case("text", "empty text file (eval)", r"text file .*/empty\.txt is empty")
def empty_text(w: Work) -> list[str]:
    return eval_text(w, w.inputs.tok, w.file("empty.txt", ""))


@case("text", "whitespace-only text file (eval)", r"text file .*/blank\.txt is empty")
def blank_text(w: Work) -> list[str]:
    return eval_text(w, w.inputs.tok, w.file("blank.txt", " \n\t\n"))


@case("text", "non-UTF-8 text file (eval)", r"text file .*/latin1\.txt is not UTF-8 \(byte 3")
def non_utf8_text(w: Work) -> list[str]:
    return eval_text(w, w.inputs.tok, w.file("latin1.txt", "caf\xe9 au lait".encode("latin-1")))


@case("text", "text shorter than one window", r"corpus '.*/short\.txt' .*gives only \d+ tokens")
def text_too_short(w: Work) -> list[str]:
    return eval_text(w, w.inputs.tok, w.file("short.txt", "Too short."))


@case(
    "text",
    "text file does not exist",
    r"unknown corpus '.*/missing\.txt': not a packaged corpus .* nor an existing text file",
)
def missing_text(w: Work) -> list[str]:
    return eval_text(w, w.inputs.tok, w.dir / "missing.txt")


@case("text", "unknown corpus name (profile)", r"unknown corpus 'no-such-corpus'")
def unknown_corpus(w: Work) -> list[str]:
    return profile(w, w.inputs.tok, "no-such-corpus")


@case("text", "empty calibration file (profile)", r"text file .*/empty\.txt is empty")
def empty_calibration_text(w: Work) -> list[str]:
    return profile(w, w.inputs.tok, w.file("empty.txt", b""))


@case("text", "non-UTF-8 calibration file (profile)", r"text file .*/utf16\.txt is not UTF-8")
def non_utf8_calibration_text(w: Work) -> list[str]:
    return profile(w, w.inputs.tok, w.file("utf16.txt", "plain words".encode("utf-16")))


# ------------------------------------------------------------------------------------ recipes


def recipe_case(name: str, what: str, filename: str, content: str | bytes, expect: str) -> None:
    def build(w: Work) -> list[str]:
        return compress(w, w.inputs.notok, "--recipe", str(w.file(filename, content)))

    build.__name__ = name
    case("recipe", what, expect)(build)


recipe_case(
    "recipe_unknown_key",
    "recipe with an unknown key (typo)",
    "recipe.json",
    '{"method": "lowrank", "heavy_ration": 0.1}',
    r"/recipe\.json: unknown key\(s\) 'heavy_ration'; known keys: version, method",
)
recipe_case(
    "recipe_nested_unknown_key",
    "recipe with an unknown nested key",
    "recipe.json",
    '{"method": "quant", "quant": {"bitz": 4}}',
    r"/recipe\.json\.quant: unknown key\(s\) 'bitz'",
)
recipe_case(
    "recipe_integer_key",
    "YAML recipe with an integer key",
    "recipe.yaml",
    "method: lowrank\n1: 2\n",
    r"/recipe\.yaml: unknown key\(s\) 1",
)
recipe_case(
    "recipe_newer_version",
    "recipe from a newer format version",
    "recipe.json",
    '{"version": 4}',
    r"/recipe\.json: format version 4 is not supported",
)
recipe_case(
    "recipe_corpus_not_a_name",
    "recipe profile.corpus is a number (found by the config property test)",
    "recipe.json",
    '{"profile": {"corpus": 5}}',
    r"/recipe\.json.*profile\.corpus must be a corpus name or a text file path, got 5",
)
recipe_case(
    "recipe_ratio_string",
    "recipe heavy_ratio is a string",
    "recipe.json",
    '{"heavy_ratio": "0.1"}',
    r"/recipe\.json: recipe\.heavy_ratio must be a number in \(0, 1\), got '0\.1'",
)
recipe_case(
    "recipe_ratio_nan",
    "recipe heavy_ratio NaN",
    "recipe.json",
    '{"heavy_ratio": NaN}',
    r"/recipe\.json: recipe\.heavy_ratio must be a number in \(0, 1\), got nan",
)
recipe_case(
    "recipe_reduction_overflow",
    "recipe ffn_reduction 1e400 (overflows to inf)",
    "recipe.json",
    '{"ffn_reduction": 1e400}',
    r"/recipe\.json: recipe\.ffn_reduction must be a number in \(0, 1\), got inf",
)
recipe_case(
    "recipe_absurd_group_size",
    "absurd size: quantization group of 10^9",
    "recipe.json",
    '{"method": "quant", "quant": {"group_size": 1000000000}}',
    r"/recipe\.json\.quant: quant\.group_size must be in \[8, 4096\]",
)
recipe_case(
    "recipe_truncated_json",
    "truncated JSON recipe",
    "recipe.json",
    '{"method": "lowrank", "heavy_ra',
    r"/recipe\.json: not valid JSON",
)
recipe_case(
    "recipe_invalid_yaml",
    "invalid YAML recipe",
    "recipe.yaml",
    "method: [lowrank\n",
    r"/recipe\.yaml: not valid YAML \(",
)
recipe_case(
    "recipe_yaml_list",
    "YAML recipe that is a list",
    "recipe.yaml",
    "- lowrank\n- quant\n",
    r"/recipe\.yaml: expected a mapping, got list",
)
recipe_case(
    "recipe_non_utf8",
    "non-UTF-8 recipe",
    "recipe.json",
    b'{"method": "lowrank\xff"}',
    r"/recipe\.json: not UTF-8 text",
)


@case("recipe", "recipe file does not exist", r"recipe file not found: .*/missing\.json")
def recipe_missing(w: Work) -> list[str]:
    return compress(w, w.inputs.notok, "--recipe", str(w.dir / "missing.json"))


# ------------------------------------------------------------------------------- statistics


def stats_copy(w: Work) -> Path:
    return w.copy(w.inputs.stats, "stats.safetensors")


def with_stats(w: Work, stats: Path) -> list[str]:
    return compress(w, w.inputs.notok, "--stats", str(stats))


@case(
    "statistics",
    "truncated statistics file",
    r"/stats\.safetensors: not a readable safetensors statistics file",
)
def stats_truncated(w: Work) -> list[str]:
    stats = stats_copy(w)
    truncate(stats)
    return with_stats(w, stats)


@case(
    "statistics",
    "a pickle given as statistics (refused, never unpickled)",
    r"/stats\.pkl: not a readable safetensors statistics file",
)
def stats_pickle(w: Work) -> list[str]:
    marker = w.dir / "UNPICKLED"  # inside the snapshot: would fail the nothing-written check
    payload = pickle.dumps(Unpickled(str(marker)))
    return with_stats(w, w.file("stats.pkl", payload))


@case("statistics", "inf in statistics", r"/stats\.safetensors: layer 0 sum_sq holds NaN or inf")
def stats_inf(w: Work) -> list[str]:
    stats = stats_copy(w)
    edit_tensors(stats, lambda t: t["layer.0.sum_sq"].__setitem__(3, float("inf")))
    return with_stats(w, stats)


@case("statistics", "NaN in a Gram matrix", r"/stats\.safetensors: layer 1 gram_in holds NaN")
def stats_nan_gram(w: Work) -> list[str]:
    stats = stats_copy(w)
    edit_tensors(stats, lambda t: t["layer.1.gram_in_tril"].__setitem__(0, float("nan")))
    return with_stats(w, stats)


@case(
    "statistics",
    "statistics from a newer format version",
    r"/stats\.safetensors: statistics format 99 is newer",
)
def stats_newer(w: Work) -> list[str]:
    stats = stats_copy(w)
    edit_tensors(stats, metadata=lambda m: m.update(format_version="99"))
    return with_stats(w, stats)


@case(
    "statistics",
    "statistics format_version not a number",
    r"/stats\.safetensors: statistics format_version 'x' is not an integer",
)
def stats_version_text(w: Work) -> list[str]:
    stats = stats_copy(w)
    edit_tensors(stats, metadata=lambda m: m.update(format_version="x"))
    return with_stats(w, stats)


@case(
    "statistics",
    "statistics of a different base model (sha256 mismatch)",
    r"/stats\.safetensors: statistics were collected on another model",
)
def stats_other_model(w: Work) -> list[str]:
    stats = stats_copy(w)

    def other(meta: dict[str, str]) -> None:
        inner = json.loads(meta["meta"])
        inner["model_sha256"] = "ab" * 32
        meta["meta"] = json.dumps(inner)

    edit_tensors(stats, metadata=other)
    return with_stats(w, stats)


@case(
    "statistics",
    "statistics whose tensors disagree in shape",
    r"/stats\.safetensors: layer 0 \w+ has shape \[\d+\], expected \[5\]",
)
def stats_inconsistent(w: Work) -> list[str]:
    stats = stats_copy(w)
    edit_tensors(stats, lambda t: t.update({"layer.0.sum_sq": t["layer.0.sum_sq"][:5].clone()}))
    return with_stats(w, stats)


@case(
    "statistics",
    "statistics lacking a layer of the model",
    r"/stats\.safetensors: no statistics for layer 1",
)
def stats_missing_layer(w: Work) -> list[str]:
    stats = stats_copy(w)

    def drop(tensors: dict[str, torch.Tensor]) -> None:
        for name in [k for k in tensors if k.startswith("layer.1.")]:
            del tensors[name]

    edit_tensors(stats, drop)
    return with_stats(w, stats)


@case(
    "statistics",
    "statistics with a foreign tensor name",
    r"/stats\.safetensors: unexpected tensor name\(s\) \['bogus'\]",
)
def stats_foreign_tensor(w: Work) -> list[str]:
    stats = stats_copy(w)
    edit_tensors(stats, lambda t: t.update(bogus=torch.zeros(3)))
    return with_stats(w, stats)


@case(
    "statistics",
    "model weights given as statistics",
    r"/model\.safetensors: not an ffsplit statistics file \(format='pt'\)",
)
def stats_are_weights(w: Work) -> list[str]:
    return with_stats(w, w.inputs.notok / "model.safetensors")


@case("statistics", "statistics file does not exist", r"statistics file not found: .*/none\.st")
def stats_missing(w: Work) -> list[str]:
    return with_stats(w, w.dir / "none.st")


# ------------------------------------------------------------------------ variants, manifests


def variant_case(name: str, what: str, expect: str, *, with_text: bool = False) -> Callable:
    """A case on a copy of the good variant; the decorated function spoils it in place."""

    def register(spoil: Callable[[Path], None]) -> Callable[[Path], None]:
        def build(w: Work) -> list[str]:
            variant = w.copy(w.inputs.variant, "variant")
            spoil(variant)
            return eval_text(w, variant) if with_text else ["eval", str(variant)]

        build.__name__ = name
        case("variant", what, expect)(build)
        return spoil

    return register


def manifest_edit(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    return lambda variant: edit_json(variant / "manifest.json", change)


def first_layer(m: dict[str, Any]) -> dict[str, Any]:
    return m["layers"]["0"]


MANIFEST_AT = "/variant/manifest\\.json: "

variant_case(
    "manifest_truncated", "truncated manifest.json", MANIFEST_AT + "invalid or truncated JSON"
)(lambda v: truncate(v / "manifest.json", 0.3))
variant_case(
    "manifest_newer_version",
    "manifest from a newer format version",
    MANIFEST_AT + "format version 2 is newer than this ffsplit reads",
)(manifest_edit(lambda m: m.update(format_version=2)))
variant_case(
    "manifest_not_object", "manifest that is a JSON list", MANIFEST_AT + "expected a JSON object"
)(lambda v: (v / "manifest.json").write_text("[1, 2]"))
variant_case("manifest_non_utf8", "manifest that is not UTF-8", MANIFEST_AT + "not UTF-8 text")(
    lambda v: (v / "manifest.json").write_bytes(b"\xff\xfe{}")
)
variant_case(
    "manifest_deeply_nested",
    "manifest nested 100000 levels deep",
    MANIFEST_AT + "JSON nested too deeply",
)(lambda v: (v / "manifest.json").write_text("[" * 100_000 + "]" * 100_000))
variant_case(
    "manifest_path_traversal",
    "manifest file name ../../etc/passwd",
    MANIFEST_AT + r"file name '\.\./\.\./etc/passwd' escapes the variant folder",
)(manifest_edit(lambda m: m["files"].update({"../../etc/passwd": "0" * 64})))
variant_case(
    "manifest_absolute_path",
    "manifest file name /etc/passwd",
    MANIFEST_AT + r"file name '/etc/passwd' escapes the variant folder",
)(manifest_edit(lambda m: m["files"].update({"/etc/passwd": "0" * 64})))
variant_case(
    "manifest_unknown_adapter",
    "manifest names an unknown adapter",
    MANIFEST_AT + r"unknown adapter 'nope'",
)(manifest_edit(lambda m: m.update(adapter="nope")))
variant_case(
    "manifest_absurd_part_size",
    "absurd size: a part of 10^12 neurons",
    MANIFEST_AT + r"layer 0: up part 1000000000000x\d+ .*does not fit the FFN",
)(manifest_edit(lambda m: first_layer(m)["up"]["parts"][0].update(out=10**12)))
variant_case(
    "manifest_negative_rank",
    "negative low-rank rank",
    MANIFEST_AT + r"layer 0: up part sizes must be positive integers",
)(manifest_edit(lambda m: first_layer(m)["up"]["parts"][-1].update(rank=-3)))
variant_case(
    "manifest_unknown_part_type",
    "unknown part type 'pickle'",
    MANIFEST_AT + r"layer 0: unknown part type 'pickle'",
)(manifest_edit(lambda m: first_layer(m)["up"].update(type="pickle")))
variant_case(
    "manifest_missing_layer",
    "manifest entry for a layer the model lacks",
    MANIFEST_AT + r"layer 7 does not exist in the model",
)(manifest_edit(lambda m: m["layers"].update({"7": first_layer(m)})))
variant_case(
    "manifest_bad_recipe",
    "manifest recipe with an unknown method",
    MANIFEST_AT + r"recipe: recipe\.method must be one of",
)(manifest_edit(lambda m: m["recipe"].update(method="zip")))
variant_case(
    "manifest_missing_sizes",
    "manifest sizes empty",
    MANIFEST_AT + r"sizes\.dense_ffn_bytes must be a non-negative integer, got None",
)(manifest_edit(lambda m: m.update(sizes={})))
variant_case(
    "variant_truncated_weights",
    "truncated variant weights",
    r"/variant/model\.safetensors: sha256 \w+\.\.\. does not match the manifest",
)(lambda v: truncate(v / "model.safetensors"))
variant_case(
    "variant_missing_file",
    "variant file listed in the manifest is missing",
    r"/variant/config\.json: missing \(listed in .*/variant/manifest\.json\)",
)(lambda v: (v / "config.json").unlink())


def _nan_weights(variant: Path) -> None:
    edit_tensors(variant / "model.safetensors", poison(float("nan")))
    rehash(variant)


def _garbage_weights(variant: Path) -> None:
    (variant / "model.safetensors").write_bytes(struct.pack("<Q", 64) + b"{not json" + b" " * 60)
    rehash(variant)


variant_case(
    "variant_nan_weights",
    "NaN in variant weights (hashes updated to match)",
    r"/variant/model\.safetensors: tensor model\.layers\.0\.mlp\.\S+ holds NaN or inf",
)(_nan_weights)
variant_case(
    "variant_garbage_weights",
    "unparsable variant weights (hashes updated to match)",
    r"/variant/model\.safetensors: unreadable safetensors",
)(_garbage_weights)


@case(
    "variant",
    "variant of a different base model (base sha256 mismatch, eval --latency)",
    r"tiny-llama-tok: base model weights \(sha256 \w+\.\.\.\) are not the ones this variant",
)
def variant_other_base(w: Work) -> list[str]:
    variant = w.copy(w.inputs.variant_tok, "variant")
    edit_json(variant / "manifest.json", lambda m: m["base_model"].update(weights_sha256="ab" * 32))
    return eval_text(w, variant, None, "--latency")


# ------------------------------------------------- issue 16: no silent wrong model, one-line failures
# Hostile inputs found by an adversarial pass (issue 16) and the ones its fixes suggested: each was a
# wrong or random model loading with exit 0, a traceback, a second stderr line, or a half-written
# output before.


def model_case(
    name: str, what: str, expect: str, *, base: str = "notok", command: str = "compress"
) -> Callable:
    """A case on a copy of a good model folder (notok: no tokenizer, tok: SmolLM2's tokenizer);
    the decorated function spoils the copy in place; the command compresses or evaluates it."""

    def register(spoil: Callable[[Path], None]) -> Callable[[Path], None]:
        def build(w: Work) -> list[str]:
            model = w.copy(getattr(w.inputs, base), "model")
            spoil(model)
            if command == "eval":
                return eval_text(w, model)
            if command == "profile":
                return profile(w, model, w.inputs.text)
            return compress(w, model, "--plain-svd", "--baseline", "random")

        build.__name__ = name
        case("model", what, expect)(build)
        return spoil

    return register


def variant_tok_case(name: str, what: str, expect: str) -> Callable:
    """A case on a copy of the good variant that has a tokenizer, evaluated on text."""

    def register(spoil: Callable[[Path], None]) -> Callable[[Path], None]:
        def build(w: Work) -> list[str]:
            variant = w.copy(w.inputs.variant_tok, "variant")
            spoil(variant)
            return eval_text(w, variant)

        build.__name__ = name
        case("variant", what, expect)(build)
        return spoil

    return register


def edit_config(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    return lambda folder: edit_json(folder / "config.json", change)


def drop_tensor(key_part: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[sorted(k for k in tensors if key_part in k)[0]]

    return change


def flip_byte(path: Path, offset: int = -9) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def unlist(name: str) -> Callable[[Path], None]:
    """Remove a file from the manifest's list (the file itself stays)."""

    def change(manifest: dict[str, Any]) -> None:
        del manifest["files"][name]

    return manifest_edit(change)


def then_rehash(spoil: Callable[[Path], None]) -> Callable[[Path], None]:
    def run(variant: Path) -> None:
        spoil(variant)
        rehash(variant)

    return run


# --- a variant loads only through its manifest

variant_case(
    "manifest_deleted",
    "variant whose manifest.json was deleted (loaded as a base model before: perplexity 2.2e9)",
    r"/variant: an ffsplit variant \(neurons\.safetensors\) without its manifest\.json",
)(lambda v: (v / "manifest.json").unlink())
variant_case(
    "manifest_and_neurons_deleted",
    "variant with manifest.json and neurons.safetensors deleted",
    r"/variant: holds compressed \(split\) weights but no manifest\.json",
)(lambda v: [(v / n).unlink() for n in ("manifest.json", "neurons.safetensors")])
variant_case(
    "manifest_is_a_folder",
    "manifest.json is a directory",
    r"/variant/manifest\.json: not a regular file \(a variant manifest\)",
)(lambda v: ((v / "manifest.json").unlink(), (v / "manifest.json").mkdir()))
variant_case(
    "manifest_symlink_dev_zero",
    "manifest.json is a symlink to /dev/zero",
    r"/variant/manifest\.json: a symlink; a variant's files are plain files",
)(lambda v: ((v / "manifest.json").unlink(), (v / "manifest.json").symlink_to("/dev/zero")))


@case(
    "variant",
    "compress of a variant whose manifest.json was deleted (wrote a new variant before)",
    r"/variant: an ffsplit variant \(neurons\.safetensors\) without its manifest\.json",
)
def compress_variant_without_manifest(w: Work) -> list[str]:
    variant = w.copy(w.inputs.variant, "variant")
    (variant / "manifest.json").unlink()
    return compress(w, variant, "--plain-svd", "--baseline", "random")


variant_case(
    "manifest_files_emptied",
    'manifest "files": {} and a flipped byte in the weights (the hash check was switched off)',
    MANIFEST_AT + r"lists no model\.safetensors or config\.json",
)(
    lambda v: (
        flip_byte(v / "model.safetensors"),
        manifest_edit(lambda m: m.update(files={}))(v),
    )
)


def _duplicate_files_key(variant: Path) -> None:
    flip_byte(variant / "model.safetensors")
    text = (variant / "manifest.json").read_text().rstrip()
    (variant / "manifest.json").write_text(
        text[:-1] + ', "files": {"config.json": "' + "0" * 64 + '"}}'
    )


variant_case(
    "manifest_duplicate_files_key",
    'a second "files" key appended to the manifest (last one wins in plain JSON)',
    MANIFEST_AT + r"duplicate key 'files'",
)(_duplicate_files_key)
variant_case(
    "manifest_weights_unlisted",
    "model.safetensors removed from the manifest's files, weights changed",
    MANIFEST_AT + r"lists no model\.safetensors",
)(
    lambda v: (
        flip_byte(v / "model.safetensors"),
        unlist("model.safetensors")(v),
    )
)
variant_case(
    "manifest_config_unlisted",
    "config.json removed from the manifest's files",
    MANIFEST_AT + r"lists no config\.json",
)(unlist("config.json"))
variant_case(
    "manifest_lists_python_file",
    "manifest lists evil.py (with its hash)",
    MANIFEST_AT + r"lists 'evil\.py', which is not a file a variant holds",
)(manifest_edit(lambda m: m["files"].update({"evil.py": "0" * 64})))
variant_case(
    "manifest_hash_not_hex",
    "manifest file hash that is not a sha256",
    MANIFEST_AT + r"files\.config\.json must be a sha256",
)(manifest_edit(lambda m: m["files"].update({"config.json": "x"})))
variant_case(
    "manifest_negative_sizes",
    "negative sizes in the manifest",
    MANIFEST_AT + r"sizes\.ffn_bytes must be a non-negative integer, got -5",
)(manifest_edit(lambda m: m["sizes"].update(ffn_bytes=-5)))
variant_case(
    "manifest_reduction_minus_1e300",
    "ffn_reduction -1e300 in the manifest",
    MANIFEST_AT + r"sizes\.ffn_reduction must be a number in \[0, 1\), got -1e\+300",
)(manifest_edit(lambda m: m["sizes"].update(ffn_reduction=-1e300)))
variant_case(
    "manifest_reduction_not_from_sizes",
    "ffn_reduction 0.9 that the sizes do not give",
    MANIFEST_AT + r"sizes\.ffn_reduction 0\.9 is not what the sizes give",
)(manifest_edit(lambda m: m["sizes"].update(ffn_reduction=0.9)))


def _consistent_lie(manifest: dict[str, Any]) -> None:
    sizes = manifest["sizes"]
    sizes["ffn_bytes"] = sizes["dense_ffn_bytes"] // 10
    sizes["ffn_reduction"] = (sizes["dense_ffn_bytes"] - sizes["ffn_bytes"]) / sizes[
        "dense_ffn_bytes"
    ]


variant_case(
    "manifest_sizes_lie",
    "sizes edited to claim a 90% reduction, consistently with each other",
    MANIFEST_AT + r"sizes\.ffn_bytes \d+ is not what the structure holds \(\d+\)",
)(manifest_edit(_consistent_lie))
variant_case(
    "manifest_compressed_larger_than_dense",
    "ffn_bytes larger than dense_ffn_bytes",
    MANIFEST_AT + r"sizes ffn_bytes \d+ and dense_ffn_bytes \d+ are inconsistent",
)(manifest_edit(lambda m: m["sizes"].update(ffn_bytes=m["sizes"]["dense_ffn_bytes"] + 1)))
variant_case(
    "manifest_nan_literal",
    "NaN in the manifest (not JSON)",
    MANIFEST_AT + r"NaN is not a JSON number",
)(
    lambda v: (v / "manifest.json").write_text(
        (v / "manifest.json")
        .read_text()
        .replace('"ffn_reduction": ', '"ffn_reduction": NaN, "x": ', 1)
    )
)
variant_case(
    "manifest_heavy_out_of_range",
    "heavy neuron index 10^6 in a 96-neuron FFN",
    MANIFEST_AT + r"layer 0: heavy neuron index out of range \(the FFN has 96 neurons\)",
)(manifest_edit(lambda m: first_layer(m).update(heavy=[10**6])))
variant_case(
    "manifest_heavy_repeated",
    "heavy neuron indices repeated",
    MANIFEST_AT + r"layers\.0\.heavy must be distinct non-negative neuron indices",
)(manifest_edit(lambda m: first_layer(m).update(heavy=[3, 3])))
variant_case(
    "manifest_base_hash_not_hex",
    "base model sha256 that is not a sha256",
    MANIFEST_AT + r"base_model\.weights_sha256 must be a sha256",
)(manifest_edit(lambda m: m["base_model"].update(weights_sha256="../../x")))
variant_case(
    "manifest_layer_spec_disagrees",
    "a layer's part spec (rank) that disagrees with the weights and the sizes",
    MANIFEST_AT + r"sizes\.ffn_bytes \d+ is not what the structure holds",
)(manifest_edit(lambda m: first_layer(m)["up"]["parts"][-1].update(rank=1)))
variant_case(
    "manifest_architecture_changed",
    "manifest architecture that config.json does not have",
    MANIFEST_AT + r"architecture OPTForCausalLM does not match config\.json",
)(manifest_edit(lambda m: m.update(architecture="OPTForCausalLM")))
variant_case(
    "manifest_bogus_tie",
    "manifest ties a weight the model does not have",
    MANIFEST_AT + r"tied x -> y is not a tie of this model",
)(manifest_edit(lambda m: m.update(tied={**m.get("tied", {}), "x": "y"})))
variant_case(
    "manifest_huge",
    "manifest of 70 MB (a JSON bomb)",
    r"/variant/manifest\.json: \d+ bytes is too large for a variant manifest",
)(lambda v: (v / "manifest.json").write_text('{"pad": "' + "x" * (70 << 20) + '"}'))

# --- the variant's files: only listed ones, plain, hash-checked as read

variant_case(
    "variant_weights_symlink",
    "model.safetensors replaced by a symlink to a copy (hash still right)",
    r"/variant/model\.safetensors: a symlink; a variant's files are plain files",
)(
    lambda v: (
        (v / "model.safetensors").rename(v.parent / "elsewhere.safetensors"),
        (v / "model.safetensors").symlink_to(v.parent / "elsewhere.safetensors"),
    )
)
variant_case(
    "variant_config_symlink",
    "config.json replaced by a symlink outside the folder",
    r"/variant/config\.json: a symlink; a variant's files are plain files",
)(
    lambda v: (
        (v / "config.json").rename(v.parent / "config.json"),
        (v / "config.json").symlink_to(v.parent / "config.json"),
    )
)
variant_case(
    "variant_config_duplicate_key",
    "variant config.json with a duplicate key (hashes updated)",
    r"/variant/config\.json: duplicate key 'hidden_size'",
)(
    then_rehash(
        lambda v: (v / "config.json").write_text(
            (v / "config.json").read_text().rstrip()[:-1] + ', "hidden_size": 64}'
        )
    )
)
variant_case(
    "variant_config_vocab_1e10",
    "variant config.json with vocab_size 10^10 (hashes updated)",
    r"/variant/config\.json: vocab_size must be an integer in \[1, 4194304\], got 10000000000",
)(then_rehash(edit_config(lambda c: c.update(vocab_size=10**10))))
variant_case(
    "variant_config_larger_model",
    "variant config.json of a larger model, within the size bounds (hashes updated)",
    MANIFEST_AT + r"config\.json describes [\d,]+ parameters outside the FFNs but the weights hold",
)(then_rehash(edit_config(lambda c: c.update(vocab_size=4_000_000))))
variant_case(
    "variant_int_weights",
    "a float weight stored as int8 in the variant (hashes updated)",
    r"/variant/model\.safetensors: tensor \S+ is stored as int8, the model holds float",
)(
    then_rehash(
        lambda v: edit_tensors(
            v / "model.safetensors",
            lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int8)}),
        )
    )
)
variant_case(
    "variant_extra_tensor",
    "an extra tensor in the variant weights (hashes updated)",
    r"/variant/model\.safetensors: weights do not fit the manifest's structure .*unexpected \['bogus'\]",
)(
    then_rehash(
        lambda v: edit_tensors(v / "model.safetensors", lambda t: t.update(bogus=torch.zeros(2)))
    )
)
variant_case(
    "variant_missing_tensor",
    "a tensor removed from the variant weights (hashes updated)",
    r"/variant/model\.safetensors: weights do not fit the manifest's structure \(missing \[",
)(then_rehash(lambda v: edit_tensors(v / "model.safetensors", drop_tensor(".mlp.down_proj."))))
variant_case(
    "variant_neurons_out_of_range",
    "neurons.safetensors heavy index out of range (hashes updated)",
    r"/variant/neurons\.safetensors: layer\.0\.heavy holds indices out of range or repeated",
)(
    then_rehash(
        lambda v: edit_tensors(
            v / "neurons.safetensors",
            lambda t: t["layer.0.heavy"].__setitem__(0, 10**6),
        )
    )
)
variant_case(
    "variant_neurons_other_heavy_set",
    "neurons.safetensors heavy set that is not the manifest's (hashes updated)",
    r"/variant/neurons\.safetensors: layer\.0\.heavy is not the heavy set the manifest lists",
)(
    then_rehash(
        lambda v: edit_tensors(
            v / "neurons.safetensors",
            lambda t: t.update(
                {"layer.0.heavy": t["layer.0.order"][-len(t["layer.0.heavy"]) :].clone()}
            ),
        )
    )
)


def _dtype_trick(variant: Path) -> None:
    """A safetensors header that declares F16 for bytes written as F32 (sizes disagree)."""
    path = variant / "model.safetensors"
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    name = next(
        k for k, v in header.items() if k != "__metadata__" and v["dtype"] in ("BF16", "F32")
    )
    header[name]["dtype"] = "F64"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size :])
    rehash(variant)


variant_case(
    "variant_dtype_header_trick",
    "a safetensors header whose dtype does not match its byte range (hashes updated)",
    r"/variant/model\.safetensors: unreadable safetensors",
)(_dtype_trick)
variant_tok_case(
    "variant_tokenizer_truncated",
    "variant tokenizer.json truncated (hashes updated)",
    r"/variant/tokenizer\.json: invalid or truncated JSON",
)(then_rehash(lambda v: truncate(v / "tokenizer.json", 0.01)))
variant_tok_case(
    "variant_tokenizer_pickled",
    "variant tokenizer.json replaced by a pickle (hashes updated)",
    r"/variant/tokenizer\.json: not UTF-8 text|/variant/tokenizer\.json: invalid or truncated JSON",
)(then_rehash(lambda v: (v / "tokenizer.json").write_bytes(pickle.dumps({"vocab": [1, 2]}))))
variant_tok_case(
    "variant_tokenizer_auto_map",
    "variant tokenizer_config.json with auto_map (hashes updated)",
    r"/variant/tokenizer_config\.json: the tokenizer asks for custom code \(auto_map\)",
)(
    then_rehash(
        lambda v: edit_json(
            v / "tokenizer_config.json",
            lambda c: c.update(auto_map={"AutoTokenizer": ["x.T", None]}),
        )
    )
)

# --- any model load: every weight accounted for, nothing read from outside the folder


model_case(
    "model_missing_ffn_weight",
    "one FFN matrix removed from model.safetensors (random values, perplexity 867,102 before)",
    r"model folder .*/model: the weights do not match the architecture \(missing: "
    r"model\.layers\.0\.mlp\.\w+\.weight\)",
    base="tok",
    command="eval",
)(lambda m: edit_tensors(m / "model.safetensors", drop_tensor(".mlp.")))
model_case(
    "model_unexpected_weight",
    "an extra tensor in model.safetensors",
    r"model folder .*/model: the weights do not match the architecture \(unexpected: bogus\)",
)(lambda m: edit_tensors(m / "model.safetensors", lambda t: t.update(bogus=torch.zeros(3))))
model_case(
    "model_int_weight",
    "a float weight stored as int8",
    r"model folder .*/model: weight \S+ is stored as int8, not a float type",
)(
    lambda m: edit_tensors(
        m / "model.safetensors",
        lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int8)}),
    )
)


def _index_to(target: str) -> Callable[[Path], None]:
    def spoil(model: Path) -> None:
        from safetensors.torch import load_file

        keys = list(load_file(str(model / "model.safetensors")))
        shutil.copy(model / "model.safetensors", model.parent / "outside.safetensors")
        (model / "model.safetensors").unlink()
        (model / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, target)})
        )

    return spoil


model_case(
    "index_shard_outside",
    "model.safetensors.index.json pointing at ../outside.safetensors (a decoy was hashed before)",
    r"/model/model\.safetensors\.index\.json: shard name '\.\./outside\.safetensors' is not a "
    r"\.safetensors file in the folder",
)(_index_to("../outside.safetensors"))
model_case(
    "index_shard_absolute",
    "index naming an absolute shard path",
    r"/model/model\.safetensors\.index\.json: shard name '/.*/outside\.safetensors' is not",
)(lambda m: _index_to(str(m.parent / "outside.safetensors"))(m))


def _split_shards(model: Path, misplace: bool = False) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    parts = {"model-1.safetensors": names[:half], "model-2.safetensors": names[half:]}
    for shard, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, str(model / shard), metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in parts.items() for k in keys}
    if misplace:
        weight_map[names[0]] = "model-2.safetensors"
    (model / "model.safetensors").unlink()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


model_case(
    "index_weight_in_wrong_shard",
    "index whose weight map names the wrong shard for a weight",
    r"model folder .*/model: weight \S+ is in model-1\.safetensors, the index maps it to "
    r"'model-2\.safetensors'",
)(lambda m: _split_shards(m, misplace=True))
model_case(
    "index_shard_missing",
    "index naming a shard file that is absent",
    r"/model/model-2\.safetensors: missing \(a shard named by model\.safetensors\.index\.json\)",
)(lambda m: (_split_shards(m), (m / "model-2.safetensors").unlink()))
model_case(
    "weights_symlink_outside",
    "model.safetensors a symlink to a file outside the folder",
    r"model folder .*/model: model\.safetensors is a symlink to .*, outside the folder",
)(
    lambda m: (
        (m / "model.safetensors").rename(m.parent / "w.safetensors"),
        (m / "model.safetensors").symlink_to(m.parent / "w.safetensors"),
    )
)
model_case(
    "tokenizer_symlink_dev_zero",
    "tokenizer.json a symlink to /dev/zero",
    r"model folder .*/model: tokenizer\.json is a symlink to /dev/zero, outside the folder",
    base="tok",
    command="eval",
)(lambda m: ((m / "tokenizer.json").unlink(), (m / "tokenizer.json").symlink_to("/dev/zero")))
model_case(
    "model_fifo_in_folder",
    "a FIFO named tokenizer_config.json (a read would block forever)",
    r"model folder .*/model: tokenizer_config\.json is not a regular file",
    base="tok",
    command="eval",
)(lambda m: ((m / "tokenizer_config.json").unlink(), os.mkfifo(m / "tokenizer_config.json")))
model_case(
    "config_duplicate_key",
    "config.json with hidden_size given twice",
    r"/model/config\.json: duplicate key 'hidden_size'",
)(
    lambda m: (m / "config.json").write_text(
        (m / "config.json").read_text().rstrip()[:-1] + ', "hidden_size": 64}'
    )
)
model_case(
    "config_vocab_1e10",
    "config.json vocab_size 10^10 (tried to allocate 23 TB before)",
    r"config\.json: vocab_size must be an integer in \[1, 4194304\], got 10000000000",
)(edit_config(lambda c: c.update(vocab_size=10**10)))
model_case(
    "config_larger_model",
    "config.json of a model 1000x larger than its weights, within the size bounds",
    r"model folder .*/model: config\.json describes [\d,]+ parameters but the weights hold [\d,]+",
)(edit_config(lambda c: c.update(vocab_size=4_000_000)))
model_case(
    "config_hidden_size_bad",
    "config.json hidden_size 33 (not a multiple of the head count)",
    r"model folder .*/model: config\.json is not a usable model config \(.*hidden size \(33\)",
)(edit_config(lambda c: c.update(hidden_size=33)))
model_case(
    "config_hidden_size_text",
    "config.json hidden_size a string",
    r"config\.json: hidden_size must be an integer in \[1, 65536\], got 'big'",
)(edit_config(lambda c: c.update(hidden_size="big")))
model_case(
    "config_zero_heads",
    "config.json with 0 attention heads",
    r"config\.json: num_attention_heads must be an integer in \[1, 1024\], got 0",
)(edit_config(lambda c: c.update(num_attention_heads=0)))
model_case(
    "config_layers_1e6",
    "config.json with 10^6 layers",
    r"config\.json: num_hidden_layers must be an integer in \[1, 1024\], got 1000000",
)(edit_config(lambda c: c.update(num_hidden_layers=10**6)))
model_case(
    "config_negative_eps",
    "config.json rms_norm_eps -1 (NaN activations)",
    r"config\.json: rms_norm_eps must be a positive number, got -1",
)(edit_config(lambda c: c.update(rms_norm_eps=-1)))
model_case(
    "config_infinity_literal",
    "config.json rope_theta Infinity (not JSON)",
    r"/model/config\.json: Infinity is not a JSON number",
)(
    lambda m: (m / "config.json").write_text(
        (m / "config.json").read_text().rstrip()[:-1] + ', "rope_theta": Infinity}'
    )
)
model_case(
    "config_not_an_object",
    "config.json that is a JSON list",
    r"model folder .*/model: config\.json: expected a JSON object",
)(lambda m: (m / "config.json").write_text("[1, 2, 3]"))
model_case(
    "unknown_model_type_auto_map",
    "unknown model_type with auto_map (transformers added a hub URL line)",
    r"config\.json: model type 'evil' is unknown to transformers and contains custom code",
)(edit_config(lambda c: c.update(model_type="evil", auto_map={"AutoConfig": "evil.Config"})))
model_case(
    "tokenizer_pickled",
    "tokenizer.json replaced by a pickle",
    r"/model/tokenizer\.json: not UTF-8 text|/model/tokenizer\.json: invalid or truncated JSON",
    base="tok",
    command="eval",
)(lambda m: (m / "tokenizer.json").write_bytes(pickle.dumps({"vocab": [1, 2]})))
model_case(
    "tokenizer_config_auto_map",
    "tokenizer_config.json with auto_map",
    r"/model/tokenizer_config\.json: the tokenizer asks for custom code \(auto_map\)",
    base="tok",
    command="eval",
)(
    lambda m: edit_json(
        m / "tokenizer_config.json", lambda c: c.update(auto_map={"AutoTokenizer": ["x.T", None]})
    )
)
model_case(
    "tokenizer_json_valid_but_wrong",
    "tokenizer.json valid JSON that is no tokenizer",
    r"model folder .*/model: tokenizer files are unreadable",
    base="tok",
    command="eval",
)(lambda m: (m / "tokenizer.json").write_text('{"model": {"type": "nothing"}}'))
model_case(
    "tokenizer_profile_truncated",
    "truncated tokenizer.json (profile)",
    r"/model/tokenizer\.json: invalid or truncated JSON",
    base="tok",
    command="profile",
)(lambda m: truncate(m / "tokenizer.json", 0.01))

model_case(
    "config_ffn_size_mismatch",
    "config.json intermediate_size 95 for weights of 96 neurons",
    r"model folder .*/model: weight model\.layers\.\d+\.mlp\.\w+\.weight has shape \[\d+, \d+\], "
    r"config\.json makes it \[\d+, \d+\]",
)(edit_config(lambda c: c.update(intermediate_size=95)))
model_case(
    "config_fewer_layers",
    "config.json num_hidden_layers 1 for weights of 2 layers",
    r"model folder .*/model: the weights do not match the architecture \(unexpected: "
    r"model\.layers\.1\.",
)(edit_config(lambda c: c.update(num_hidden_layers=1)))


def _foreign_tokenizer(model: Path) -> None:
    """The tokenizer of the 49152-token model beside weights of a 160-token vocabulary."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model.parent.parent.parent / "tiny-llama-tok" / name, model / name)


model_case(
    "tokenizer_of_another_model",
    "a 49152-token tokenizer beside a 160-token model (token ids past the embedding)",
    r"model folder .*/model: the tokenizer has 49152 tokens but the model's embedding has 160 rows",
    command="eval",
)(_foreign_tokenizer)
variant_case(
    "manifest_down_spec_as_split_out",
    "a down projection spec of the wrong kind (split_out)",
    MANIFEST_AT + r"layer 0: down spec must be split_in, got split_out",
)(manifest_edit(lambda m: first_layer(m)["down"].update(type="split_out")))
variant_case(
    "manifest_projections_disagree",
    "up keeps more neurons than down takes (a shape error at the first forward before)",
    MANIFEST_AT + r"layer 0: the projections keep different neuron counts",
)(manifest_edit(lambda m: first_layer(m)["down"]["parts"][0].update(**{"in": 1})))


# --- options


@case(
    "options",
    "--ffn-reduction 0.999999 with prune (every neuron pruned: traceback before)",
    r"budget 0\.999999 cannot be met by pruning: keeping a single neuron of 96",
)
def prune_everything(w: Work) -> list[str]:
    return compress(
        w,
        w.inputs.notok,
        "--method",
        "prune",
        "--ffn-reduction",
        "0.999999",
        "--stats",
        str(w.inputs.stats),
    )


# --- output paths, checked before any work


@case("output", "--out under a regular file", r"--out: .*/afile is a file, not a folder")
def out_under_file(w: Work) -> list[str]:
    w.file("afile", "x")
    return ["compress", str(w.inputs.notok), "--out", str(w.dir / "afile" / "out")]


@case("output", "profile --out under a regular file", r"--out: .*/afile is a file, not a folder")
def profile_out_under_file(w: Work) -> list[str]:
    w.file("afile", "x")
    args = profile(w, w.inputs.tok, w.inputs.text)
    args[args.index("--out") + 1] = str(w.dir / "afile" / "stats.safetensors")
    return args


@case("output", "--out a dangling symlink", r"--out .*/out: a dangling symlink")
def out_dangling_symlink(w: Work) -> list[str]:
    w.out.symlink_to(w.dir / "nowhere")
    return compress(w, w.inputs.notok)


@case("output", "profile --out an existing file", r"--out .*/out\.safetensors: already exists")
def profile_out_exists(w: Work) -> list[str]:
    w.file("out.safetensors", "keep")
    return profile(w, w.inputs.tok, w.inputs.text)


@case("output", "--out a 300-character name", r"--out a{40}\.\.\.: the name is 300 bytes")
def out_name_300(w: Work) -> list[str]:
    return ["compress", str(w.inputs.notok), "--out", str(w.dir / ("a" * 300))]


@case("output", "--out a 5000-character path", r"--out is \d{4} bytes long; paths must stay under")
def out_path_5000(w: Work) -> list[str]:
    deep = w.dir.joinpath(*(["d" * 200] * 25))
    return ["compress", str(w.inputs.notok), "--out", str(deep / "out")]


@case(
    "output",
    "--out name with a newline and a forged second line (shown escaped, one line)",
    r"--out '.*/x\\nerror: forged': control characters in a path",
)
def out_name_newline(w: Work) -> list[str]:
    return ["compress", str(w.inputs.notok), "--out", str(w.dir / "x\nerror: forged")]


@case(
    "output",
    "--out name with a terminal escape sequence",
    r"--out '.*/x\\x1b\[2Jy': control characters in a path",
)
def out_name_escape(w: Work) -> list[str]:
    return ["compress", str(w.inputs.notok), "--out", str(w.dir / "x\x1b[2Jy")]


def read_only_mount(w: Work) -> list[str]:
    """Run the command with w.dir/ro a read-only tmpfs, in a mount namespace of its own (the
    mount ends with the command); where namespaces are not allowed, fail the case visibly."""
    if shutil.which("unshare") is None:
        return ["false"]
    script = 'mount -t tmpfs -o ro ffsplit-ro "$0" && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, str(w.dir / "ro")]


@case(
    "output",
    "--out on a read-only filesystem (a read-only tmpfs mounted in a private mount namespace)",
    r"--out: .*/ro is on a read-only filesystem",
    prefix=read_only_mount,
)
def out_read_only(w: Work) -> list[str]:
    (w.dir / "ro").mkdir()
    return ["compress", str(w.inputs.notok), "--out", str(w.dir / "ro" / "out")]


# --- statistics


@case(
    "statistics",
    "statistics metadata that is a JSON list",
    r"/stats\.safetensors: statistics metadata must be a JSON object, got list",
)
def stats_meta_list(w: Work) -> list[str]:
    stats = stats_copy(w)
    edit_tensors(stats, metadata=lambda m: m.update(meta="[1, 2, 3]"))
    return with_stats(w, stats)


@case(
    "statistics",
    "statistics metadata nested 100000 levels deep",
    r"/stats\.safetensors: statistics metadata: JSON nested too deeply",
)
def stats_meta_nested(w: Work) -> list[str]:
    stats = stats_copy(w)
    edit_tensors(stats, metadata=lambda m: m.update(meta="[" * 100_000 + "]" * 100_000))
    return with_stats(w, stats)


@case(
    "statistics",
    "statistics metadata with model_sha256 given twice",
    r"/stats\.safetensors: statistics metadata: duplicate key 'model_sha256'",
)
def stats_meta_duplicate(w: Work) -> list[str]:
    stats = stats_copy(w)
    edit_tensors(
        stats,
        metadata=lambda m: m.update(meta=m["meta"][:-1] + ', "model_sha256": "' + "ab" * 32 + '"}'),
    )
    return with_stats(w, stats)


@case(
    "statistics",
    "statistics model_sha256 that is not a sha256",
    r"/stats\.safetensors: model_sha256 must be a sha256",
)
def stats_sha_not_hex(w: Work) -> list[str]:
    stats = stats_copy(w)

    def change(meta: dict[str, str]) -> None:
        inner = json.loads(meta["meta"])
        inner["model_sha256"] = {"a": 1}
        meta["meta"] = json.dumps(inner)

    edit_tensors(stats, metadata=change)
    return with_stats(w, stats)


@case(
    "statistics",
    "statistics whose hit counts do not add up (hits scaled by 10)",
    r"/stats\.safetensors: layer 0: \d+ hits for \d+ tokens at top-\d+",
)
def stats_hits_forged(w: Work) -> list[str]:
    stats = stats_copy(w)
    edit_tensors(stats, lambda t: t.update({"layer.0.hits": t["layer.0.hits"] * 10}))
    return with_stats(w, stats)


@case(
    "statistics",
    "statistics with negative sums of squares",
    r"/stats\.safetensors: layer 0 holds negative sums, maxima or counts",
)
def stats_negative(w: Work) -> list[str]:
    stats = stats_copy(w)
    edit_tensors(stats, lambda t: t["layer.0.sum_sq"].__setitem__(0, -1.0))
    return with_stats(w, stats)


@case(
    "statistics",
    "statistics with float hit counts",
    r"/stats\.safetensors: layer 0 hits must be integer counts",
)
def stats_float_hits(w: Work) -> list[str]:
    stats = stats_copy(w)
    edit_tensors(stats, lambda t: t.update({"layer.0.hits": t["layer.0.hits"].double()}))
    return with_stats(w, stats)


@case(
    "statistics",
    "statistics mixed from two profiles (sums of squares scaled, Gram left)",
    r"/stats\.safetensors: layer 1: gram_hidden's diagonal is not sum_sq",
)
def stats_mixed(w: Work) -> list[str]:
    stats = stats_copy(w)
    edit_tensors(stats, lambda t: t.update({"layer.1.sum_sq": t["layer.1.sum_sq"] * 4}))
    return with_stats(w, stats)


@case(
    "statistics",
    "statistics file of another model, made by ffsplit profile",
    r"/tiny-llama-tok\.stats\.safetensors: statistics were collected on another model",
)
def stats_from_other_model(w: Work) -> list[str]:
    return compress(
        w, w.inputs.notok, "--stats", str(w.inputs.root / "tiny-llama-tok.stats.safetensors")
    )


@case("statistics", "statistics path is a FIFO", r"/stats\.safetensors: not a regular file")
def stats_fifo(w: Work) -> list[str]:
    os.mkfifo(w.dir / "stats.safetensors")
    return with_stats(w, w.dir / "stats.safetensors")


# ---------------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def results(
    request: pytest.FixtureRequest, inputs: Any, cli: Callable[..., Any], snap: Callable
) -> dict[str, tuple[Any, bool]]:
    """Build every selected case, run them WORKERS at a time; name -> (CliResult, nothing written)."""
    wanted = {
        item.callspec.params["case"].name
        for item in request.session.items
        if hasattr(item, "callspec") and isinstance(item.callspec.params.get("case"), Case)
    }
    root = inputs.root / "cases"
    root.mkdir(exist_ok=True)
    prepared = []
    for c in CASES:
        if c.name in wanted:
            work = Work(inputs, root / c.name)
            work.dir.mkdir()
            prepared.append((c, work, c.build(work), snap(work.dir)))

    def run(job: tuple[Case, Work, list[str], dict]) -> tuple[str, tuple[Any, bool]]:
        c, work, args, before = job
        result = cli(args, cwd=work.dir, prefix=c.prefix(work) if c.prefix else ())
        return c.name, (result, snap(work.dir) == before)

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        return dict(pool.map(run, prepared))


def test_at_least_25_bad_inputs() -> None:
    assert len(CASES) >= 25
    assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"


@pytest.mark.slow  # the whole batch: ~2 s of interpreter start per case, ~5 s with a model
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, results: dict[str, tuple[Any, bool]], record: Callable) -> None:
    result, nothing_written = results[case.name]
    lines = result.stderr_lines
    record(
        kind="bad-input",
        area=case.area,
        what=case.what,
        command=result.command,
        exit_code=result.returncode,
        message=" // ".join(lines) or "(no message)",
        nothing_written=nothing_written,
    )
    assert "Traceback" not in result.stderr and "\u256d" not in result.stderr, result.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{result.stderr}"
    assert result.returncode == 2, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(case.expect, lines[0]), f"{lines[0]!r} does not match {case.expect!r}"
    assert result.stdout == "", result.stdout
    assert nothing_written, "the failed command wrote or left files behind"


def test_long_messages_stay_one_line_on_narrow_terminals(
    inputs: Any, cli: Callable[..., Any], tmp_path: Path
) -> None:
    """Rich must not wrap an error line to the terminal width (soft_wrap)."""
    missing = tmp_path / ("x" * 120)
    result = cli(["eval", str(missing)], cwd=tmp_path, env={"COLUMNS": "40"})
    assert result.returncode == 2
    assert len(result.stderr_lines) == 1, result.stderr
    assert str(missing) in result.stderr_lines[0]
