"""The results page, byte for byte, from a realistic set of runs (issue 14: the page generator was
split into readers, tables and rendering without changing a byte of what it writes).

golden/runs.json holds 134 runs of three models as the registry logged them before recipes had
version 2 (commit c6ec673: version-1 recipe params, metrics and tags of sweeps, healed sweeps, a
duplicate registration, CLI runs with pruning's old heavy ratio 0.1, a probe accuracy whose
test-set size is unknown) and two observation runs made from the committed records in
bench/results/observation. golden/page.md, golden/rows.json and golden/plots.json are what
c6ec673's reports/results.py made of them; this code must make the same.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ffsplit.variant.manifest import flat_params
from reports import results

GOLDEN = Path(__file__).parent / "golden"
NOW = datetime(2026, 11, 30, 11, 13, tzinfo=UTC)
COMMAND = ".venv/bin/python -m flows.results"
URI = "http://127.0.0.1:5000"
INCOMPLETE = 2  # runs the reader skipped (killed or failed), counted in the provenance line


def golden_runs() -> dict[str, Any]:
    return json.loads((GOLDEN / "runs.json").read_text(encoding="utf-8"))


def observation(data: dict[str, Any]) -> results.ObservationRun:
    return results.ObservationRun(
        model=data["model"],
        run_id=data["run_id"],
        experiment=data["experiment"],
        start_time=data["start_time"],
        params=data["params"],
        metrics=data["metrics"],
        series={k: {int(s): v for s, v in pts.items()} for k, pts in data["series"].items()},
        plots={name: b"\x89PNG " + name.encode() for name in data["plots"]},
        run_dir=data["run_dir"],
        command=data["command"],
    )


def rows_and_source(
    runs: list[dict[str, Any]] | None = None,
) -> tuple[list[results.Row], results.Source]:
    """What read_rows makes of the golden runs: rows (deduplicated, with their dense reference)
    and the page's provenance."""
    data = golden_runs()
    runs = data["runs"] if runs is None else runs
    rows = [results.row_from_run(**run) for run in runs]
    kept, dropped = results.dedupe(rows)
    experiments = tuple(
        (f"ffsplit/{m}", str(i + 1)) for i, m in enumerate(sorted({r.model for r in kept}))
    )
    source = results.Source(
        URI,
        experiments,
        len(runs) + INCOMPLETE + len(data["observations"]),
        INCOMPLETE,
        dropped,
        tuple(observation(o) for o in data["observations"]),
    )
    return results.with_reference(kept), source


def as_json(rows: list[results.Row]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(r) | {"metrics": dict(r.metrics)} for r in rows]


def render(tmp_path: Path) -> tuple[str, list[str]]:
    rows, source = rows_and_source()
    text, written = results.render(rows, source, NOW, tmp_path / "results", "results", COMMAND)
    return text, sorted(p.name for p in written)


def _first_difference(got: str, want: str) -> str:
    diff = difflib.unified_diff(
        want.splitlines(), got.splitlines(), "golden", "now", n=1, lineterm=""
    )
    return "\n".join(list(diff)[:40])


def test_the_page_is_byte_identical_to_the_golden(tmp_path: Path) -> None:
    text, plots = render(tmp_path)
    want = (GOLDEN / "page.md").read_text(encoding="utf-8")
    assert text == want, _first_difference(text, want)
    assert plots == json.loads((GOLDEN / "plots.json").read_text(encoding="utf-8"))
    assert all((tmp_path / "results" / name).stat().st_size > 0 for name in plots)


def test_version_1_runs_give_the_rows_they_gave_before() -> None:
    """Rows as c6ec673 read them, but for what version 2 of the recipe says differently: a
    uniform baseline (and the dense reference) selects no heavy set, and pruning has no heavy
    ratio (flows.compress logged the CLI's 0.1 for it). Rows now say how quant rows rounded:
    every one of these runs rounded to nearest (version 1's default, none set gptq)."""
    rows, _ = rows_and_source()
    want = json.loads((GOLDEN / "rows.json").read_text(encoding="utf-8"))
    for row in want:
        if row["series"] in ("dense", "uniform-lowrank", "uniform-quant"):
            row["selection"] = "none"
        if row["series"] == "prune":
            row["heavy_ratio"] = 0.0
        row["gptq"] = False if row["method"] == "quant" else None
    assert as_json(rows) == want


def logged_today(run: dict[str, Any]) -> dict[str, Any]:
    """The run as if logged today: its recipe migrated, flattened as the registry does."""
    recipe = results.recipe_from_params(run["params"])
    params = {k: v for k, v in run["params"].items() if not k.startswith("recipe.")}
    params |= flat_params({"recipe": recipe.to_dict()})
    return run | {"params": params}


OLD_QUANT = (
    "quant.act_order=False, quant.gptq=False, quant.gptq_down=False, quant.ladder=[8, 4, 3, 2]"
)


def test_the_same_recipes_logged_today_give_the_same_rows() -> None:
    """Only the setting of quant runs differs: the quant defaults changed in version 3, so what
    was the default then is an option today, and says so."""
    runs = golden_runs()["runs"]
    assert {run["params"]["recipe.version"] for run in runs} == {"1"}
    again = [logged_today(run) for run in runs]
    assert {run["params"]["recipe.version"] for run in again} == {"3"}
    assert "recipe.quant.gptq" not in again[1]["params"]  # a low-rank recipe: no quant options
    before, after = as_json(rows_and_source()[0]), as_json(rows_and_source(again)[0])
    assert len(before) == len(after)
    by_run = {(row["run_id"], row["label"]): row for row in after}
    quant = 0
    for old in before:
        new = by_run[(old["run_id"], old["label"])]
        if old.get("method") == "quant":
            quant += 1
            want = ", ".join(x for x in (old["setting"], OLD_QUANT) if x)
            assert sorted(new["setting"].split(", q")) == sorted(want.split(", q"))
            old, new = {**old, "setting": ""}, {**new, "setting": ""}
        assert new == old
    assert quant > 20


def test_a_version_1_run_is_set_by_its_own_method_options_only() -> None:
    """Version 1 logged every method's options with every recipe (a sweep's quant.gptq rode along
    on its low-rank and pruned recipes); the setting is the recipe's own options now."""
    run = golden_runs()["runs"][1]
    assert run["params"]["recipe.method"] == "lowrank"
    lowrank = results.row_from_run(**run)
    gptq = run | {"params": run["params"] | {"recipe.quant.gptq": "True"}}
    assert results.row_from_run(**gptq).setting == lowrank.setting == "profile.tokens=16384"
    damp = run | {"params": run["params"] | {"recipe.lowrank.damp": "0.05"}}
    assert results.row_from_run(**damp).setting == "lowrank.damp=0.05, profile.tokens=16384"
