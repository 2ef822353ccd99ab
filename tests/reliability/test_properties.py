"""Property-based tests of config, statistics and manifest parsing (issue 7).

Whatever a file holds, parsing ends in exactly one of two ways: a valid object, or one
FFSplitError (never a KeyError, TypeError, OverflowError or RecursionError escaping as a
traceback). Valid configs round-trip through to_dict / JSON / from_dict unchanged. The strategies
mix arbitrary JSON with plausible values, so both outcomes are reached (the tests check that too).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ffsplit.config import (
    METHOD_CONFIGS,
    SELECTIONS,
    LowRankConfig,
    ProfileConfig,
    QuantConfig,
    Recipe,
)
from ffsplit.data.corpora import SPLITS
from ffsplit.data.windows import CorpusRef
from ffsplit.errors import FFSplitError
from ffsplit.profiling.stats import load_stats
from ffsplit.variant import load_variant, read_manifest
from ffsplit.variant.manifest import MANIFEST

CONFIG_EXAMPLES = 300
FILE_EXAMPLES = 150
LOAD_EXAMPLES = 60
SETTINGS = {
    "deadline": None,
    "database": None,  # no .hypothesis folder in the repository
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}

# ------------------------------------------------------------------------------- strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
any_keys = st.text(max_size=12) | st.integers()  # YAML mappings may have integer keys
fractions = st.floats(-0.5, 1.5) | st.sampled_from([0, 0.0, 1, 1.0, -0.0, 1e-300, 0.999999])


def config_dicts(plausible: dict[str, st.SearchStrategy]) -> st.SearchStrategy[Any]:
    """Dicts of the config's keys with plausible or arbitrary values, plus typos and non-dicts."""
    known = st.fixed_dictionaries(
        {}, optional={key: value | json_values for key, value in plausible.items()}
    )
    with_unknown = st.builds(
        lambda d, extra: {**extra, **d}, known, st.dictionaries(any_keys, json_values, max_size=2)
    )
    return st.one_of(known, known, with_unknown, json_values)


PROFILE = {
    "version": st.sampled_from([1, 2, 0, "1"]),
    "corpus": st.sampled_from(["wikipedia", "news", "tweets", "/tmp/x.txt", ""]),
    "tokens": st.integers(-5, 10**6) | st.integers(),
    "window": st.integers(-2, 4096),
    "batch_size": st.integers(-1, 5000),
    "hit_top_fraction": fractions,
    "collect_grams": st.booleans(),
}
LOWRANK = {"whiten": st.booleans(), "damp": st.floats(-1, 11) | st.integers(-1, 11)}
QUANT = {
    "heavy_bits": st.sampled_from([16, 8, 4, 16.0, True]),
    "ladder": st.lists(st.integers(0, 10), max_size=5) | st.just([8, 4, 3, 2]),
    "group_size": st.integers(0, 5000) | st.integers(),
    "gptq": st.booleans(),
}
RECIPE = {
    "version": st.sampled_from([1, 2, 3]),
    "method": st.sampled_from([*METHOD_CONFIGS, "zip"]),
    "heavy_ratio": fractions | st.none(),
    "ffn_reduction": fractions,
    "selection": st.sampled_from([*SELECTIONS, "best"]),
    "seed": st.integers(-3, 100) | st.integers(),
    "lowrank": config_dicts(LOWRANK),
    "quant": config_dicts(QUANT),
    "profile": config_dicts(PROFILE),
}
CONFIGS = {
    "Recipe": (Recipe, RECIPE),
    "ProfileConfig": (ProfileConfig, PROFILE),
    "LowRankConfig": (LowRankConfig, LOWRANK),
    "QuantConfig": (QuantConfig, QUANT),
}


def _parse(parse: Callable[[], Any], counts: dict[str, int]) -> Any:
    """parse() must return a value or raise FFSplitError with a one-line message."""
    try:
        value = parse()
    except FFSplitError as exc:
        assert str(exc) and "\n" not in str(exc), repr(str(exc))
        counts["refused"] += 1
        return None
    counts["valid"] += 1
    return value


def _record(record: Callable, area: str, what: str, counts: dict[str, int], examples: int) -> None:
    assert counts["valid"] and counts["refused"], f"the strategy reached only one outcome: {counts}"
    record(
        kind="property",
        area=area,
        what=what,
        message=f"{examples} random examples per run: every one valid or a one-line "
        "FFSplitError; both outcomes reached",
    )


