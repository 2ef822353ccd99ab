"""tracking/serving.py: the logged model's contract (signature, input example, run id) and the model
served by `mlflow models serve` as a real process, answering /invocations over HTTP.

Variants are tiny random Llamas with a character tokenizer; the store is a real sqlite MLflow store
(conftest's mlflow_uri). The served logits must equal ffsplit.load_variant's bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest
import torch

from ffsplit.adapters import get_adapter
from ffsplit.compress.recipe import compress_model
from ffsplit.config import ProfileConfig, Recipe
from ffsplit.models.tiny import tiny_model
from ffsplit.profiling import profile_model
from ffsplit.variant import load_variant, save_variant
from services.stack import free_port
from tracking.registry import register_variant, set_alias
from tracking.serving import (
    CAUSAL_OUTPUTS,
    INPUT_SCHEMA,
    PARAMS_SCHEMA,
    FFSplitVariantModel,
)

TEXTS = ["Hello, world!", "The heavy hitters hold most of the output norm."]
IDS = [[5, 9, 14, 3], [7, 7, 20]]
METRICS = {"perplexity_change_pct": 1.0, "decode_speedup": 1.1, "bytes": 1.0e5}
PROFILE = ProfileConfig(tokens=128, window=16, batch_size=4)


def char_tokenizer() -> Any:
    """A real fast tokenizer over printable ASCII (97 ids: fits the tiny models' vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>", "<eos>", *string.printable[:95]]
    tok = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def make_variant(out: Path, *, seed: int = 0, tokenizer: bool = True) -> Path:
    model, _ = tiny_model("LlamaForCausalLM", seed=seed)
    ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(seed))
    report, layers = compress_model(model, profile_model(model, ids, PROFILE), Recipe())
    return save_variant(
        model,
        char_tokenizer() if tokenizer else None,
        out,
        adapter=get_adapter(model),
        base_model={"name": "tiny-llama", "weights_sha256": f"{seed:064d}"},
        report=report,
        layers=layers,
    )


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_variant(tmp_path_factory.mktemp("serving") / "text")


@pytest.fixture(scope="module")
def reference(variant: Path) -> tuple[Any, Any]:
    model, tokenizer, _ = load_variant(variant)
    return model, tokenizer


def _logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _greedy(model: Any, ids: list[int], new_tokens: int, pad: int) -> list[int]:
    prompt = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return out[0, prompt.shape[1] :].tolist()


@pytest.fixture(scope="module")
def registered(variant: Path, mlflow_uri: str) -> tuple[str, Any, list[str]]:
    """The variant registered as NAME@champion; also what registering warned or logged."""
    import uuid

    name = f"t-serving-{uuid.uuid4().hex[:8]}"
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    handler = Keep()
    logging.getLogger("mlflow").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rv = register_variant(variant, model_name=name, metrics=METRICS, uri=mlflow_uri)
    finally:
        logging.getLogger("mlflow").removeHandler(handler)
    records += [f"{w.category.__name__}: {w.message}" for w in caught]
    set_alias(name, "champion", rv.version, uri=mlflow_uri)
    return name, rv, records


# ------------------------------------------------------------------------- the logged model


