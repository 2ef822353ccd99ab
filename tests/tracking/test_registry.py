"""tracking/registry.py and tracking/serving.py against real MLflow stores (sqlite; one real server test).

Variants are tiny random Llamas (a character tokenizer where text is needed); the registered model
is loaded in a fresh process by models:/NAME@champion and must give ffsplit.load_variant's logits
exactly.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import string
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from ffsplit.adapters import get_adapter
from ffsplit.compress.recipe import compress_model
from ffsplit.config import ProfileConfig, Recipe
from ffsplit.errors import FFSplitError
from ffsplit.models.tiny import tiny_model
from ffsplit.profiling import profile_model, save_stats
from ffsplit.variant import load_variant, read_manifest, save_variant
from tracking import registry
from tracking.registry import (
    COMPLETE_TAG,
    CONTENT_TAG,
    ROLE_TAG,
    RegistryError,
    choose_champion,
    register_variant,
    set_alias,
)

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["Hello, world!", "The heavy hitters hold most of the output norm.", "ab"]
CONFIG = ProfileConfig(tokens=128, window=16, batch_size=4, hit_top_fraction=0.05)
METRICS = {
    "perplexity": 12.5,
    "perplexity_change_pct": 3.0,
    "parameters": 1.0e5,
    "bytes": 2.0e5,
    "ffn_reduction": 0.3,
    "prefill_speedup": 1.1,
    "decode_speedup": 1.2,
    "profile_seconds": 0.5,
    "compress_seconds": 0.2,
}


def char_tokenizer() -> Any:
    """A real fast tokenizer over printable ASCII (97 ids: fits the tiny models' 160)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>", "<eos>", *string.printable[:95]]
    tok = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def make_variant(
    out: Path, *, seed: int = 0, tokenizer: bool = True, recipe: Recipe | None = None
) -> Path:
    model, _ = tiny_model("LlamaForCausalLM", seed=seed)
    ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(seed))
    stats = profile_model(model, ids, CONFIG)
    recipe = recipe or Recipe(method="lowrank", heavy_ratio=0.1, ffn_reduction=0.3)
    report, layers = compress_model(model, stats, recipe)
    return save_variant(
        model,
        char_tokenizer() if tokenizer else None,
        out,
        adapter=get_adapter(model),
        base_model={"name": "tiny-llama", "weights_sha256": f"{seed:064d}"},
        report=report,
        layers=layers,
        calibration={"corpus": "random", "seed": seed},
    )


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {
        "text": make_variant(root / "text"),
        "ids": make_variant(root / "ids", seed=1, tokenizer=False),
        "other": make_variant(root / "other", seed=2),
    }


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, _ = tiny_model("LlamaForCausalLM")
    ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    return save_stats(
        profile_model(model, ids, CONFIG), tmp_path_factory.mktemp("stats") / "s.safetensors"
    )


def client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def reference_logits(variant: Path, texts: list[str]) -> list[torch.Tensor]:
    model, tokenizer, _ = load_variant(variant)
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([tokenizer(t)["input_ids"]])).logits[0] for t in texts]


FRESH = textwrap.dedent(
    """
    import json, sys
    import mlflow, torch
    from safetensors.torch import save_file
    model = mlflow.pyfunc.load_model(sys.argv[1])
    texts = json.loads(sys.argv[2])
    logits = model.unwrap_python_model().logits(texts)
    save_file({f"t{i}": t.contiguous() for i, t in enumerate(logits)}, sys.argv[3] + "/logits.safetensors")
    scored = model.predict([{"text": t} for t in texts])
    made = model.predict([{"text": texts[0]}], params={"task": "generate", "max_new_tokens": 6})
    out = {"score": scored.to_dict(orient="list"), "generate": made.to_dict(orient="list"),
           "modules": sorted(m for m in sys.modules if m.startswith("ffsplit"))[:3]}
    (open(sys.argv[3] + "/out.json", "w")).write(json.dumps(out))
    """
)