# ------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_from_dict_valid_or_ffsplit_error(name: str, record: Callable) -> None:
    cls, plausible = CONFIGS[name]
    counts = {"valid": 0, "refused": 0}

    @settings(max_examples=CONFIG_EXAMPLES, **SETTINGS)
    @given(data=config_dicts(plausible), where=st.none() | st.just("recipe.yaml"))
    def check(data: Any, where: str | None) -> None:
        config = _parse(lambda: cls.from_dict(data, where=where), counts)
        if config is None:
            return
        as_dict = config.to_dict()
        again = cls.from_dict(json.loads(json.dumps(as_dict, allow_nan=False)))
        assert again == config and again.to_dict() == as_dict

    check()
    _record(
        record,
        "config",
        f"{name}.from_dict(arbitrary dict): a valid config whose to_dict -> JSON -> from_dict "
        "round trip is the identity, or FFSplitError",
        counts,
        CONFIG_EXAMPLES,
    )


def test_corpus_ref_from_dict_valid_or_ffsplit_error(record: Callable) -> None:
    plausible = {
        "corpus": st.sampled_from(["wikipedia", "news", "/abs/file.txt"]),
        "split": st.sampled_from([*SPLITS, "train"]),
        "tokens": st.sampled_from([64, 128, 100, 0, -64]) | st.integers(),
        "window": st.sampled_from([16, 32, 0, -1]) | st.integers(),
        "seed": st.integers(-1, 3),
        "sha256": st.sampled_from(["ab" * 32, "AB" * 32, "a" * 63, ""]),
    }
    complete = st.fixed_dictionaries({k: v | json_values for k, v in plausible.items()})
    counts = {"valid": 0, "refused": 0}

    @settings(max_examples=CONFIG_EXAMPLES, **SETTINGS)
    @given(data=st.one_of(complete, complete, config_dicts(plausible)))
    def check(data: Any) -> None:
        ref = _parse(lambda: CorpusRef.from_dict(data), counts)
        if ref is not None:
            assert CorpusRef.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref

    check()
    _record(
        record,
        "calibration record",
        "CorpusRef.from_dict(arbitrary dict): valid and round-trips, or FFSplitError",
        counts,
        CONFIG_EXAMPLES,
    )


