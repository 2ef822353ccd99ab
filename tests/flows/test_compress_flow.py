"""The compress flow against a real Prefect server, Ray and MLflow (tiny model, real text)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from ffsplit.errors import FFSplitError
from ffsplit.variant import load_variant, read_manifest
from flows.compress import compress

REPO = Path(__file__).resolve().parents[2]
RECIPE = {
    "method": "lowrank",
    "heavy_ratio": 0.1,
    "ffn_reduction": 0.3,
    "profile": {"tokens": 512, "window": 64, "batch_size": 2},
}
SMALL = {"eval_tokens": 256, "eval_window": 64, "profile_units": 4, "compress_shards": 2}


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_compress_registers_one_complete_variant_then_reuses_everything(
    tiny_lm: str, pipeline_env: dict, tmp_path: Path
) -> None:
    first = compress(model=tiny_lm, recipe=RECIPE, register_as="t-compress-flow", **SMALL)
    assert first["cached"] == {"profile": False, "variant": False, "evaluation": False}
    assert set(first["stage_seconds"]) == {
        "validate",
        "ray_start",
        "profile",
        "aggregate",
        "compress",
        "assemble",
        "evaluate",
        "register",
    }
    metrics = first["metrics"]
    assert 0.29 < metrics["ffn_reduction"] < 0.35 and metrics["perplexity"] > 1
    assert {"perplexity_change_pct", "prefill_speedup", "decode_speedup", "bytes"} <= set(metrics)
    model, tokenizer, manifest = load_variant(first["variant"])
    assert manifest["pipeline"]["compress_shards"] == 2 and manifest["calibration"]["units"] == 4
    registered = first["registered"]
    version = _client(pipeline_env["mlflow"]).get_model_version(
        "t-compress-flow", registered["version"]
    )
    assert version.tags["ffsplit.complete"] == "true"
    assert Path(first["run_dir"], "summary.json").is_file()
    # the same inputs again: nothing is profiled, compressed, evaluated or registered anew
    again = compress(model=tiny_lm, recipe=RECIPE, register_as="t-compress-flow", **SMALL)
    assert again["cached"] == {"profile": True, "variant": True, "evaluation": True}
    assert again["registered"]["reused"] and again["registered"]["version"] == registered["version"]
    assert again["metrics"]["perplexity"] == metrics["perplexity"]
    versions = _client(pipeline_env["mlflow"]).search_model_versions("name = 't-compress-flow'")
    assert len(versions) == 1
    # ... and a changed recipe is new work, sharing the statistics
    other = compress(
        model=tiny_lm,
        recipe={**RECIPE, "ffn_reduction": 0.4},
        register_as="t-compress-flow",
        **SMALL,
    )
    assert other["cached"] == {"profile": True, "variant": False, "evaluation": False}
    assert other["registered"]["version"] != registered["version"]


def test_layer_groups_mode_gives_the_same_variant_under_a_memory_cap(
    tiny_lm: str, pipeline_env: dict
) -> None:
    quick = {**SMALL, "register_model": False, "latency": False}
    units = compress(model=tiny_lm, recipe=RECIPE, **quick)
    with pytest.raises(FFSplitError, match="memory_cap_mb.*layer_groups"):
        compress(model=tiny_lm, recipe=RECIPE, memory_cap_mb=4.0, **quick)
    groups = compress(
        model=tiny_lm,
        recipe=RECIPE,
        memory_cap_mb=4.0,
        profile_mode="layer_groups",
        layer_group_size=2,
        **quick,
    )
    assert not groups["cached"]["profile"]  # another mode, other cache keys ...
    a, b = read_manifest(units["variant"]), read_manifest(groups["variant"])
    assert {k: v["heavy"] for k, v in a["layers"].items()} == {
        k: v["heavy"] for k, v in b["layers"].items()
    }  # ... the same statistics, bit for bit
    ma, _, _ = load_variant(units["variant"])
    mb, _, _ = load_variant(groups["variant"])
    sa, sb = ma.state_dict(), mb.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


HEAL = {"steps": 4, "loss": "local", "lr": 1e-3, "tokens": 512, "window": 64, "batch_size": 2}


def test_a_healed_recipe_heals_after_assembly_and_shares_the_compression(
    tiny_lm: str, pipeline_env: dict
) -> None:
    quick = {**SMALL, "latency": False}
    healed = {**RECIPE, "heal": HEAL}
    first = compress(model=tiny_lm, recipe=healed, register_as="t-heal-flow", **quick)
    assert first["cached"] == {
        "profile": False,
        "variant": False,
        "evaluation": False,
        "heal": False,
    }
    assert first["label"] == "lowrank-h0.10-r0.3-heal4-local" and "heal" in first["stage_seconds"]
    manifest = read_manifest(first["variant"])
    assert manifest["recipe"]["heal"]["steps"] == 4 and manifest["heal"]["steps"] == 4
    assert manifest["pipeline"]["compress_shards"] == 2  # the assembled variant's record, kept
    metrics = first["metrics"]
    assert metrics["heal_seconds"] > 0 and metrics["heal_loss_after"] < metrics["heal_loss_before"]
    client = _client(pipeline_env["mlflow"])
    version = client.get_model_version("t-heal-flow", first["registered"]["version"])
    run = client.get_run(version.run_id)
    assert run.data.params["recipe.heal.steps"] == "4"
    assert run.data.metrics["heal_loss_after"] == metrics["heal_loss_after"]
    # the same recipe without healing: the compressed, assembled variant is the one healed above
    plain = compress(model=tiny_lm, recipe=RECIPE, register_model=False, **quick)
    assert plain["cached"] == {"profile": True, "variant": True, "evaluation": False}
    assert plain["variant"] == first["unhealed_variant"] and "heal_seconds" not in plain["metrics"]
    again = compress(model=tiny_lm, recipe=healed, register_as="t-heal-flow", **quick)
    assert again["cached"] == {"profile": True, "variant": True, "evaluation": True, "heal": True}
    assert again["registered"]["reused"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "no-such-model"}, "unknown model 'no-such-model'"),
        ({"recipe": {**RECIPE, "ffn_reduction": 1.5}}, r"recipe.ffn_reduction must be in \(0, 1\)"),
        ({"recipe": {**RECIPE, "heavy_ration": 0.1}}, "unknown key.*'heavy_ration'"),
        ({"profile_units": 64}, "exceeds the 8 calibration windows"),
        ({"eval_tokens": 10}, "eval_tokens"),
        ({"profile_mode": "layer_groups"}, "layer_group_size"),
        (
            {"recipe": {**RECIPE, "profile": {**RECIPE["profile"], "collect_grams": False}}},
            "lowrank.whiten needs Gram matrices",
        ),
        ({"recipe": {**RECIPE, "heal": {"steps": 4, "loss": "mse"}}}, "heal.loss must be one of"),
        # a budget the model's FFN shapes cannot meet: refused before profiling, from the config
        (
            {"recipe": {**RECIPE, "method": "quant", "heavy_ratio": None, "ffn_reduction": 0.95}},
            r"recipe 'quant-.*r0.95'",
        ),
    ],
)
def test_bad_input_fails_before_any_work(
    tiny_lm: str, pipeline_env: dict, changes: dict, message: str
) -> None:
    params = {"model": tiny_lm, "recipe": RECIPE, **SMALL, **changes}
    with pytest.raises(FFSplitError, match=message):
        compress(**params)
    assert not pipeline_env["cache"].exists()


def test_unreachable_services_fail_before_any_work(
    tiny_lm: str, pipeline_env: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(FFSplitError, match="MLflow tracking server .* is unreachable"):
        compress(model=tiny_lm, recipe=RECIPE, **SMALL)
    assert not pipeline_env["cache"].exists()
    # a dead Prefect API: the CLI checks it before creating a flow run at all
    env = {
        **pipeline_env_vars(),
        "PREFECT_API_URL": "http://127.0.0.1:9/api",
        "FFSPLIT_HOME": str(pipeline_env["home"]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "flows.compress", "--model", tiny_lm],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "Prefect API at PREFECT_API_URL=http://127.0.0.1:9/api is not reachable" in done.stderr
    assert "Traceback" not in done.stderr
    assert not pipeline_env["cache"].exists()


def pipeline_env_vars() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