def load_in_fresh_process(model_uri: str, tracking: str, texts: list[str], out: Path) -> dict:
    """Load model_uri in a new interpreter (cwd outside the repo) and return its outputs."""
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", FRESH, model_uri, json.dumps(texts), str(out)],
        env=env,
        cwd=out,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "out.json").read_text())
    tensors = load_file(str(out / "logits.safetensors"))
    data["logits"] = [tensors[f"t{i}"] for i in range(len(texts))]
    return data


def check_fresh_outputs(data: dict, variant: Path, texts: list[str]) -> None:
    reference = reference_logits(variant, texts)
    for got, want in zip(data["logits"], reference, strict=True):
        assert torch.equal(got, want)
    score = data["score"]
    model, tokenizer, _ = load_variant(variant)
    for i, want in enumerate(reference):
        ids = tokenizer(texts[i])["input_ids"]
        assert score["tokens"][i] == len(ids)
        assert score["last_logits"][i] == want[-1].tolist()
        nll = torch.nn.functional.cross_entropy(want[:-1], torch.tensor(ids[1:])).item()
        assert score["nll"][i] == pytest.approx(nll, rel=1e-6)
        assert score["perplexity"][i] == pytest.approx(math.exp(nll), rel=1e-6)
    prompt = torch.tensor([tokenizer(texts[0])["input_ids"]])
    with torch.inference_mode():
        greedy = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    new = greedy[0, prompt.shape[1] :].tolist()
    assert data["generate"]["generated_ids"][0] == new
    assert data["generate"]["generated_text"][0] == tokenizer.decode(new, skip_special_tokens=True)


# --------------------------------------------------------------------------------------- pure parts


def test_mlflow_limits_still_hold() -> None:
    from mlflow.utils import validation

    assert registry.MAX_PARAM_LENGTH == validation.MAX_PARAM_VAL_LENGTH
    assert registry.MAX_TAG_LENGTH == validation.MAX_TAG_VAL_LENGTH
    assert registry.MAX_KEY_LENGTH == validation.MAX_ENTITY_KEY_LENGTH
    assert registry.PARAMS_PER_BATCH == validation.MAX_PARAMS_TAGS_PER_BATCH


@pytest.mark.parametrize(
    ("text", "secret", "kept"),
    [
        ("http://alice:hunter2@mlflow.example:5000", "hunter2", "http://***@mlflow.example:5000"),
        ("https://tok3n@host/api?x=1", "tok3n", "https://***@host/api?x=1"),
        ("postgresql://u:pw9@db:5432/mlflow", "pw9", "postgresql://***@db:5432/mlflow"),
        ("http://host/x?access_token=abc123&b=2", "abc123", "access_token=***&b=2"),
        (
            "failed: HTTPConnectionPool(host) url http://bob:s3cr3t@127.0.0.1:1/api",
            "s3cr3t",
            "http://***@127.0.0.1:1/api",
        ),
    ],
)
def test_redact_masks_credentials(text: str, secret: str, kept: str) -> None:
    out = registry.redact(text)
    assert secret not in out and kept in out


def test_redact_leaves_plain_uris() -> None:
    for uri in ("sqlite:////tmp/x/mlflow.db", "http://127.0.0.1:5000", "file:///a/b", "databricks"):
        assert registry.redact(uri) == uri


def test_tracking_uri_prefers_env_then_stack_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FFSPLIT_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    assert registry.tracking_uri() == "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(RegistryError, match=r"flows\.stack up"):
        registry.tracking_uri()
    (tmp_path / "stack.json").write_text(
        json.dumps(
            {
                "version": 1,
                "services": {"mlflow": {"name": "mlflow", "url": "http://127.0.0.1:5123"}},
            }
        )
    )
    assert registry.tracking_uri() == "http://127.0.0.1:5123"