# ---------------------------------------------------------------------------------- manifests


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(variant folder, statistics file) of a tiny Llama, written by save_variant / save_stats."""
    from ffsplit.adapters import get_adapter
    from ffsplit.compress.recipe import compress_model
    from ffsplit.models.tiny import tiny_model
    from ffsplit.profiling import profile_model, save_stats
    from ffsplit.variant import save_variant

    root = tmp_path_factory.mktemp("property-inputs")
    model, _ = tiny_model("LlamaForCausalLM")
    ids = torch.randint(0, 150, (4, 16), generator=torch.Generator().manual_seed(0))
    config = ProfileConfig(tokens=64, window=16, hit_top_fraction=0.05, collect_grams=False)
    stats = profile_model(model, ids, config)
    report, layers = compress_model(
        model,
        stats,
        Recipe(method=LowRankConfig(whiten=False), heavy_ratio=0.1, ffn_reduction=0.3),
    )
    variant = save_variant(
        model,
        None,
        root / "variant",
        adapter=get_adapter(model),
        base_model={"name": "tiny", "weights_sha256": "0" * 64},
        report=report,
        layers=layers,
    )
    return variant, save_stats(stats, root / "stats.safetensors")


@st.composite
def mutated(draw: st.DrawFn, document: Any, depth: int = 5) -> Any:
    """The document with one value somewhere inside replaced by arbitrary JSON, or deleted."""
    if depth == 0 or not isinstance(document, dict | list) or not document:
        return draw(json_values)
    if draw(st.integers(0, 4)) == 0:  # stop here: replace this whole value
        return draw(json_values)
    keys = list(document) if isinstance(document, dict) else list(range(len(document)))
    key = draw(st.sampled_from(keys))
    copy = dict(document) if isinstance(document, dict) else list(document)
    if isinstance(copy, dict) and draw(st.integers(0, 5)) == 0:
        del copy[key]
    else:
        copy[key] = draw(mutated(document[key], depth - 1))
    return copy


def _write_manifest(folder: Path, content: bytes) -> None:
    (folder / MANIFEST).write_bytes(content)


def test_read_manifest_on_arbitrary_bytes_and_json(record: Callable, tmp_path: Path) -> None:
    counts = {"valid": 0, "refused": 0}
    valid = {
        "format": "ffsplit-variant",
        "format_version": 1,
        "base_model": {},
        "adapter": "llama",
        "architecture": "LlamaForCausalLM",
        "recipe": {},
        "layers": {},
        "files": {"model.safetensors": "0" * 64, "config.json": "1" * 64},  # both must be listed
        "sizes": {"dense_ffn_bytes": 1, "ffn_bytes": 1, "ffn_reduction": 0.0},
    }
    documents = (
        st.binary(max_size=200)
        | json_values.map(lambda v: json.dumps(v).encode())
        | mutated(valid).map(lambda v: json.dumps(v).encode())
        | st.just(json.dumps(valid).encode())
    )

    @settings(max_examples=FILE_EXAMPLES, **SETTINGS)
    @given(content=documents)
    def check(content: bytes) -> None:
        _write_manifest(tmp_path, content)
        manifest = _parse(lambda: read_manifest(tmp_path), counts)
        assert manifest is None or isinstance(manifest, dict)

    check()
    _record(
        record,
        "manifest",
        "read_manifest on arbitrary bytes, arbitrary JSON and mutated manifests: "
        "a validated dict or FFSplitError",
        counts,
        FILE_EXAMPLES,
    )


def test_load_variant_with_mutated_manifest(tiny: tuple[Path, Path], record: Callable) -> None:
    """One value anywhere in a real manifest changed: the variant loads, or FFSplitError."""
    variant = tiny[0]
    original = json.loads((variant / MANIFEST).read_text())
    counts = {"valid": 0, "refused": 0}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "variant"
        shutil.copytree(variant, folder)

        @settings(max_examples=LOAD_EXAMPLES, **SETTINGS)
        @given(manifest=mutated(original))
        def check(manifest: Any) -> None:
            _write_manifest(folder, json.dumps(manifest).encode())
            loaded = _parse(lambda: load_variant(folder), counts)
            if loaded is not None:
                model, _, _ = loaded
                with torch.no_grad():
                    logits = model(input_ids=torch.arange(8)[None]).logits
                assert torch.isfinite(logits).all()

        check()
    _record(
        record,
        "manifest",
        "load_variant after one random change anywhere in a real manifest: a working model "
        "or FFSplitError",
        counts,
        LOAD_EXAMPLES,
    )


def test_load_stats_on_arbitrary_and_damaged_files(
    tiny: tuple[Path, Path], record: Callable, tmp_path: Path
) -> None:
    real = tiny[1].read_bytes()
    counts = {"valid": 0, "refused": 0}
    path = tmp_path / "stats.safetensors"

    def safetensors_like(header: Any) -> bytes:
        body = json.dumps(header).encode()
        return len(body).to_bytes(8, "little") + body + bytes(64)

    def damaged(position: int, value: int) -> bytes:
        data = bytearray(real)
        data[position % len(data)] = value
        return bytes(data)

    tensor_entry = st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F64", "I64", "F32", "X"]),
            "shape": st.lists(st.integers(-1, 4), max_size=2),
            "data_offsets": st.lists(st.integers(-1, 80), min_size=2, max_size=2),
        }
    )
    headers = st.dictionaries(
        st.sampled_from(["layer.0.sum_sq", "layer.0.hits", "layer.x.y", "__metadata__", "a"]),
        tensor_entry | json_values,
        max_size=4,
    )
    contents = (
        st.binary(max_size=120)
        | headers.map(safetensors_like)
        | st.builds(damaged, st.integers(0, len(real) - 1), st.integers(0, 255))
        | st.builds(lambda n: real[:n], st.integers(0, len(real)))
    )

    @settings(max_examples=FILE_EXAMPLES, **SETTINGS)
    @given(content=contents)
    def check(content: bytes) -> None:
        path.write_bytes(content)
        stats = _parse(lambda: load_stats(path), counts)
        if stats is not None:
            for layer in stats.layers.values():
                assert torch.isfinite(layer.sum_sq).all() and torch.isfinite(layer.max_abs).all()
                assert layer.sum_sq.shape == layer.max_abs.shape == layer.hits.shape

    check()
    _record(
        record,
        "statistics",
        "load_stats on arbitrary bytes, random safetensors headers and a real statistics file "
        "with one byte changed or cut short: consistent finite statistics or FFSplitError",
        counts,
        FILE_EXAMPLES,
    )
