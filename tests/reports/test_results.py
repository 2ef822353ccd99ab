"""reports/results.py and flows/results.py: the results page from MLflow runs (issue 6).

Pure rows exercise the section builders (trade-off verdicts, the "does not beat" list, dedup,
heavy-ratio transfer, goals, healing); one test registers tiny variants in a real sqlite MLflow
store through tracking.registry.register_variant and reads them back into a written page.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from ffsplit.config import ProfileConfig, QuantConfig, Recipe
from ffsplit.errors import FFSplitError
from ffsplit.variant.manifest import flat_params
from flows import results as results_flow
from reports import results
from reports.results import Column, Row

TWO_LEVEL = QuantConfig(allocation="two-level")
# what a quant recipe of versions 1 and 2 was made with (the defaults before the allocation)
V2_QUANT = QuantConfig(
    ladder=(8, 4, 3, 2), allocation="two-level", gptq=False, act_order=False, gptq_down=False
)

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def row(
    series: str,
    budget: float,
    loss: float,
    *,
    rho: float = 0.1,
    achieved: float | None = None,
    model: str = "lm",
    setting: str = "",
    key: str | None = None,
    start: int = 0,
    heal: int = 0,
    param_cut: float | None = None,
) -> Row:
    method = "prune" if series == "prune" else series.split("-", 1)[1]
    if series.startswith("uniform") or series == "prune":
        rho = 0.0
    achieved = budget if achieved is None else achieved
    return Row(
        model=model,
        run_id=key or f"{series}-{rho}-{budget}-{loss}",
        label=f"{series}-h{rho}-r{budget}",
        series=series,
        method=method,
        heavy_ratio=rho,
        budget=budget,
        metrics={"perplexity": 10 * (1 + loss / 100), "ffn_reduction": achieved},
        setting=setting,
        heal_steps=heal,
        start_time=start,
        variant_key=key or "",
        loss=loss,
        ffn_param_reduction=param_cut,
    )


def flat(recipe: Recipe) -> dict[str, str]:
    return flat_params({"recipe": recipe.to_dict(), "git_commit": "abc"})


# ------------------------------------------------------------------------------------ rows


def test_row_from_run_reads_recipe_setting_and_heal() -> None:
    params = flat(Recipe(method="lowrank", heavy_ratio=0.05, ffn_reduction=0.431))
    r = results.row_from_run(
        model="lm", run_id="r1", run_name="x", params=params, metrics={}, tags={}
    )
    assert (r.series, r.method, r.heavy_ratio, r.budget) == (
        "ffsplit-lowrank",
        "lowrank",
        0.05,
        0.431,
    )
    assert r.setting == "" and not r.healed and r.git_commit == "abc"
    for recipe, series in (
        (Recipe(method=TWO_LEVEL, selection="none"), "uniform-quant"),
        (Recipe(method=TWO_LEVEL, selection="random"), "random-quant"),
        (Recipe(method="prune"), "prune"),
        (Recipe(method="prune", selection="random"), "prune-random"),
        (Recipe(method="none", selection="none", ffn_reduction=0.0), "dense"),
        (Recipe(method="none", heavy_ratio=0.2, ffn_reduction=0.0), "split"),  # not a reference
    ):
        got = results.row_from_run(
            model="lm", run_id="r", run_name="", params=flat(recipe), metrics={}, tags={}
        )
        assert (got.series, got.label, got.heavy_ratio) == (series, recipe.label, recipe.heavy)
    # Options other than the grid make the setting; healing comes from the recipe.
    quant = Recipe.from_dict(
        {
            "method": "quant",
            "quant": {"gptq": False},
            "ffn_reduction": 0.3,
            "profile": {"tokens": 16384},
            "heal": {"steps": 200},
        }
    )
    r = results.row_from_run(
        model="lm", run_id="r", run_name="", params=flat(quant), metrics={}, tags={}
    )
    assert r.heal_steps == 200 and r.healed
    assert r.setting == "heal.steps=200, profile.tokens=16384, quant.gptq=False"
    # Healing off: its other options do not split the setting.
    off = quant.replace(heal=quant.heal.replace(steps=0, lr=0.5))
    r = results.row_from_run(
        model="lm", run_id="r", run_name="", params=flat(off), metrics={}, tags={}
    )
    assert not r.healed and r.setting == "profile.tokens=16384, quant.gptq=False"


def test_recipe_params_round_trip_and_unreadable_ones_name_the_run() -> None:
    recipes = [
        Recipe(),
        Recipe(method=TWO_LEVEL, selection="none", ffn_reduction=0.5),
        Recipe.from_dict({"method": "quant", "quant": {"ladder": [4, 2], "gptq": True}}),
        Recipe(method="lowrank", selection="random", seed=3, heavy_ratio=0.25),
        Recipe.from_dict({"method": "lowrank", "heal": {"steps": 20, "loss": "local", "lr": 1e-3}}),
        Recipe(method="prune", selection="random"),
        Recipe(method="none", selection="none", ffn_reduction=0.0),
    ]
    for recipe in recipes:
        assert results.recipe_from_params(flat(recipe)) == recipe
    assert results.recipe_from_params({"git_commit": "abc"}) is None
    # A version-1 recipe (heavy ratio 0 = uniform) migrates; a newer one is refused, naming the run.
    old = {"recipe.version": "1", "recipe.method": "quant", "recipe.heavy_ratio": "0.0"}
    assert results.recipe_from_params(old) == Recipe(method=V2_QUANT, selection="none")
    newer = flat(Recipe()) | {"recipe.version": "4"}
    with pytest.raises(FFSplitError, match=r"run r9 \(v\) of lm: .*version 4"):
        results.row_from_run(
            model="lm", run_id="r9", run_name="v", params=newer, metrics={}, tags={}
        )


def test_dedupe_keeps_the_latest_run_of_a_variant() -> None:
    old = row("ffsplit-lowrank", 0.3, 5.0, key="k1", start=1)
    new = row("ffsplit-lowrank", 0.3, 4.0, key="k1", start=2)
    other_model = row("ffsplit-lowrank", 0.3, 9.0, key="k1", start=0, model="lm2")
    kept, dropped = results.dedupe([new, old, other_model])
    assert dropped == 1
    assert sorted((r.model, r.loss) for r in kept) == [("lm", 4.0), ("lm2", 9.0)]


def test_reference_fills_loss_and_size_reductions() -> None:
    dense = Row(
        "lm", "d", "dense", "dense", "none", 0.0, 0.0,
        metrics={"perplexity": 10.0, "parameters": 1000.0, "bytes": 2000.0, "ffn_bytes": 1200.0, "ffn_params": 600.0},
    )  # fmt: skip
    cut = Row(
        "lm", "v", "v", "ffsplit-lowrank", "lowrank", 0.1, 0.5,
        metrics={"perplexity": 10.5, "parameters": 700.0, "bytes": 1400.0, "ffn_reduction": 0.5},
    )  # fmt: skip
    logged = dataclass_replace(
        cut, run_id="w", metrics={**cut.metrics, "perplexity_change_pct": 4.0, "ffn_params": 420.0}
    )
    enc_dense = Row("enc", "ed", "dense", "dense", "none", 0.0, 0.0, metrics={"accuracy": 0.8})
    enc = Row("enc", "e", "e", "ffsplit-quant", "quant", 0.1, 0.3, metrics={"accuracy": 0.78})
    got = {r.run_id: r for r in results.with_reference([dense, cut, logged, enc_dense, enc])}
    assert got["v"].loss == pytest.approx(5.0)  # from the dense perplexity
    assert got["w"].loss == 4.0  # the logged change wins
    assert got["w"].ffn_param_reduction == pytest.approx(0.3)  # so do logged FFN parameters
    assert got["v"].model_reduction == pytest.approx(0.3)
    # 300 fewer parameters out of 1200 / 2 = 600 dense FFN parameters
    assert got["v"].ffn_param_reduction == pytest.approx(0.5)
    assert got["e"].loss == pytest.approx(2.5) and got["e"].quality_kind == "accuracy"
    assert got["d"].loss == 0.0


def dataclass_replace(r: Row, **changes: Any) -> Row:
    import dataclasses

    return dataclasses.replace(r, **changes)


# ------------------------------------------------------------------------------- trade-off


def grid() -> list[Row]:
    return [
        # 30%: FFSplit low-rank beats everything
        row("ffsplit-lowrank", 0.3, 2.0, rho=0.05),
        row("ffsplit-lowrank", 0.3, 3.0, rho=0.1),
        row("ffsplit-quant", 0.3, 1.0, rho=0.1),
        row("uniform-lowrank", 0.3, 6.0),
        row("uniform-quant", 0.3, 1.5),
        row("random-lowrank", 0.3, 7.0),
        row("random-quant", 0.3, 1.2),
        row("prune", 0.3, 20.0),
        # 50%: uniform quant beats FFSplit quant; FFSplit low-rank wins its loss but saves fewer bytes
        row("ffsplit-lowrank", 0.5, 5.0, rho=0.1, achieved=0.48),
        row("ffsplit-quant", 0.5, 3.0, rho=0.1),
        row("uniform-lowrank", 0.5, 9.0),
        row("uniform-quant", 0.5, 2.5),
        row("prune", 0.5, 40.0),
    ]


def test_tradeoff_verdicts_and_where_ffsplit_does_not_beat() -> None:
    lines = results.tradeoff(grid(), "lm")
    assert [x.budget for x in lines] == [0.3, 0.5]
    first, second = lines
    assert first.cells[Column("ffsplit-lowrank")].heavy_ratio == 0.05  # best ρ
    assert first.cells[Column("ffsplit-lowrank", 0.1)].loss == 3.0  # the default ρ
    assert first.beats_all is True and first.ffsplit.loss == 1.0 and not first.missing
    assert second.beats_all is False
    assert second.beaten_by == ("uniform-quant",)
    assert second.missing == ("random-lowrank", "random-quant")
    falls = results.shortfalls(lines)
    found = {(f.budget, f.column.series, f.baseline.series) for f in falls}
    assert found == {
        (0.5, "ffsplit-quant", "uniform-quant"),
        (0.5, "ffsplit-lowrank", "uniform-lowrank"),  # better loss, but fewer bytes saved
        (0.5, "ffsplit-lowrank", "prune"),
    }
    why = {f.baseline.series: f.reason for f in falls}
    assert "fewer FFN bytes" in why["uniform-lowrank"] and "worse" in why["uniform-quant"]
    # A baseline within the bytes tolerance and an exact tie are not beaten either.
    ok, _ = results.beats(row("ffsplit-quant", 0.5, 1.0, achieved=0.497), row("prune", 0.5, 2.0))
    tie, reason = results.beats(row("ffsplit-quant", 0.5, 2.0), row("prune", 0.5, 2.0))
    assert ok and not tie and "ties" in reason


def test_settings_are_compared_apart() -> None:
    rows = [
        row("ffsplit-quant", 0.3, 1.0, setting="quant.gptq=True"),
        row("uniform-quant", 0.3, 0.5),
    ]
    lines = results.tradeoff(rows, "lm")
    assert len(lines) == 2 and all(x.beats_all is None for x in lines)
    assert results.shortfalls(lines) == []


# ----------------------------------------------------------------------- heavy ratio, transfer


def test_best_heavy_ratio_and_transfer_between_models() -> None:
    rows = []
    for model, losses in (
        ("a", {0.05: 3.0, 0.1: 2.0, 0.2: 4.0}),
        ("b", {0.05: 5.0, 0.1: 4.5, 0.2: 4.0}),
    ):
        for budget in (0.3, 0.5):
            for rho, loss in losses.items():
                rows.append(row("ffsplit-lowrank", budget, loss + budget, rho=rho, model=model))
    rows.append(row("ffsplit-quant", 0.3, 1.0, rho=0.1, model="a"))  # one point: no curve to rank
    curves = results.heavy_ratio_curves(rows)
    assert results.best_ratio(curves[("a", "", "ffsplit-lowrank", 0.3)]) == 0.1
    assert results.best_ratio_overall(curves, "a", "ffsplit-lowrank", "") == (0.1, 2)
    assert results.best_ratio_overall(curves, "b", "ffsplit-lowrank", "") == (0.2, 2)
    assert results.best_ratio_overall(curves, "a", "ffsplit-quant", "") == (None, 0)
    moves = {(t.source, t.target, t.budget): t for t in results.transfer(curves)}
    assert len(moves) == 4
    a_to_b = moves[("a", "b", 0.3)]
    assert (a_to_b.source_best, a_to_b.target_best, a_to_b.rank_on_target) == (0.1, 0.2, 2)
    assert a_to_b.extra_loss == pytest.approx(0.5) and not a_to_b.transfers
    assert moves[("b", "a", 0.5)].rank_on_target == 3  # b's best 0.2 is a's worst
    same = [
        row("ffsplit-quant", 0.3, v, rho=r, model=m) for m in "xy" for r, v in ((0.1, 1), (0.2, 2))
    ]
    assert all(
        t.transfers and t.extra_loss == 0
        for t in results.transfer(results.heavy_ratio_curves(same))
    )


# --------------------------------------------------------------------------- goals and healing


def test_goals_pick_the_best_variant_past_the_size_and_check_one_percent() -> None:
    rows = [
        row("ffsplit-quant", 0.431, 0.8, achieved=0.4306),  # 43.06% reads as 43.1%: counts
        row("uniform-quant", 0.5, 0.5, achieved=0.5),
        row("ffsplit-quant", 0.43, 0.1, achieved=0.43),  # too small
        row("ffsplit-lowrank", 0.45, 3.0, param_cut=0.45, heal=100),
        row("prune", 0.45, 9.0, param_cut=0.45),
        row("ffsplit-quant", 0.6, 0.2, achieved=0.6, model="enc"),
    ]
    rows[-1] = dataclass_replace(rows[-1], metrics={"accuracy": 0.8, "ffn_reduction": 0.6})
    got = {(g.model, g.goal): g for g in results.goals(rows)}
    assert set(got) == {("lm", "ffn_bytes"), ("lm", "ffn_params")}  # encoders have no ppl goal
    by_bytes = got[("lm", "ffn_bytes")]
    assert by_bytes.best.series == "uniform-quant" and by_bytes.met
    assert by_bytes.best_ffsplit.loss == 0.8
    by_params = got[("lm", "ffn_params")]
    assert by_params.best.healed and by_params.best.loss == 3.0 and not by_params.met
    empty = results.goals([row("ffsplit-lowrank", 0.3, 1.0, param_cut=0.3)])
    assert all(g.best is None and not g.met for g in empty)


def test_healing_pairs_match_the_same_recipe() -> None:
    plain = row("ffsplit-lowrank", 0.5, 8.0, setting="profile.tokens=16384")
    healed = dataclass_replace(
        row("ffsplit-lowrank", 0.5, 3.0, heal=200, key="h"),
        setting="heal.steps=200, profile.tokens=16384",
    )
    lonely = row("uniform-lowrank", 0.5, 9.0, heal=200, key="u")
    assert results.healing_pairs([plain, healed, lonely]) == [(plain, healed)]


# ------------------------------------------------------------------------------------- page


def source() -> results.Source:
    return results.Source("http://***@host:5000", (("ffsplit/lm", "1"),), 14, 1, 0)


def test_page_states_the_verdicts_honestly(tmp_path: Path) -> None:
    dense = Row(
        "lm", "d", "dense", "dense", "none", 0.0, 0.0,
        metrics={"perplexity": 10.0, "parameters": 1e6, "bytes": 2e6, "ffn_bytes": 1.2e6},
        loss=0.0,
    )  # fmt: skip
    out = tmp_path / "docs" / "results.md"
    page, plots = results.write_page(
        [dense, *grid()], source(), out, generated_at=NOW, command="python -m flows.results"
    )
    text = page.read_text()
    for heading in ("## Summary", "## Dense references", "## Trade-off at equal FFN budget",
                    "## Where FFSplit does not beat a baseline", "## Heavy-ratio sweep",
                    "## Goals", "## Healing", "## All variants", "## Provenance"):  # fmt: skip
        assert heading in text
    assert "python -m flows.results" in text.split("##")[0]  # the command is at the top
    assert "**no**: uniform quant" in text
    assert "beats every baseline run at 1 of 2 budgets" in text
    assert "http://***@host:5000" in text and "2026-11-30" in text
    assert {p.name for p in plots} == {"lm-tradeoff.png", "lm-heavy-ratio.png"}
    assert all(p.parent == tmp_path / "docs" / "results" and p.stat().st_size > 1000 for p in plots)
    assert "](results/lm-tradeoff.png)" in text
    # Regenerating without the heavy-ratio curve removes its stale plot, keeps other files.
    (out.parent / "results" / "notes.png").write_bytes(b"x")
    results.write_page(
        [dense, *(r for r in grid() if r.budget == 0.5)], source(), out,
        generated_at=NOW, command="x",
    )  # fmt: skip
    assert sorted(p.name for p in (out.parent / "results").iterdir()) == [
        "lm-tradeoff.png",
        "notes.png",
    ]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------------ real MLflow store


def make_variant(out: Path, base: str, recipe: Recipe, seed: int = 0) -> Path:
    from ffsplit.adapters import get_adapter
    from ffsplit.compress.recipe import compress_model
    from ffsplit.models.tiny import tiny_model
    from ffsplit.profiling import profile_model
    from ffsplit.variant import save_variant

    model, _ = tiny_model("LlamaForCausalLM", seed=seed)
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(seed))
    stats = profile_model(model, ids, ProfileConfig(tokens=64, window=16, hit_top_fraction=0.05))
    report, layers = compress_model(model, stats, recipe)
    return save_variant(
        model,
        None,
        out,
        adapter=get_adapter(model),
        base_model={"name": base, "weights_sha256": f"{seed:064d}"},
        report=report,
        layers=layers,
        calibration={"corpus": "random", "seed": seed},
    )


def test_registered_variants_come_back_as_rows_and_a_page(
    mlflow_uri: str, unique_name: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from tracking.registry import experiment_for, register_variant

    base = unique_name  # its own experiment ffsplit/<base> in the shared session store
    specs = [
        ("dense", Recipe(method="none", selection="none", ffn_reduction=0.0), 0, {}, "dense"),
        ("ffs", Recipe(method="lowrank", heavy_ratio=0.1, ffn_reduction=0.5), 0, {"perplexity_change_pct": 4.0}, "k-ffs"),
        ("uni", Recipe(method="lowrank", selection="none", ffn_reduction=0.5), 0, {"perplexity_change_pct": 9.0}, "k-uni"),
        # the same variant key registered twice (two sweeps): the later run counts, once
        ("q0", Recipe(method=TWO_LEVEL, heavy_ratio=0.1, ffn_reduction=0.5), 0, {"perplexity_change_pct": 2.0}, "k-q"),
        ("q1", Recipe(method=TWO_LEVEL, heavy_ratio=0.1, ffn_reduction=0.5), 1, {"perplexity_change_pct": 1.5}, "k-q"),
    ]  # fmt: skip
    registered = {}
    for name, recipe, seed, extra, key in specs:
        folder = make_variant(tmp_path / "variants" / name, base, recipe, seed)
        metrics = {
            "perplexity": 10.0 * (1 + extra.get("perplexity_change_pct", 0.0) / 100),
            "parameters": 1e5 if name == "dense" else 8e4,
            "bytes": 2e5 if name == "dense" else 1.6e5,
            "ffn_bytes": 8e4 if name == "dense" else 4e4,
            "ffn_reduction": 0.0 if name == "dense" else 0.5,
            **extra,
        }
        tags = {
            "ffsplit.role": "dense" if name == "dense" else "variant",
            "ffsplit.flow": "sweep",
            "ffsplit.variant_key": key,
        }
        registered[name] = register_variant(
            folder, model_name=base, metrics=metrics, tags=tags, uri=mlflow_uri
        )
        time.sleep(0.01)  # distinct start times
    client = MlflowClient(tracking_uri=mlflow_uri)
    client.create_run(experiment_for(base, uri=mlflow_uri), run_name="killed")  # never completed

    rows, src = results.read_rows(mlflow_uri, [base])
    assert (src.runs_read, src.incomplete, src.duplicates) == (6, 1, 1)
    by_key = {r.variant_key: r for r in rows}
    assert set(by_key) == {"dense", "k-ffs", "k-uni", "k-q"}
    assert by_key["k-q"].run_id == registered["q1"].run_id and by_key["k-q"].loss == 1.5
    assert by_key["k-ffs"].version == f"{base} v{registered['ffs'].version}"
    assert (
        by_key["k-ffs"].series == "ffsplit-lowrank" and by_key["k-uni"].series == "uniform-lowrank"
    )
    assert by_key["k-ffs"].model_reduction == pytest.approx(0.2)
    assert by_key["k-ffs"].ffn_param_reduction == pytest.approx(0.5)  # 2e4 of 4e4 FFN params

    out = tmp_path / "docs" / "results.md"
    page, plots, count = results_flow.generate(mlflow_uri, [base], out, now=NOW)
    text = page.read_text()
    assert count == 4 and page == out and plots
    assert registered["q1"].run_id in text and registered["q0"].run_id not in text
    assert f"`ffsplit/{base}`" in text and "lowrank-h0.10-r0.5" in text
    assert f".venv/bin/python -m flows.results --models {base} --out {out}" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_fails_in_one_line_and_writes_nothing(
    mlflow_uri: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    own_lines: Callable[[str], list[str]],
) -> None:
    out = tmp_path / "results.md"
    dead = f"http://user:secret@127.0.0.1:{_free_port()}"
    assert results_flow.main(["--tracking-uri", dead, "--out", str(out)]) == 2
    err = "\n".join(own_lines(capsys.readouterr().err))
    assert err.count("\n") == 0 and "unreachable" in err and "secret" not in err
    assert (
        results_flow.main(
            ["--tracking-uri", mlflow_uri, "--models", "no-such-model", "--out", str(out)]
        )
        == 2
    )
    err = "\n".join(own_lines(capsys.readouterr().err))
    assert err.count("\n") == 0 and "no ffsplit experiment for no-such-model" in err
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    assert results_flow.main(["--tracking-uri", empty, "--out", str(out)]) == 2
    assert "no ffsplit experiments" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "results").exists()
    with pytest.raises(FFSplitError, match="no ffsplit experiments"):
        results.read_rows(empty)


# ------------------------------------------------------------------------------------ probe noise
# MiniLM's quality is a linear probe's accuracy on 1500 test tweets: a binomial standard error of
# about 1.3 points, so a difference between two variants under about 3.5 points is noise.


def acc_row(
    series: str,
    budget: float,
    accuracy: float,
    *,
    n: int | None = 1500,
    dense: float = 0.612,
    rho: float = 0.1,
    achieved: float | None = None,
    key: str | None = None,
    heal: int = 0,
    setting: str = "",
) -> Row:
    base = row(
        series,
        budget,
        -100.0 * (accuracy / dense - 1.0),
        rho=rho,
        achieved=achieved,
        model="enc",
        setting=setting,
        key=key,
        heal=heal,
    )
    metrics = {"accuracy": accuracy, "ffn_reduction": base.metrics["ffn_reduction"]}
    return dataclass_replace(base, metrics=metrics, test_examples=n)


def band(p: float, q: float, n: int = 1500) -> float:
    """The noise rule written out independently: 1.96 sqrt(se_p^2 + se_q^2)."""
    return 1.96 * ((p * (1 - p) / n) + (q * (1 - q) / n)) ** 0.5


def test_accuracy_rows_carry_n_and_show_a_95_interval() -> None:
    params = flat(Recipe(method=TWO_LEVEL, heavy_ratio=0.1, ffn_reduction=0.3))
    logged = results.row_from_run(
        model="enc",
        run_id="r",
        run_name="q",
        params=params,
        metrics={"accuracy": 0.612, "accuracy_test_examples": 1500.0},
        tags={},
    )
    assert logged.test_examples == 1500
    assert logged.accuracy_stderr == pytest.approx((0.612 * 0.388 / 1500) ** 0.5)
    assert results.fmt_quality(logged) == "acc 0.612 ±0.025"
    bare = results.row_from_run(
        model="enc", run_id="r", run_name="q", params=params, metrics={"accuracy": 0.612}, tags={}
    )
    assert bare.test_examples is None and bare.accuracy_stderr is None
    assert results.fmt_quality(bare) == "acc 0.6120 (n unknown)"
    # Perplexity has no interval and no n: its cells stay as they were.
    ppl = row("ffsplit-quant", 0.3, 5.0)
    assert results.fmt_quality(ppl) == "ppl 10.50" and ppl.accuracy_stderr is None
    # The evaluation record's test-set size (ffsplit.jobs.evaluate_job: record["eval"]["test"]).
    assert results.record_test_examples({"eval": {"corpus": "tweets", "test": 1500}}) == 1500
    for broken in (None, [], {}, {"eval": {}}, {"eval": {"test": 0}}, {"eval": {"test": 1.5}},
                   {"eval": {"test": "1500"}}, {"eval": {"test": True}}, {"eval": [1500]}):  # fmt: skip
        assert results.record_test_examples(broken) is None, broken


def test_an_accuracy_difference_inside_the_noise_is_neither_a_win_nor_a_loss() -> None:
    ffsplit, uniform = acc_row("ffsplit-quant", 0.3, 0.6120), acc_row("uniform-quant", 0.3, 0.6133)
    for a, b in ((ffsplit, uniform), (uniform, ffsplit)):
        got = results.compare(a, b)
        assert got.outcome == "noise" and got.reason == "within noise (±3.5 pt)"
        assert got.band == pytest.approx(band(a.quality, b.quality))
        assert results.beats(a, b) == (False, "within noise (±3.5 pt)")
    # At the rule's edge: 3.4 points apart is noise, 3.6 is not (the band is about 3.53 here).
    p = 0.600
    inside, outside = acc_row("uniform-quant", 0.3, p - 0.034), acc_row("prune", 0.3, p - 0.036)
    assert 0.034 < band(p, p - 0.034) and 0.036 > band(p, p - 0.036)
    top = acc_row("ffsplit-quant", 0.3, p)
    assert results.compare(top, inside).outcome == "noise"
    assert results.beats(top, outside) == (True, "")
    # The same 3.4 points on ten times the test examples is a real difference.
    big = [dataclass_replace(r, test_examples=15000) for r in (top, inside)]
    assert results.beats(*big) == (True, "")
    # A real loss says so, with the band; unknown n is not judged; equal bytes still come first.
    assert results.compare(inside, top).outcome == "noise"  # nor a loss, either way round
    worse = results.compare(outside, top)
    assert (
        worse.outcome == "no"
        and worse.reason == "worse: +7.84% vs +1.96% (3.60 pt apart, beyond noise ±3.53 pt)"
    )
    unknown = results.compare(top, dataclass_replace(inside, test_examples=None))
    assert unknown.outcome == "unknown" and inside.label in unknown.reason
    fewer = results.compare(acc_row("ffsplit-quant", 0.3, 0.613, achieved=0.28), uniform)
    assert fewer.outcome == "no" and "fewer FFN bytes" in fewer.reason


def minilm_grid() -> list[Row]:
    """Numbers like the MiniLM sweep's: most differences are a fraction of the noise."""
    return [
        dataclass_replace(acc_row("uniform-quant", 0.0, 0.612), series="dense", loss=0.0),
        # 30%: every baseline but pruning is within noise of the best FFSplit variant
        acc_row("ffsplit-quant", 0.3, 0.6120),
        acc_row("ffsplit-quant", 0.3, 0.6113, rho=0.05),
        acc_row("ffsplit-lowrank", 0.3, 0.6067),
        acc_row("uniform-lowrank", 0.3, 0.6040),
        acc_row("uniform-quant", 0.3, 0.6133),
        acc_row("random-quant", 0.3, 0.6127),
        acc_row("prune", 0.3, 0.5600),
        # 43.1%: pruning beats FFSplit by more than the noise
        acc_row("ffsplit-quant", 0.431, 0.6113),
        acc_row("prune", 0.431, 0.6600),
        # healing that moves accuracy by less than the noise
        acc_row("ffsplit-lowrank", 0.3, 0.6090, heal=100, key="h", setting="heal.steps=100"),
    ]


