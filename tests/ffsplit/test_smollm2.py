"""Integration on the real SmolLM2-135M: golden numbers with tolerances (style.md, 9).

Golden values were measured with this code on the packaged SmolLM2-135M-Instruct (Q4_1 GGUF
dequantized, stored as bf16), Wikipedia evaluation split, first 4096 tokens in 512-token windows.
"""

import pytest
import torch

from ffsplit.compress.recipe import compress_model
from ffsplit.config import ProfileConfig, Recipe
from ffsplit.data.windows import calibration_windows, evaluation_windows
from ffsplit.eval import perplexity
from ffsplit.models.loading import load_model
from ffsplit.profiling import profile_model

pytestmark = pytest.mark.slow

DENSE_PPL = 21.3126  # measured 2026-11-30, see module docstring
EVAL_SHA256 = "e835d28c85f47996d8302855d8f1ca8aa4411b404810c2779b240f1268da615f"


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    model, tokenizer, ref = load_model("smollm2-135m")
    evaluation, eval_ref = evaluation_windows(tokenizer, tokens=4096, window=512)
    return model, tokenizer, ref, evaluation, eval_ref


@pytest.fixture(scope="module")
def stats(smollm2):
    model, tokenizer, *_ = smollm2
    calib, _ = calibration_windows(tokenizer, tokens=4096, window=512)
    return profile_model(model, calib, ProfileConfig(tokens=4096, window=512))


def test_dense_perplexity_golden(smollm2):
    model, _, ref, evaluation, eval_ref = smollm2
    assert ref.architecture == "LlamaForCausalLM"
    assert eval_ref.sha256 == EVAL_SHA256  # the evaluation slice itself is pinned
    assert perplexity(model, evaluation).perplexity == pytest.approx(DENSE_PPL, rel=2e-3)


def test_ffsplit_lowrank_beats_uniform_at_30_percent(smollm2, stats):
    _, _, _, evaluation, _ = smollm2
    results = {}
    for name, recipe in {
        "ffsplit": Recipe(method="lowrank", heavy_ratio=0.1, ffn_reduction=0.3),
        "uniform": Recipe(method="lowrank", ffn_reduction=0.3, selection="none"),
    }.items():
        model, _, _ = load_model("smollm2-135m")
        report, _ = compress_model(model, stats, recipe)
        assert 0.30 <= report.ffn_reduction < 0.31
        results[name] = (perplexity(model, evaluation).perplexity, report.ffn_bytes)
    # equal bytes (within one rank's worth), and FFSplit strictly better
    assert abs(results["ffsplit"][1] - results["uniform"][1]) / results["uniform"][1] < 0.005
    assert results["ffsplit"][0] < results["uniform"][0]
    assert results["ffsplit"][0] > DENSE_PPL  # compression costs something; sanity
