"""The `sweep` flow: a grid of methods x heavy ratios x budgets plus the baselines at equal budgets.

Statistics are profiled once and shared by every variant; each variant is compressed, assembled,
healed when its recipe asks for it (recipe_defaults {"heal": {"steps": N}}), evaluated (quality on
the evaluation split, size, latency raced against the dense model) and registered in MLflow. The
dense reference is registered too. Alias policy: `dense` names the reference; `champion` the
fastest (objective "speed": highest decode speedup) or smallest (objective "size": fewest bytes)
variant of this sweep whose perplexity is at most quality_budget_pct % above the dense model's
(tracking.registry.choose_champion); with none within the budget the champion alias is left where it
was. The run folder gets results.json, results.md, the Pareto chart and the score distribution
chart; the chart files are logged with every version.

CLI: ``python -m flows.sweep run --model smollm2-135m --methods lowrank,quant ...`` runs the flow;
``python -m flows.sweep report RUN_DIR`` prints a finished run's table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from ffsplit.config import (
    BASELINES,
    DEFAULT_EVAL_TOKENS,
    DEFAULT_HEAVY_RATIO,
    DEFAULT_WINDOW,
    PIPELINE_CALIB_TOKENS,
    SELECTION_METHODS,
    EvalConfig,
    ProfileConfig,
    QuantConfig,
    Recipe,
    SplitOnlyConfig,
)
from ffsplit.errors import FFSplitError
from flows.run import (
    DEFAULT_MODEL,
    Run,
    provenance_tags,
    register_version,
    registered_name,
    score_plot,
    settings_from,
    start_run,
    write_json,
)
from flows.stages import TASK_RUNNER_THREADS, Stages, VariantRun, run_metrics
from tasks.records import Statistics
from tasks.runtime import check_prefect_api, ray_session

SWEEP_METHODS = ("lowrank", "quant")
OBJECTIVES = ("speed", "size")
DEFAULT_METHODS = ["lowrank", "quant"]
DEFAULT_HEAVY_RATIOS = [DEFAULT_HEAVY_RATIO]
DEFAULT_BUDGETS = [0.3, 0.5]
# Every baseline but the column-outlier one (quant only; ask for it with --baselines ...,outlier).
DEFAULT_BASELINES = ["uniform", "random", "prune"]
DEFAULT_QUALITY_BUDGET_PCT = 10.0
STAGES = (
    "validate",
    "ray_start",
    "profile",
    "aggregate",
    "compress",
    "assemble",
    "heal",
    "evaluate",
    "report",
    "register",
)
LATENCY = EvalConfig()  # the latency race's default workload


# ------------------------------------------------------------------------------------ validation


def _names(kind: str, values: Any, allowed: tuple[str, ...], empty_ok: bool = False) -> list[str]:
    if isinstance(values, str):
        values = [v for v in values.split(",") if v]
    if not isinstance(values, list | tuple) or (not values and not empty_ok):
        raise FFSplitError(
            f"{kind} must be a non-empty list of {', '.join(allowed)}, got {values!r}"
        )
    bad = [v for v in values if v not in allowed]
    if bad:
        raise FFSplitError(f"unknown {kind} {bad}: choose from {', '.join(allowed)}")
    return list(dict.fromkeys(values))


def _fractions(kind: str, values: Any) -> list[float]:
    if not isinstance(values, list | tuple) or not values:
        raise FFSplitError(f"{kind} must be a non-empty list of numbers in (0, 1), got {values!r}")
    out = []
    for v in values:
        if (
            isinstance(v, bool)
            or not isinstance(v, int | float)
            or not math.isfinite(v)
            or not 0 < v < 1
        ):
            raise FFSplitError(f"{kind}: {v!r} is not a number in (0, 1)")
        out.append(float(v))
    return list(dict.fromkeys(out))


def _grid_specs(
    methods: list[str], heavy_ratios: list[float], budgets: list[float], baselines: list[str]
) -> list[dict[str, Any]]:
    """What each variant of the grid is (method, heavy set, budget), FFSplit first. A baseline
    only some methods have (the column-outlier one: quant) is skipped for the others."""
    specs: list[dict[str, Any]] = [
        {"method": method, "heavy_ratio": rho, "ffn_reduction": budget}
        for method in methods
        for rho in heavy_ratios
        for budget in budgets
    ]
    for budget in budgets:
        for method in methods:
            if "uniform" in baselines:
                specs.append({"method": method, "selection": "none", "ffn_reduction": budget})
            for selection in ("random", "outlier"):  # baselines with a heavy set to size
                if selection in baselines and method in SELECTION_METHODS.get(selection, (method,)):
                    specs += [
                        {
                            "method": method,
                            "selection": selection,
                            "heavy_ratio": rho,
                            "ffn_reduction": budget,
                        }
                        for rho in heavy_ratios
                    ]
        if "prune" in baselines:
            specs.append({"method": "prune", "ffn_reduction": budget})
    return specs


def build_grid(
    methods: list[str],
    heavy_ratios: list[float],
    budgets: list[float],
    baselines: list[str],
    profile: dict[str, Any],
    recipe_defaults: dict[str, Any] | None = None,
) -> list[Recipe]:
    """FFSplit recipes for every method x heavy ratio x budget, then the baselines at the same
    budgets: uniform (no split) per method, random split per method and heavy ratio, the
    column-outlier baseline per heavy ratio (its share of input columns kept bf16; quant only),
    score-based pruning. Every recipe is validated (unknown keys and bad values are errors);
    recipe_defaults (e.g. {"quant": {"gptq": true}}) applies to the recipes of the methods it
    names."""
    methods = _names("methods", methods, SWEEP_METHODS)
    baselines = _names("baselines", baselines, BASELINES, empty_ok=True)
    heavy_ratios = _fractions("heavy_ratios", heavy_ratios)
    budgets = _fractions("budgets", budgets)
    defaults = dict(recipe_defaults or {})
    for key in ("method", "heavy_ratio", "ffn_reduction", "selection", "profile"):
        if key in defaults:
            raise FFSplitError(
                f"recipe_defaults may not set {key!r}: the sweep sets it (use methods, heavy_ratios, "
                "budgets, baselines, calib_tokens)"
            )
    per_method = {name: defaults.pop(name) for name in ("lowrank", "quant") if name in defaults}
    recipes: dict[str, Recipe] = {}
    for spec in _grid_specs(methods, heavy_ratios, budgets, baselines):
        own = dict(per_method.get(spec["method"], {}))
        if spec["method"] == "quant":
            spec = _quant_spec(spec, own)
        method = {spec["method"]: own} if own else {}
        recipe = Recipe.from_dict(
            {**defaults, **method, **spec, "profile": profile}, where="sweep recipe"
        )
        recipes.setdefault(json.dumps(recipe.to_dict(), sort_keys=True), recipe)
    return list(recipes.values())


def _quant_spec(spec: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """Quant FFSplit under the layer allocation (the default) sizes its heavy set itself: one
    recipe per budget, whatever the heavy ratios. The baselines have no scores to allocate by:
    they place widths two-level (edits ``own``, the quant settings of this recipe)."""
    if spec.get("selection", "score") != "score":
        own["allocation"] = "two-level"
    elif own.get("allocation", QuantConfig.allocation) == "layer":
        spec = {k: v for k, v in spec.items() if k != "heavy_ratio"}
    return spec


def _check_budget(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise FFSplitError(f"quality_budget_pct must be a finite percentage >= 0, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------- results


COLUMNS = (
    ("series", "series", "{}"),
    ("label", "variant", "{}"),
    ("ffn_reduction", "FFN cut", "{:.3f}"),
    ("perplexity", "ppl", "{:.2f}"),
    ("perplexity_change_pct", "ppl Δ%", "{:+.1f}"),
    ("bytes", "MB", "{:.1f}"),
    ("prefill_speedup", "prefill x", "{:.2f}"),
    ("decode_speedup", "decode x", "{:.2f}"),
    ("version", "version", "{}"),
    ("aliases", "alias", "{}"),
)
# Encoders have no perplexity: probe accuracy, its change, and the hidden-state error instead.
ENCODER_COLUMNS = (
    *COLUMNS[:3],
    ("accuracy", "accuracy", "{:.3f}"),
    ("accuracy_change_pct", "acc Δ%", "{:+.1f}"),
    ("hidden_error", "hidden err", "{:.4f}"),
    *COLUMNS[5:],
)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or value == "":
        return "-"
    if key == "bytes":
        value = value / 1e6
    if isinstance(value, list):
        value = ",".join(value)
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def print_results(results: dict[str, Any], file: Any = None) -> None:
    """The results table and where to look, with rich."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=160)
    table = Table(
        title=f"sweep of {results['model']['name']}: champion policy = {results['policy']['text']}"
    )
    encoder = not any("perplexity" in row for row in results["rows"])
    columns = ENCODER_COLUMNS if encoder else COLUMNS
    for _, title, _ in columns:
        table.add_column(
            title, justify="left" if title in ("series", "variant", "alias") else "right"
        )
    for row in results["rows"]:
        table.add_row(*(_cell(row, k, f) for k, _, f in columns))
    console.print(table)
    seconds = results.get("stage_seconds") or {}
    ordered = sorted(seconds.items(), key=lambda kv: STAGES.index(kv[0]) if kv[0] in STAGES else 99)
    console.print(
        "stage wall times (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in ordered)
        + f"; total {results.get('seconds', 0):.1f}",
        soft_wrap=True,  # one line whatever the terminal width (scripts parse it)
    )
    console.print(f"run folder: {results['run_dir']}", soft_wrap=True)