def test_verdicts_and_page_say_within_noise_for_probe_accuracies(tmp_path: Path) -> None:
    rows = minilm_grid()
    lines = [x for x in results.tradeoff(rows, "enc") if not x.setting]
    assert [x.budget for x in lines] == [0.3, 0.431]
    noisy, beaten = lines
    assert noisy.beats_all is False and noisy.beaten_by == ()  # not a win, and not a loss
    assert noisy.within_noise == ("uniform-lowrank", "uniform-quant", "random-quant")
    assert noisy.versus["prune"].outcome == "win"
    assert beaten.beaten_by == ("prune",) and beaten.within_noise == ()
    falls = results.shortfalls(lines)
    assert {f.outcome for f in falls if f.budget == 0.3} == {"noise"}
    assert all(f.reason == "within noise (±3.5 pt)" for f in falls if f.budget == 0.3)
    assert [(f.outcome, f.baseline.series) for f in falls if f.budget == 0.431] == [
        ("no", "prune"),
        ("no", "prune"),  # best ρ and default ρ columns: the same variant
    ]

    page, _ = results.write_page(
        rows, source(), tmp_path / "results.md", generated_at=NOW, command="x"
    )
    text = page.read_text()
    assert "acc 0.612 ±0.025" in text  # dense reference and cells carry their 95% interval
    assert "| within noise (±3.5 pt) of uniform low-rank, uniform quant, random split quant" in text
    assert "**no**: uniform" not in text and "| **no**: score pruning (not run" in text
    assert "no clear winner (within probe noise) against uniform low-rank" in text
    assert "| within noise (±3.5 pt) |" in text  # the shortfalls list
    assert "| -0.38 (within noise ±3.5 pt) |" in text  # healing: 0.6067 -> 0.6090
    assert "Probe noise:" in text and "paired test" in text and "n = 1500" in text
    assert "perplexity is deterministic" in text
    assert "Probe accuracies: the best ρ is picked on point estimates" in text
    # A perplexity-only page has no noise paragraph and its verdicts read as before.
    ppl_page, _ = results.write_page(
        grid(), source(), tmp_path / "ppl.md", generated_at=NOW, command="x"
    )
    ppl_text = ppl_page.read_text()
    assert "Probe noise:" not in ppl_text and "within noise" not in ppl_text
    assert "**no**: uniform quant" in ppl_text


