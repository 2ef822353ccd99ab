"""The paper's observation on one base model (issue 6): concentration, stability, coverage and
ablation of the heavy hitters, as one JSON-ready record."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ffsplit.config import (
    DEFAULT_WINDOW,
    ProfileConfig,
)
from ffsplit.errors import FFSplitError
from ffsplit.jobs.common import (
    Progress,
    _adapter_of,
    _require_tokenizer,
    _stage,
    run_environment,
)
from ffsplit.profiling import profile_model

# ------------------------------------------------------------------------------------ observation

OBSERVATION_HEAVY_RATIO = 0.01  # issue 6: the heavy set of the observation and the ablation: top 1%
OBSERVATION_STABILITY_RATIOS = (0.01, 0.05, 0.10)  # method.md: stability of the top 1/5/10%
OBSERVATION_CORPORA = ("wikipedia", "news")  # heavy sets from A, stability and coverage on B


def observation_params(
    calib_tokens: int = 8192,
    eval_tokens: int = 8192,
    window: int = DEFAULT_WINDOW,
    batch_size: int = 4,
    probe_limit: int = 1500,
    random_repeats: int = 3,
    seed: int = 0,
) -> dict[str, int]:
    """The observation's settings, checked (so a flow can refuse bad ones before any work)."""
    checks = (
        ("calib_tokens", calib_tokens, 2),
        ("eval_tokens", eval_tokens, 2),
        ("window", window, 2),
        ("batch_size", batch_size, 1),
        ("probe_limit", probe_limit, 3),  # the probe's tweets are balanced over 3 labels
        ("random_repeats", random_repeats, 1),
        ("seed", seed, 0),
    )
    for name, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise FFSplitError(f"observation: {name} must be an integer >= {low}, got {value!r}")
    for name, value in (("calib_tokens", calib_tokens), ("eval_tokens", eval_tokens)):
        if value < window:
            raise FFSplitError(
                f"observation: {name} ({value}) must be at least one window ({window})"
            )
    return {
        "calib_tokens": calib_tokens,
        "eval_tokens": eval_tokens,
        "window": window,
        "batch_size": batch_size,
        "probe_limit": probe_limit,
        "random_repeats": random_repeats,
        "seed": seed,
    }


# The defaults of every observation setting, by name (for command lines built over the job).
OBSERVATION_DEFAULTS: dict[str, int] = observation_params()
OBSERVATION_HELP = {"probe_limit": "tweets per probe split"}


def _counted(
    evaluate: Callable[[nn.Module], float],
    stage: str,
    total: int,
    progress: Progress | None,
) -> Callable[[nn.Module], float]:
    """evaluate, reporting each call as one progress step of `stage`."""
    done = [0]

    def run(candidate: nn.Module) -> float:
        value = evaluate(candidate)
        done[0] += 1
        if progress is not None:
            progress(stage, done[0], total)
        return value

    return run


