"""Bad inputs through the real CLI (issue 7): each must give exit code 2, exactly one line on stderr
that names the offending file, key or value, no traceback, nothing on stdout, and nothing written.

Each case builds its bad input in a folder of its own, next to the --out path; a snapshot of that
folder before and after the command proves nothing was written (no output, no temp leftovers).
The commands run in subprocesses, two at a time (startup dominates: ~2 s importing torch and
transformers, ~3 s more when a model loads).
"""

from __future__ import annotations

import json
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


CASES: list[Case] = []


def case(area: str, what: str, expect: str) -> Callable[[Callable[[Work], list[str]]], Any]:
    """Register the decorated builder (name from the function) as a bad-input case."""

    def register(build: Callable[[Work], list[str]]) -> Callable[[Work], list[str]]:
        CASES.append(Case(build.__name__.replace("_", "-"), area, what, build, expect))
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


@case("options", "--out folder already exists", r"output folder .*/out already exists")
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


@case(
    "model", "config.json is not JSON", r"model folder .*/model: config\.json is not readable JSON"
)
def config_not_json(w: Work) -> list[str]:
    model = w.copy(w.inputs.notok, "model")
    (model / "config.json").write_text('{"architectures": ["Llama', encoding="utf-8")
    return compress(w, model)


@case(
    "model",
    "unknown architecture (model_type unknown to transformers)",
    r"could not load model folder .*/model: .*model type `foo`",
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
    r"model folder .*/model: a \*\.safetensors file is corrupt or truncated",
)
def truncated_weights(w: Work) -> list[str]:
    model = w.copy(w.inputs.notok, "model")
    truncate(model / "model.safetensors")
    return compress(w, model)


@case(
    "model",
    "model.safetensors of random bytes",
    r"model folder .*/model: a \*\.safetensors file is corrupt or truncated",
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
    r"model folder .*/model: a \*\.safetensors file is corrupt or truncated",
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
    r"model folder .*/model: tokenizer files are unreadable",
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
    '{"quant": {"bitz": 4}}',
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
    '{"version": 2}',
    r"/recipe\.json: format version 2 is not supported",
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
    '{"quant": {"group_size": 1000000000}}',
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
    MANIFEST_AT + r"sizes\.dense_ffn_bytes must be a finite number",
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
        result = cli(args, cwd=work.dir)
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
