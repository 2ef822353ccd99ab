"""The page's observation section (the paper's premise): per-layer concentration, hit frequency and
heavy-set stability of each model's latest observation run, and its ablation table and plots.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from reports.results.format import fmt_number, slug, table
from reports.results.rows import Z95, ObservationRun, count, finite

OBSERVATION_TITLE = "Observation (the paper's premise)"
# Plot files of an observation run (tracking.observation: artifacts plots/<name>) -> page file suffix.
OBSERVATION_PLOTS = {
    "observation.png": "observation",
    "ablation.png": "ablation",
    "ablation_hidden.png": "ablation-hidden",
}
# What each ablation kind measures (tracking.observation.ablation_kind); the run's own
# ablation_<kind>_metric param names it more exactly when logged.
ABLATION_KINDS = {
    "perplexity": "perplexity (lower is better)",
    "accuracy": "linear-probe accuracy (higher is better)",
    "hidden_error": "relative error of the last hidden states vs dense (lower is better)",
}
HOW_TO_OBSERVE = (
    "`python -m flows.observation run --models MODEL` (computes it on Ray and logs it), or "
    "log a record folder that bench/observation.py wrote with `python -m flows.observation "
    "log --record bench/results/observation/MODEL`"
)
EXPLANATION = (
    "From each model's latest complete observation run (tag `ffsplit.role=observation`). "
    "Share: the part of the sum of squared neuron output norms s_j^2 (s_j = sqrt(S2_j)·||v_j||, "
    "over the calibration tokens) held by the top 1/5/10% of a layer's neurons by score; a "
    "uniform spread gives 1/5/10%. Hit frequency: how often one neuron of the heavy set "
    "(top 1% by score) is among the k largest output norms of a token (k = 1% of the layer's "
    "neurons); uniform: k/m, and the lift is the ratio. Jaccard: overlap of the heavy sets "
    "chosen from Wikipedia and from news calibration text, against the expectation for two "
    "random sets. Ablation: the top 1% of neurons by score zeroed in every FFN layer, against a "
    "random 1% (mean ± sd over seeds) and the bottom 1%; effects are compared as cross-entropy "
    "increase for perplexity (ln of its factor), accuracy points for the probe and the "
    "difference for the hidden-state error.\n"
)


def ablation_effect(kind: str, dense: float, value: float) -> float | None:
    """What zeroing did, on a scale where effects compare by ratio: for perplexity the increase
    of the cross-entropy in nats per token (ln(value / dense)), for accuracy the change in
    points, otherwise (hidden-state error) the difference."""
    if not (math.isfinite(dense) and math.isfinite(value)):
        return None
    if kind == "perplexity":
        return math.log(value / dense) if dense > 0 and value > 0 else None
    if kind == "accuracy":
        return 100.0 * (value - dense)
    return value - dense


def _effect_text(kind: str, effect: float | None) -> str:
    if effect is None:
        return "n/a"
    if kind == "perplexity":
        factor = math.exp(effect)
        times = f"{factor:,.0f}" if factor >= 100 else f"{factor:.3g}"
        return f"x{times} ({effect:+.3g} nats/token)"
    if kind == "accuracy":
        return f"{effect:+.1f} pp"
    return f"{effect:+.3g}"


def _value_text(kind: str, value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "inf"
    if kind == "accuracy":
        return f"{value:.3f}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _jaccard_sizes(obs: ObservationRun) -> list[int]:
    names = set(obs.series) | {k[len("mean_") :] for k in obs.metrics if k.startswith("mean_")}
    return sorted(int(m.group(1)) for k in names if (m := re.fullmatch(r"jaccard_(\d+)pct", k)))


def observation_layer_table(obs: ObservationRun) -> str:
    """Per layer: top-1/5/10% shares, hit frequency and lift of the heavy set, Jaccard of the
    heavy sets of the two corpora; then the mean over layers and what a uniform spread or random
    sets give."""
    sizes = _jaccard_sizes(obs)
    head = (
        "layer",
        "top 1% share",
        "top 5% share",
        "top 10% share",
        "hit frequency",
        "hit lift",
        *(f"Jaccard {p}%" for p in sizes),
    )

    def row(label: str, get: Callable[[str], float | None]) -> tuple[str, ...]:
        lift = get("hit_lift")
        return (
            label,
            _share(get("top1_share")),
            _share(get("top5_share")),
            _share(get("top10_share")),
            _share(get("hit_frequency")),
            "-" if lift is None else f"{lift:.1f}x",
            *("-" if (j := get(f"jaccard_{p}pct")) is None else f"{j:.2f}" for p in sizes),
        )

    layers = sorted({step for points in obs.series.values() for step in points})
    body = [
        row(str(layer), lambda key, layer=layer: finite(obs.series.get(key, {}).get(layer)))
        for layer in layers
    ]
    body.append(row("**mean**", lambda key: finite(obs.metrics.get(f"mean_{key}"))))
    reference = {
        "top1_share": 0.01,
        "top5_share": 0.05,
        "top10_share": 0.10,
        "hit_frequency": finite(obs.metrics.get("mean_uniform_hit_frequency")),
        "hit_lift": 1.0,
        **{
            f"jaccard_{p}pct": finite(obs.metrics.get(f"mean_random_jaccard_{p}pct")) for p in sizes
        },
    }
    body.append(row("uniform / random", lambda key: reference.get(key)))
    return table(head, body)


def observation_ablation_table(obs: ObservationRun) -> str:
    """Dense against the top 1% by score, a random 1% (mean over seeds) and the bottom 1% zeroed
    in every layer, per measured quantity, with the effect of the top and the random set."""
    pct = finite(_float_or_none(obs.params.get("ablation_fraction")))
    size = f"{100 * pct:g}%" if pct is not None else "1%"
    body = [row for kind in ABLATION_KINDS if (row := _ablation_row(obs, kind)) is not None]
    if not body:
        return "No ablation metrics were logged by this run.\n"
    head = (
        "measured",
        "dense",
        f"zero bottom {size}",
        f"zero random {size}",
        f"zero top {size}",
        "effect vs dense",
    )
    return table(head, body)


def _ablation_row(obs: ObservationRun, kind: str) -> tuple[str, ...] | None:
    """One measured quantity of the ablation table, None when the run did not log it."""
    logged = obs.params.get(f"ablation_{kind}_metric")
    better = "higher" if kind == "accuracy" else "lower"
    title = f"{logged} ({better} is better)" if logged else ABLATION_KINDS[kind]
    values = {
        suffix: finite(obs.metrics.get(f"ablation_{kind}_{suffix}"))
        for suffix in ("dense", "top", "random", "random_std", "bottom", "chance")
    }
    dense, top, rand, std = values["dense"], values["top"], values["random"], values["random_std"]
    if dense is None or (top is None and rand is None):
        return None
    seeds = [s for s in obs.params.get("ablation_seeds", "").split(",") if s]
    chance = values["chance"]
    return (
        title + (f"; chance {chance:.3f}" if chance is not None else ""),
        _value_text(kind, dense),
        _value_text(kind, values["bottom"]),
        _value_text(kind, rand)
        + (f" ± {_value_text(kind, std)}" if std is not None else "")
        + (f" ({len(seeds)} seeds)" if seeds else ""),
        _value_text(kind, top),
        _ablation_verdict(obs, kind, dense, top, rand),
    )


def _ablation_verdict(
    obs: ObservationRun, kind: str, dense: float, top: float | None, rand: float | None
) -> str:
    """The top set's effect against the random set's, and for the probe whether it is noise."""
    top_effect = None if top is None else ablation_effect(kind, dense, top)
    rand_effect = None if rand is None else ablation_effect(kind, dense, rand)
    verdict = f"top {_effect_text(kind, top_effect)}, random {_effect_text(kind, rand_effect)}"
    if top_effect is not None and rand_effect and top_effect / rand_effect > 0:
        ratio = top_effect / rand_effect
        times = f"{ratio:,.0f}" if ratio >= 100 else f"{ratio:.3g}"
        verdict += f": {times}x the random set's effect"
    elif top_effect and rand_effect == 0:
        verdict += " (the random set changes nothing)"
    tested = count(_float_or_none(obs.params.get("probe_per_split")))
    if kind == "accuracy" and tested and top is not None:
        # the probe's binomial noise (reports.results): dense vs top-zeroed accuracy
        se = [math.sqrt(max(q * (1 - q), 0.0) / tested) for q in (dense, top)]
        band = 100 * Z95 * math.hypot(*se)
        if top_effect is not None and abs(top_effect) < band:
            verdict += f"; within the probe's noise (±{band:.1f} pp at n={tested})"
    return verdict


def observation_section(
    observations: Sequence[ObservationRun],
    variant_models: Sequence[str],
    plots_dir: Path,
    plots_link: str,
) -> tuple[str, list[Path]]:
    """The page's observation section and the plot files it wrote into plots_dir."""
    md = [f"## {OBSERVATION_TITLE}\n"]
    if not observations:
        md.append(
            f"No observation run in the experiments read yet. Make one with {HOW_TO_OBSERVE}.\n"
        )
        return "\n".join(md), []
    md.append(EXPLANATION)
    written: list[Path] = []
    for obs in observations:
        text, plots = _observation_of_model(obs, plots_dir, plots_link)
        md += text
        written += plots
    missing = sorted(set(variant_models) - {o.model for o in observations})
    if missing:
        md.append(
            f"No observation run for {', '.join(missing)} yet: make one with {HOW_TO_OBSERVE}.\n"
        )
    return "\n".join(md), written