def test_names_for_a_base_model() -> None:
    assert registry.model_name_for("smollm2-135m") == "ffsplit-smollm2-135m"
    assert registry.model_name_for("/models/My Model v2") == "ffsplit-models-My-Model-v2"
    assert registry.experiment_name("smollm2-135m") == "ffsplit/smollm2-135m"
    with pytest.raises(RegistryError):
        registry.experiment_name("  ")


def test_secrets_never_reach_the_exception_chain(
    variants: dict[str, Path], mlflow_uri: str, unique_name: str
) -> None:
    def leak(stage: str) -> None:
        if stage == "params":
            raise ValueError("upload to https://bob:pa55word@store.example/x refused")

    with pytest.raises(RegistryError) as info:
        register_variant(
            variants["text"], model_name=unique_name, metrics=METRICS, uri=mlflow_uri, progress=leak
        )
    assert "pa55word" not in str(info.value) and "https://***@store.example/x" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_manifest_params_skip_long_values_and_redact(variants: dict[str, Path]) -> None:
    manifest = read_manifest(variants["text"])
    manifest["calibration"] = {"corpus": "x" * 7000, "seed": 3}
    manifest["base_model"] = {**manifest["base_model"], "source": "http://u:pw@hub/x"}
    params, skipped = registry.manifest_params(manifest)
    assert skipped == ["calibration.corpus"]
    assert params["calibration.seed"] == "3"
    assert params["recipe.method"] == "lowrank"
    assert params["base_model.source"] == "http://***@hub/x"
    assert all(len(v) <= registry.MAX_PARAM_LENGTH for v in params.values())


def test_content_hash_ignores_when_not_what(variants: dict[str, Path]) -> None:
    manifest = read_manifest(variants["text"])
    same = {
        **manifest,
        "created": "2000-01-01T00:00:00+00:00",
        "compression_seconds": 99.0,
        "git_commit": "deadbeef",
    }
    assert registry.variant_content_hash(same) == registry.variant_content_hash(manifest)
    other = read_manifest(variants["other"])
    assert registry.variant_content_hash(other) != registry.variant_content_hash(manifest)


@pytest.mark.parametrize(
    "name",
    [
        "../escape",
        "/abs/x.png",
        "a/../b",
        ".hidden",
        "a//b",
        "",
        "model/x",
        "manifest.json",
        "a\\b",
        3,
    ],
)
def test_artifact_names_cannot_escape(name: Any) -> None:
    with pytest.raises(RegistryError, match="artifact name"):
        registry.check_artifact_name(name)


def test_artifact_names_accepted() -> None:
    for name in ("stats.safetensors", "plots/scores.png", "a/b-c/d_e.1.json"):
        assert registry.check_artifact_name(name) == name


# ------------------------------------------------------------------------------------ champion policy


def cand(version: int, **metrics: float) -> dict[str, Any]:
    return {"name": "m", "version": str(version), **metrics}


def test_champion_fastest_within_budget() -> None:
    rows = [
        cand(1, perplexity_change_pct=0.5, decode_speedup=1.05, bytes=900),
        cand(2, perplexity_change_pct=1.8, decode_speedup=1.30, bytes=700),
        cand(3, perplexity_change_pct=6.0, decode_speedup=1.90, bytes=400),  # over budget
    ]
    assert choose_champion(rows, 2.0, "speed")["version"] == "2"
    assert choose_champion(rows, 1.0, "speed")["version"] == "1"
    assert choose_champion(rows, 10.0, "size")["version"] == "3"
    assert choose_champion(rows, 2.0, "size")["version"] == "2"
    assert choose_champion(rows, 0.1, "speed") is None
    assert choose_champion([], 5.0) is None


def test_champion_budget_is_inclusive_and_improvements_count() -> None:
    rows = [
        cand(1, perplexity_change_pct=2.0, decode_speedup=1.1),
        cand(2, perplexity_change_pct=-1.0, decode_speedup=1.0),
    ]
    assert choose_champion(rows, 2.0)["version"] == "1"
    assert choose_champion(rows, 0.0)["version"] == "2"


