"""MLflow side of the pipeline: one experiment per base model, one run and one registered model
version per variant, aliases set by a stated policy.

Contract (issue 3; reliability issue):
- The tracking URI is MLFLOW_TRACKING_URI when set, else the local server that `python -m
  services.stack up` recorded; an unreachable server fails before any work, in one line that names
  the URI with credentials redacted (`redact`). URIs are never written to params or tags.
- `register_variant` is one transaction: run (params = flattened manifest, metrics, artifacts),
  pyfunc model (tracking.serving), model version. The version gets the tag ``ffsplit.complete=true``
  as the very last write, after metrics and artifacts were read back. Any failure deletes the
  version made so far, removes the run's artifacts and marks the run FAILED. Connection errors are
  retried a bounded number of times with exponential backoff; MLflow's own HTTP retries are capped
  too (MLFLOW_HTTP_REQUEST_MAX_RETRIES / _BACKOFF_FACTOR default to 2 / 1 here unless set).
- Re-registering the same variant content (tag ``ffsplit.content_sha256``) returns the existing
  complete version; an incomplete leftover with that content (a killed process) is deleted first.
- `set_alias` refuses a version without ``ffsplit.complete=true`` or whose run did not finish, so
  an alias never points at a version lacking its metrics or artifacts.
- Alias policy (`apply_alias_policy`, `choose_champion`): ``dense`` names the reference;
  ``champion`` the fastest (or smallest) complete variant within a quality budget.

Metric names (the evaluation tasks log these; choose_champion reads them):
perplexity, perplexity_change_pct (100 * (ppl / ppl_dense - 1), + is worse), accuracy,
accuracy_change_pct (100 * (acc / acc_dense - 1), - is worse), parameters, bytes, ffn_reduction,
prefill_speedup, decode_speedup (dense time / variant time, > 1 is faster), profile_seconds,
compress_seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from ffsplit.errors import FFSplitError
from ffsplit.variant import read_manifest, verify_files
from ffsplit.variant.manifest import MANIFEST, flat_params

log = logging.getLogger(__name__)

COMPLETE_TAG = "ffsplit.complete"
CONTENT_TAG = "ffsplit.content_sha256"
ROLE_TAG = "ffsplit.role"  # "dense" for the reference, "variant" otherwise
SERIES_TAG = "ffsplit.series"  # the recipe's series: ffsplit-<method>, or which baseline
ERROR_TAG = "ffsplit.error"
SKIPPED_TAG = "ffsplit.params_skipped"
MODEL_ARTIFACT = "model"
MANIFEST_ARTIFACT = "manifest.json"
EXPERIMENT_PREFIX = "ffsplit/"
DENSE_ALIAS = "dense"
CHAMPION_ALIAS = "champion"
# register_variant calls progress(stage) as each stage starts.
STAGES = ("run", "params", "metrics", "artifacts", "model", "version", "verify", "complete")

# Metric names shared with the evaluation tasks (see the module docstring).
PERPLEXITY = "perplexity"
PERPLEXITY_CHANGE = "perplexity_change_pct"
ACCURACY = "accuracy"
ACCURACY_CHANGE = "accuracy_change_pct"
PARAMETERS = "parameters"
BYTES = "bytes"
FFN_REDUCTION = "ffn_reduction"
PREFILL_SPEEDUP = "prefill_speedup"
DECODE_SPEEDUP = "decode_speedup"
PROFILE_SECONDS = "profile_seconds"
COMPRESS_SECONDS = "compress_seconds"

# MLflow 3.17 limits (mlflow/utils/validation.py; a test checks they still hold).
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
MAX_KEY_LENGTH = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch call

_KEY = re.compile(r"^[\w.\- /:]+$")  # MLflow's param/metric/tag key alphabet
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # model names usable in models:/ URIs
_ALIAS = re.compile(r"^[A-Za-z_][\w-]{0,254}$")
_ARTIFACT_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")

T = TypeVar("T")


class RegistryError(FFSplitError):
    """MLflow-side failure (unreachable server, refused alias, failed registration), one line."""


@dataclass(frozen=True)
class RegisteredVersion:
    """A complete registered model version; uri loads it (`mlflow.pyfunc.load_model(uri)`)."""

    name: str
    version: str
    run_id: str
    uri: str
    reused: bool = False  # True when an identical variant was already registered


# ------------------------------------------------------------------------------ URIs and secrets

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/@?#]+)@")
_SECRET_QUERY = re.compile(
    r"(?i)(?P<key>[?&;][^=&;\s#]*(?:pass|pwd|secret|token|key|auth|sig|credential)[^=&;\s#]*=)"
    r"[^&;\s#]+"
)


def redact(text: str) -> str:
    """URI or message with credentials masked: user:password@ and secret-looking query values."""
    text = _USERINFO.sub(r"\g<scheme>***@", str(text))
    return _SECRET_QUERY.sub(r"\g<key>***", text)


def _stack_home() -> Path:
    # Same rule as services.stack.default_home (tasks must not import flows: flows -> tasks -> ffsplit).
    env = os.environ.get("FFSPLIT_HOME")
    return (
        Path(env).expanduser().resolve()
        if env
        else Path(__file__).resolve().parents[1] / ".ffsplit"
    )


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else the MLflow server recorded by `python -m flows.stack up`."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    state = _stack_home() / "stack.json"
    try:
        url = json.loads(state.read_text())["services"]["mlflow"]["url"]
    except (OSError, ValueError, KeyError, TypeError):
        url = None
    if not isinstance(url, str) or not url:
        raise RegistryError(
            f"no MLflow tracking URI: set MLFLOW_TRACKING_URI (a server URL or sqlite:///path/mlflow.db)"
            f" or start the local server with `python -m flows.stack up` (none recorded in {state})"
        )
    return url


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path).resolve()


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, if the tracking store at uri cannot answer (before any work)."""
    sqlite = _sqlite_path(uri)
    if sqlite is not None:
        try:
            sqlite.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(
                f"MLflow store {redact(uri)}: cannot create {sqlite.parent} ({exc.strerror})"
            ) from None
        return
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme not in ("http", "https"):
        return  # file stores need no server; other schemes (databricks, ...) are not probed
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if ":" in host:
        netloc = f"[{host}]" if parts.port is None else f"[{host}]:{parts.port}"
    health = urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", "")
    )
    handlers: list[Any] = []
    if host in ("127.0.0.1", "localhost", "::1"):
        handlers.append(urllib.request.ProxyHandler({}))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(health, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RegistryError(
            f"MLflow tracking server {redact(uri)} is unreachable ({redact(str(reason))}): start it "
            "(`python -m flows.stack up`) or fix MLFLOW_TRACKING_URI"
        ) from None
    if not 200 <= status < 300:
        raise RegistryError(
            f"MLflow tracking server {redact(uri)} answered HTTP {status} on /health: is it an MLflow "
            "server? fix MLFLOW_TRACKING_URI"
        )


def _bound_http_retries() -> None:
    # MLflow retries each HTTP request 7 times with backoff factor 2 by default (minutes against a
    # dead server); our own retry loop wraps whole transactions, so keep MLflow's short.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def _connect(uri: str | None, timeout: float) -> tuple[str, Any]:
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    check_reachable(uri, timeout)
    _bound_http_retries()
    return uri, MlflowClient(tracking_uri=uri, registry_uri=uri)


# ---------------------------------------------------------------------------------------- retries

_TRANSIENT = (
    "max retries exceeded",
    "connection refused",
    "connection aborted",
    "connection reset",
    "failed to establish",
    "timed out",
    "temporarily unavailable",
    "database is locked",
    "remote end closed",
    "bad gateway",
    "service unavailable",
)


def _retryable(exc: BaseException) -> bool:
    """Connection-level failures worth another attempt (never bad input or refused requests)."""
    if isinstance(exc, FFSplitError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    try:
        import requests

        if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
    except ImportError:  # pragma: no cover - mlflow depends on requests
        pass
    text = str(exc).lower()
    return any(s in text for s in _TRANSIENT) or bool(re.search(r"error code 5\d\d", text))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return redact(text.splitlines()[0] if text else type(exc).__name__)[:500]


def _retrying(what: str, uri: str, fn: Callable[[], T], retries: int, backoff: float) -> T:
    """fn() with up to `retries` retries on connection errors (delay backoff * 2**i, <= 30 s)."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except FFSplitError:
            raise
        except Exception as exc:
            # Chain the cause only if its text holds no secret (tracebacks end up in flow logs).
            cause = exc if redact(str(exc)) == str(exc) else None
            if not _retryable(exc):
                raise RegistryError(
                    f"{what} in {redact(uri)} failed: {_first_line(exc)}"
                ) from cause
            if attempt == retries:
                raise RegistryError(
                    f"{what} in {redact(uri)} failed after {retries + 1} attempts (connection "
                    f"errors): {_first_line(exc)}"
                ) from cause
            delay = min(30.0, backoff * 2**attempt)
            log.warning("%s: %s; retrying in %.1f s", what, _first_line(exc), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# -------------------------------------------------------------------------------------- validation


def _check_key(kind: str, key: Any) -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH or not _KEY.match(key):
        raise RegistryError(
            f"{kind} name {key!r} is not valid in MLflow: use up to {MAX_KEY_LENGTH} letters, "
            "digits, _ - . / : and spaces"
        )
    return key


def _check_model_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise RegistryError(
            f"model name {name!r}: use letters, digits, '.', '_' and '-' (up to 128, starting with a "
            "letter or digit), so that models:/NAME@ALIAS URIs stay unambiguous"
        )
    return name


def _check_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        _check_key("metric", key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise RegistryError(f"metric {key}={value!r}: metrics must be finite numbers")
        out[key] = float(value)
    return out


def _check_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in tags.items():
        _check_key("tag", key)
        text = redact(str(value))
        if len(text) > MAX_TAG_LENGTH:
            raise RegistryError(
                f"tag {key}: value is {len(text)} characters; MLflow takes {MAX_TAG_LENGTH}"
            )
        out[key] = text
    return out


def check_artifact_name(name: Any) -> str:
    """A relative artifact path that cannot escape the run's folder: 'a/b.png', never '../x'."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or len(parts) > 8 or not all(_ARTIFACT_PART.match(p) for p in parts):
        raise RegistryError(
            f"artifact name {name!r}: use a relative path of letters, digits, '.', '_' and '-' "
            "segments separated by '/' (no '..', no leading '.' or '/')"
        )
    if parts[0] in (MODEL_ARTIFACT, MANIFEST_ARTIFACT):
        raise RegistryError(
            f"artifact name {name!r} is reserved for the variant's model and manifest"
        )
    return name


def _check_artifacts(artifacts: Mapping[str, str | Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for name, path in artifacts.items():
        check_artifact_name(name)
        path = Path(path)
        if not (path.is_file() or path.is_dir()):
            raise RegistryError(f"artifact {name}: {path} is not a regular file or folder")
        if path.is_dir():
            for sub in path.rglob("*"):
                if sub.is_symlink() or not (sub.is_file() or sub.is_dir()):
                    raise RegistryError(
                        f"artifact {name}: {sub} is a link or special file; only plain files are logged"
                    )
        out[name] = path
    return out


# ------------------------------------------------------------------------------------ experiments


def variant_content_hash(manifest: Mapping[str, Any]) -> str:
    """sha256 of what makes a variant (files, structure, recipe, base model), not of when or how
    fast it was written: the same variant re-saved hashes the same."""
    layers = {
        k: {p: v for p, v in entry.items() if p in ("up", "gate", "down", "heavy")}
        for k, entry in manifest.get("layers", {}).items()
    }
    keys = ("files", "base_model", "recipe", "architecture", "adapter", "tied", "storage_dtype")
    core = {k: manifest.get(k) for k in keys}
    core["layers"] = layers
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()


def model_name_for(base_model_name: str) -> str:
    """Registered model name of a base model's variants: 'ffsplit-<base>' in the URI alphabet."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(base_model_name)).strip("-._")
    return _check_model_name(f"ffsplit-{slug}"[:128])


def experiment_name(base_model_name: str) -> str:
    name = str(base_model_name).strip()
    if not name or len(name) > 200 or any(ord(c) < 32 for c in name):
        raise RegistryError(f"base model name {base_model_name!r} cannot name an MLflow experiment")
    return EXPERIMENT_PREFIX + name


def _experiment_id(client: Any, uri: str, base_model_name: str) -> str:
    from mlflow.entities import LifecycleStage

    name = experiment_name(base_model_name)
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == LifecycleStage.DELETED:
            client.restore_experiment(found.experiment_id)
        return str(found.experiment_id)
    location = None
    sqlite = _sqlite_path(uri)
    if sqlite is not None:
        # Without a server, MLflow's default artifact root is ./mlruns of whatever the cwd is.
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        location = (sqlite.parent / "mlartifacts" / slug).as_uri()
    try:
        return str(
            client.create_experiment(
                name, artifact_location=location, tags={"ffsplit.base_model": str(base_model_name)}
            )
        )
    except Exception as exc:  # created meanwhile by a concurrent registration
        found = client.get_experiment_by_name(name)
        if found is None:
            raise exc from None
        return str(found.experiment_id)


def experiment_for(
    base_model_name: str,
    *,
    uri: str | None = None,
    timeout: float = 5.0,
    retries: int = 3,
    backoff: float = 1.0,
) -> str:
    """Id of the experiment 'ffsplit/<base model>' (created on first use): one per base model."""
    uri, client = _connect(uri, timeout)
    return _retrying(
        f"experiment for {base_model_name}",
        uri,
        lambda: _experiment_id(client, uri, base_model_name),
        retries,
        backoff,
    )


# ------------------------------------------------------------------------------------ registration


def manifest_params(manifest: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """(params, skipped keys): the flattened manifest, secrets redacted, values over MLflow's
    length limit skipped (the whole manifest is always logged as an artifact)."""
    params: dict[str, str] = {}
    skipped: list[str] = []
    for key, value in flat_params(dict(manifest)).items():
        key = re.sub(r"[^\w.\- /:]", "_", key)[:MAX_KEY_LENGTH] or "_"
        value = redact(value)
        if len(value) > MAX_PARAM_LENGTH:
            skipped.append(key)
        else:
            params[key] = value
    return params, skipped


def _label(manifest: Mapping[str, Any], folder: Path) -> str:
    try:
        from ffsplit.config import Recipe

        return Recipe.from_dict(manifest["recipe"]).label
    except Exception:  # a recipe written by another ffsplit version: fall back to the folder
        return folder.name


def _base_name(manifest: Mapping[str, Any], folder: Path) -> str:
    base = manifest.get("base_model") or {}
    name = base.get("name") if isinstance(base, dict) else None
    if not name and isinstance(base, dict) and base.get("path"):
        name = Path(str(base["path"])).name
    if not name:
        raise RegistryError(
            f"{folder / MANIFEST}: base_model has no name; cannot pick an experiment"
        )
    return str(name)


def _find_versions(client: Any, model_name: str, content: str) -> list[Any]:
    return list(
        client.search_model_versions(
            f"name = '{model_name}' and tags.`{CONTENT_TAG}` = '{content}'"
        )
    )


def _is_complete(mv: Any) -> bool:
    return mv.status == "READY" and (mv.tags or {}).get(COMPLETE_TAG) == "true"


def _ensure_registered_model(client: Any, model_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(model_name, tags={"ffsplit.registry": "variants"})
        except MlflowException as again:
            if again.error_code != "RESOURCE_ALREADY_EXISTS":
                raise


def log_params(client: Any, run_id: str, params: Mapping[str, str]) -> None:
    """A run's params, in batches MLflow accepts."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + PARAMS_PER_BATCH])


def log_metrics(
    client: Any,
    run_id: str,
    metrics: Mapping[str, float],
    series: Mapping[str, Sequence[tuple[int, float]]] | None = None,
) -> None:
    """Scalar metrics (step 0) and per-step series (non-finite points left out), in batches."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, v, now, 0) for k, v in metrics.items()]
    items += [
        Metric(name, value, now, step)
        for name, points in (series or {}).items()
        for step, value in points
        if math.isfinite(value)
    ]
    for i in range(0, len(items), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[i : i + METRICS_PER_BATCH])


def _log_artifact(client: Any, run_id: str, name: str, path: Path) -> None:
    """Upload under exactly `name` (a file is staged under its artifact name first)."""
    parent, _, leaf = name.rpartition("/")
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path=name)
        return
    with tempfile.TemporaryDirectory(prefix="ffsplit-artifact-") as tmp:
        staged = Path(tmp) / leaf
        shutil.copyfile(path, staged)
        client.log_artifact(run_id, str(staged), artifact_path=parent or None)


def _artifact_exists(client: Any, run_id: str, name: str) -> bool:
    parent = name.rpartition("/")[0]
    return any(f.path == name for f in client.list_artifacts(run_id, parent or None))


def _wait_ready(client: Any, name: str, version: str, timeout: float) -> None:
    deadline = time.monotonic() + max(timeout, 30.0)
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return
        if mv.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RegistryError(
                f"model version {name}/{version} is {mv.status}: {mv.status_message}"
            )
        time.sleep(0.2)


def _verify(
    client: Any,
    run_id: str,
    metrics: Mapping[str, float],
    names: Sequence[str],
    n_params: int,
    variant_in_model: str,
) -> None:
    """Read back what the run must hold before its version may be called complete."""
    data = client.get_run(run_id).data
    wrong = [
        k
        for k, v in metrics.items()
        if not math.isclose(data.metrics.get(k, math.nan), v, rel_tol=1e-12, abs_tol=0.0)
    ]
    if wrong:
        raise RegistryError(f"run {run_id}: metrics {wrong} did not read back")
    if len(data.params) < n_params:
        raise RegistryError(f"run {run_id}: {n_params - len(data.params)} params did not read back")
    expected = [
        *names,
        MANIFEST_ARTIFACT,
        f"{MODEL_ARTIFACT}/MLmodel",
        f"{MODEL_ARTIFACT}/{variant_in_model}/{MANIFEST}",
    ]
    missing = [n for n in expected if not _artifact_exists(client, run_id, n)]
    if missing:
        raise RegistryError(f"run {run_id}: artifacts {missing} are missing after upload")


def _abort(
    client: Any, uri: str, run: Any, model_name: str, version: str | None, exc: BaseException
) -> None:
    """Undo a failed registration as far as the server lets us (each step best effort)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    run_id = run.info.run_id
    if version is not None:
        try:
            client.delete_model_version(model_name, version)
        except Exception as err:  # left without the complete tag: no alias can reach it
            log.warning(
                "could not delete incomplete version %s/%s: %s",
                model_name,
                version,
                _first_line(err),
            )
    try:
        get_artifact_repository(run.info.artifact_uri, tracking_uri=uri).delete_artifacts()
    except Exception as err:
        log.warning("could not delete artifacts of failed run %s: %s", run_id, _first_line(err))
    try:
        client.set_tag(run_id, ERROR_TAG, _first_line(exc)[:MAX_TAG_LENGTH])
        client.set_terminated(run_id, "FAILED")
    except Exception as err:
        log.warning("could not mark run %s FAILED: %s", run_id, _first_line(err))


def _register_once(
    client: Any,
    uri: str,
    folder: Path,
    manifest: dict[str, Any],
    content: str,
    model_name: str,
    metrics: dict[str, float],
    artifacts: dict[str, Path],
    tags: dict[str, str],
    timeout: float,
    progress: Callable[[str], None],
) -> RegisteredVersion:
    from tracking.serving import save_pyfunc, variant_path_in_model

    for mv in _find_versions(client, model_name, content):
        if _is_complete(mv):
            return RegisteredVersion(
                model_name,
                str(mv.version),
                mv.run_id,
                f"models:/{model_name}/{mv.version}",
                reused=True,
            )
    for mv in _find_versions(client, model_name, content):  # leftovers of a killed registration
        log.warning("deleting incomplete version %s/%s of the same variant", model_name, mv.version)
        client.delete_model_version(model_name, str(mv.version))
    experiment_id = _experiment_id(client, uri, _base_name(manifest, folder))
    params, skipped = manifest_params(manifest)
    run_tags = {
        CONTENT_TAG: content,
        ROLE_TAG: "variant",
        "ffsplit.variant": folder.name,
        "ffsplit.base_model": _base_name(manifest, folder),
        **tags,
    }
    if skipped:
        run_tags[SKIPPED_TAG] = ",".join(skipped)[:MAX_TAG_LENGTH]
    progress("run")
    run = client.create_run(experiment_id, run_name=_label(manifest, folder), tags=run_tags)
    run_id = run.info.run_id
    version: str | None = None
    try:
        progress("params")
        log_params(client, run_id, params)
        progress("metrics")
        log_metrics(client, run_id, metrics)
        progress("artifacts")
        client.log_artifact(run_id, str(folder / MANIFEST))
        for name, path in artifacts.items():
            _log_artifact(client, run_id, name, path)
        progress("model")
        with tempfile.TemporaryDirectory(prefix="ffsplit-model-") as tmp:
            save_pyfunc(
                folder, Path(tmp) / MODEL_ARTIFACT, run_id=run_id, artifact_path=MODEL_ARTIFACT
            )
            variant_in_model = variant_path_in_model(Path(tmp) / MODEL_ARTIFACT)
            client.log_artifacts(
                run_id, str(Path(tmp) / MODEL_ARTIFACT), artifact_path=MODEL_ARTIFACT
            )
        progress("version")
        _ensure_registered_model(client, model_name)
        mv = client.create_model_version(
            model_name,
            source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT}",
            run_id=run_id,
            tags={CONTENT_TAG: content, ROLE_TAG: run_tags[ROLE_TAG]},
        )
        version = str(mv.version)
        _wait_ready(client, model_name, version, timeout)
        progress("verify")
        _verify(client, run_id, metrics, list(artifacts), len(params), variant_in_model)
        progress("complete")
        client.set_tag(run_id, COMPLETE_TAG, "true")
        client.set_terminated(run_id, "FINISHED")
        client.set_model_version_tag(model_name, version, COMPLETE_TAG, "true")  # the last write
    except BaseException as exc:
        _abort(client, uri, run, model_name, version, exc)
        raise
    return RegisteredVersion(model_name, version, run_id, f"models:/{model_name}/{version}")


def register_variant(
    variant_dir: str | Path,
    *,
    model_name: str,
    metrics: Mapping[str, float],
    artifacts: Mapping[str, str | Path] | None = None,
    tags: Mapping[str, Any] | None = None,
    uri: str | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 10.0,
    progress: Callable[[str], None] | None = None,
) -> RegisteredVersion:
    """Register a variant folder as a complete model version (see the module docstring).

    metrics: finite numbers named as in the module docstring; artifacts: artifact name (relative
    path, e.g. 'plots/scores.png') -> local file or folder; tags: extra run tags (ROLE_TAG "dense"
    marks the reference). Inputs are checked and the server probed before any work.
    """
    folder = Path(variant_dir)
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    _check_model_name(model_name)
    checked_metrics = _check_metrics(metrics)
    checked_artifacts = _check_artifacts(artifacts or {})
    checked_tags = _check_tags(tags or {})
    if not isinstance(retries, int) or retries < 0 or not backoff >= 0:
        raise RegistryError(
            f"retries must be an integer >= 0 and backoff >= 0, got {retries}, {backoff}"
        )
    uri, client = _connect(uri, timeout)
    content = variant_content_hash(manifest)
    report = progress or (lambda stage: None)
    return _retrying(
        f"registering {folder} as {model_name}",
        uri,
        lambda: _register_once(
            client,
            uri,
            folder,
            manifest,
            content,
            model_name,
            checked_metrics,
            checked_artifacts,
            checked_tags,
            timeout,
            report,
        ),
        retries,
        backoff,
    )


# ----------------------------------------------------------------------------------------- aliases


def _set_alias_checked(client: Any, model_name: str, alias: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(model_name, version)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"model {model_name} has no version {version}") from None
        raise
    if not _is_complete(mv):
        raise RegistryError(
            f"{model_name} version {version} is not complete (status {mv.status}, no "
            f"{COMPLETE_TAG}=true): its registration did not finish, so alias {alias!r} stays put"
        )
    run = client.get_run(mv.run_id)
    if run.info.status != "FINISHED":
        raise RegistryError(
            f"{model_name} version {version}: its run {mv.run_id} is {run.info.status}, not FINISHED; "
            f"alias {alias!r} stays put"
        )
    client.set_registered_model_alias(model_name, alias, version)


def set_alias(
    model_name: str,
    alias: str,
    version: str | int,
    *,
    uri: str | None = None,
    timeout: float = 5.0,
    retries: int = 3,
    backoff: float = 1.0,
) -> None:
    """Point alias at version, refusing versions whose registration did not complete."""
    _check_model_name(model_name)
    if (
        not isinstance(alias, str)
        or not _ALIAS.match(alias)
        or alias == "latest"
        or re.match(r"^v\d+$", alias)
    ):
        raise RegistryError(
            f"alias {alias!r}: use letters, digits, '_' and '-' (not 'latest' or v<N>)"
        )
    uri, client = _connect(uri, timeout)
    _retrying(
        f"setting alias {model_name}@{alias}",
        uri,
        lambda: _set_alias_checked(client, model_name, alias, str(version)),
        retries,
        backoff,
    )


def _finite(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _identity(candidate: Mapping[str, Any]) -> tuple[float, str]:
    version = str(candidate.get("version", ""))
    return (
        int(version) if version.isdigit() else math.inf,
        str(candidate.get("name", candidate.get("run_id", ""))),
    )


def choose_champion(
    candidates: Sequence[Mapping[str, Any]],
    quality_budget_pct: float,
    objective: Literal["speed", "size"] = "speed",
) -> Mapping[str, Any] | None:
    """The champion under the policy of tracking.champion (speed or size within the quality
    budget; ties inside the measurement noise go to fewer bytes; a baseline wins only outside
    the noise), or None when no candidate is within the budget; a bad policy is a RegistryError."""
    from tracking import champion

    try:
        return champion.choose_champion(candidates, quality_budget_pct, objective)
    except RegistryError:
        raise
    except FFSplitError as exc:
        raise RegistryError(str(exc)) from None


@dataclass(frozen=True)
class AliasDecision:
    """What apply_alias_policy did: versions now behind 'dense' and 'champion' (None: unchanged)."""

    dense: str | None
    champion: str | None
    candidates: int


def registered_candidates(
    model_name: str, *, uri: str | None = None, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """Complete versions of a model as dicts: run metrics plus name, version, run_id, role."""
    _check_model_name(model_name)
    uri, client = _connect(uri, timeout)

    def read() -> list[dict[str, Any]]:
        out = []
        for mv in client.search_model_versions(f"name = '{model_name}'"):
            if not _is_complete(mv):
                continue
            run = client.get_run(mv.run_id)
            if run.info.status != "FINISHED":
                continue
            out.append(
                {
                    **run.data.metrics,
                    "name": model_name,
                    "version": str(mv.version),
                    "run_id": mv.run_id,
                    "role": run.data.tags.get(ROLE_TAG, "variant"),
                    "series": run.data.tags.get(SERIES_TAG),
                }
            )
        return sorted(out, key=_identity)

    return _retrying(f"listing versions of {model_name}", uri, read, 3, 1.0)


def apply_alias_policy(
    model_name: str,
    *,
    quality_budget_pct: float,
    objective: Literal["speed", "size"] = "speed",
    dense_version: str | int | None = None,
    uri: str | None = None,
    timeout: float = 5.0,
) -> AliasDecision:
    """Set 'dense' to dense_version (when given) and 'champion' to choose_champion over every
    complete non-dense version of the model. With no version within the budget the champion alias
    is left where it is (serving keeps working) and AliasDecision.champion is None."""
    candidates = [
        c
        for c in registered_candidates(model_name, uri=uri, timeout=timeout)
        if c["role"] != "dense"
    ]
    best = choose_champion(candidates, quality_budget_pct, objective)
    if dense_version is not None:
        set_alias(model_name, DENSE_ALIAS, dense_version, uri=uri, timeout=timeout)
    if best is not None:
        set_alias(model_name, CHAMPION_ALIAS, best["version"], uri=uri, timeout=timeout)
    return AliasDecision(
        None if dense_version is None else str(dense_version),
        None if best is None else str(best["version"]),
        len(candidates),
    )
