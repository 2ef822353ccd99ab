"""Low-bit quality at equal FFN bytes (issue 17): FFSplit quant against uniform and outlier baselines.

Profiles the model once on the Wikipedia calibration split (statistics with both Gram matrices,
cached in --stats and reused), then for each method and FFN byte reduction builds every FFN from a
neuron plan (ffsplit/compress/plans.py), swaps it into a copy of the model and measures quality:
perplexity on the Wikipedia and the news evaluation splits (causal LMs), or linear-probe accuracy
on tweets plus the relative error of the last hidden states on the Wikipedia evaluation split
(encoders). Every row records its exact FFN bytes and achieved reduction; rows go to --out as
they finish (JSON, --resume keeps them).

Methods (``--methods``, comma separated):
  uniform-rtn, uniform-gptq       no split: every neuron within one bit of the others (index order)
                                  (after a GPTQ method: -downrtn down by RTN, up/gate by GPTQ;
                                  -noact GPTQ in index order, no act-order)
  ffsplit-h<rho>-<bf16|int8>      heavy = top rho by score at that precision, light over two
                                  adjacent widths in score order (GPTQ; add -rtn for RTN)
  random-h<rho>-<bf16|int8>       the same with a random heavy set and light order
  outlier-h<rho>                  OWQ-style: rho of each matrix's input columns kept bf16
  alloc-<layer|global>-<parts|joint>[-rel][-no16]
                                  widths per neuron (and per part) by the proxy allocation
                                  (ffsplit/compress/allocation.py), per layer or over all layers
                                  (-rel: errors relative to each layer's output energy;
                                  -no16: no bf16 level, int8 at most)

    nice -n 5 .venv/bin/python bench/lowbit.py --model smollm2-135m --budgets 0.75 \
        --methods uniform-gptq,ffsplit-h0.01-int8 --out bench/results/lowbit-smollm2-135m.json
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ffsplit.adapters import FFNWeights, get_adapter
from ffsplit.compress.allocation import LEVELS, allocate, allocation_plans, neuron_part_costs
from ffsplit.compress.budget import (
    FFNShape,
    dense_ffn_bytes,
    max_bytes,
    neuron_plan_bytes,
    reduction,
    solve_light_bits,
)
from ffsplit.compress.outliers import outlier_columns, outlier_count
from ffsplit.compress.plans import (
    NeuronPlan,
    RowQuantizer,
    build_plan_ffn,
    column_outlier_plan,
    two_level_plan,
)
from ffsplit.config import ProfileConfig
from ffsplit.data.windows import calibration_windows, corpus_windows
from ffsplit.files import write_text_atomic
from ffsplit.jobs import run_environment
from ffsplit.models.loading import is_causal_lm, load_model
from ffsplit.profiling import ModelStats, load_stats, profile_model, save_stats
from ffsplit.selection import heavy_count, neuron_scores, order_by_score, random_order
from ffsplit.split.apply import swap_ffn

CACHE = Path.home() / ".cache" / "ffsplit" / "lowbit"
WEIGHTS_NOTE = {
    "smollm2-135m": "packaged weights are dequantized GGUF Q4_1 (4-bit, blocks of 32 along each "
    "matrix's input dim): up/gate groups along d align with that grid, down's do not",
    "gemma3-270m": "packaged weights are dequantized GGUF Q4_K_M (4/5/6-bit blocks)",
    "minilm-l6": "genuine fp32 weights",
    "mpnet-base": "genuine fp32 weights",
}


@dataclass
class Layer:
    """One FFN's weights, statistics and the caches shared by every method and budget."""

    weights: FFNWeights
    stats: Any
    shape: FFNShape
    scores: Tensor
    rows: dict[str, RowQuantizer] = field(default_factory=dict)
    costs: dict[tuple[bool, bool], list] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A parsed --methods entry."""

    name: str
    family: str  # uniform, ffsplit, random, outlier, alloc
    ratio: float = 0.0
    heavy_bits: int = 16
    gptq: bool = True
    scope: str = "layer"  # alloc: per layer or global
    joint: bool = False  # alloc: one width per neuron for all its vectors
    relative: bool = False  # alloc: errors relative to the layer's output energy
    dense_level: bool = True  # alloc: bf16 allowed
    down_gptq: bool = True  # -downrtn: GPTQ for up/gate only, down by RTN (the old recipe)
    act_order: bool = True  # -noact: GPTQ in index order


def parse_method(name: str) -> Method:
    parts = name.split("-")
    family = parts[0]
    method = _parse_family(name, family, parts)
    return replace(method, down_gptq="downrtn" not in parts, act_order="noact" not in parts)


def _parse_family(name: str, family: str, parts: list[str]) -> Method:
    if family == "uniform":
        return Method(name, family, gptq=parts[1] == "gptq")
    if family in ("ffsplit", "random"):
        return Method(
            name,
            family,
            ratio=float(parts[1][1:]),
            heavy_bits=16 if parts[2] == "bf16" else 8,
            gptq="rtn" not in parts[3:],
        )
    if family == "outlier":
        return Method(name, family, ratio=float(parts[1][1:]), gptq="rtn" not in parts[2:])
    if family == "alloc":
        return Method(
            name,
            family,
            scope=parts[1],
            joint=parts[2] == "joint",
            relative="rel" in parts[3:],
            dense_level="no16" not in parts[3:],
            gptq="rtn" not in parts[3:],
        )
    raise SystemExit(f"unknown method {name!r}")


def two_level_plans(
    method: Method, layers: dict[int, Layer], target: float, group: int, ladder: tuple[int, ...]
) -> dict[int, NeuronPlan]:
    """uniform / ffsplit / random: per layer, heavy neurons then two adjacent light widths."""
    plans = {}
    for index, layer in layers.items():
        m = layer.shape.m
        if method.family == "uniform":
            order, heavy = torch.arange(m), 0
        elif method.family == "ffsplit":
            order, heavy = order_by_score(layer.scores).cpu(), heavy_count(m, method.ratio)
        else:
            first, rest = random_order(m, method.ratio, 0, index)
            order, heavy = torch.cat([first, rest]), first.numel()
        bits = method.heavy_bits if heavy else 16
        counts = solve_light_bits(layer.shape, heavy, bits, target, group, ladder)
        plans[index] = two_level_plan(order, heavy, bits, counts)
    return plans


def outlier_plans(
    method: Method, layers: dict[int, Layer], target: float, group: int, ladder: tuple[int, ...]
) -> dict[int, NeuronPlan]:
    """The column-outlier baseline: kept input columns by Gram diagonal, the rest in index order."""
    plans = {}
    for index, layer in layers.items():
        shape = layer.shape
        kept_down = outlier_columns(layer.stats.gram_hidden, outlier_count(shape.m, method.ratio))
        kept_in = outlier_count(shape.d, method.ratio)
        plans[index] = column_outlier_plan(shape, kept_down, kept_in, target, group, ladder)
    return plans


def alloc_plans(
    method: Method, layers: dict[int, Layer], target: float, group: int, ladder: tuple[int, ...]
) -> dict[int, NeuronPlan]:
    levels = tuple(b for b in LEVELS if b in ladder or (b == 16 and method.dense_level))
    costs_by_layer = {}
    for index, layer in layers.items():
        key = (method.joint, method.relative, levels)
        if key not in layer.costs:
            energy = float(layer.scores.double().pow(2).sum())
            scale = 1.0 / energy if method.relative and energy > 0 else 1.0
            layer.costs[key] = neuron_part_costs(
                layer.weights, layer.stats, index, group, levels, method.joint, scale
            )
        costs_by_layer[index] = layer.costs[key]
    orders = {i: order_by_score(layer.scores).cpu() for i, layer in layers.items()}

    def budget_of(indices: list[int]) -> int:
        dense = sum(dense_ffn_bytes(layers[i].shape) for i in indices)
        biases = sum(layers[i].shape.bias_bytes(layers[i].shape.m) for i in indices)
        return max_bytes(dense, target) - biases

    plans: dict[int, NeuronPlan] = {}
    groups = [[i] for i in layers] if method.scope == "layer" else [list(layers)]
    for indices in groups:
        costs = [c for i in indices for c in costs_by_layer[i]]
        result = allocate(costs, budget_of(indices))
        plans.update(allocation_plans(costs, result, orders))
    return plans


def row_key(method: Method) -> str:
    """Which RowQuantizer cache a method's up/gate rows come from."""
    kept = method.ratio if method.family == "outlier" else 0
    order = "" if method.act_order else "-noact"
    return f"{'gptq' if method.gptq else 'rtn'}-{kept}{order}"