def test_champion_ties_are_deterministic_in_any_order() -> None:
    """Equal speeds tie; issue 13: a tie goes to fewer bytes, then to less quality loss."""
    rows = [
        cand(4, perplexity_change_pct=1.0, decode_speedup=1.5, bytes=560),
        cand(3, perplexity_change_pct=0.5, decode_speedup=1.5, bytes=600),
        cand(2, perplexity_change_pct=0.5, decode_speedup=1.5, bytes=550),  # fewest bytes
        cand(
            7, perplexity_change_pct=0.5, decode_speedup=1.5, bytes=550
        ),  # identical: lower version
        cand(5, perplexity_change_pct=0.9, decode_speedup=1.5, bytes=550),  # same bytes, more loss
    ]
    for seed in range(6):
        random.Random(seed).shuffle(rows)
        assert choose_champion(rows, 5.0, "speed")["version"] == "2"
    size_rows = [
        cand(9, perplexity_change_pct=1.0, bytes=100, decode_speedup=1.0),
        cand(8, perplexity_change_pct=1.0, bytes=100, decode_speedup=1.2),
    ]
    assert choose_champion(size_rows, 5.0, "size")["version"] == "8"


def test_champion_encoders_use_accuracy_and_prefill() -> None:
    rows = [
        cand(1, accuracy_change_pct=-0.5, prefill_speedup=1.2),
        cand(2, accuracy_change_pct=-3.0, prefill_speedup=1.6),
        cand(3, accuracy_change_pct=+0.2, prefill_speedup=1.1),
    ]
    assert choose_champion(rows, 1.0)["version"] == "1"
    assert choose_champion(rows, 5.0)["version"] == "2"


def test_champion_skips_missing_or_non_finite_metrics() -> None:
    rows = [
        cand(1, perplexity_change_pct=math.nan, decode_speedup=3.0),
        cand(2, decode_speedup=2.0),  # no quality metric
        cand(3, perplexity_change_pct=1.0, decode_speedup=math.inf),
        cand(4, perplexity_change_pct=1.0, decode_speedup=1.1),
        cand(5, perplexity_change_pct=1.0),
    ]  # no speed
    assert choose_champion(rows, 5.0)["version"] == "4"
    assert choose_champion(rows, 5.0, "size") is None


@pytest.mark.parametrize(
    ("budget", "objective"),
    [(-1.0, "speed"), (math.nan, "speed"), ("5", "speed"), (5.0, "latency")],
)
def test_champion_rejects_bad_policy(budget: Any, objective: Any) -> None:
    with pytest.raises(RegistryError):
        choose_champion([cand(1, perplexity_change_pct=0.0, decode_speedup=1.0)], budget, objective)


# ------------------------------------------------------------------------------- real MLflow: sqlite


