"""bench/multigpu.py on CPU: the same code the GPU machine ran, on a tiny Llama with real text.

Fast tests cover the pieces (model build, hand-off files, fingerprints, splits); the slow ones run
the profile and compress stages with 1 and then 2 Ray CPU workers and require identical results,
then hand one setting's shards to the CPU-side flow (assemble, evaluate, register in MLflow).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import multigpu  # noqa: E402
from ffsplit.errors import FFSplitError  # noqa: E402
from ffsplit.profiling.stats import LayerStats  # noqa: E402

TINY = multigpu.MODELS["tiny-llama"]


def _stats(seed: int, layers: int = 3) -> dict[int, LayerStats]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(layers):
        s = LayerStats.zeros(50, 20, 2, True)
        s.tokens = 7 + layer
        s.sum_sq.copy_(torch.rand(50, generator=gen, dtype=torch.float64))
        s.max_abs.copy_(torch.rand(50, generator=gen, dtype=torch.float64))
        s.hits.copy_(torch.randint(0, 9, (50,), generator=gen))
        x = torch.rand(9, 20, generator=gen, dtype=torch.float64)
        h = torch.rand(9, 50, generator=gen, dtype=torch.float64)
        s.gram_in.copy_((x.T @ x + (x.T @ x).T) / 2)
        s.gram_hidden.copy_((h.T @ h + (h.T @ h).T) / 2)
        out[layer] = s
    return out


def _equal(a: LayerStats, b: LayerStats) -> bool:
    fields = ("sum_sq", "max_abs", "hits", "gram_in", "gram_hidden")
    return (a.tokens, a.hit_top_k) == (b.tokens, b.hit_top_k) and all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in fields
    )


def test_even_split_matches_the_pipelines_layer_shards() -> None:
    from tasks.compress import layer_shards

    for count in (1, 4, 7, 32):
        for parts in (1, 2, 3, 4, 8, 40):
            assert multigpu.even_split(count, parts) == layer_shards(count, parts)
    assert multigpu.unit_ranges(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_build_model_is_seeded_and_deterministic() -> None:
    a = multigpu.build_model(TINY, "cpu")
    b = multigpu.build_model(TINY, "cpu")
    other = multigpu.build_model(multigpu.ModelSpec(**{**TINY.__dict__, "seed": 1}), "cpu")
    assert multigpu.model_fingerprint(a) == multigpu.model_fingerprint(b)
    assert multigpu.model_fingerprint(a) != multigpu.model_fingerprint(other)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert sum(p.numel() for p in a.parameters()) == multigpu._parameter_count(TINY)
    assert multigpu._parameter_count(multigpu.MODELS["llama2-7b"]) == 6_878_924_800


def test_bit_fingerprint_sees_a_one_bit_change() -> None:
    x = torch.rand(1000, dtype=torch.float64)
    y = x.clone()
    y[517] = torch.nextafter(y[517], torch.tensor(2.0, dtype=torch.float64))
    assert multigpu.bit_fingerprint(x) == multigpu.bit_fingerprint(x.clone())
    assert multigpu.bit_fingerprint(x) != multigpu.bit_fingerprint(y)
    assert multigpu.bit_fingerprint(x) != multigpu.bit_fingerprint(x.flip(0))


@pytest.mark.parametrize("threads", [1, 3])
def test_partials_round_trip_exactly(tmp_path: Path, threads: int) -> None:
    stats = _stats(0)
    writer = multigpu.RawWriter("cpu", threads)
    written = multigpu.write_partial(stats, tmp_path / "p", {"units": [0]}, writer)
    assert written == sum((50 * 3 + 20 * 21 // 2 + 50 * 51 // 2) * 8 for _ in stats)  # packed
    for layer, s in stats.items():
        assert _equal(multigpu.read_partial_layer(tmp_path / "p", layer, "cpu"), s)


def test_grams_travel_as_the_lower_triangle_of_their_symmetric_part() -> None:
    """Half the bytes; a symmetric Gram round-trips exactly, one that differs from its transpose
    in the last bits (as a GEMM's may) comes back as (G + G^T)/2, which whitens the same."""
    from ffsplit.compress.lowrank import whitened_svd

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 12, generator=gen, dtype=torch.float64)
    gram = x.T @ x
    gram = (gram + gram.T) / 2
    packed = multigpu.pack_lower(gram)
    assert packed.numel() == 12 * 13 // 2
    assert torch.equal(multigpu.unpack_lower(packed, 12), gram)
    skewed = gram.clone()
    skewed[0, 5] += 1e-9
    back = multigpu.unpack_lower(multigpu.pack_lower(skewed), 12)
    assert torch.equal(back, back.T) and torch.equal(back, (skewed + skewed.T) / 2)
    weight = torch.randn(7, 12, generator=gen)
    a = whitened_svd(weight, 3, skewed, 64)
    b = whitened_svd(weight, 3, back, 64)
    assert torch.allclose(a.a @ a.b, b.a @ b.b, rtol=0, atol=1e-6)
    with pytest.raises(FFSplitError, match="packed triangle holds 78 values, not 66"):
        multigpu.unpack_lower(packed, 11)