def test_test_set_size_comes_from_the_metric_else_the_record_artifact(
    mlflow_uri: str, unique_name: str, tmp_path: Path
) -> None:
    import json

    from tracking.registry import register_variant

    base = unique_name
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"accuracy": 0.6, "eval": {"corpus": "tweets", "test": 1200}}))
    specs = [
        # (name, recipe, metrics beyond accuracy, artifacts)
        ("dense", Recipe(method="none", selection="none", ffn_reduction=0.0), {"accuracy_test_examples": 1500.0}, {"eval/record.json": record}),
        ("ffs", Recipe(method=TWO_LEVEL, heavy_ratio=0.1, ffn_reduction=0.3), {}, {"eval/record.json": record}),
        ("uni", Recipe(method=TWO_LEVEL, selection="none", ffn_reduction=0.3), {}, {}),
    ]  # fmt: skip
    run_of = {}
    for seed, (name, recipe, extra, artifacts) in enumerate(specs):
        folder = make_variant(tmp_path / "variants" / name, base, recipe, seed)
        metrics = {"accuracy": 0.6, "ffn_reduction": 0.0 if name == "dense" else 0.3, **extra}
        tags = {
            "ffsplit.role": "dense" if name == "dense" else "variant",
            "ffsplit.variant_key": name,
        }
        run_of[name] = register_variant(
            folder, model_name=base, metrics=metrics, artifacts=artifacts, tags=tags, uri=mlflow_uri
        ).run_id

    rows, _ = results.read_rows(mlflow_uri, [base])
    n = {r.run_id: r.test_examples for r in rows}
    assert n[run_of["dense"]] == 1500  # the metric wins over the record
    assert n[run_of["ffs"]] == 1200  # no metric: the record's eval.test
    assert n[run_of["uni"]] is None  # neither: unknown, not guessed
    lines = results.tradeoff(rows, base)
    assert lines[0].unjudged == ("uniform-quant",) and lines[0].beaten_by == ()
    text, _ = results.render(rows, source(), NOW, tmp_path / "plots", "plots", "x")
    assert "acc 0.6000 (n unknown)" in text and "acc 0.600 ±0.028" in text
    assert "1 accuracy run(s) have neither" in text
    assert "not judged (test-set size unknown): uniform quant" in text