def _row(run: VariantRun, metrics: dict[str, float]) -> dict[str, Any]:
    """One line of the sweep's table (and of results.json)."""
    assert run.evaluation is not None
    return {
        "series": run.recipe.series,
        "label": run.recipe.label,
        "method": run.recipe.method_name,
        "heavy_ratio": run.recipe.heavy_ratio,
        "budget": run.recipe.ffn_reduction,
        **metrics,
        "variant": run.folder.path,
        "variant_key": run.folder.key,
        "eval_record": run.evaluation.path,
        "cached": run.cached,
    }


def _policy(quality_budget_pct: Any, objective: str) -> dict[str, Any]:
    budget = _check_budget(quality_budget_pct)
    if objective not in OBJECTIVES:
        raise FFSplitError(
            f"champion_objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}"
        )
    best = "fastest (decode speedup)" if objective == "speed" else "smallest"
    return {
        "quality_budget_pct": budget,
        "objective": objective,
        "text": f"{best} variant within +{budget:g}% perplexity of dense",
    }


def _profile(calib_tokens: Any, calib_window: Any) -> ProfileConfig:
    if not isinstance(calib_tokens, int) or not isinstance(calib_window, int):
        raise FFSplitError(
            f"calib_tokens and calib_window must be integers, got "
            f"{calib_tokens!r}, {calib_window!r}"
        )
    return ProfileConfig(tokens=calib_tokens, window=calib_window)