def test_register_then_fresh_process_loads_champion_with_identical_logits(
    variants: dict[str, Path],
    stats_file: Path,
    mlflow_uri: str,
    unique_name: str,
    tmp_path: Path,
) -> None:
    from reports.plots import score_distribution_plot

    model, _ = tiny_model("LlamaForCausalLM")
    plot = score_distribution_plot(stats_file, model, tmp_path / "scores.png")
    stages: list[str] = []
    rv = register_variant(
        variants["text"],
        model_name=unique_name,
        metrics=METRICS,
        uri=mlflow_uri,
        artifacts={"statistics/stats.safetensors": stats_file, "plots/scores.png": plot},
        tags={"ffsplit.sweep": "unit"},
        progress=stages.append,
    )
    assert stages == list(registry.STAGES)
    assert (rv.name, rv.uri, rv.reused) == (
        unique_name,
        f"models:/{unique_name}/{rv.version}",
        False,
    )
    c = client(mlflow_uri)
    mv = c.get_model_version(unique_name, rv.version)
    assert mv.status == "READY" and mv.tags[COMPLETE_TAG] == "true"
    assert mv.tags[CONTENT_TAG] == registry.variant_content_hash(read_manifest(variants["text"]))
    run = c.get_run(rv.run_id)
    assert run.info.status == "FINISHED"
    assert c.get_experiment(run.info.experiment_id).name == "ffsplit/tiny-llama"
    assert run.data.metrics == pytest.approx(METRICS)
    assert run.data.params["recipe.method"] == "lowrank"
    assert run.data.params["base_model.name"] == "tiny-llama"
    assert run.data.tags["ffsplit.sweep"] == "unit" and run.data.tags[ROLE_TAG] == "variant"
    assert run.data.tags["mlflow.runName"] == "lowrank-h0.10-r0.3"
    names = {f.path for f in c.list_artifacts(rv.run_id)}
    assert {"manifest.json", "model", "plots", "statistics"} <= names
    assert [f.path for f in c.list_artifacts(rv.run_id, "plots")] == ["plots/scores.png"]
    assert not any(str(mlflow_uri) in v for v in {**run.data.params, **run.data.tags}.values())
    # the logged model pickles nothing: safetensors, JSON, YAML, text and the code script only
    local = Path(mv.source)
    suffixes = {p.suffix for p in local.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".yaml", ".txt", ".py", ""}, suffixes

    set_alias(unique_name, "champion", rv.version, uri=mlflow_uri)
    data = load_in_fresh_process(
        f"models:/{unique_name}@champion", mlflow_uri, TEXTS, tmp_path / "fresh"
    )
    check_fresh_outputs(data, variants["text"], TEXTS)


def test_token_id_input_for_variants_without_tokenizer(
    variants: dict[str, Path], mlflow_env: str, unique_name: str
) -> None:
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    rv = register_variant(variants["ids"], model_name=unique_name, metrics=METRICS)  # env URI
    loaded = mlflow.pyfunc.load_model(rv.uri)
    ids = [[5, 9, 14, 3], [7, 7]]
    ref, tokenizer, _ = load_variant(variants["ids"])
    assert tokenizer is None
    out = loaded.predict(pd.DataFrame({"input_ids": ids}))
    assert list(out.columns) == ["tokens", "nll", "perplexity", "last_logits"]
    for i, seq in enumerate(ids):
        with torch.inference_mode():
            want = ref(input_ids=torch.tensor([seq])).logits[0]
        assert out["last_logits"][i] == want[-1].tolist()
    assert loaded.predict([{"input_ids": seq} for seq in ids])["tokens"].tolist() == [4, 2]
    made = loaded.predict(
        pd.DataFrame({"input_ids": ids[:1]}), params={"task": "generate", "max_new_tokens": 3}
    )
    assert len(made["generated_ids"][0]) == 3 and made["generated_text"][0] is None
    single = loaded.predict([{"input_ids": [5]}])
    assert math.isnan(single["nll"][0])
    with pytest.raises(MlflowException, match="no tokenizer"):
        loaded.predict([{"text": "some text"}])
    with pytest.raises(MlflowException, match="outside"):
        loaded.predict([{"input_ids": [5, 999]}])
    with pytest.raises(MlflowException, match="task"):
        loaded.predict(pd.DataFrame({"input_ids": ids}), params={"task": "translate"})


def test_reregistering_same_variant_returns_existing_version(
    variants: dict[str, Path], mlflow_uri: str, unique_name: str
) -> None:
    first = register_variant(
        variants["text"], model_name=unique_name, metrics=METRICS, uri=mlflow_uri
    )
    again = register_variant(
        variants["text"],
        model_name=unique_name,
        metrics={**METRICS, "perplexity": 99.0},
        uri=mlflow_uri,
    )
    assert (again.version, again.run_id, again.reused) == (first.version, first.run_id, True)
    other = register_variant(
        variants["other"], model_name=unique_name, metrics=METRICS, uri=mlflow_uri
    )
    assert other.version != first.version and not other.reused
    versions = client(mlflow_uri).search_model_versions(f"name = '{unique_name}'")
    assert sorted(v.version for v in versions) == sorted([int(first.version), int(other.version)])


