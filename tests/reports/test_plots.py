"""reports/plots.py: score distributions and Pareto charts written as real PNGs, atomically."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ffsplit.adapters import get_adapter
from ffsplit.config import ProfileConfig
from ffsplit.errors import FFSplitError
from ffsplit.models.tiny import tiny_model
from ffsplit.profiling import profile_model, save_stats
from ffsplit.selection import neuron_scores
from reports.plots import (
    down_norms,
    layer_scores,
    pareto_front,
    pareto_plot,
    score_distribution_plot,
)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model, _ = tiny_model("LlamaForCausalLM")
    ids = torch.randint(0, 150, (8, 16), generator=torch.Generator().manual_seed(0))
    stats = profile_model(
        model,
        ids,
        ProfileConfig(
            tokens=128, window=16, batch_size=4, hit_top_fraction=0.05, collect_grams=False
        ),
    )
    return model, save_stats(stats, tmp_path_factory.mktemp("stats") / "stats.safetensors")


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000


def _no_temp_files(folder: Path) -> bool:
    return not any(p.name.endswith(".tmp") for p in folder.iterdir())


def test_layer_scores_match_selection(tiny: tuple[torch.nn.Module, Path]) -> None:
    from ffsplit.profiling import load_stats

    model, path = tiny
    stats = load_stats(path)
    adapter = get_adapter(model)
    norms = down_norms(model)
    for handle in adapter.ffns(model):
        down = adapter.weights(model, handle).down
        want = neuron_scores(stats.layers[handle.layer], down)
        assert torch.allclose(
            layer_scores(stats.layers[handle.layer], norms[handle.layer]), want, rtol=1e-12, atol=0
        )


def test_down_norms_from_model_weights_or_norms_agree(tiny: tuple[torch.nn.Module, Path]) -> None:
    model, _ = tiny
    adapter = get_adapter(model)
    from_model = down_norms(model)
    weights = {h.layer: adapter.weights(model, h).down for h in adapter.ffns(model)}
    from_weights = down_norms(weights)
    from_norms = down_norms({k: v.clone() for k, v in from_model.items()})
    assert from_model.keys() == from_weights.keys() == from_norms.keys() == {0, 1}
    for k in from_model:
        assert torch.equal(from_model[k], from_weights[k])
        assert torch.equal(from_model[k], from_norms[k])


def test_score_distribution_plot_writes_png(
    tiny: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    model, stats = tiny
    out = score_distribution_plot(stats, model, tmp_path / "plots" / "scores.png")
    assert out == tmp_path / "plots" / "scores.png" and _is_png(out)
    assert _no_temp_files(out.parent)
    again = score_distribution_plot(stats, down_norms(model), out, title="custom")  # overwrite
    assert _is_png(again)


def test_score_distribution_plot_refuses_another_models_norms(
    tiny: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    _, stats = tiny
    with pytest.raises(FFSplitError, match="another model"):
        score_distribution_plot(stats, {0: torch.ones(50), 1: torch.ones(50)}, tmp_path / "x.png")
    with pytest.raises(FFSplitError, match=r"layers \[1\]"):
        score_distribution_plot(stats, {0: torch.ones(96)}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists() and _no_temp_files(tmp_path)


def test_pareto_front_minimises_y_maximises_x() -> None:
    points = [(0.1, 1.0), (0.2, 3.0), (0.2, 2.0), (0.3, 2.5), (0.15, 5.0), (0.3, 9.0)]
    assert pareto_front(points) == [0, 2, 3]
    # bytes (lower is better) against perplexity change
    assert pareto_front([(100, 5.0), (80, 6.0), (90, 7.0), (70, 9.0)], x_higher=False) == [3, 1, 0]
    # accuracy change (higher is better) against speedup (higher is better)
    assert pareto_front([(1.0, -1.0), (1.5, -2.0), (1.2, -3.0)], True, True) == [0, 1]


def test_pareto_front_keeps_duplicates_and_single_points() -> None:
    assert pareto_front([(0.5, 1.0), (0.5, 1.0)]) == [0, 1]
    assert pareto_front([(0.5, 1.0)]) == [0]
    assert pareto_front([]) == []


def test_pareto_plot_writes_png(tmp_path: Path) -> None:
    rows = [
        {"series": method, "ffn_reduction": r, "perplexity_change_pct": base * r * 100}
        for method, base in (("ffsplit-lowrank", 0.2), ("uniform-lowrank", 0.5), ("prune", 1.5))
        for r in (0.1, 0.2, 0.3, 0.4)
    ]
    rows.append({"series": "broken", "ffn_reduction": 0.5, "perplexity_change_pct": math.nan})
    out = pareto_plot(rows, tmp_path / "pareto.png")
    assert _is_png(out) and _no_temp_files(tmp_path)
    huge = [*rows, {"series": "prune", "ffn_reduction": 0.6, "perplexity_change_pct": 5000.0}]
    assert _is_png(pareto_plot(huge, tmp_path / "huge.png"))  # symlog y axis
    by_bytes = [
        {"method": "quant", "bytes": 1e6 * (1 - r), "perplexity_change_pct": r} for r in (0.1, 0.5)
    ]
    assert _is_png(pareto_plot(by_bytes, tmp_path / "by-bytes.png", x="bytes"))


def test_pareto_plot_without_points_leaves_old_file(tmp_path: Path) -> None:
    out = tmp_path / "pareto.png"
    out.write_bytes(b"old")
    with pytest.raises(FFSplitError, match="no row has finite"):
        pareto_plot([{"ffn_reduction": 0.1}], out)
    assert out.read_bytes() == b"old" and _no_temp_files(tmp_path)