def _profiles(
    net: nn.Module, adapter: Any, tokenizer: Any, params: dict[str, int], progress: Progress | None
) -> dict[str, Any]:
    """Statistics of both corpora (no Gram matrices), and the per-token coverage of corpus A's
    heavy set while profiling corpus B."""
    from ffsplit.analysis import count_coverage, heavy_sets
    from ffsplit.data.windows import calibration_windows, corpus_windows

    corpus_a, corpus_b = OBSERVATION_CORPORA
    tokens, window = params["calib_tokens"], params["window"]
    config = ProfileConfig(
        corpus=corpus_a,
        tokens=tokens,
        window=window,
        batch_size=params["batch_size"],
        collect_grams=False,  # the observation needs no Gram matrices (and they cost a lot on CPU)
    )
    calib, calib_ref = calibration_windows(tokenizer, corpus_a, tokens, window)
    other, other_ref = corpus_windows(tokenizer, corpus_b, "calibration", tokens, window)
    t0 = time.perf_counter()
    stats_a = profile_model(
        net, calib, config, adapter=adapter, progress=_stage(progress, f"profile {corpus_a}")
    )
    seconds = {f"profile_{corpus_a}": time.perf_counter() - t0}
    downs = {h.layer: adapter.weights(net, h).down for h in adapter.ffns(net)}
    heavy = heavy_sets(stats_a, downs, OBSERVATION_HEAVY_RATIO)
    top_k = {i: s.hit_top_k for i, s in stats_a.layers.items()}
    t0 = time.perf_counter()
    with count_coverage(net, adapter, heavy, top_k) as counts:
        stats_b = profile_model(
            net,
            other,
            config.replace(corpus=corpus_b),
            adapter=adapter,
            progress=_stage(progress, f"profile {corpus_b}"),
        )
    seconds[f"profile_{corpus_b}"] = time.perf_counter() - t0
    return {
        "config": config,
        "a": stats_a,
        "b": stats_b,
        "downs": downs,
        "counts": counts,
        "refs": {"calibration": calib_ref.to_dict(), "other_corpus": other_ref.to_dict()},
        "seconds": seconds,
    }


def _premise(profiles: dict[str, Any]) -> dict[str, Any]:
    """The record's observation part: concentration, stability and coverage of the heavy set."""
    from ffsplit.analysis import coverage_summary, heavy_set_stability, model_observation

    corpus_a, corpus_b = OBSERVATION_CORPORA
    ratio = OBSERVATION_HEAVY_RATIO
    stats_a, stats_b, downs = profiles["a"], profiles["b"], profiles["downs"]
    return {
        "profile": profiles["config"].to_dict(),
        "data": dict(profiles["refs"]),
        "corpora": {"a": corpus_a, "b": corpus_b},
        "heavy_ratio": ratio,
        "observation": model_observation(stats_a, downs, ratio),
        "observation_other_corpus": model_observation(stats_b, downs, ratio),
        "stability": {
            f"{round(100 * r)}%": heavy_set_stability(stats_a, stats_b, downs, r)
            for r in OBSERVATION_STABILITY_RATIOS
        },
        "coverage": {
            "corpus": corpus_b,
            "heavy_from": corpus_a,
            "heavy_ratio": ratio,
            **coverage_summary(profiles["counts"]),
        },
    }


def _quality(
    net: nn.Module, tokenizer: Any, params: dict[str, int], record: dict[str, Any]
) -> tuple[Callable[[nn.Module], float], str, bool]:
    """(quality of a model, its name, higher is better): perplexity on the evaluation split for
    causal LMs, linear-probe accuracy on tweets for encoders; the data go into the record."""
    from ffsplit.data.corpora import TWEET_LABELS, labelled_texts
    from ffsplit.data.windows import evaluation_windows
    from ffsplit.eval import perplexity, probe_accuracy
    from ffsplit.models.loading import is_causal_lm

    corpus_a = OBSERVATION_CORPORA[0]
    if is_causal_lm(net.config):
        windows, ref = evaluation_windows(
            tokenizer, corpus_a, params["eval_tokens"], params["window"]
        )
        record["data"]["evaluation"] = ref.to_dict()

        def ppl(candidate: nn.Module) -> float:
            return perplexity(candidate, windows, batch_size=params["batch_size"]).perplexity

        return ppl, f"perplexity ({corpus_a} evaluation split)", False
    limit, seed = params["probe_limit"], params["seed"]
    train = labelled_texts("tweets", "calibration", limit=limit, seed=seed)
    test = labelled_texts("tweets", "evaluation", limit=limit, seed=seed)
    record["data"]["probe"] = {
        "corpus": "tweets",
        "train_split": "calibration",
        "test_split": "evaluation",
        "per_split": limit,
        "balanced": True,
        "labels": list(TWEET_LABELS),
    }

    def accuracy(candidate: nn.Module) -> float:
        return probe_accuracy(candidate, tokenizer, *train, *test, seed=seed).accuracy

    return accuracy, f"linear-probe accuracy (tweets, {len(TWEET_LABELS)} classes)", True