def _evaluated(
    stages: Stages, dense_recipe: Recipe, grid: list[Recipe], stats: Any
) -> tuple[list[VariantRun], list[dict[str, float]]]:
    """Compress, assemble, heal and evaluate the dense reference and the grid; runs and metrics.

    The dense reference is a variant too (method none, no split: registered under the `dense`
    alias); its quality is the base model's own evaluation.
    """
    runs = stages.heal(stages.assemble(stages.compress([dense_recipe, *grid], stats)))
    evaluated, dense = stages.evaluate(runs[1:])
    runs = [replace(runs[0], evaluation=dense), *evaluated]
    metrics = [run_metrics(run, dense) for run in runs]
    metrics[0].update({"perplexity_change_pct": 0.0, "prefill_speedup": 1.0, "decode_speedup": 1.0})
    return runs, metrics


def _register_all(
    run: Run,
    runs: list[VariantRun],
    metrics: list[dict[str, float]],
    model_name: str,
    artifacts: dict[str, str],
) -> list[dict[str, Any]]:
    """Every variant (the dense reference first) as an MLflow model version; the table's rows."""
    from tracking.registry import ROLE_TAG

    provenance = provenance_tags("sweep", run.folder)
    rows = []
    for item, values in zip(runs, metrics, strict=True):
        assert item.evaluation is not None
        row = _row(item, values)
        tags = {
            ROLE_TAG: "dense" if row["series"] == "dense" else "variant",
            "ffsplit.flow": "sweep",
            "ffsplit.series": row["series"],
            "ffsplit.variant_key": item.folder.key,
            **provenance,
        }
        registered = (
            register_version.with_options(task_run_name=f"register-{row['label']}")
            .submit(
                item.folder.path,
                model_name,
                values,
                {**artifacts, "eval/record.json": item.evaluation.path},
                tags,
            )
            .result()
        )
        rows.append({**row, "version": registered["version"], "reused": registered["reused"]})
    return rows