def test_failure_midway_leaves_no_version_and_no_artifacts(
    variants: dict[str, Path], stats_file: Path, mlflow_uri: str, unique_name: str
) -> None:
    def fail_at_verify(stage: str) -> None:
        if stage == "verify":  # the version exists by now: it must be rolled back
            raise RuntimeError("disk full while verifying")

    with pytest.raises(RegistryError, match="disk full"):
        register_variant(
            variants["text"],
            model_name=unique_name,
            metrics=METRICS,
            uri=mlflow_uri,
            artifacts={"stats.safetensors": stats_file},
            progress=fail_at_verify,
        )
    c = client(mlflow_uri)
    assert c.search_model_versions(f"name = '{unique_name}'") == []
    experiment = c.get_experiment_by_name("ffsplit/tiny-llama")
    failed = [
        r
        for r in c.search_runs([experiment.experiment_id], "attributes.status = 'FAILED'")
        if r.data.tags.get("ffsplit.error", "").endswith("disk full while verifying")
    ]
    assert len(failed) == 1
    assert c.list_artifacts(failed[0].info.run_id) == []
    with pytest.raises(RegistryError, match="no version 1"):
        set_alias(unique_name, "champion", 1, uri=mlflow_uri)
    ok = register_variant(variants["text"], model_name=unique_name, metrics=METRICS, uri=mlflow_uri)
    assert not ok.reused
    assert c.get_model_version(unique_name, ok.version).tags[COMPLETE_TAG] == "true"


def test_connection_error_midway_is_retried_without_duplicates(
    variants: dict[str, Path], mlflow_uri: str, unique_name: str
) -> None:
    calls: list[str] = []

    def drop_once(stage: str) -> None:
        calls.append(stage)
        if stage == "verify" and calls.count("verify") == 1:
            raise ConnectionError("connection reset by peer")

    rv = register_variant(
        variants["text"],
        model_name=unique_name,
        metrics=METRICS,
        uri=mlflow_uri,
        backoff=0.0,
        progress=drop_once,
    )
    assert calls.count("run") == 2
    versions = client(mlflow_uri).search_model_versions(f"name = '{unique_name}'")
    assert [v.version for v in versions] == [int(rv.version)]
    assert versions[0].tags[COMPLETE_TAG] == "true"


def test_bounded_retries_then_clean_failure(
    variants: dict[str, Path], mlflow_uri: str, unique_name: str
) -> None:
    def always_down(stage: str) -> None:
        if stage == "model":
            raise ConnectionError("connection refused")

    with pytest.raises(RegistryError, match="after 3 attempts"):
        register_variant(
            variants["text"],
            model_name=unique_name,
            metrics=METRICS,
            uri=mlflow_uri,
            retries=2,
            backoff=0.0,
            progress=always_down,
        )
    assert client(mlflow_uri).search_model_versions(f"name = '{unique_name}'") == []


def test_alias_refused_for_incomplete_version_and_leftover_replaced(
    variants: dict[str, Path], mlflow_uri: str, unique_name: str
) -> None:
    # A half-registered version as a killed process would leave it: no complete tag.
    good = register_variant(
        variants["other"], model_name=unique_name, metrics=METRICS, uri=mlflow_uri
    )
    c = client(mlflow_uri)
    source = c.get_model_version(unique_name, good.version).source
    content = registry.variant_content_hash(read_manifest(variants["text"]))
    half = c.create_model_version(
        unique_name, source=source, run_id=good.run_id, tags={CONTENT_TAG: content}
    )
    with pytest.raises(RegistryError, match="not complete"):
        set_alias(unique_name, "champion", half.version, uri=mlflow_uri)
    assert c.get_registered_model(unique_name).aliases == {}
    rv = register_variant(variants["text"], model_name=unique_name, metrics=METRICS, uri=mlflow_uri)
    left = {int(v.version) for v in c.search_model_versions(f"name = '{unique_name}'")}
    assert left == {int(good.version), int(rv.version)}  # the leftover is gone
    set_alias(unique_name, "champion", rv.version, uri=mlflow_uri)
    assert str(c.get_model_version_by_alias(unique_name, "champion").version) == rv.version