def row_quantizer(method: Method, layer: Layer, group: int) -> RowQuantizer:
    key = row_key(method)
    if key not in layer.rows:
        kept = None
        if method.family == "outlier":
            kept = outlier_columns(layer.stats.gram_in, outlier_count(layer.shape.d, method.ratio))
        gram = layer.stats.gram_in if method.gptq else None
        layer.rows[key] = RowQuantizer(
            layer.weights, group, gram, kept=kept, act_order=method.act_order
        )
    return layer.rows[key]


# Read by forked workers (set before the pool starts, shared copy-on-write, never sent).
_SHARED: dict[str, Any] = {}


def _row_job(job: tuple[int, str, str, int]) -> tuple[tuple[int, str, str, int], Any]:
    index, key, name, bits = job
    torch.set_num_threads(1)
    quantizer = _SHARED["layers"][index].rows[key]
    return job, quantizer._whole(name, bits)


def _layer_job(index: int) -> tuple[int, tuple]:
    torch.set_num_threads(1)
    method, plans, group = _SHARED["method"], _SHARED["plans"], _SHARED["group"]
    layer = _SHARED["layers"][index]
    rows = row_quantizer(method, layer, group)
    down_gptq = method.gptq and method.down_gptq
    modules = build_plan_ffn(
        layer.weights,
        plans[index],
        group,
        layer.stats,
        gptq=down_gptq,
        act_order=method.act_order,
        rows=rows,
    )
    return index, modules