def _set_aliases(model_name: str, rows: list[dict[str, Any]], policy: dict[str, Any]) -> Any:
    """`dense` on the reference; `champion` by the policy (left where it was when none fits)."""
    from tracking.registry import CHAMPION_ALIAS, DENSE_ALIAS, choose_champion, set_alias

    set_alias(model_name, DENSE_ALIAS, rows[0]["version"])
    rows[0]["aliases"] = [DENSE_ALIAS]
    candidates = [{**r, "name": model_name} for r in rows[1:]]
    champion = choose_champion(candidates, policy["quality_budget_pct"], policy["objective"])
    if champion is not None:
        set_alias(model_name, CHAMPION_ALIAS, champion["version"])
        for r in rows[1:]:
            if r.get("version") == champion["version"]:
                r.setdefault("aliases", []).append(CHAMPION_ALIAS)
    return champion


def _start(
    model: str,
    grid: list[Recipe],
    profile: ProfileConfig | None,
    settings: Any,
    register_as: str | None,
    run_dir: str | None,
    started: float,
) -> tuple[Run, str]:
    """The run's checks (flows.run.start_run, every recipe's budget included) and its registered
    model name."""
    run = start_run(
        "sweep", model, settings, profile, register=True, run_dir=run_dir, started=started,
        recipes=grid,
    )  # fmt: skip
    print(
        f"sweep {run.base.name}: {len(grid)} variants + dense; cache {settings.cache_dir}; "
        f"run folder {run.folder}"
    )
    return run, registered_name(run.base, register_as)


def _results(
    run: Run,
    model_name: str,
    policy: dict[str, Any],
    champion: Any,
    rows: list[dict[str, Any]],
    stats: Statistics | None,
    stages: Stages,
    cluster: dict[str, Any],
    calib_tokens: int,
) -> dict[str, Any]:
    """results.json of a finished sweep."""
    return {
        "flow": "sweep",
        "model": run.base.to_dict(),
        "registered_name": model_name,
        "policy": policy,
        "champion": champion and {"version": champion["version"], "label": champion["label"]},
        "dense_version": rows[0]["version"],
        "rows": rows,
        "stats": stats
        and {"key": stats.key, "cached": stats.cached, "units": [u.to_dict() for u in stats.units]},
        "stage_seconds": stages.seconds,
        "seconds": time.perf_counter() - run.started,
        "cluster": cluster,
        "services": run.services,
        "settings": {
            "profile_units": stages.settings.profile_units,
            "compress_shards": stages.settings.compress_shards,
            "calib_tokens": calib_tokens,
            "eval": stages.settings.eval.key_dict(),
            "cache_dir": stages.settings.cache_dir,
        },
        "run_dir": str(run.folder),
        "pareto": str(run.folder / "pareto.png"),
    }