def test_preallocated_partials_are_written_in_place(tmp_path: Path) -> None:
    stats = _stats(6)
    allocated = multigpu.preallocate_partial(stats, tmp_path / "p")
    layout = multigpu.partial_layout(stats)
    assert allocated == sum(layout.values())
    assert {f.name: f.stat().st_size for f in (tmp_path / "p").iterdir()} == layout
    inode = (tmp_path / "p" / "0.gram_hidden.bin").stat().st_ino
    written = multigpu.write_partial(stats, tmp_path / "p", {}, multigpu.RawWriter("cpu", 2))
    assert written == allocated and (tmp_path / "p" / "0.gram_hidden.bin").stat().st_ino == inode
    for layer, s in stats.items():
        assert _equal(multigpu.read_partial_layer(tmp_path / "p", layer, "cpu"), s)
    (tmp_path / "q").mkdir()  # a stale, longer file is cut to the written size
    (tmp_path / "q" / "0.sum_sq.bin").write_bytes(b"x" * 10_000)
    multigpu.write_partial(stats, tmp_path / "q", {})
    assert _equal(multigpu.read_partial_layer(tmp_path / "q", 0, "cpu"), stats[0])


def test_staged_writes_in_chunks_round_trip(tmp_path: Path) -> None:
    """The GPU path's chunk loop (staging buffer smaller than a tensor), run with CPU buffers."""
    writer = multigpu.RawWriter("cpu", 2, chunk_bytes=1000)
    writer.staging = [torch.empty(1000, dtype=torch.uint8) for _ in range(2)]
    stats = _stats(1)
    multigpu.write_partial(stats, tmp_path / "p", {}, writer)
    for layer, s in stats.items():
        assert _equal(multigpu.read_partial_layer(tmp_path / "p", layer, "cpu"), s)


def test_merged_layer_folds_ranges_in_order(tmp_path: Path) -> None:
    from ffsplit.profiling.stats import merge

    parts = [_stats(seed) for seed in (2, 3, 4)]
    folders = []
    for i, stats in enumerate(parts):
        multigpu.write_partial(stats, tmp_path / f"p{i}", {})
        folders.append(tmp_path / f"p{i}")
    merged = multigpu.merged_layer(folders, 1, "cpu")
    assert _equal(merged, merge(merge(parts[0][1], parts[1][1]), parts[2][1]))