def test_heavy_ratio_transfer_between_encoders_marks_noise() -> None:
    rows = []
    for model, accs in (("a", {0.05: 0.610, 0.1: 0.600}), ("b", {0.05: 0.600, 0.1: 0.612})):
        for rho, acc in accs.items():
            rows.append(dataclass_replace(acc_row("ffsplit-quant", 0.3, acc, rho=rho), model=model))
    moves = {(t.source, t.target): t for t in results.transfer(results.heavy_ratio_curves(rows))}
    a_to_b = moves[("a", "b")]
    assert not a_to_b.transfers and a_to_b.within_noise  # 1.2 points apart on b: noise
    assert a_to_b.band == pytest.approx(band(0.600, 0.612))
    far = [dataclass_replace(r, test_examples=150000) for r in rows]  # a 0.2-point band
    assert results.transfer(results.heavy_ratio_curves(far))[0].within_noise is False
    ppl = [row("ffsplit-quant", 0.3, v, rho=r, model=m) for m in "xy" for r, v in ((0.1, 1), (0.2, 2 if m == "x" else 0))]  # fmt: skip
    assert all(t.within_noise is None for t in results.transfer(results.heavy_ratio_curves(ppl)))


# ---------------------------------------------------------------------------- the observation
# tasks.observation logs one run per model with ffsplit.role=observation into the experiment of the
# model's variants; the page shows it in its own section and never as a variant.