def _charts(
    stages: Stages,
    run: Run,
    runs: list[VariantRun],
    metrics: list[dict[str, float]],
    scores: Any,
) -> dict[str, str]:
    """The sweep's charts (Pareto; neuron scores when profiled), logged with every version."""
    from reports.plots import pareto_plot

    run.folder.mkdir(parents=True, exist_ok=True)
    with stages.timed("report"):
        title = f"{run.base.name}: perplexity change vs FFN reduction"
        table = [_row(r, m) for r, m in zip(runs, metrics, strict=True)]
        pareto = pareto_plot(table, run.folder / "pareto.png", title=title)
        artifacts = {"plots/pareto.png": str(pareto)}
        if scores is not None:
            artifacts["plots/scores.png"] = scores.result()
    return artifacts


def _write_results(
    run: Run, policy: dict[str, Any], rows: list[dict[str, Any]], results: dict[str, Any]
) -> None:
    """results.json and results.md in the run folder, and the table on the console."""
    write_json(run.folder / "results.json", results)
    (run.folder / "results.md").write_text(
        f"# sweep of {run.base.name}\n\nChampion policy: {policy['text']}.\n\n"
        + markdown_table(rows)
    )
    print_results(results)


# ------------------------------------------------------------------------------------------- flow


@flow(
    name="sweep", task_runner=ThreadPoolTaskRunner(max_workers=TASK_RUNNER_THREADS), log_prints=True
)
def sweep(
    model: str = DEFAULT_MODEL,
    methods: list[str] | None = None,
    heavy_ratios: list[float] | None = None,
    budgets: list[float] | None = None,
    baselines: list[str] | None = None,
    quality_budget_pct: float = DEFAULT_QUALITY_BUDGET_PCT,
    champion_objective: str = "speed",
    calib_tokens: int = PIPELINE_CALIB_TOKENS,
    calib_window: int = DEFAULT_WINDOW,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    eval_window: int = DEFAULT_WINDOW,
    latency: bool = True,
    latency_prompt_tokens: int = LATENCY.prompt_tokens,
    latency_decode_tokens: int = LATENCY.decode_tokens,
    latency_repeats: int = LATENCY.repeats,
    recipe_defaults: dict[str, Any] | None = None,
    profile_units: int = 2,
    compress_shards: int = 4,
    profile_mode: str = "units",
    layer_group_size: int | None = None,
    memory_cap_mb: float | None = None,
    register_as: str | None = None,
    run_dir: str | None = None,
    cache_dir: str | None = None,
    ray_cpus: int | None = None,
) -> dict[str, Any]:
    """Compress one model by a grid of recipes and the baselines, evaluate, register, set aliases.

    methods (lowrank, quant) x heavy_ratios x budgets (FFN byte reductions), plus baselines
    (uniform, random, prune; on request outlier, quant's column-outlier baseline per heavy ratio)
    at the same budgets; recipe_defaults adds Recipe fields to every variant (e.g.
    {"quant": {"gptq": true}}; {"heal": {"steps": 100}} heals every variant after assembly, and
    each is registered healed; quantized light parts are not trained, so a quant recipe heals only
    its 16-bit heavy part, and one with none is refused). quality_budget_pct and
    champion_objective ("speed" or "size") state the champion policy; latency_* set the latency
    race's workload. Defaults: methods lowrank,quant; heavy_ratios 0.1; budgets 0.3,0.5;
    baselines uniform,random,prune.
    """
    started = time.perf_counter()
    profile = _profile(calib_tokens, calib_window)
    grid = build_grid(
        DEFAULT_METHODS if methods is None else methods,
        DEFAULT_HEAVY_RATIOS if heavy_ratios is None else heavy_ratios,
        DEFAULT_BUDGETS if budgets is None else budgets,
        DEFAULT_BASELINES if baselines is None else baselines,
        profile.to_dict(),
        recipe_defaults,
    )
    policy = _policy(quality_budget_pct, champion_objective)
    settings = settings_from(locals())
    needs_stats = any(r.needs_statistics for r in grid)
    run, model_name = _start(
        model, grid, profile if needs_stats else None, settings, register_as, run_dir, started
    )
    dense_recipe = Recipe(
        method=SplitOnlyConfig(), selection="none", ffn_reduction=0, profile=profile
    )
    ray_started = time.perf_counter()
    with ray_session(num_cpus=ray_cpus) as cluster:
        stages = Stages(run.base, settings)
        stages.seconds["validate"] = run.validate_seconds
        stages.seconds["ray_start"] = time.perf_counter() - ray_started
        stats = stages.profile(profile) if needs_stats else None
        scores = (
            None if stats is None else score_plot.submit(stats, run.base.name, settings.cache_dir)
        )
        runs, metrics = _evaluated(stages, dense_recipe, grid, stats)
        artifacts = _charts(stages, run, runs, metrics, scores)
        with stages.timed("register"):
            rows = _register_all(run, runs, metrics, model_name, artifacts)
            champion = _set_aliases(model_name, rows, policy)
    results = _results(
        run, model_name, policy, champion, rows, stats, stages, cluster, calib_tokens
    )
    _write_results(run, policy, rows, results)
    print_results(results)
    return results


