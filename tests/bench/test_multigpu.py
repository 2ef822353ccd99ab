"""bench/multigpu.py on CPU: the flows' own stages with 1, then 2 Ray CPU workers on a tiny Llama with
real calibration text must give bitwise-equal statistics and shard weights (issues 5 and 15).

Fast tests cover the model build and the recipe's budget; the slow one runs both settings.
"""

from __future__ import annotations

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

TINY = multigpu.MODELS["tiny-llama"]


def test_model_specs_and_parameter_counts() -> None:
    assert multigpu.MODELS["llama2-7b"].parameters == 6_878_924_800
    eight = multigpu.model_spec("llama2-7b", 8)
    assert (eight.hidden, eight.intermediate, eight.heads, eight.layers) == (4096, 11008, 32, 8)
    assert eight.name == "llama2-7b-8l"
    assert multigpu.model_spec("llama2-7b", 32) == multigpu.MODELS["llama2-7b"]
    with pytest.raises(FFSplitError, match="model must be one of"):
        multigpu.model_spec("gpt-9")
    with pytest.raises(FFSplitError, match="layers must be >= 1"):
        multigpu.model_spec("llama2-7b", 0)


def test_build_model_is_seeded_and_deterministic() -> None:
    a = multigpu.build_model(TINY, "cpu")
    b = multigpu.build_model(TINY, "cpu")
    other = multigpu.build_model(multigpu.ModelSpec(**{**TINY.__dict__, "seed": 1}), "cpu")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(
        torch.equal(p, q) for p, q in zip(a.parameters(), other.parameters(), strict=True)
    )
    assert sum(p.numel() for p in a.parameters()) == TINY.parameters
    assert next(a.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(4096, 11008), (64, 176)])
def test_all_int4_budget_puts_every_light_neuron_at_int4(shape: tuple[int, int]) -> None:
    """The recipe's budget is where the solver gives light neurons int4 and nothing else."""
    from ffsplit.compress.budget import FFNShape, solve_light_bits
    from ffsplit.selection import heavy_count

    d, m = shape
    target = multigpu.all_int4_reduction(d, m, 0.1, 64)
    heavy = heavy_count(m, 0.1)
    bits = solve_light_bits(FFNShape(d=d, m=m, gated=True), heavy, 16, target, 64, ladder=(4,))
    assert bits == {4: m - heavy}
    assert 0.6 < target < 0.65


def test_bench_config_refuses_more_units_than_windows() -> None:
    config = multigpu.BenchConfig(units=5, profile={"tokens": 512, "window": 128})
    with pytest.raises(FFSplitError, match="5 units need 5 calibration windows"):
        config.parsed()


_RUN = """
import json, sys
from dataclasses import replace
from pathlib import Path
from bench import multigpu
from ffsplit.models.registry import materialize

root = Path(sys.argv[1])
spec = replace(multigpu.MODELS["tiny-llama"], dtype="float32")
built = multigpu.build_model_folder(spec, root / "model", materialize("smollm2-135m"), "cpu")
config = multigpu.BenchConfig(
    units=4,
    shards=3,
    profile={"tokens": 16 * 128, "window": 128, "batch_size": 2},
    recipe={"method": "lowrank", "heavy_ratio": 0.1, "ffn_reduction": 0.3},
)
multigpu.run_benchmark(
    Path(built["path"]), config, [1, 2], gpus=False, work=root / "runs",
    json_path=root / "result.json",
)
"""


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """1 then 2 Ray CPU workers, the pipeline's stages, lowrank with Grams (a strict test). In a
    process of its own: each setting starts its own Ray, and this session may hold one already."""
    import json
    import os
    import subprocess

    root = tmp_path_factory.mktemp("multigpu")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _RUN, str(root)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "result": json.loads((root / "result.json").read_text())}


@pytest.mark.slow
def test_one_and_two_workers_give_bitwise_equal_statistics_and_shards(cpu_run: dict) -> None:
    result = cpu_run["result"]
    one, two = result["settings"]["1cpu"], result["settings"]["2cpu"]
    assert "error" not in one and "error" not in two, (one.get("error"), two.get("error"))
    assert (one["cluster"]["cpus"], two["cluster"]["cpus"]) == (1.0, 2.0)
    comparison = result["comparison"]
    assert comparison["between"] == ["1cpu", "2cpu"]
    assert comparison["unit_stats_bitwise_equal"] and comparison["merged_stats_bitwise_equal"]
    assert comparison["shard_weights_bitwise_equal"]
    assert len(comparison["per_unit"]) == 4 and len(comparison["per_shard"]) == 3
    # Every calibration token profiled once, every layer compressed once, with Grams.
    assert one["profile_tokens"] == two["profile_tokens"] == 16 * 128
    layers = sorted(layer for shard in two["shards"] for layer in shard["layers"])
    assert layers == list(range(TINY.layers))
    assert all(u["device"] == "cpu" and u["threads"] == 1 for u in one["units"] + two["units"])
    assert all(s["device"] == "cpu" for s in one["shards"] + two["shards"])
    for key in ("profile_scaling", "compress_scaling", "stage_scaling"):
        assert math.isfinite(result[key]) and result[key] > 0


@pytest.mark.slow
def test_the_settings_used_separate_caches(cpu_run: dict) -> None:
    """Equal results must come from two computations, not one cache read twice."""
    one, two = (cpu_run["result"]["settings"][k] for k in ("1cpu", "2cpu"))
    assert all(not u["cached"] for u in one["units"] + two["units"])
    assert {u["path"] for u in one["units"]}.isdisjoint({u["path"] for u in two["units"]})
    assert [Path(u["path"]).name for u in one["units"]] == [
        Path(u["path"]).name for u in two["units"]
    ]