def _map(function: Any, jobs: list, workers: int) -> list:
    """function over jobs in forked workers (serially for one worker)."""
    if workers <= 1 or len(jobs) <= 1:
        return [function(job) for job in jobs]
    context = multiprocessing.get_context("fork")
    with context.Pool(min(workers, len(jobs))) as pool:
        return pool.map(function, jobs, chunksize=1)


def build_modules(
    layers: dict[int, Layer],
    plans: dict[int, NeuronPlan],
    method: Method,
    group: int,
    workers: int,
) -> dict[int, tuple]:
    """Every FFN's split modules by its plan. The up/gate rows of each width are quantized once
    per model (RowQuantizer caches, filled in parallel first), then layers build in parallel."""
    key = row_key(method)
    jobs = []
    for index, layer in layers.items():
        quantizer = row_quantizer(method, layer, group)
        for bits in sorted(set(plans[index].up_gate.tolist()) - {16}):
            for name in ("up", "gate"):
                if quantizer.matrices[name] is not None and (name, bits) not in quantizer._cache:
                    jobs.append((index, key, name, bits))
    _SHARED.update(layers=layers, method=method, plans=plans, group=group)
    for (index, _, name, bits), result in _map(_row_job, jobs, workers):
        layers[index].rows[key]._cache[(name, bits)] = result
    return dict(_map(_layer_job, list(layers), workers))


PLANNERS = {
    "uniform": two_level_plans,
    "ffsplit": two_level_plans,
    "random": two_level_plans,
    "outlier": outlier_plans,
    "alloc": alloc_plans,
}


def histogram(plans: dict[int, NeuronPlan], layers: dict[int, Layer]) -> dict[str, Any]:
    """Widths summary: neuron counts per width and part, and the mean width of the top 1% of
    neurons by score against the rest (does the plan favour the heavy hitters?)."""
    out: dict[str, Any] = {}
    for part in ("up_gate", "down"):
        widths = torch.cat([getattr(p, part) for p in plans.values()])
        values, counts = widths.unique(return_counts=True)
        out[part] = {int(v): int(c) for v, c in zip(values, counts, strict=True)}
    top, rest = [], []
    for index, plan in plans.items():
        order = order_by_score(layers[index].scores).cpu()
        k = heavy_count(order.numel(), 0.01)
        mean = (plan.up_gate.double() * 2 + plan.down.double()) / 3
        top.append(mean[order[:k]])
        rest.append(mean[order[k:]])
    out["mean_bits_top1pct"] = float(torch.cat(top).mean())
    out["mean_bits_rest"] = float(torch.cat(rest).mean())
    out["mean_bits_per_layer"] = [
        round(float((p.up_gate.double() * 2 + p.down.double()).mean() / 3), 3)
        for p in plans.values()
    ]
    return out


