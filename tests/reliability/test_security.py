"""Security rules (issue 7): only safetensors and JSON are loaded (no pickle, no remote code),
servers bind 127.0.0.1 unless told otherwise, artifact names cannot escape their folder, and no
secrets reach messages, logs or params.

Hostile files are real: pickles that create a marker file when unpickled, and a model folder whose
config points at custom code that creates a marker when imported. A marker that appears is proof
that the loader ran them.
"""

from __future__ import annotations

import ast
import json
import logging
import pickle
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ffsplit.errors import FFSplitError
from ffsplit.files import sha256_file
from ffsplit.models.loading import load_model
from ffsplit.profiling import load_stats
from ffsplit.variant import load_variant, read_manifest

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("ffsplit", "tasks", "flows")
SECRET = "s3cr3t-Pa55"


class _Unpickled:
    """Unpickling this creates the marker file (builtins.open(marker, 'w'))."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


def _plant_pickles(folder: Path, marker: Path) -> None:
    """Pickle files where loaders look for them: HF weights, torch checkpoints, training args."""
    payload = pickle.dumps(_Unpickled(marker))
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "stats.pkl"):
        (folder / name).write_bytes(payload)


def _no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every pickle entry point fail loudly for the rest of the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("something tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


def _rehash(variant: Path) -> None:
    path = variant / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"] = {name: sha256_file(variant / name) for name in manifest["files"]}
    path.write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------- no pickle


def test_loaders_never_unpickle(
    inputs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record: Callable
) -> None:
    marker = tmp_path / "UNPICKLED"
    model_dir = shutil.copytree(inputs.notok, tmp_path / "model")
    variant = shutil.copytree(inputs.variant, tmp_path / "variant")
    _plant_pickles(model_dir, marker)
    _plant_pickles(variant, marker)
    _no_pickle(monkeypatch)

    model, _, _ = load_model(model_dir)
    loaded, _, manifest = load_variant(variant)
    stats = load_stats(inputs.stats)
    with pytest.raises(FFSplitError, match="not a readable safetensors"):
        load_stats(model_dir / "stats.pkl")
    with torch.no_grad():
        logits = loaded(input_ids=torch.arange(8)[None]).logits
    assert torch.isfinite(logits).all() and stats.layers and manifest["adapter"] == "llama"
    assert not marker.exists(), "a pickle planted beside the weights was unpickled"
    record(
        kind="security",
        area="no pickle",
        what="load_model, load_variant, load_stats with pickle.load/loads/Unpickler and "
        "torch.load made to fail, and marker-writing pickles planted beside the weights",
        message="all three load from safetensors + JSON; a pickle given as statistics is "
        "refused; the marker never appears",
    )


def test_pickle_only_model_folder_is_refused(
    inputs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record: Callable
) -> None:
    marker = tmp_path / "UNPICKLED"
    model_dir = shutil.copytree(inputs.notok, tmp_path / "model")
    (model_dir / "model.safetensors").unlink()
    _plant_pickles(model_dir, marker)
    _no_pickle(monkeypatch)
    with pytest.raises(FFSplitError, match=r"lacks \*\.safetensors"):
        load_model(model_dir)
    assert not marker.exists()
    record(
        kind="security",
        area="no pickle",
        what="a model folder whose only weights are pytorch_model.bin (a pickle)",
        message="refused: 'model folder ... lacks *.safetensors'; nothing unpickled",
    )


def _remote_code_folder(src: Path, dst: Path, marker: Path, model_type: str) -> Path:
    """A model folder whose config.json maps the auto classes to code that writes a marker."""
    folder = shutil.copytree(src, dst)
    code = (
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('remote code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n"
        f"    model_type = {model_type!r}\n"
        "class EvilModel(LlamaForCausalLM):\n"
        "    config_class = EvilConfig\n"
    )
    (folder / "evil.py").write_text(code)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModel": "evil.EvilModel",
        "AutoModelForCausalLM": "evil.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_remote_code_never_runs(inputs: Any, tmp_path: Path, record: Callable) -> None:
    marker = tmp_path / "REMOTE_CODE_RAN"
    custom = _remote_code_folder(inputs.notok, tmp_path / "custom", marker, "evil")
    with pytest.raises(FFSplitError, match="custom code"):
        load_model(custom)
    # A known model_type with an auto_map: transformers' own class is used, the file is ignored.
    mapped = _remote_code_folder(inputs.notok, tmp_path / "mapped", marker, "llama")
    model, _, _ = load_model(mapped)
    assert type(model).__module__.startswith("transformers.")
    # The same inside a variant (hashes updated, so only the config can refuse it).
    variant = shutil.copytree(inputs.variant, tmp_path / "variant")
    shutil.copy(custom / "evil.py", variant / "evil.py")
    shutil.copy(custom / "config.json", variant / "config.json")
    _rehash(variant)
    with pytest.raises(FFSplitError, match="config.json"):
        load_variant(variant)
    assert not marker.exists(), "custom code from a model folder was executed"
    record(
        kind="security",
        area="no remote code",
        what="model folder and variant whose config.json auto_map points at code that writes "
        "a marker when imported",
        message="custom model_type refused ('contains custom code'); known model_type loads "
        "transformers' own class; the marker never appears",
    )


def _trust_remote_code_values(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, source) of every trust_remote_code keyword or dict key not set to literal False."""
    found = []
    for node in ast.walk(tree):
        pairs: list[tuple[Any, ast.AST]] = []
        if isinstance(node, ast.Call):
            pairs = [(k.arg, k.value) for k in node.keywords]
        elif isinstance(node, ast.Dict):
            pairs = [
                (k.value, v)
                for k, v in zip(node.keys, node.values, strict=True)
                if isinstance(k, ast.Constant)
            ]
        for key, value in pairs:
            if key == "trust_remote_code" and not (
                isinstance(value, ast.Constant) and value.value is False
            ):
                found.append((node.lineno, ast.unparse(value)))
    return found