def test_bad_inputs_fail_before_any_work(
    variants: dict[str, Path], stats_file: Path, mlflow_uri: str, unique_name: str, tmp_path: Path
) -> None:
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "escape").symlink_to(stats_file)
    cases = [
        ({"artifacts": {"../up.safetensors": stats_file}}, "artifact name"),
        ({"artifacts": {"stats.safetensors": tmp_path / "missing"}}, "not a regular file"),
        ({"artifacts": {"linked": linked}}, "link"),
        ({"metrics": {"perplexity": math.nan}}, "finite"),
        ({"metrics": {"bad key!": 1.0}}, "not valid"),
        ({"model_name": "bad name/x"}, "model name"),
    ]
    for change, message in cases:
        kwargs: dict[str, Any] = {
            "model_name": unique_name,
            "metrics": METRICS,
            "uri": mlflow_uri,
            **change,
        }
        with pytest.raises(RegistryError, match=message):
            register_variant(variants["text"], **kwargs)
    with pytest.raises(FFSplitError, match="not an ffsplit variant"):
        register_variant(tmp_path, model_name=unique_name, metrics=METRICS, uri=mlflow_uri)
    assert client(mlflow_uri).search_registered_models(f"name = '{unique_name}'") == []


def test_alias_policy_sets_dense_and_champion(
    tmp_path: Path, mlflow_uri: str, unique_name: str
) -> None:
    dense = make_variant(
        tmp_path / "dense", seed=5, recipe=Recipe(method="none", heavy_ratio=0.1, ffn_reduction=0.0)
    )
    fast = make_variant(tmp_path / "fast", seed=6)
    faster_but_worse = make_variant(tmp_path / "worse", seed=7)
    d = register_variant(
        dense,
        model_name=unique_name,
        uri=mlflow_uri,
        tags={ROLE_TAG: "dense"},
        metrics={"perplexity_change_pct": 0.0, "decode_speedup": 9.0, "bytes": 9e5},
    )
    f = register_variant(
        fast,
        model_name=unique_name,
        uri=mlflow_uri,
        metrics={"perplexity_change_pct": 1.5, "decode_speedup": 1.3, "bytes": 5e5},
    )
    register_variant(
        faster_but_worse,
        model_name=unique_name,
        uri=mlflow_uri,
        metrics={"perplexity_change_pct": 8.0, "decode_speedup": 1.8, "bytes": 4e5},
    )
    decision = registry.apply_alias_policy(
        unique_name, quality_budget_pct=2.0, dense_version=d.version, uri=mlflow_uri
    )
    assert decision == registry.AliasDecision(dense=d.version, champion=f.version, candidates=2)
    c = client(mlflow_uri)
    assert str(c.get_model_version_by_alias(unique_name, "dense").version) == d.version
    assert str(c.get_model_version_by_alias(unique_name, "champion").version) == f.version
    # a budget nothing meets leaves the champion where it is
    none = registry.apply_alias_policy(unique_name, quality_budget_pct=0.5, uri=mlflow_uri)
    assert none.champion is None
    assert str(c.get_model_version_by_alias(unique_name, "champion").version) == f.version