def build_variant(
    base: nn.Module,
    layers: dict[int, Layer],
    plans: dict[int, NeuronPlan],
    method: Method,
    args: argparse.Namespace,
) -> tuple[nn.Module, int]:
    """A copy of the base model with every FFN swapped for its plan's modules; its FFN bytes."""
    built_modules = build_modules(layers, plans, method, args.group, args.workers)
    net = copy.deepcopy(base)
    adapter = get_adapter(net)
    total = 0
    for handle in adapter.ffns(net):
        layer, plan = layers[handle.layer], plans[handle.layer]
        modules = built_modules[handle.layer]
        built = sum(m.nbytes() for m in modules if m is not None)
        up_gate, down = plan.up_gate.tolist(), plan.down.tolist()
        planned = neuron_plan_bytes(layer.shape, up_gate, down, args.group)
        if method.family != "outlier" and built != planned:
            raise RuntimeError(f"layer {handle.layer}: built {built} B, planned {planned} B")
        total += built
        swap_ffn(net, adapter, handle, modules)
    return net, total


class Quality:
    """The quality measures of one model, with the dense model's references computed once."""

    def __init__(self, base: nn.Module, tokenizer: Any, args: argparse.Namespace) -> None:
        self.causal = is_causal_lm(base.config)
        self.data: dict[str, Any] = {}
        self.tokenizer = tokenizer
        if self.causal:
            self.windows = {}
            for corpus in ("wikipedia", "news"):
                ids, ref = corpus_windows(
                    tokenizer, corpus, "evaluation", args.eval_tokens, args.window
                )
                self.windows[corpus] = ids
                self.data[f"evaluation_{corpus}"] = ref.to_dict()
        else:
            from ffsplit.analysis import hidden_state_error
            from ffsplit.data.corpora import labelled_texts

            # --probe-limit 0: no probe (its embeddings of ~3000 tweets dominate an encoder's
            # evaluation on a shared CPU, and the hidden-state error is the sensitive measure)
            self.probe = args.probe_limit > 0
            if self.probe:
                self.train = labelled_texts("tweets", "calibration", limit=args.probe_limit)
                self.test = labelled_texts("tweets", "evaluation", limit=args.probe_limit)
            ids, ref = corpus_windows(
                tokenizer, "wikipedia", "evaluation", args.eval_tokens, args.window
            )
            self.hidden_error = hidden_state_error(base, ids)
            self.data["evaluation_wikipedia"] = ref.to_dict()
            self.data["probe"] = {
                "corpus": "tweets",
                "train_split": "calibration",
                "test_split": "evaluation",
                "per_split": args.probe_limit,
                "balanced": True,
            }

    def __call__(self, net: nn.Module) -> dict[str, float]:
        if self.causal:
            from ffsplit.eval import perplexity

            return {f"ppl_{c}": perplexity(net, w).perplexity for c, w in self.windows.items()}
        from ffsplit.eval import probe_accuracy

        out = {"hidden_error": self.hidden_error(net)}
        if self.probe:
            out["probe_accuracy"] = probe_accuracy(
                net, self.tokenizer, *self.train, *self.test
            ).accuracy
        return out


