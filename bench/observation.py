"""The paper's premise for one model (issue 6): heavy-hitter concentration, hit frequency,
heavy-set stability across corpora (Wikipedia vs news), and the top-vs-random neuron ablation.

Profiles the Wikipedia calibration split and the news calibration split (same token count, no
Gram matrices), counts per-token coverage of the Wikipedia heavy set while profiling news, then
zeroes the top 1% of neurons by score against random and bottom 1% sets and measures perplexity on
the Wikipedia evaluation split (causal LMs) or linear-probe accuracy on tweets (encoders; also the
relative error of the encoder's output on the Wikipedia evaluation split). Writes
OUT/observation.json and OUT/observation.png, OUT/ablation.png (OUT/ablation_hidden.png). CPU is fine.

    python bench/observation.py --model smollm2-135m --calib-tokens 8192 --eval-tokens 8192 \
        --out bench/results/observation/smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine  # noqa: E402
from ffsplit.adapters import get_adapter  # noqa: E402
from ffsplit.analysis import (  # noqa: E402
    ablation,
    count_coverage,
    coverage_summary,
    heavy_set_stability,
    heavy_sets,
    model_observation,
)
from ffsplit.config import ProfileConfig  # noqa: E402
from ffsplit.data.corpora import TWEET_LABELS, labelled_texts  # noqa: E402
from ffsplit.data.windows import calibration_windows, corpus_windows, evaluation_windows  # noqa: E402
from ffsplit.eval import perplexity, probe_accuracy  # noqa: E402
from ffsplit.models.loading import is_causal_lm, load_model  # noqa: E402
from ffsplit.profiling import profile_model  # noqa: E402
from ffsplit.variant.atomic import write_text_atomic  # noqa: E402
from tasks.observation_plots import observation_plots  # noqa: E402

HEAVY_RATIO = 0.01  # issue 6: the heavy set of the observation and the ablation is the top 1%
STABILITY_RATIOS = (0.01, 0.05, 0.10)
CORPUS_A, CORPUS_B = "wikipedia", "news"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def progress(what: str):  # noqa: ANN201 - a small closure for profile_model / perplexity
    def report(done: int, total: int) -> None:
        if done == total or done % max(1, total // 4) < 4:
            log(f"{what}: {done}/{total} windows")

    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="smollm2-135m | gemma3-270m | minilm-l6")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--probe-limit", type=int, default=1500, help="tweets per probe split")
    parser.add_argument("--random-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    model, tokenizer, ref = load_model(args.model)
    adapter = get_adapter(model)
    causal = is_causal_lm(model.config)
    seconds["load"] = time.perf_counter() - started
    log(f"loaded {ref.name} ({ref.architecture}), causal={causal}")

    config = ProfileConfig(
        corpus=CORPUS_A,
        tokens=args.calib_tokens,
        window=args.window,
        batch_size=args.batch_size,
        collect_grams=False,  # the observation needs no Gram matrices (and they cost a lot on CPU)
    )
    calib, calib_ref = calibration_windows(tokenizer, CORPUS_A, args.calib_tokens, args.window)
    news, news_ref = corpus_windows(
        tokenizer, CORPUS_B, "calibration", args.calib_tokens, args.window
    )

    t0 = time.perf_counter()
    stats_a = profile_model(model, calib, config, adapter=adapter, progress=progress(CORPUS_A))
    seconds[f"profile_{CORPUS_A}"] = time.perf_counter() - t0
    downs = {h.layer: adapter.weights(model, h).down for h in adapter.ffns(model)}
    heavy = heavy_sets(stats_a, downs, HEAVY_RATIO)
    top_k = {i: s.hit_top_k for i, s in stats_a.layers.items()}

    t0 = time.perf_counter()
    with count_coverage(model, adapter, heavy, top_k) as counts:
        stats_b = profile_model(
            model,
            news,
            config.replace(corpus=CORPUS_B),
            adapter=adapter,
            progress=progress(CORPUS_B),
        )
    seconds[f"profile_{CORPUS_B}"] = time.perf_counter() - t0

    record: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "model": ref.to_dict(),
        "adapter": adapter.name,
        "profile": config.to_dict(),
        "data": {"calibration": calib_ref.to_dict(), "other_corpus": news_ref.to_dict()},
        "corpora": {"a": CORPUS_A, "b": CORPUS_B},
        "heavy_ratio": HEAVY_RATIO,
        "observation": model_observation(stats_a, downs, HEAVY_RATIO),
        "observation_other_corpus": model_observation(stats_b, downs, HEAVY_RATIO),
        "stability": {
            f"{round(100 * r)}%": heavy_set_stability(stats_a, stats_b, downs, r)
            for r in STABILITY_RATIOS
        },
        "coverage": {
            "corpus": CORPUS_B,
            "heavy_from": CORPUS_A,
            "heavy_ratio": HEAVY_RATIO,
            **coverage_summary(counts),
        },
    }

    t0 = time.perf_counter()
    if causal:
        windows, eval_ref = evaluation_windows(tokenizer, CORPUS_A, args.eval_tokens, args.window)
        record["data"]["evaluation"] = eval_ref.to_dict()

        def evaluate(net: torch.nn.Module) -> float:
            result = perplexity(net, windows, batch_size=args.batch_size)
            log(f"perplexity {result.perplexity:.4g} ({result.tokens_per_s:.0f} tokens/s)")
            return result.perplexity

        metric, higher = "perplexity (wikipedia evaluation split)", False
    else:
        train = labelled_texts("tweets", "calibration", limit=args.probe_limit, seed=args.seed)
        test = labelled_texts("tweets", "evaluation", limit=args.probe_limit, seed=args.seed)
        record["data"]["probe"] = {
            "corpus": "tweets",
            "train_split": "calibration",
            "test_split": "evaluation",
            "per_split": args.probe_limit,
            "balanced": True,
            "labels": list(TWEET_LABELS),
        }

        def evaluate(net: torch.nn.Module) -> float:
            result = probe_accuracy(net, tokenizer, *train, *test, seed=args.seed)
            log(f"probe accuracy {result.accuracy:.4f} (converged={result.converged})")
            return result.accuracy

        metric, higher = "linear-probe accuracy (tweets, 3 classes)", True
    common = {"fraction": HEAVY_RATIO, "seed": args.seed, "random_repeats": args.random_repeats}
    record["ablation"] = ablation(
        model, adapter, stats_a, evaluate, metric=metric, higher_is_better=higher, **common
    )
    if not causal:
        record["ablation"]["chance"] = 1 / len(TWEET_LABELS)
        # The probe refits on the ablated features, which hides much of the damage: the relative
        # error of the encoder's output itself is the sensitive measure.
        windows, eval_ref = evaluation_windows(tokenizer, CORPUS_A, args.eval_tokens, args.window)
        record["data"]["evaluation"] = eval_ref.to_dict()
        error = hidden_error(
            windows, dense_hidden(model, windows, args.batch_size), args.batch_size
        )
        record["ablation_hidden"] = ablation(
            model,
            adapter,
            stats_a,
            error,
            metric="relative error of the last hidden states vs dense (wikipedia evaluation)",
            higher_is_better=False,
            **common,
        )
    seconds["ablation"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started
    record["seconds"] = seconds

    args.out.mkdir(parents=True, exist_ok=True)
    path = write_text_atomic(args.out / "observation.json", json.dumps(record, indent=1) + "\n")
    pngs = observation_plots(record, args.out)
    log(f"wrote {path}, {', '.join(str(p) for p in pngs)}")
    print(json.dumps(headline(record), indent=1))


@torch.inference_mode()
def dense_hidden(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int
) -> list[torch.Tensor]:
    """The dense model's last hidden states, one tensor per batch of windows."""
    return [
        model(input_ids=windows[i : i + batch_size]).last_hidden_state.float()
        for i in range(0, windows.shape[0], batch_size)
    ]