UNPICKLERS = {"pickle": ("load", "loads", "Unpickler"), "dill": ("load", "loads"),
              "joblib": ("load",), "torch": ("load",)}  # fmt: skip


def _unpickling_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, source) of every pickle.load-like attribute (pickle, dill, joblib, torch.load)."""
    return [
        (node.lineno, ast.unparse(node))
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.attr in UNPICKLERS.get(node.value.id, ())
    ]


def test_source_enables_no_remote_code_and_no_pickle(record: Callable) -> None:
    files = [p for d in SOURCE_DIRS for p in sorted((REPO_ROOT / d).rglob("*.py"))]
    assert files
    offending = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = path.relative_to(REPO_ROOT)
        offending += [
            f"{where}:{n} trust_remote_code={v}" for n, v in _trust_remote_code_values(tree)
        ]
        offending += [f"{where}:{n} {call}" for n, call in _unpickling_calls(tree)]
    assert not offending, offending
    record(
        kind="security",
        area="no pickle, no remote code",
        what=f"source scan of every .py file in {', '.join(d + '/' for d in SOURCE_DIRS)}: every "
        "trust_remote_code is the literal False; no pickle/dill/joblib load, no torch.load",
        message="none found",
    )


# ------------------------------------------------------------------------ names and folders

ESCAPING_NAMES = (
    "../x",
    "../../etc/passwd",
    "/etc/passwd",
    "a/b",
    "..",
    ".",
    "",
    ".hidden",
    "x/..",
)
ESCAPING_ARTIFACTS = ("../x", "/abs/path", "a/../b", ".hidden", "a//b", "", "x/./y")


def test_manifest_file_names_cannot_escape(inputs: Any, tmp_path: Path, record: Callable) -> None:
    """verify_files reads folder / name for every name: none may point outside the folder."""
    variant = shutil.copytree(inputs.variant, tmp_path / "variant")
    path = variant / "manifest.json"
    good = json.loads(path.read_text())
    for name in ESCAPING_NAMES:
        path.write_text(json.dumps({**good, "files": {**good["files"], name: "0" * 64}}))
        with pytest.raises(FFSplitError, match="escapes the variant folder"):
            read_manifest(variant)
    record(
        kind="security",
        area="path traversal",
        what="variant manifest file names " + ", ".join(repr(n) for n in ESCAPING_NAMES),
        message="every one refused: 'file name ... escapes the variant folder'",
    )


def test_artifact_names_cannot_escape(record: Callable) -> None:
    registry = pytest.importorskip(
        "tracking.registry", reason="tracking.registry is not importable"
    )
    for name in ESCAPING_ARTIFACTS:
        with pytest.raises(FFSplitError, match="artifact name"):
            registry.check_artifact_name(name)
    assert registry.check_artifact_name("plots/quality.png") == "plots/quality.png"
    record(
        kind="security",
        area="path traversal",
        what="MLflow artifact names " + ", ".join(repr(n) for n in ESCAPING_ARTIFACTS),
        message="every one refused ('artifact name ...: use a relative path'); "
        "'plots/quality.png' accepted",
    )


# ------------------------------------------------------------------------------------ servers


def test_stack_binds_loopback_unless_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record: Callable
) -> None:
    """The argv of the Prefect and MLflow servers, captured instead of started."""
    stack = pytest.importorskip("services.stack", reason="services.stack needs the pipeline extra")
    started: list[list[str]] = []

    def capture(name: str, argv: list[str], env: Any, home: Path, token: str) -> tuple[Any, Path]:
        started.append(list(argv))
        return None, home / f"{name}.log"

    monkeypatch.setattr(stack, "_start_process", capture)
    assert stack.StackConfig(home=tmp_path).host == "127.0.0.1"
    assert stack._parser().parse_args(["up"]).host == "127.0.0.1"

    def hosts(config: Any) -> list[str]:
        started.clear()
        stack._launch_prefect(config, 4200)
        stack._launch_mlflow(config, 5000)
        assert len(started) == 2
        return [argv[argv.index("--host") + 1] for argv in started]

    assert hosts(stack.StackConfig(home=tmp_path)) == ["127.0.0.1", "127.0.0.1"]
    assert hosts(stack.StackConfig(home=tmp_path, host="10.1.2.3")) == ["10.1.2.3", "10.1.2.3"]
    record(
        kind="security",
        area="servers",
        what="services/stack.py: default host of StackConfig and of `python -m flows.stack up`; "
        "the --host in the Prefect and MLflow server command lines",
        message="127.0.0.1 by default; another address only when given (--host / "
        "StackConfig.host). Not covered: the Ray head, which binds all interfaces by design "
        "(services/stack.py)",
    )


# ------------------------------------------------------------------------------------ secrets


@pytest.fixture
def registry() -> Any:
    module = pytest.importorskip("tracking.registry", reason="tracking.registry is not importable")
    if not hasattr(module, "redact"):
        pytest.skip("tracking.registry has no redact() yet")
    return module


URIS_WITH_SECRETS = (
    f"http://alice:{SECRET}@mlflow.example.com:5000",
    f"https://alice:{SECRET}@mlflow.example.com/api/2.0/mlflow",
    f"postgresql://admin:{SECRET}@db.example.com:5432/mlflow",
    f"mysql+pymysql://root:{SECRET}@10.0.0.5/mlflow",
    f"https://mlflow.example.com/?token={SECRET}&experiment=3",
    f"s3://bucket/path?X-Amz-Signature={SECRET}&X-Amz-Credential={SECRET}",
    f"could not reach http://bob:{SECRET}@127.0.0.1:1/health: connection refused",
)


@pytest.mark.parametrize("text", URIS_WITH_SECRETS)
def test_redact_hides_credentials(registry: Any, text: str) -> None:
    redacted = registry.redact(text)
    assert SECRET not in redacted
    assert redacted.split("://")[0] == text.split("://")[0]  # the scheme stays readable


def test_no_secrets_in_messages_logs_or_params(
    registry: Any, caplog: pytest.LogCaptureFixture, record: Callable
) -> None:
    for plain in ("http://127.0.0.1:5000", "sqlite:///tmp/mlflow.db", "file:///tmp/mlruns"):
        assert registry.redact(plain) == plain
    # An unreachable server with a password in its URI: the one-line error hides it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FFSplitError) as error:
        registry.check_reachable(f"http://alice:{SECRET}@127.0.0.1:{port}", timeout=2.0)
    assert SECRET not in str(error.value) and "127.0.0.1" in str(error.value)
    # Connection errors that quote the URI: neither the retry log nor the error shows the secret.
    caplog.set_level(logging.DEBUG)
    uri = f"http://alice:{SECRET}@127.0.0.1:{port}"

    def fail() -> None:
        raise ConnectionError(f"connection refused by {uri}/api/2.0/mlflow/runs/create")

    with pytest.raises(FFSplitError) as error:
        registry._retrying("create run", uri, fail, retries=1, backoff=0.0)
    assert SECRET not in str(error.value) and error.value.__cause__ is None
    assert caplog.records and SECRET not in caplog.text
    # A manifest whose recorded paths carry credentials: MLflow params are redacted.
    manifest = {
        "recipe": {"method": "lowrank"},
        "base_model": {"name": "m", "path": f"https://u:{SECRET}@models.example.com/m"},
        "calibration": {"corpus": f"https://data.example.com/c.txt?token={SECRET}"},
    }
    params, _ = registry.manifest_params(manifest)
    assert params and not any(SECRET in v for v in params.values())
    record(
        kind="security",
        area="secrets",
        what="URIs with user:password@ and secret query values (token, signature, credential) "
        "in: redact(), an unreachable-server error, the retry log and error, manifest params",
        message="the secret appears nowhere; plain URIs are left as they are",
    )
