"""`ffsplit compress` options: baselines reachable by --baseline, errors in one line (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ffsplit.cli import Baseline, Method, _recipe_from_options, app
from ffsplit.config import DEFAULT_OUTLIER_RATIO, ProfileConfig
from ffsplit.models.tiny import tiny_model
from ffsplit.profiling import profile_model, save_stats
from ffsplit.variant import load_variant

IDS = torch.randint(0, 150, (8, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny Llama folder, its statistics file with Gram matrices)."""
    folder = tmp_path_factory.mktemp("cli")
    model, _ = tiny_model("LlamaForCausalLM")
    model.save_pretrained(str(folder / "base"))
    stats = profile_model(model, IDS, ProfileConfig(tokens=128, window=16, batch_size=4))
    save_stats(stats, folder / "stats.safetensors")
    return folder / "base", folder / "stats.safetensors"


def _compress(base: tuple[Path, Path], out: Path, *options: str) -> tuple[int, str]:
    model, stats = base
    args = ["compress", str(model), "--stats", str(stats), "--out", str(out), *options]
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def _options(**changes: object) -> dict:
    options = {
        "method": Method.quant,
        "heavy_ratio": None,
        "ffn_reduction": 0.75,
        "baseline": Baseline.outlier,
        "calib_tokens": 1024,
        "plain_svd": False,
        "heavy_bits": 16,
        "gptq": True,
        "seed": 0,
    }
    return {**options, **changes}


def test_baseline_outlier_is_the_column_outlier_recipe() -> None:
    recipe = _recipe_from_options(**_options())
    assert (recipe.selection, recipe.heavy_ratio) == ("outlier", DEFAULT_OUTLIER_RATIO)
    assert recipe.method.allocation == "two-level" and recipe.method.gptq_down
    assert recipe.label == "quant-outlier-h0.01-r0.75"
    assert _recipe_from_options(**_options(heavy_ratio=0.05, gptq=False)).label == (
        "quant-outlier-h0.05-r0.75"
    )


def test_compress_baseline_outlier_writes_a_loadable_variant(
    base: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "variant"
    options = ("--method", "quant", "--baseline", "outlier", "--ffn-reduction", "0.75", "--json")
    code, output = _compress(base, out, *options)
    assert code == 0, output
    summary = json.loads(output[output.index("{") :])
    assert summary["label"] == "quant-outlier-h0.01-r0.75"
    assert summary["ffn_reduction"] >= 0.75
    _, _, manifest = load_variant(out)
    assert manifest["recipe"]["selection"] == "outlier"
    assert manifest["layers"]["0"]["up"]["parts"][0]["type"] == "column_outlier"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ("--baseline", "outlier"),
            "--baseline outlier (kept bf16 input columns) applies to --method quant only, not "
            "lowrank: add --method quant or choose another --baseline",
        ),
        (
            ("--method", "prune", "--baseline", "outlier"),
            "--baseline outlier (kept bf16 input columns) applies to --method quant only, "
            "not prune",
        ),
        (
            ("--method", "quant", "--baseline", "outlier", "--heavy-bits", "8"),
            "--heavy-bits does not apply to --baseline outlier (its columns are bf16): drop it",
        ),
        (
            ("--method", "quant", "--baseline", "outlier", "--heavy-ratio", "1.5"),
            "--heavy-ratio must be in (0, 1), got 1.5",
        ),
    ],
)
def test_outlier_option_errors_are_one_line(
    base: tuple[Path, Path], tmp_path: Path, options: tuple[str, ...], message: str
) -> None:
    out = tmp_path / "variant"
    code, output = _compress(base, out, *options)
    assert code == 2
    assert output.strip().splitlines()[-1].startswith(f"error: {message}")
    assert not out.exists()