def _ablations(
    net: nn.Module,
    adapter: Any,
    tokenizer: Any,
    stats: Any,
    params: dict[str, int],
    record: dict[str, Any],
    progress: Progress | None,
) -> None:
    """Top 1% of neurons zeroed against random and bottom 1% sets (and, for encoders, the
    relative error of the last hidden states, which the probe's refit hides), into the record."""
    from ffsplit.analysis import ablation, hidden_state_error
    from ffsplit.data.corpora import TWEET_LABELS
    from ffsplit.data.windows import evaluation_windows
    from ffsplit.models.loading import is_causal_lm

    quality, metric, higher = _quality(net, tokenizer, params, record)
    repeats = params["random_repeats"]
    total = 3 + repeats  # dense, top, bottom and one per random set: a progress step each
    common = {
        "fraction": OBSERVATION_HEAVY_RATIO,
        "seed": params["seed"],
        "random_repeats": repeats,
    }
    record["ablation"] = ablation(
        net,
        adapter,
        stats,
        _counted(quality, "ablation", total, progress),
        metric=metric,
        higher_is_better=higher,
        **common,
    )
    if is_causal_lm(net.config):
        return
    record["ablation"]["chance"] = 1 / len(TWEET_LABELS)
    corpus_a = OBSERVATION_CORPORA[0]
    windows, ref = evaluation_windows(tokenizer, corpus_a, params["eval_tokens"], params["window"])
    record["data"]["evaluation"] = ref.to_dict()
    error = hidden_state_error(net, windows, params["batch_size"])
    record["ablation_hidden"] = ablation(
        net,
        adapter,
        stats,
        _counted(error, "ablation hidden", total, progress),
        metric=f"relative error of the last hidden states vs dense ({corpus_a} evaluation)",
        higher_is_better=False,
        **common,
    )


def observation_job(
    model: str | Path,
    *,
    calib_tokens: int = 8192,
    eval_tokens: int = 8192,
    window: int = DEFAULT_WINDOW,
    batch_size: int = 4,
    probe_limit: int = 1500,
    random_repeats: int = 3,
    seed: int = 0,
    device: str = "cpu",
    command: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The paper's premise on one base model (issue 6), as one JSON-ready record.

    Profiles the Wikipedia and the news calibration splits (same token count, no Gram matrices),
    counts per-token coverage of the Wikipedia heavy set while profiling news, then zeroes the top
    1% of neurons by score against random and bottom 1% sets: perplexity on the Wikipedia
    evaluation split (causal LMs) or linear-probe accuracy on tweets (encoders, plus the relative
    error of the last hidden states on the Wikipedia evaluation split). The record's keys are those
    reports.observation_plots draws and tracking.observation logs; progress(stage, done, total).
    """
    from ffsplit.models.loading import load_model

    params = observation_params(
        calib_tokens, eval_tokens, window, batch_size, probe_limit, random_repeats, seed
    )
    started = time.perf_counter()
    net, tokenizer, ref = load_model(str(model), device=device)
    adapter = _adapter_of(net, model)
    _require_tokenizer(tokenizer, model, "the observation profiles and evaluates on text")
    seconds = {"load": time.perf_counter() - started}
    # Seeded here for reproducible random sets and probes, without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        profiles = _profiles(net, adapter, tokenizer, params, progress)
        seconds.update(profiles["seconds"])
        record: dict[str, Any] = {
            "command": command or f"ffsplit.jobs.observation_job({str(model)!r}, **{params})",
            "machine": run_environment(device),
            "model": ref.to_dict(),
            "adapter": adapter.name,
            **_premise(profiles),
        }
        t0 = time.perf_counter()
        _ablations(net, adapter, tokenizer, profiles["a"], params, record, progress)
    seconds["ablation"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started
    record["seconds"] = seconds
    return record