def hidden_error(windows: torch.Tensor, reference: list[torch.Tensor], batch_size: int):  # noqa: ANN201
    """evaluate(model) -> ||H - H_dense||_F / ||H_dense||_F over all windows (0 for the dense model)."""

    @torch.inference_mode()
    def evaluate(net: torch.nn.Module) -> float:
        diff = total = 0.0
        for ref, i in zip(reference, range(0, windows.shape[0], batch_size), strict=True):
            out = net(input_ids=windows[i : i + batch_size]).last_hidden_state.float()
            diff += float((out - ref).double().pow(2).sum())
            total += float(ref.double().pow(2).sum())
        value = (diff / total) ** 0.5
        log(f"relative hidden-state error {value:.4g}")
        return value

    return evaluate


def headline(record: dict[str, Any]) -> dict[str, Any]:
    """The numbers a report quotes: means over layers, and the ablation."""
    mean = record["observation"]["mean"]
    out = {
        "model": record["model"].get("name"),
        "top1_share": mean["top1_share"],
        "top5_share": mean["top5_share"],
        "top10_share": mean["top10_share"],
        "score_gini": mean["score_gini"],
        "heavy_slot_share": mean["heavy_slot_share"],
        "uniform_slot_share": mean["uniform_slot_share"],
        "hit_lift": mean["hit_lift"],
        "coverage_other_corpus": record["coverage"]["mean"]["covered_rate"],
        "coverage_random": record["coverage"]["mean"]["random_covered_rate"],
        "jaccard": {k: v["mean"]["jaccard"] for k, v in record["stability"].items()},
        "random_jaccard": {k: v["mean"]["random_jaccard"] for k, v in record["stability"].items()},
    }
    keys = ("metric", "dense", "top", "bottom", "random_mean", "random")
    for name in ("ablation", "ablation_hidden"):
        if name in record:
            out[name] = {k: record[name][k] for k in keys if k in record[name]}
    return out


if __name__ == "__main__":
    main()