OBSERVATION_RECORD = (
    Path(__file__).resolve().parents[2] / "bench" / "results" / "observation" / "minilm-l6"
)  # a real record (6 layers, probe accuracy and hidden-state ablations), committed with its plots


def _sections(text: str) -> dict[str, str]:
    parts = text.split("\n## ")
    return {p.split("\n", 1)[0]: p for p in parts[1:]}


def test_observation_runs_get_their_section_and_leave_the_variant_tables_alone(
    mlflow_uri: str, unique_name: str, tmp_path: Path
) -> None:
    import json
    import shutil

    from tracking.observation import log_observation
    from tracking.registry import register_variant

    base = unique_name
    for name, recipe, change in (
        ("dense", Recipe(method="none", selection="none", ffn_reduction=0.0), 0.0),
        ("ffs", Recipe(method="lowrank", heavy_ratio=0.1, ffn_reduction=0.5), 4.0),
    ):
        folder = make_variant(tmp_path / "variants" / name, base, recipe)
        metrics = {"perplexity": 10.0 * (1 + change / 100), "perplexity_change_pct": change}
        metrics |= {"parameters": 1e5, "bytes": 2e5, "ffn_bytes": 8e4, "ffn_reduction": 0.5}
        role = "dense" if name == "dense" else "variant"
        tags = {"ffsplit.role": role, "ffsplit.flow": "sweep", "ffsplit.variant_key": name}
        register_variant(folder, model_name=base, metrics=metrics, tags=tags, uri=mlflow_uri)
    before_rows, before = results.read_rows(mlflow_uri, [base])
    out = tmp_path / "before" / "results.md"
    page, _ = results.write_page(before_rows, before, out, generated_at=NOW, command="x")
    before_text = page.read_text()
    assert before.observations == ()
    assert "No observation run in the experiments read yet" in before_text
    assert "python -m flows.observation run --models MODEL" in before_text

    record_dir = tmp_path / "record"
    shutil.copytree(OBSERVATION_RECORD, record_dir)
    record = json.loads((record_dir / "observation.json").read_text())
    record["model"]["name"] = base  # the experiment of this test's variants
    (record_dir / "observation.json").write_text(json.dumps(record))
    logged = log_observation(record_dir, mlflow_uri, tags={"ffsplit.command": "log it"})

    rows, src = results.read_rows(mlflow_uri, [base])
    assert rows == before_rows  # the observation run is not a variant row
    assert (src.runs_read, src.incomplete, src.duplicates) == (3, 0, 0)
    (seen,) = src.observations
    assert seen.run_id == logged.run_id and seen.model == base
    assert sorted(seen.series["top1_share"]) == list(range(6))
    assert set(seen.plots) == {"observation.png", "ablation.png", "ablation_hidden.png"}

    out = tmp_path / "docs" / "results.md"
    page, plots = results.write_page(rows, src, out, generated_at=NOW, command="x")
    text = page.read_text()
    after, earlier = _sections(text), _sections(before_text)
    for heading, body in earlier.items():  # every variant section exactly as before
        if not heading.startswith(("Observation", "Provenance")):
            assert after[heading] == body, heading
    section = after["Observation (the paper's premise)"]
    mean = record["observation"]["mean"]
    jaccard = record["stability"]["1%"]["mean"]["jaccard"]
    assert (
        f"| **mean** | {100 * mean['top1_share']:.1f}% | {100 * mean['top5_share']:.1f}% "
        f"| {100 * mean['top10_share']:.1f}% | {100 * mean['heavy_hit_rate']:.1f}% "
        f"| {mean['hit_lift']:.1f}x | {jaccard:.2f} |" in section
    )
    assert "| uniform / random | 1.0% | 5.0% | 10.0% |" in section
    ablation = record["ablation"]
    assert f"| {ablation['dense']:.3f} | {ablation['bottom']:.3f} |" in section
    top_pp = 100 * (ablation["top"] - ablation["dense"])
    assert f"top {top_pp:+.1f} pp" in section and "chance 0.333" in section
    assert "relative error of the last hidden states" in section
    names = {f"{base}-observation.png", f"{base}-ablation.png", f"{base}-ablation-hidden.png"}
    assert names <= {p.name for p in plots}
    for name in names:
        assert f"](results/{name})" in section
        assert (out.parent / "results" / name).read_bytes()[:4] == b"\x89PNG"
    provenance = after["Provenance"]
    assert logged.run_id in provenance and "logged by `log it`" in provenance
    assert "computed by `python bench/observation.py --model minilm-l6" in provenance
    # Regenerated from the variants alone, the observation plots of the earlier page are removed.
    results.write_page(before_rows, before, out, generated_at=NOW, command="x")
    assert not names & {p.name for p in (out.parent / "results").iterdir()}