# -------------------------------------------------------------------------------------------- CLI


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.sweep run ...` or `report RUN_DIR`; errors in one line, exit code 2."""
    parser = argparse.ArgumentParser(prog="python -m flows.sweep")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the sweep flow here (Ray embedded unless RAY_ADDRESS)")
    run.add_argument("--model", default=DEFAULT_MODEL)
    run.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    run.add_argument("--heavy-ratios", type=_floats, default=DEFAULT_HEAVY_RATIOS)
    run.add_argument("--budgets", type=_floats, default=DEFAULT_BUDGETS)
    run.add_argument(
        "--baselines",
        default=",".join(DEFAULT_BASELINES),
        help=f"comma-separated, of {','.join(BASELINES)} (outlier: quant only)",
    )
    run.add_argument("--quality-budget-pct", type=float, default=DEFAULT_QUALITY_BUDGET_PCT)
    run.add_argument("--objective", default="speed", choices=OBJECTIVES)
    run.add_argument("--calib-tokens", type=int, default=PIPELINE_CALIB_TOKENS)
    run.add_argument("--calib-window", type=int, default=DEFAULT_WINDOW)
    run.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS)
    run.add_argument("--eval-window", type=int, default=DEFAULT_WINDOW)
    run.add_argument(
        "--recipe-defaults",
        type=json.loads,
        default=None,
        help='JSON of Recipe fields for every variant, e.g. {"quant": {"gptq": true}}',
    )
    run.add_argument("--profile-units", type=int, default=2)
    run.add_argument("--compress-shards", type=int, default=4)
    run.add_argument("--no-latency", action="store_true", help="skip the latency race")
    run.add_argument("--latency-decode-tokens", type=int, default=LATENCY.decode_tokens)
    run.add_argument("--latency-repeats", type=int, default=LATENCY.repeats)
    run.add_argument(
        "--register-as", default=None, help="MLflow model name (default ffsplit-MODEL)"
    )
    run.add_argument("--run-dir", default=None)
    report = sub.add_parser("report", help="print the results table of a finished run folder")
    report.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "report":
            path = args.run_dir / "results.json"
            if not path.is_file():
                raise FFSplitError(f"{path}: no results (did the sweep finish?)")
            print_results(json.loads(path.read_text()))
            return 0
        check_prefect_api()
        sweep(
            model=args.model,
            methods=args.methods.split(","),
            heavy_ratios=args.heavy_ratios,
            budgets=args.budgets,
            baselines=[b for b in args.baselines.split(",") if b],
            quality_budget_pct=args.quality_budget_pct,
            champion_objective=args.objective,
            calib_tokens=args.calib_tokens,
            calib_window=args.calib_window,
            eval_tokens=args.eval_tokens,
            eval_window=args.eval_window,
            recipe_defaults=args.recipe_defaults,
            latency=not args.no_latency,
            latency_decode_tokens=args.latency_decode_tokens,
            latency_repeats=args.latency_repeats,
            register_as=args.register_as,
            profile_units=args.profile_units,
            compress_shards=args.compress_shards,
            run_dir=args.run_dir,
        )
    except FFSplitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
