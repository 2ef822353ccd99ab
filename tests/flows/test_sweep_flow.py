"""The sweep flow: grid + baselines, dense/champion aliases, Pareto chart, cache reuse, and a run
killed midway (SIGKILL) that finishes on restart without redoing finished work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from ffsplit.errors import FFSplitError
from flows.sweep import DEFAULT_BASELINES, build_grid, sweep
from tracking.registry import choose_champion

REPO = Path(__file__).resolve().parents[2]
GRID = {
    "methods": ["lowrank", "quant"],
    "heavy_ratios": [0.1],
    "budgets": [0.3],
    "baselines": ["uniform", "random", "prune"],
    "calib_tokens": 512,
    "calib_window": 64,
    "eval_tokens": 256,
    "eval_window": 64,
    "profile_units": 4,
    "compress_shards": 2,
    "recipe_defaults": {"quant": {"group_size": 32}},
    "quality_budget_pct": 5.0,
    # the latency race is exercised by the compress flow test; here the champion is the smallest
    "latency": False,
    "champion_objective": "size",
}
SERIES = [
    "dense",
    "ffsplit-lowrank",
    "ffsplit-quant",
    "uniform-lowrank",
    "random-lowrank",
    "uniform-quant",
    "random-quant",
    "prune",
]


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_grid_has_every_point_and_the_baselines_at_equal_budgets() -> None:
    profile = {"tokens": 512, "window": 64}
    grid = build_grid(
        ["lowrank", "quant"], [0.05, 0.1], [0.3, 0.5], ["uniform", "random", "prune"], profile
    )
    labels = [r.label for r in grid]
    # FFSplit: low-rank per heavy ratio and budget, quant per budget (its allocation sizes the
    # heavy set); uniform per method and budget; random per method, ratio and budget; pruning
    assert len(labels) == len(set(labels)) == 4 + 2 + 4 + 8 + 2
    assert {r.ffn_reduction for r in grid} == {0.3, 0.5}
    assert sum(r.baseline is None for r in grid) == 6
    quant = [r for r in grid if r.method_name == "quant"]
    assert {(r.baseline, r.method.allocation) for r in quant} == {
        (None, "layer"),
        ("uniform", "two-level"),
        ("random", "two-level"),
    }
    two_level = build_grid(
        ["quant"], [0.1], [0.3], [], profile, {"quant": {"allocation": "two-level"}}
    )
    assert [r.label for r in two_level] == ["quant-h0.10-r0.3"]
    assert sum(r.baseline == "random" for r in grid) == 8  # same heavy sizes, random sets
    assert all(r.profile.tokens == 512 for r in grid)
    assert len(build_grid(["quant", "quant"], [0.1], [0.3, 0.3], [], profile)) == 1


def test_grid_adds_the_outlier_baseline_on_request_and_for_quant_only() -> None:
    """The column-outlier baseline: not in the default grid; asked for, one quant recipe per
    heavy ratio (its share of input columns kept bf16) and budget; low-rank has none (skipped)."""
    profile = {"tokens": 512, "window": 64}
    assert DEFAULT_BASELINES == ["uniform", "random", "prune"]
    methods, ratios, budgets = ["lowrank", "quant"], [0.01, 0.1], [0.3, 0.5]
    plain = build_grid(methods, ratios, budgets, DEFAULT_BASELINES, profile)
    grid = build_grid(
        methods,
        ratios,
        budgets,
        [*DEFAULT_BASELINES, "outlier"],
        profile,
        {"quant": {"ladder": [4, 3, 2]}},
    )
    outlier = [r for r in grid if r.baseline == "outlier"]
    assert len(grid) == len(plain) + 4 == 24
    assert {(r.method_name, r.heavy_ratio, r.ffn_reduction) for r in outlier} == {
        ("quant", rho, budget) for rho in ratios for budget in budgets
    }
    assert {(r.series, r.method.allocation, r.method.ladder) for r in outlier} == {
        ("outlier-quant", "two-level", (4, 3, 2))
    }
    assert "quant-outlier-h0.01-r0.5" in {r.label for r in outlier}
    only_lowrank = build_grid(["lowrank"], [0.1], [0.3], ["outlier"], profile)
    assert [r.label for r in only_lowrank] == ["lowrank-h0.10-r0.3"]


def test_sweep_registers_every_variant_sets_aliases_then_reuses_everything(
    tiny_lm: str, pipeline_env: dict
) -> None:
    name = f"t-sweep-{uuid.uuid4().hex[:6]}"
    result = sweep(model=tiny_lm, register_as=name, **GRID)
    rows = result["rows"]
    assert [r["series"] for r in rows] == SERIES
    assert not result["stats"]["cached"] and not any(r["cached"] for r in rows)
    client = _client(pipeline_env["mlflow"])
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(int(v.version) for v in versions) == sorted(int(r["version"]) for r in rows)
    assert str(client.get_model_version_by_alias(name, "dense").version) == rows[0]["version"]
    assert rows[0]["aliases"] == ["dense"] and rows[0]["ffn_reduction"] == 0.0
    for row in rows[1:]:
        assert abs(row["ffn_reduction"] - 0.3) < 0.05, row["label"]
        assert row["perplexity"] > 1 and row["bytes"] < rows[0]["bytes"]
    expected = choose_champion([{**r, "name": name} for r in rows[1:]], 5.0, "size")
    if expected is None:
        assert result["champion"] is None
    else:
        champion = client.get_model_version_by_alias(name, "champion")
        assert str(champion.version) == expected["version"] == result["champion"]["version"]
        assert (
            abs(expected["perplexity_change_pct"]) <= 5.0 or expected["perplexity_change_pct"] < 0
        )
    folder = Path(result["run_dir"])
    assert (folder / "pareto.png").stat().st_size > 1000
    assert "| series |" in (folder / "results.md").read_text()
    assert json.loads((folder / "results.json").read_text())["dense_version"] == rows[0]["version"]
    artifacts = {f.path for f in client.list_artifacts(versions[0].run_id, "plots")}
    assert {"plots/pareto.png", "plots/scores.png"} <= artifacts
    # the same sweep again: every stage is a cache hit and every version is reused
    again = sweep(model=tiny_lm, register_as=name, **GRID)
    assert again["stats"]["cached"] and all(r["cached"] for r in again["rows"])
    assert [r["version"] for r in again["rows"]] == [r["version"] for r in rows]
    assert all(r["reused"] for r in again["rows"])
    assert len(client.search_model_versions(f"name = '{name}'")) == len(rows)
    assert again["stage_seconds"]["profile"] < result["stage_seconds"]["profile"]


def _token_processes(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FFSPLIT_TEST_TOKEN") == token:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def test_a_sweep_killed_midway_finishes_on_restart_without_redoing_work(
    tiny_lm: str, pipeline_env: dict, tmp_path: Path
) -> None:
    name = f"t-resume-{uuid.uuid4().hex[:6]}"
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "flows.sweep",
        "run",
        "--model",
        tiny_lm,
        "--methods",
        "lowrank,quant",
        "--heavy-ratios",
        "0.1",
        "--budgets",
        "0.3",
        "--baselines",
        "uniform,random,prune",
        "--calib-tokens",
        "512",
        "--calib-window",
        "64",
        "--eval-tokens",
        "256",
        "--eval-window",
        "64",
        "--profile-units",
        "4",
        "--compress-shards",
        "2",
        "--recipe-defaults",
        json.dumps(GRID["recipe_defaults"]),
        "--no-latency",
        "--objective",
        "size",
        "--register-as",
        name,
        "--run-dir",
        str(run_dir),
    ]
    token = uuid.uuid4().hex
    env = {**os.environ, "PREFECT_API_URL": pipeline_env["prefect"], "FFSPLIT_TEST_TOKEN": token}
    evals = pipeline_env["cache"] / "evals"
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 600
        while not (evals.is_dir() and any(evals.glob("*.json"))):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no evaluation finished in time"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the flow process and its group, mid-sweep
        proc.wait(timeout=60)
        for leftover in _token_processes(token):  # Ray's processes leave the group
            leftover.kill()
        psutil.wait_procs(_token_processes(token), timeout=30)
        log.close()
    assert _token_processes(token) == []
    assert not (run_dir / "results.json").exists()
    done_before = {p.name for p in evals.glob("*.json")}
    assert 1 <= len(done_before) < 8
    shards_before = {
        p.name for p in (pipeline_env["cache"] / "shards").iterdir() if not p.name.startswith(".")
    }
    # started again (here, in-process): it finishes, and what was finished is a cache hit
    result = sweep(
        model=tiny_lm,
        register_as=name,
        run_dir=str(run_dir),
        **GRID,
    )
    assert result["stats"]["cached"]
    rows = result["rows"]
    assert [r["series"] for r in rows] == SERIES and all(r.get("version") for r in rows)
    evaluated_before = [r for r in rows if Path(r["eval_record"]).name in done_before]
    assert len(evaluated_before) == len(done_before)
    assert all(r["cached"] for r in evaluated_before)
    assert shards_before <= {p.name for p in (pipeline_env["cache"] / "shards").iterdir()}
    versions = _client(pipeline_env["mlflow"]).search_model_versions(f"name = '{name}'")
    assert len(versions) == len(rows)  # nothing registered twice, nothing half-registered
    assert all(v.tags.get("ffsplit.complete") == "true" for v in versions)
    assert (run_dir / "results.json").is_file()


def test_sweep_heals_every_variant_through_recipe_defaults(
    tiny_lm: str, pipeline_env: dict
) -> None:
    name = f"t-heal-sweep-{uuid.uuid4().hex[:6]}"
    heal = {"steps": 3, "lr": 1e-3, "tokens": 512, "window": 64, "batch_size": 2}
    grid = {**GRID, "methods": ["lowrank"], "baselines": ["prune"]}
    result = sweep(model=tiny_lm, register_as=name, **{**grid, "recipe_defaults": {"heal": heal}})
    rows = result["rows"]
    assert [r["label"] for r in rows] == [
        "dense",
        "lowrank-h0.10-r0.3-heal3-kl",
        "prune-r0.3-heal3-kl",
    ]
    assert "heal" in result["stage_seconds"]
    assert "heal_seconds" not in rows[0] and all(r["heal_seconds"] > 0 for r in rows[1:])
    client = _client(pipeline_env["mlflow"])
    for row in rows[1:]:
        assert "/healed/" in row["variant"]
        version = client.get_model_version(name, row["version"])
        run = client.get_run(version.run_id)
        assert run.data.params["recipe.heal.steps"] == "3"
        # provenance: where the run wrote, and a call that reruns it (here: in-process)
        assert run.data.tags["ffsplit.run_dir"] == result["run_dir"]
        command = run.data.tags["ffsplit.command"]
        assert command.startswith("flows.sweep.sweep(**") and '"heal": {"batch_size": 2' in command
        assert run.data.tags["ffsplit.flow_run_id"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"budgets": [0.3, 1.5]}, r"budgets: 1.5 is not a number in \(0, 1\)"),
        ({"baselines": ["uniform", "bogus"]}, "unknown baselines"),
        ({"methods": ["prune"]}, "unknown methods"),
        ({"quality_budget_pct": -1.0}, "quality_budget_pct"),
        ({"champion_objective": "fast"}, "champion_objective"),
        ({"recipe_defaults": {"quant": {"bits": 3}}}, "unknown key.*'bits'"),
        ({"recipe_defaults": {"method": "quant"}}, "may not set 'method'"),
        ({"recipe_defaults": {"heal": {"steps": 3}}}, "nothing to train for method 'quant'"),
        ({"model": "no-such-model"}, "unknown model"),
        ({"budgets": [0.3, 0.95]}, r"recipe '.*0.95"),  # no FFN shape can meet it
    ],
)
def test_bad_sweep_parameters_fail_before_any_work(
    tiny_lm: str, pipeline_env: dict, changes: dict, message: str
) -> None:
    with pytest.raises(FFSplitError, match=message):
        sweep(**{"model": tiny_lm, **GRID, **changes})
    assert not pipeline_env["cache"].exists()
