"""ffsplit.jobs.evaluate_job on encoders: a variant carries its hidden-state error against the base."""

from __future__ import annotations

from pathlib import Path

import pytest

from ffsplit.config import QuantConfig, Recipe


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    from ffsplit.models.tiny import save_tiny_with_tokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    return str(save_tiny_with_tokenizer("BertModel", "minilm-l6", folder))


def test_encoder_variant_reports_hidden_error_and_the_base_none(
    tiny_bert: str, tmp_path: Path
) -> None:
    from ffsplit.jobs.compress import compress_job
    from ffsplit.jobs.evaluate import evaluate_job

    rtn = QuantConfig(allocation="two-level", gptq=False, gptq_down=False)
    out = tmp_path / "variant"
    compress_job(tiny_bert, Recipe(method=rtn, selection="none", ffn_reduction=0.75), out)
    common = {"max_tokens": 512, "window": 64, "probe_limit": 60}
    variant = evaluate_job(out, **common)
    base = evaluate_job(tiny_bert, **common)
    assert "hidden_error" not in base
    assert 0 < variant["hidden_error"] < 1  # 3-4 bits: a visible, bounded error
    assert variant["hidden_eval"]["split"] == "evaluation"
    assert variant["hidden_eval"]["tokens"] <= 512