def test_unfinished_partials_and_missing_layers_are_errors(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    with pytest.raises(FFSplitError, match="did not finish"):
        multigpu.read_partial_layer(tmp_path / "p", 0, "cpu")
    multigpu.write_partial(_stats(0, layers=1), tmp_path / "q", {})
    with pytest.raises(FFSplitError, match="no statistics for layer 5"):
        multigpu.read_partial_layer(tmp_path / "q", 5, "cpu")


def test_bad_bench_configs_are_errors() -> None:
    with pytest.raises(FFSplitError, match="--model"):
        multigpu.BenchConfig(model="gpt-9")
    with pytest.raises(FFSplitError, match="--ranges"):
        multigpu.BenchConfig(units=4, ranges=5)
    with pytest.raises(FFSplitError, match="multiple of --units"):
        multigpu.BenchConfig(sequences=10, units=4)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The benchmark with 1, then 2 Ray CPU workers on a tiny Llama and real calibration text."""
    from tasks.runtime import ray_session

    root = tmp_path_factory.mktemp("multigpu")
    calibration = root / "calibration.safetensors"
    multigpu.prepare_calibration(calibration, sequences=16, window=128)
    config = multigpu.BenchConfig(
        model="tiny-llama", sequences=16, window=128, units=4, ranges=2, shards=3, batch_size=2
    )
    with ray_session(num_cpus=2):
        result = multigpu.run_benchmark(
            config,
            [1, 2],
            gpus=False,
            scratch=root / "scratch",
            work=root / "work",
            calibration=calibration,
            json_path=root / "result.json",
        )
        base = multigpu.save_base_model(TINY, root / "base")
        mlflow_uri = f"sqlite:///{root / 'mlflow.db'}"
        finished = multigpu.finish_on_cpu(
            result,
            "2cpu",
            base,
            root / "cpu-side",
            model_name="ffsplit-multigpu-test",
            mlflow_uri=mlflow_uri,
            eval_tokens=512,
            eval_window=128,
        )
    return {"root": root, "result": result, "finished": finished, "mlflow_uri": mlflow_uri}


@pytest.mark.slow
def test_one_and_two_workers_give_identical_results(cpu_run: dict) -> None:
    result = cpu_run["result"]
    assert set(result["settings"]) == {"1cpu", "2cpu"}
    one, two = result["settings"]["1cpu"], result["settings"]["2cpu"]
    assert (one["workers"], two["workers"]) == (1, 2)
    # Two workers really ran the two ranges side by side (two processes).
    assert len({t["pid"] for t in two["profile_tasks"]}) == 2
    assert len({t["pid"] for t in one["profile_tasks"]}) == 1
    comparison = result["comparison"]
    assert comparison["same_model_weights"] and comparison["stats_bitwise_equal"]
    assert comparison["weights_bitwise_equal"]
    assert result["max_abs_diff_1v2"] == 0.0
    assert [t["weights_sha256"] for t in one["compress_tasks"]] == [
        t["weights_sha256"] for t in two["compress_tasks"]
    ]
    # Every calibration token profiled, every layer compressed, once.
    assert one["profile_tokens"] == two["profile_tokens"] == 16 * 128
    layers = sorted(layer for t in two["compress_tasks"] for layer in t["layers"])
    assert layers == list(range(TINY.layers))
    for key in ("profile_tokens_per_s_1cpu", "profile_tokens_per_s_2cpu", "total_s_2cpu"):
        assert math.isfinite(result[key]) and result[key] > 0
    # The JSON on disk is the returned record.
    assert json.loads((cpu_run["root"] / "result.json").read_text()) == json.loads(
        json.dumps(result)
    )


@pytest.mark.slow
def test_statistics_equal_profiling_the_whole_set_in_one_pass(cpu_run: dict) -> None:
    """The merged ranges agree with the library's one-pass profile (float rounding apart)."""
    from safetensors.torch import load_file

    from ffsplit.config import ProfileConfig
    from ffsplit.profiling import profile_model

    result = cpu_run["result"]
    ids, _ = multigpu.load_calibration(cpu_run["root"] / "calibration.safetensors", 16, 128)
    order = torch.cat([ids[u::4] for u in range(4)])  # the units' windows, in unit order
    config = ProfileConfig.from_dict(result["recipe"]["profile"])
    whole = profile_model(multigpu.build_model(TINY, "cpu"), order, config)
    for shard in result["settings"]["1cpu"]["shards"]:
        probe = load_file(f"{shard}.probe.safetensors")
        for key, value in probe.items():
            _, layer, name = key.split(".", 2)
            stats = whole.layers[int(layer)]
            expected = {
                "sum_sq": stats.sum_sq,
                "max_abs": stats.max_abs,
                "hits": stats.hits.double(),
                "gram_in.diag": stats.gram_in.diagonal(),
                "gram_hidden.diag": stats.gram_hidden.diagonal(),
            }.get(name)
            if expected is not None:
                torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_cpu_side_flow_assembles_evaluates_and_registers(cpu_run: dict) -> None:
    from mlflow import MlflowClient

    from ffsplit.variant.manifest import read_manifest

    finished = cpu_run["finished"]
    variant = Path(finished["variant"]["path"])
    manifest = read_manifest(variant)
    assert manifest["recipe"] == cpu_run["result"]["recipe"]
    shards = cpu_run["result"]["settings"]["2cpu"]["compress_tasks"]
    expected = 1 - sum(t["bytes"] for t in shards) / sum(t["dense_bytes"] for t in shards)
    assert finished["variant"]["ffn_reduction"] == pytest.approx(expected)
    assert math.isfinite(finished["metrics"]["perplexity"])
    client = MlflowClient(tracking_uri=cpu_run["mlflow_uri"], registry_uri=cpu_run["mlflow_uri"])
    version = client.get_model_version("ffsplit-multigpu-test", finished["registered"]["version"])
    assert version.status == "READY"