def _observation_of_model(
    obs: ObservationRun, plots_dir: Path, plots_link: str
) -> tuple[list[str], list[Path]]:
    """One model's part of the section (paragraphs) and the plot files it copied out."""
    from ffsplit.files import atomic_path

    p = obs.params
    tokens = p.get("calibration_tokens") or fmt_number(
        obs.metrics.get("calibration_tokens"), "{:.0f}"
    )
    md = [
        f"### {obs.model}\n",
        f"Run `{obs.run_id}`: {tokens} calibration tokens each of {p.get('corpus_a', '?')} and "
        f"{p.get('corpus_b', '?')}, {fmt_number(obs.metrics.get('layers'), '{:.0f}')} FFN layers; "
        f"heavy set: top {100 * (_float_or_none(p.get('heavy_ratio')) or 0.01):g}% by "
        f"{p.get('corpus_a', '?')} score.\n",
        observation_layer_table(obs),
        "Ablation:\n",
        observation_ablation_table(obs),
    ]
    written: list[Path] = []
    for name, suffix in OBSERVATION_PLOTS.items():
        data = obs.plots.get(name)
        if data is None:
            continue
        file = f"{slug(obs.model)}-{suffix}.png"
        with atomic_path(plots_dir / file) as tmp:
            tmp.write_bytes(data)
        written.append(plots_dir / file)
        md.append(f"![{obs.model} {suffix}]({plots_link}/{file})\n")
    return md, written