def statistics(model: nn.Module, tokenizer: Any, args: argparse.Namespace, ref: Any) -> ModelStats:
    path = args.stats or CACHE / f"{args.name}-stats.safetensors"
    if path.is_file():
        return load_stats(path)
    config = ProfileConfig(tokens=args.calib_tokens, window=args.window)
    windows, calibration = calibration_windows(
        tokenizer, config.corpus, config.tokens, config.window
    )
    meta = {"model_sha256": ref.weights_sha256, "calibration": calibration.to_dict()}
    stats = profile_model(model, windows, config, meta=meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_stats(stats, path)
    return load_stats(path)  # on the CPU, where GPTQ runs


def prepare_layers(model: nn.Module, stats: ModelStats) -> dict[int, Layer]:
    adapter = get_adapter(model)
    layers = {}
    for handle in adapter.ffns(model):
        weights = adapter.weights(model, handle)
        weights = FFNWeights(
            **{
                k: None if t is None else t.detach().to("cpu", copy=True)
                for k, t in vars(weights).items()
            }
        )
        layer_stats = stats.layers[handle.layer]
        layers[handle.layer] = Layer(
            weights,
            layer_stats,
            FFNShape.from_weights(weights),
            neuron_scores(layer_stats, weights.down),
        )
    return layers


def change(row: dict[str, float], dense: dict[str, float]) -> dict[str, float]:
    out = {}
    for key, value in row.items():
        if key.startswith("ppl_"):
            out[f"{key}_change_pct"] = 100 * (value / dense[key] - 1)
        elif key == "probe_accuracy":
            out["probe_accuracy_drop_pt"] = 100 * (dense[key] - value)
    return out


def run_row(
    method: Method,
    target: float,
    ctx: dict[str, Any],
) -> dict[str, Any]:
    args, layers = ctx["args"], ctx["layers"]
    ladder = tuple(int(b) for b in args.ladder.split(","))
    started = time.perf_counter()
    # GPTQ's column loop is many small ops: one thread, or a shared CPU's spinning threads make
    # it ~10x slower (measured on 2 shared cores)
    torch.set_num_threads(1)
    plans = PLANNERS[method.family](method, layers, target, args.group, ladder)
    net, ffn_bytes = build_variant(ctx["base"], layers, plans, method, args)
    net.to(args.device)
    built = time.perf_counter() - started
    torch.set_num_threads(args.threads)
    quality = ctx["quality"](net)
    dense_bytes = sum(dense_ffn_bytes(layer.shape) for layer in layers.values())
    return {
        "method": method.name,
        "group_size": args.group,
        "ladder": list(ladder),
        "target_reduction": target,
        "ffn_reduction": reduction(dense_bytes, ffn_bytes),
        "ffn_bytes": ffn_bytes,
        "dense_ffn_bytes": dense_bytes,
        **quality,
        **change(quality, ctx["dense"]),
        "widths": histogram(plans, layers),
        "build_seconds": built,
        "eval_seconds": time.perf_counter() - started - built,
    }


CHART_METHODS = (
    "uniform-rtn",
    "uniform-gptq",
    "random-h0.01-int8",
    "outlier-h0.01",
    "ffsplit-h0.01-int8",
    "ffsplit-h0.005-int8",
    "alloc-layer-joint",
)


def plot_records(paths: list[Path], out: Path) -> None:
    """Quality loss against achieved FFN reduction, one line per method (solid: FFSplit, dashed:
    baselines; marker: group size), from one model's records: perplexity change on both corpora,
    or hidden-state error and probe-accuracy drop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(p.read_text()) for p in paths]
    causal = "ppl_wikipedia" in records[0]["dense"]
    keys = ["ppl_wikipedia_change_pct", "ppl_news_change_pct"] if causal else ["hidden_error"]
    if not causal and any("probe_accuracy" in r for rec in records for r in rec["rows"]):
        keys.append("probe_accuracy_drop_pt")
    fig, grid = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.8), squeeze=False)
    axes = list(grid[0])
    lines: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in records:
        for row in record["rows"]:
            if row["method"] in CHART_METHODS:
                lines.setdefault((row["method"], row["group_size"]), []).append(row)
    colors = dict(zip(CHART_METHODS, plt.cm.tab10.colors, strict=False))
    markers = dict(zip(sorted({g for _, g in lines}), "os^vD", strict=False))
    for ax, key in zip(axes, keys, strict=True):
        for (method, group), rows in sorted(lines.items()):
            rows = sorted((r for r in rows if key in r), key=lambda r: r["ffn_reduction"])
            ax.plot(
                [100 * r["ffn_reduction"] for r in rows],
                [r[key] for r in rows],
                "-" if method.startswith(("ffsplit", "alloc")) else "--",
                color=colors[method],
                marker=markers[group],
                label=f"{method} g{group}",
            )
        if key != "probe_accuracy_drop_pt":
            ax.set_yscale("log")
        ax.set_xlabel("FFN byte reduction (%)")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    name = records[0].get("model_name", records[0]["model"].get("name", ""))
    fig.suptitle(f"{name}: quality loss at equal FFN bytes. {records[0]['weights']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _quality_cell(row: dict[str, Any]) -> str:
    if "ppl_wikipedia" in row:
        return (
            f"{row['ppl_wikipedia']:.2f} ({row['ppl_wikipedia_change_pct']:+.2f}%) / "
            f"{row['ppl_news']:.2f} ({row['ppl_news_change_pct']:+.2f}%)"
        )
    if "probe_accuracy" not in row:
        return f"{row['hidden_error']:.4f} / -"
    drop = -row["probe_accuracy_drop_pt"]
    return f"{row['hidden_error']:.4f} / {100 * row['probe_accuracy']:.1f} ({drop:+.1f} pt)"


def _loss(row: dict[str, Any]) -> float:
    """The quality loss the targets compare: perplexity change on Wikipedia, or hidden error."""
    return row["ppl_wikipedia_change_pct"] if "ppl_wikipedia" in row else row["hidden_error"]


def summary_table(paths: list[Path]) -> str:
    """Markdown: every row by budget (bytes exact), and per budget the best FFSplit method
    against uniform GPTQ and the column-outlier baseline at the same group size."""
    out = []
    for path in paths:
        record = json.loads(path.read_text())
        causal = "ppl_wikipedia" in record["dense"]
        head = "ppl wiki / news (change)" if causal else "hidden error / probe % (change)"
        out += [f"\n{path.name}: {record.get('model_name')}, {record['weights']}", ""]
        out += [f"| budget | method | group | FFN bytes | reduction | {head} |", "|" + "---|" * 6]
        rows = sorted(record["rows"], key=lambda r: (r["target_reduction"], _loss(r)))
        for r in rows:
            out.append(
                f"| {100 * r['target_reduction']:g}% | {r['method']} | {r['group_size']} | "
                f"{r['ffn_bytes']:,} | {100 * r['ffn_reduction']:.4f}% | {_quality_cell(r)} |"
            )
        out += ["", "| budget | best FFSplit | loss | uniform GPTQ | loss cut | column outlier |"]
        out += ["|" + "---|" * 6]
        for target in sorted({r["target_reduction"] for r in rows}):
            at = [r for r in rows if r["target_reduction"] == target]
            split = [r for r in at if r["method"].startswith(("ffsplit", "alloc"))]
            uniform = [r for r in at if r["method"] == "uniform-gptq"]
            outlier = [r for r in at if r["method"].startswith("outlier")]
            if not split or not uniform:
                continue
            best, base = split[0], uniform[0]
            cut = 1 - _loss(best) / _loss(base) if _loss(base) else 0.0
            other = f"{outlier[0]['method']} {_loss(outlier[0]):.4g}" if outlier else "-"
            out.append(
                f"| {100 * target:g}% | {best['method']} | {_loss(best):.4g} | "
                f"{_loss(base):.4g} | {100 * cut:.0f}% | {other} |"
            )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="packaged name or HF folder")
    parser.add_argument("--name", help="the packaged name a --model folder holds (records)")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--probe-limit", type=int, default=1500)
    parser.add_argument("--budgets", default="0.6,0.7,0.75,0.8")
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--ladder", default="8,6,5,4,3,2")
    parser.add_argument("--methods", default="uniform-rtn,uniform-gptq,ffsplit-h0.01-int8")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for evaluation")
    parser.add_argument("--workers", type=int, default=1, help="processes building FFNs")
    parser.add_argument("--device", default="cpu", help="where profiling and evaluation run")
    parser.add_argument("--stats", type=Path, help="statistics file (default: cache); reused")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true", help="keep rows already in --out")
    parser.add_argument("--deadline", type=float, help="start no row after this many seconds")
    parser.add_argument("--plot", type=Path, nargs="+", help="only chart these records to --out")
    parser.add_argument("--summary", type=Path, nargs="+", help="only tabulate records to --out")
    args = parser.parse_args()
    if args.plot:
        plot_records(args.plot, args.out)
        return
    if args.summary:
        write_text_atomic(args.out, summary_table(args.summary) + "\n")
        return
    args.name = args.name or args.model
    launched = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    base, tokenizer, ref = load_model(args.model, device=args.device)
    stats = statistics(base, tokenizer, args, ref)
    quality = Quality(base, tokenizer, args)
    started = time.perf_counter()
    dense = quality(base)
    record: dict[str, Any] = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": run_environment(args.device),
        "model": ref.to_dict(),
        "model_name": args.name,
        "weights": WEIGHTS_NOTE.get(args.name, "see the model's source"),
        "calibration": stats.meta.get("calibration"),
        **quality.data,
        "dense": dense,
        "dense_eval_seconds": time.perf_counter() - started,
        "rows": [],
    }
    if args.resume and args.out.is_file():
        record["rows"] = json.loads(args.out.read_text())["rows"]
    print(json.dumps({"dense": dense}), flush=True)
    ctx = {"args": args, "layers": prepare_layers(base, stats), "base": base}
    ctx.update(quality=quality, dense=dense)
    for name in args.methods.split(","):
        method = parse_method(name)
        for target in (float(b) for b in args.budgets.split(",")):
            done = {(r["method"], r["target_reduction"], r["group_size"]) for r in record["rows"]}
            if (name, target, args.group) in done:
                continue
            if args.deadline and time.perf_counter() - launched > args.deadline:
                print(json.dumps({"deadline": f"{name} at {target} not started"}), flush=True)
                continue
            row = run_row(method, target, ctx)
            record["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "widths"}), flush=True)
            write_text_atomic(args.out, json.dumps(record, indent=1))
    write_text_atomic(args.out, json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
