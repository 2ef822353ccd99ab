"""Charts: per-layer neuron score distributions and the Pareto chart (logged with each variant),
and the quality-loss charts of the results page (reports.results draws its lines with loss_chart).

matplotlib with the Agg backend (no display); every PNG is written atomically (temp file + rename),
so an interrupted run never leaves a half-written image for MLflow to pick up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ffsplit.errors import FFSplitError
from ffsplit.profiling.stats import LayerStats, load_stats, summary
from reports.figures import pyplot, save_figure

SHARES = (1, 5, 10)  # top-% neuron shares of the output norm (method.md's observation)
LABELS = {
    "ffn_reduction": "FFN reduction (fraction of FFN bytes removed)",
    "bytes": "model bytes",
    "parameters": "parameters",
    "perplexity_change_pct": "perplexity change vs dense (%)",
    "accuracy_change_pct": "accuracy change vs dense (%)",
    "decode_speedup": "decode speedup vs dense (x)",
    "prefill_speedup": "prefill speedup vs dense (x)",
}
_HIGHER_IS_BETTER = ("reduction", "speedup", "accuracy")


def down_norms(source: Mapping[int, Tensor] | nn.Module | str | Path) -> dict[int, Tensor]:
    """||down[:, j]|| per FFN layer, from norms or down weights per layer, a model, or a model name."""
    if isinstance(source, Mapping):
        out = {}
        for layer, t in source.items():
            t = torch.as_tensor(t).detach().to(torch.float64)
            out[int(layer)] = t if t.ndim == 1 else t.norm(dim=0)
        return out
    model = source
    if not isinstance(model, nn.Module):
        from ffsplit.models.loading import load_model

        model = load_model(str(source))[0]
    from ffsplit.adapters import get_adapter

    adapter = get_adapter(model)
    return {
        h.layer: adapter.weights(model, h).down.detach().to(torch.float64).norm(dim=0)
        for h in adapter.ffns(model)
    }


def layer_scores(stats: LayerStats, norms: Tensor) -> Tensor:
    """s_j = sqrt(S2_j) * ||v_j|| (ffsplit.selection.neuron_scores, from the down norms alone)."""
    if norms.shape != (stats.neurons,):
        raise FFSplitError(
            f"down norms have shape {tuple(norms.shape)} but the statistics have {stats.neurons} "
            "neurons: the statistics were collected on another model"
        )
    return stats.sum_sq.sqrt() * norms.to(stats.sum_sq)


def score_distribution_plot(
    stats_path: str | Path,
    base_model: Mapping[int, Tensor] | nn.Module | str | Path,
    out_png: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Per layer: sorted normalized neuron scores (log-log), and the share of the FFN output norm
    held by the top 1/5/10% of neurons against what a uniform spread would give."""
    stats = load_stats(stats_path)
    norms = down_norms(base_model)
    missing = sorted(set(stats.layers) - set(norms))
    if missing:
        raise FFSplitError(
            f"{stats_path}: layers {missing} have no down-projection norms in the model"
        )
    if not stats.layers:
        raise FFSplitError(f"{stats_path}: no layers to plot")
    plt = pyplot()
    from matplotlib import cm, colors
    from matplotlib.ticker import MaxNLocator

    layers = sorted(stats.layers)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2), width_ratios=(1.15, 1))
    cmap = plt.get_cmap("viridis")
    norm = colors.Normalize(vmin=layers[0], vmax=max(layers[-1], layers[0] + 1))
    shares: dict[int, list[float]] = {p: [] for p in SHARES}
    for layer in layers:
        s = stats.layers[layer]
        scores = layer_scores(s, norms[layer]).cpu()
        ordered = scores.sort(descending=True).values
        top = float(ordered[0]) or 1.0
        m = ordered.numel()
        rank = torch.arange(1, m + 1, dtype=torch.float64) / m
        left.plot(
            rank.numpy(),
            (ordered / top).clamp_min(1e-12).numpy(),
            color=cmap(norm(layer)),
            lw=1.1,
            alpha=0.85,
        )
        layer_summary = summary(s, norms[layer])
        for p in SHARES:
            shares[p].append(100 * layer_summary[f"top{p}_share"])
    for p in SHARES:
        left.axvline(p / 100, color="0.45", ls=":", lw=1)
        left.text(
            p / 100,
            1.01,
            f"{p}%",
            transform=left.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color="0.3",
        )
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("neuron rank / neurons (sorted by score)")
    left.set_ylabel("score / top score of the layer")
    left.set_title("sorted neuron scores per layer", pad=16)
    left.grid(True, which="major", alpha=0.3)
    bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=left, pad=0.02)
    bar.set_label("layer")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    _shares_panel(right, layers, shares)
    tokens = stats.tokens
    fig.suptitle(
        title
        or f"{Path(str(stats_path)).stem}: neuron scores s_j = sqrt(S2_j)·||v_j|| "
        f"({tokens:,} calibration tokens, {len(layers)} layers)",
        fontsize=11,
    )
    fig.tight_layout()
    return save_figure(fig, out_png)