def test_logged_model_has_signature_example_and_run_id(
    registered: tuple[str, Any, list[str]], mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.models import Model

    name, rv, records = registered
    noise = ("type hint", "input example", "signature", "range is deprecated")
    assert not [r for r in records if any(n in r.lower() for n in noise)], records
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    info = mlflow.models.get_model_info(f"models:/{name}@champion")
    assert info.run_id == rv.run_id and info.artifact_path == "model"
    signature = info.signature
    assert signature.inputs == INPUT_SCHEMA and signature.params == PARAMS_SCHEMA
    assert signature.outputs == CAUSAL_OUTPUTS
    assert {c.name for c in signature.inputs.inputs} == {"text", "input_ids"}
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion"))
    model = Model.load(str(local))
    example = model.load_input_example(str(local))
    assert list(example.columns) == ["text"] and example["text"][0]
    assert model.load_input_example_params(str(local)) == {"task": "score"}
    serving = json.loads((local / "serving_input_example.json").read_text())
    assert serving["params"] == {"task": "score"} and "dataframe_split" in serving


def test_pyfunc_contract_text_ids_and_one_line_errors(
    registered: tuple[str, Any, list[str]],
    reference: tuple[Any, Any],
    mlflow_uri: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    name, rv, _ = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert loaded.metadata.run_id == rv.run_id
    model, tokenizer = reference
    by_text = loaded.predict(pd.DataFrame({"text": TEXTS}))
    by_ids = loaded.predict([{"input_ids": tokenizer(t)["input_ids"]} for t in TEXTS])
    for out in (by_text, by_ids):
        for i, text in enumerate(TEXTS):
            want = _logits(model, tokenizer(text)["input_ids"])[-1]
            assert torch.equal(torch.tensor(out["last_logits"][i], dtype=torch.float32), want)
    made = loaded.predict(
        pd.DataFrame({"input_ids": IDS}), params={"task": "generate", "max_new_tokens": 4}
    )
    assert made["generated_ids"].tolist() == [
        _greedy(model, ids, 4, tokenizer.eos_token_id) for ids in IDS
    ]
    bad = [
        (["a bare list"], None, "expected a 'text' or an 'input_ids' column"),
        ([{"text": "a", "input_ids": [1]}], None, "exactly one of 'text' and 'input_ids'"),
        ([{"input_ids": [1, 999]}], None, "outside 0..159"),
        ([{"text": "a"}], {"task": "translate"}, "params.task must be one of"),
        ([{"text": "a"}], {"max_new_tokens": 0}, "max_new_tokens must be an integer"),
    ]
    for data, params, message in bad:
        with pytest.raises(MlflowException, match=message) as caught:
            loaded.predict(data, params=params)
        assert "\n" not in caught.value.message and caught.value.get_http_status_code() == 400


def test_direct_calls_still_take_plain_lists(variant: Path, reference: tuple[Any, Any]) -> None:
    """FFSplitVariantModel itself (and models logged before the signature, which MLflow hands
    their input unchanged) takes a text, a list of texts or token id lists."""
    served = FFSplitVariantModel().load(variant)
    model, tokenizer = reference
    ids = tokenizer(TEXTS[0])["input_ids"]
    for data in (TEXTS[0], [TEXTS[0]], [ids], {"input_ids": [ids]}):
        out = served.predict(None, data)
        assert torch.equal(torch.tensor(out["last_logits"][0]), _logits(model, ids)[-1])


# -------------------------------------------------------------------------- mlflow models serve


def _post(url: str, body: Any, timeout: float = 120) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=body if isinstance(body, bytes) else json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _ping(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url + "/ping", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (the CLI and its uvicorn), SIGKILL what is left."""
    group = [p for p in psutil.process_iter() if _pgid(p.pid) == proc.pid]
    for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        _, alive = psutil.wait_procs(group, timeout=wait_s)
        if not alive:
            break
    proc.wait(timeout=10)
    assert not [p for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


@pytest.fixture(scope="module")
def served(
    registered: tuple[str, Any, list[str]],
    mlflow_uri: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """`mlflow models serve -m models:/NAME@champion --env-manager local` on 127.0.0.1 (a free
    port; another is tried if that one is taken meanwhile), stopped by process group."""
    name, _, _ = registered
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    venv_bin = str(Path(sys.executable).parent)  # mlflow runs `uvicorn` from PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
    }
    for _attempt in range(3):
        port = free_port()
        argv = [os.path.join(venv_bin, "mlflow"), "models", "serve"]
        argv += ["-m", f"models:/{name}@champion", "--env-manager", "local"]
        argv += ["-h", "127.0.0.1", "-p", str(port)]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not _ping(url):
            time.sleep(0.5)
        if _ping(url) and proc.poll() is None:
            break
        _stop_group(proc)
        if "address already in use" not in log_path.read_text(errors="replace").lower():
            pytest.fail(f"mlflow models serve did not come up:\n{log_path.read_text()[-3000:]}")
    else:
        pytest.fail("mlflow models serve: no free port after 3 attempts")
    try:
        yield url
    finally:
        _stop_group(proc)


@pytest.mark.pipeline
def test_served_champion_scores_and_generates_like_load_variant(
    served: str, reference: tuple[Any, Any]
) -> None:
    model, tokenizer = reference
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    by_text = _post(served + "/invocations", {"dataframe_records": [{"text": t} for t in TEXTS]})
    by_ids = _post(
        served + "/invocations",
        {"dataframe_split": {"columns": ["input_ids"], "data": [[seq] for seq in ids]}},
    )
    for status, body in (by_text, by_ids):
        assert status == 200, body
        rows = body["predictions"]
        assert [r["tokens"] for r in rows] == [len(seq) for seq in ids]
        for row, seq in zip(rows, ids, strict=True):
            want = _logits(model, seq)[-1]
            assert torch.equal(torch.tensor(row["last_logits"], dtype=torch.float32), want)
            nll = torch.nn.functional.cross_entropy(_logits(model, seq)[:-1], torch.tensor(seq[1:]))
            assert row["nll"] == pytest.approx(nll.item(), rel=1e-6)
    for request in (
        {"dataframe_records": [{"text": TEXTS[0]}], "params": {"task": "generate"}},
        {"dataframe_records": [{"input_ids": ids[0]}], "params": {"task": "generate"}},
    ):
        status, body = _post(served + "/invocations", request)
        assert status == 200, body
        [row] = body["predictions"]
        want = _greedy(model, ids[0], 32, tokenizer.eos_token_id)  # max_new_tokens' default
        assert row["generated_ids"] == want
        assert row["generated_text"] == tokenizer.decode(want, skip_special_tokens=True)


@pytest.mark.pipeline
def test_served_champion_answers_bad_requests_with_400_and_one_line(served: str) -> None:
    """MLflow's server prefixes the model's message with the request's data; the model's own
    reason is the message's last line, and it is one line."""
    cases = [
        ({"dataframe_records": [{"input_ids": [1, 999]}]}, "outside 0..159"),
        ({"dataframe_records": [{"text": "a"}], "params": {"task": "x"}}, "params.task must be"),
        ({"dataframe_records": [{"prompt": "a"}]}, "expected a 'text' or an 'input_ids' column"),
    ]
    for request, reason in cases:
        status, body = _post(served + "/invocations", request)
        assert status == 400, body
        assert body["error_code"] == "INVALID_PARAMETER_VALUE"
        last = body["message"].splitlines()[-1]
        assert last.startswith("Error: ") and reason in last, body["message"]
    status, body = _post(served + "/invocations", b"{not json")
    assert 400 <= status < 500 and body["message"]


def _readme_payloads() -> list[dict[str, Any]]:
    """The README's curl request bodies, as tests/test_readme.py reads them."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "test_readme.py"
    spec = importlib.util.spec_from_file_location("readme_checks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.readme_payloads()


@pytest.mark.pipeline
def test_readme_requests_are_answered(served: str) -> None:
    """The README's "Serve the champion" requests, sent as written (its SmolLM2 token ids mapped
    into the tiny model's vocabulary of 160)."""
    payloads = _readme_payloads()
    assert payloads
    for payload in payloads:
        for record in payload.get("dataframe_records", []):
            if "input_ids" in record:
                record["input_ids"] = [i % 150 for i in record["input_ids"]]
        status, body = _post(served + "/invocations", payload)
        assert status == 200, body
        rows = body["predictions"]
        assert len(rows) == len(payload["dataframe_records"])
        task = payload.get("params", {}).get("task", "score")
        want = {"generated_ids", "generated_text"} if task == "generate" else {"last_logits", "nll"}
        assert all(want <= set(row) for row in rows), rows
        if task == "generate":
            assert [len(r["generated_ids"]) for r in rows] == [
                payload["params"]["max_new_tokens"]
            ] * len(rows)