# -------------------------------------------------------------------------------- unreachable servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_server_fails_fast_with_redacted_uri(variants: dict[str, Path]) -> None:
    port = _free_port()
    uri = f"http://alice:hunter2@127.0.0.1:{port}"
    started = time.monotonic()
    with pytest.raises(RegistryError) as info:
        register_variant(variants["text"], model_name="never", metrics=METRICS, uri=uri)
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "hunter2" not in message and "alice" not in message
    assert f"http://***@127.0.0.1:{port}" in message and "unreachable" in message
    assert "\n" not in message
    for call in (
        lambda: set_alias("never", "champion", 1, uri=uri),
        lambda: registry.experiment_for("x", uri=uri),
    ):
        with pytest.raises(RegistryError, match="unreachable"):
            call()


def test_a_server_that_is_not_mlflow_is_refused() -> None:
    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(RegistryError, match="HTTP 404"):
            registry.check_reachable(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- real MLflow: a server


@pytest.mark.pipeline
def test_real_server_register_load_and_roll_back(
    variants: dict[str, Path],
    stats_file: Path,
    mlflow_server_uri: str,
    unique_name: str,
    tmp_path: Path,
) -> None:
    def fail_at_verify(stage: str) -> None:
        if stage == "verify":
            raise RuntimeError("stopped midway")

    with pytest.raises(RegistryError, match="stopped midway"):
        register_variant(
            variants["text"],
            model_name=unique_name,
            metrics=METRICS,
            uri=mlflow_server_uri,
            artifacts={"stats.safetensors": stats_file},
            progress=fail_at_verify,
        )
    c = client(mlflow_server_uri)
    assert c.search_model_versions(f"name = '{unique_name}'") == []
    experiment = c.get_experiment_by_name("ffsplit/tiny-llama")
    failed = c.search_runs([experiment.experiment_id], "attributes.status = 'FAILED'")
    assert failed and all(c.list_artifacts(r.info.run_id) == [] for r in failed)

    rv = register_variant(
        variants["text"],
        model_name=unique_name,
        metrics=METRICS,
        uri=mlflow_server_uri,
        artifacts={"stats.safetensors": stats_file},
    )
    assert c.get_model_version(unique_name, rv.version).source.startswith("mlflow-artifacts:")
    set_alias(unique_name, "champion", rv.version, uri=mlflow_server_uri)
    data = load_in_fresh_process(
        f"models:/{unique_name}@champion", mlflow_server_uri, TEXTS, tmp_path / "fresh"
    )
    check_fresh_outputs(data, variants["text"], TEXTS)


# ------------------------------------------------------------------------------ the real small model


@pytest.mark.slow
def test_smollm2_variant_served_from_registry(
    tmp_path: Path, mlflow_uri: str, unique_name: str
) -> None:
    from ffsplit.config import LowRankConfig
    from ffsplit.models.loading import load_model

    try:
        model, tokenizer, ref = load_model("smollm2-135m")
    except FFSplitError as exc:
        pytest.skip(f"SmolLM2 not available offline: {exc}")
    recipe = Recipe(
        method=LowRankConfig(whiten=False), heavy_ratio=0.1, ffn_reduction=0.2, selection="random"
    )
    report, layers = compress_model(model, None, recipe)
    variant = save_variant(
        model,
        tokenizer,
        tmp_path / "smol",
        adapter=get_adapter(model),
        base_model=ref.to_dict(),
        report=report,
        layers=layers,
    )
    del model
    rv = register_variant(
        variant,
        model_name=unique_name,
        uri=mlflow_uri,
        metrics={
            "perplexity_change_pct": 5.0,
            "decode_speedup": 1.0,
            "ffn_reduction": report.ffn_reduction,
        },
    )
    set_alias(unique_name, "champion", rv.version, uri=mlflow_uri)
    texts = ["The capital of France is", "Neural networks compress"]
    data = load_in_fresh_process(
        f"models:/{unique_name}@champion", mlflow_uri, texts, tmp_path / "fresh"
    )
    check_fresh_outputs(data, variant, texts)
    assert data["generate"]["generated_text"][0].strip()