def _shares_panel(ax: Any, layers: Sequence[int], shares: Mapping[int, Sequence[float]]) -> None:
    """Per layer, the share (%) of the squared output norm held by the top 1/5/10% of neurons,
    each against its uniform spread."""
    from matplotlib.ticker import MaxNLocator

    palette = ("tab:red", "tab:orange", "tab:blue")
    for p, color in zip(SHARES, palette, strict=True):
        ax.plot(layers, shares[p], "o-", color=color, ms=3.5, lw=1.4, label=f"top {p}% of neurons")
        ax.axhline(p, color=color, ls="--", lw=1, alpha=0.7)
    ax.plot([], [], "k--", lw=1, alpha=0.7, label="uniform spread")
    ax.set_ylim(0, 100)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("share of squared output norm (%)")
    ax.set_title("output norm held by the top neurons", pad=16)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4, fontsize=8, frameon=False)


def _higher_is_better(key: str) -> bool:
    return any(word in key for word in _HIGHER_IS_BETTER)


def pareto_front(
    points: Sequence[tuple[float, float]], x_higher: bool = True, y_higher: bool = False
) -> list[int]:
    """Indices of the points no other point beats in both coordinates, sorted by x."""
    sx = 1.0 if x_higher else -1.0
    sy = 1.0 if y_higher else -1.0
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            sx * qx >= sx * x and sy * qy >= sy * y and (qx, qy) != (x, y)
            for j, (qx, qy) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1], i))


def pareto_plot(
    rows: Sequence[Mapping[str, Any]],
    out_png: str | Path,
    *,
    x: str = "ffn_reduction",
    y: str = "perplexity_change_pct",
    series: str = "series",
    title: str | None = None,
) -> Path:
    """Quality change against compression, one line per series (method or baseline), the Pareto
    front over all points highlighted. Which way is better follows the key: *reduction*,
    *speedup* and *accuracy* higher, anything else (bytes, perplexity change) lower."""
    points: list[tuple[float, float]] = []
    labels: list[str] = []
    for row in rows:
        vx, vy = row.get(x), row.get(y)
        if not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in (vx, vy)
        ):
            continue
        points.append((float(vx), float(vy)))  # type: ignore[arg-type]
        labels.append(str(row.get(series) or row.get("method") or "variant"))
    if not points:
        raise FFSplitError(f"pareto_plot: no row has finite {x!r} and {y!r}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    names = list(dict.fromkeys(labels))
    cmap = plt.get_cmap("tab10")
    markers = "osD^v<>Ph*"
    for k, name in enumerate(names):
        pts = sorted(p for p, lab in zip(points, labels, strict=True) if lab == name)
        style = dict(color=cmap(k % 10), marker=markers[k % len(markers)], ms=6, lw=1.3, alpha=0.9)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style)
    front = pareto_front(points, _higher_is_better(x), _higher_is_better(y))
    fx = [points[i][0] for i in front]
    fy = [points[i][1] for i in front]
    ax.plot(
        fx,
        fy,
        color="black",
        lw=8,
        alpha=0.15,
        zorder=0,
        solid_capstyle="round",
        label="Pareto front",
    )
    ax.scatter(fx, fy, s=150, facecolors="none", edgecolors="black", linewidths=1.4, zorder=3)
    ys = [p[1] for p in points]
    if max(abs(v) for v in ys) > 200:
        ax.set_yscale("symlog", linthresh=10)
    if min(ys) < 0 < max(ys) or y.endswith("_change_pct"):
        ax.axhline(0, color="0.5", lw=0.8, ls="--")
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    better_x = "→ better" if _higher_is_better(x) else "← better"
    better_y = "↑ better" if _higher_is_better(y) else "↓ better"
    ax.set_title(title or f"quality vs compression ({better_x}, {better_y})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, framealpha=0.9, loc="best")
    fig.tight_layout()
    return save_figure(fig, out_png)


# ------------------------------------------------------------------------- the results page's charts

LOSS_CHART_DPI = 110


@dataclass(frozen=True)
class LossCurve:
    """One line of a quality-loss chart: its points (x, loss in %) and how it is drawn."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    style: str = "-"
    color: str | float | None = None  # a matplotlib colour, or a shade in [0, 1] of viridis
    marker: str = "o"


def loss_chart(
    curves: Sequence[LossCurve],
    out_png: str | Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    lowest: float,
    goal_pct: float | None = None,
    dense_point: bool = False,
    legend_loc: str = "best",
    symlog: bool = True,
) -> Path:
    """Quality loss (symlog: small losses and large ones on one chart; `symlog=False` for values
    of one order, such as relative errors below 1) against x, one line per curve; `lowest` sets
    the bottom (negative losses are gains), `goal_pct` draws the quality goal and `dense_point`
    the dense model at the origin."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    viridis = plt.get_cmap("viridis")
    for c in curves:
        color = viridis(c.color) if isinstance(c.color, float) else c.color
        ax.plot(list(c.xs), list(c.ys), c.style, color=color, marker=c.marker, ms=4, label=c.label)
    if dense_point:
        ax.plot([0], [0], "k*", ms=9, label="dense")
        ax.set_xlim(left=0)
    ax.set_xlabel(xlabel)
    if symlog:
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(bottom=min(-0.05, 1.2 * lowest))
        ax.set_ylabel(f"{ylabel} (symlog)")
    else:
        ax.set_ylim(bottom=min(0.0, 1.2 * lowest))
        ax.set_ylabel(ylabel)
    if goal_pct is not None:
        ax.axhline(goal_pct, color="grey", lw=0.8, ls=":", label=f"goal: +{goal_pct:g}% perplexity")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc=legend_loc)
    return save_figure(fig, out_png, dpi=LOSS_CHART_DPI)
