"""Where pipeline work runs: Ray start/join, resources per task, devices, and per-worker caches.

Embedded by default (`ray.init(address="local")`: never silently joins a stray head, see
docs/stack-notes.md); RAY_ADDRESS joins a cluster, with cluster/runtime_env.yaml when present.
A task asks for a GPU only when the cluster has one (a GPU request on a CPU-only cluster stays
pending forever); inside a task the device comes from what Ray assigned, never a hard-coded
cuda:N. CPU tasks run a fixed number of threads (their CPU request), so float results do not
depend on how many workers run beside them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ffsplit.environ import environ
from ffsplit.errors import FFSplitError

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ENV_FILE = REPO_ROOT / "cluster" / "runtime_env.yaml"
# Set for every Ray worker: offline, no telemetry, quiet progress bars (docs/stack-notes.md).
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}
# Passed on to workers when set here, so they find the same caches as the driver.
FORWARDED_ENV = ("FFSPLIT_HOME", "FFSPLIT_CACHE", "FFSPLIT_NO_INSTALL")
# Retry policy of every pipeline task (issue 7). A task whose worker process died (killed, out of
# memory, its node lost) runs again, up to this many times: every task body checks for its output
# first and writes it atomically, so a retry redoes only what was unfinished. An exception raised
# by the task itself is an answer, never retried. Pinned here rather than left to Ray's default,
# which RAY_TASK_MAX_RETRIES may change cluster-wide.
WORKER_DEATH_RETRIES = 3
RETRY_POLICY: dict[str, Any] = {"max_retries": WORKER_DEATH_RETRIES, "retry_exceptions": False}


def runtime_env() -> dict[str, Any]:
    """Ray runtime_env for pipeline tasks: cluster/runtime_env.yaml (if any) plus our variables."""
    env: dict[str, Any] = {}
    if RUNTIME_ENV_FILE.is_file():
        import yaml

        loaded = yaml.safe_load(RUNTIME_ENV_FILE.read_text()) or {}
        if not isinstance(loaded, dict):
            raise FFSplitError(f"{RUNTIME_ENV_FILE}: expected a mapping of runtime_env fields")
        env = dict(loaded)
    variables = {**WORKER_ENV, **dict(env.get("env_vars") or {})}
    for name in FORWARDED_ENV:
        if os.environ.get(name):
            variables[name] = os.environ[name]
    env["env_vars"] = {k: str(v) for k, v in variables.items()}
    return env


def _ray() -> Any:
    try:
        import ray
    except ImportError:  # pragma: no cover - the pipeline extra installs it
        raise FFSplitError("Ray is not installed: pip install -e '.[pipeline]'") from None
    return ray


def ensure_ray(
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    resources: dict[str, float] | None = None,
) -> bool:
    """Start embedded Ray (or join RAY_ADDRESS) unless already up; True if this call started it.

    num_cpus / num_gpus / resources (custom resources) apply to an embedded Ray only.
    """
    ray = _ray()
    address = os.environ.get("RAY_ADDRESS")
    if address and (num_cpus is not None or num_gpus is not None or resources):
        raise FFSplitError(
            f"RAY_ADDRESS={address} is set: a cluster's CPUs/GPUs are fixed by the cluster; "
            "drop num_cpus/num_gpus or unset RAY_ADDRESS"
        )
    if ray.is_initialized():
        _check_running_has(ray, resources)
        return False
    env = runtime_env()
    if address:
        try:
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        except (ConnectionError, RuntimeError) as exc:
            raise FFSplitError(
                f"cannot join the Ray cluster at RAY_ADDRESS={address} ({exc}); start it or unset "
                "RAY_ADDRESS to run embedded"
            ) from None
    else:
        # Embedded: the raylet and every worker it starts inherit this process's environment, so
        # our variables go there for the duration of init rather than into a job runtime_env. A
        # job with a runtime_env cannot use the workers Ray prestarts at start-up (one per CPU):
        # its first tasks would each wait for a new worker process to boot (~2-3 s on 2 cores).
        # Loopback only (issue 16): a single-machine run exposes nothing. Ray's servers (GCS,
        # raylet, workers, agents) bind 127.0.0.1 when the node IP is loopback, but ray.init
        # turns a given "127.0.0.1" into the machine's public IP unless Ray is in its no-cluster
        # mode, which is switched on for the call only.
        variables = env.pop("env_vars", {})
        constants = ray._private.ray_constants
        cluster_mode = constants.ENABLE_RAY_CLUSTER
        with environ(**variables):
            try:
                constants.ENABLE_RAY_CLUSTER = False
                ray.init(
                    address="local",
                    include_dashboard=False,
                    dashboard_host="127.0.0.1",
                    _node_ip_address="127.0.0.1",
                    num_cpus=num_cpus,
                    num_gpus=num_gpus,
                    resources=resources,
                    runtime_env=env or None,
                    log_to_driver=True,
                    configure_logging=False,
                )
            finally:
                constants.ENABLE_RAY_CLUSTER = cluster_mode
    return True


def _check_running_has(ray: Any, resources: dict[str, float] | None) -> None:
    """A Ray already up in this process is reused; refuse it when it lacks asked-for resources.

    Tasks that ask for a resource no node has wait forever: fail now, saying what is missing.
    """
    have = ray.cluster_resources()
    missing = {k: v for k, v in (resources or {}).items() if have.get(k, 0) < v}
    if missing:
        raise FFSplitError(
            f"Ray is already running in this process without resources {missing} (it has "
            f"{sorted(k for k in have if not k.startswith('node:'))}); call ray.shutdown() first "
            "or start it with those resources"
        )


@contextlib.contextmanager
def ray_session(
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    resources: dict[str, float] | None = None,
) -> Iterator[dict[str, Any]]:
    """Ray for the duration of a block; shut down on exit only if this block started it."""
    started = ensure_ray(num_cpus, num_gpus, resources)
    try:
        yield cluster_info()
    finally:
        if started:
            _ray().shutdown()


def cluster_info() -> dict[str, Any]:
    """CPUs, GPUs and nodes of the cluster in use (for run records)."""
    ray = _ray()
    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {
        "address": os.environ.get("RAY_ADDRESS") or "local",
        "cpus": float(resources.get("CPU", 0)),
        "gpus": float(resources.get("GPU", 0)),
        "nodes": len(nodes),
    }


def has_gpus() -> bool:
    """Whether the cluster has GPUs at all (only then may a task ask for one)."""
    return _ray().cluster_resources().get("GPU", 0) > 0


def node_cpus() -> int:
    """CPUs of the largest alive node: the most one task can ask for and still be scheduled."""
    nodes = [n for n in _ray().nodes() if n.get("Alive")]
    return max((int(n.get("Resources", {}).get("CPU", 0)) for n in nodes), default=1) or 1


def task_resources(cpus: int = 1, gpu: bool = True) -> dict[str, Any]:
    """Ray options for one task: a GPU when the cluster has them (and gpu), else `cpus` CPUs."""
    if gpu and has_gpus():
        return {"num_cpus": 1, "num_gpus": 1}
    return {"num_cpus": max(1, min(cpus, node_cpus())), "num_gpus": 0}


def task_device() -> str:
    """Device for torch inside a Ray task: the assigned GPU (Ray sets CUDA_VISIBLE_DEVICES), else CPU."""
    ray = _ray()
    if ray.is_initialized() and ray.get_gpu_ids():
        return "cuda"
    return "cpu"


def set_task_threads() -> int:
    """Torch threads = CPUs assigned to this task, so results never depend on the worker count."""
    import torch

    ray = _ray()
    cpus = 1
    if ray.is_initialized():
        try:
            cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)) or 1
        except Exception:  # outside a task (driver): keep one thread
            cpus = 1
    torch.set_num_threads(cpus)
    return cpus


@functools.cache
def _remote(fn: Callable[..., Any]) -> Any:
    return _ray().remote(fn)


def _unwrap(exc: BaseException) -> BaseException:
    """A Ray task error as the user-facing error it carries (one line, no remote traceback)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, FFSplitError):
        return FFSplitError(str(cause))
    return exc


def submit(fn: Callable[..., Any], *args: Any, resources: dict[str, Any], **kwargs: Any) -> Any:
    """Submit fn as a Ray task (retried only when its worker dies: RETRY_POLICY); its ObjectRef."""
    return _remote(fn).options(**{**RETRY_POLICY, **resources}).remote(*args, **kwargs)


def wait(refs: Sequence[Any]) -> list[Any]:
    """Results of Ray tasks in submission order; a task's FFSplitError is raised as itself."""
    ray = _ray()
    try:
        return list(ray.get(list(refs)))
    except ray.exceptions.RayTaskError as exc:
        unwrapped = _unwrap(exc)
        if unwrapped is exc:
            raise
        raise unwrapped from None


def run_remote(fn: Callable[..., Any], *args: Any, resources: dict[str, Any], **kwargs: Any) -> Any:
    """Run fn as one Ray task and wait for it (the body of a Prefect task)."""
    return wait([submit(fn, *args, resources=resources, **kwargs)])[0]


class PrefectTask:
    """A Prefect task built from its function on first use (`.submit`, `.with_options`, a call).

    Ray pickles a task body by reference, so a worker imports the body's module; if that module
    built its Prefect tasks at import, every cold worker paid Prefect's import (0.8 s of CPU on
    this box, in each worker) for nothing, and a cluster's workers needed Prefect installed.
    """

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]) -> None:
        functools.update_wrapper(self, fn)  # also sets __wrapped__ = fn
        self._options, self._task = options, None

    def _built(self) -> Any:
        if self._task is None:
            from prefect import task
            from prefect.cache_policies import NONE

            self._task = task(cache_policy=NONE, **self._options)(self.__wrapped__)
        return self._task

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # ours, or dunders: never Prefect's (and no recursion)
            raise AttributeError(name)
        return getattr(self._built(), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._built()(*args, **kwargs)


def prefect_task(**options: Any) -> Callable[[Callable[..., Any]], PrefectTask]:
    """`@prefect.task(cache_policy=NONE, **options)`, built lazily (see PrefectTask).

    No Prefect result caching: every stage caches its own outputs by content (tasks/cache.py).
    """
    return lambda fn: PrefectTask(fn, options)


def run_many(
    fn: Callable[..., Any], calls: Sequence[dict[str, Any]], *, resources: dict[str, Any]
) -> list[Any]:
    """Fan fn out over keyword-argument dicts as Ray tasks; results in call order."""
    return wait([submit(fn, resources=resources, **call) for call in calls])


# ------------------------------------------------------------------ per-worker caches (read-only)

_MODELS: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
_MODEL_SLOTS = 1  # one base model per worker process: SmolLM2 in fp32 is ~540 MB
# Every per-worker cache, so that a task needing memory for itself (evaluation) can empty them all.
WORKER_CACHES: list[OrderedDict[Any, Any]] = [_MODELS]


def release_worker_caches() -> None:
    """Drop the base models and statistics this worker process keeps between tasks."""
    import gc

    for store in WORKER_CACHES:
        store.clear()
    gc.collect()


def base_model(name: str, expected_sha256: str | None, device: str = "cpu") -> tuple[Any, Any, Any]:
    """(model, tokenizer, ModelRef) of a base model, loaded once per worker process.

    Callers must not modify the model (profiling hooks are removed after use; compression reads
    weights); assembly, which swaps modules, loads its own copy. The weights' sha256 must match
    what the driver resolved, so a model changed under a running pipeline is an error.
    """
    from ffsplit.models.loading import load_model

    key = (name, expected_sha256 or "", device)
    if key in _MODELS:
        _MODELS.move_to_end(key)
        return _MODELS[key]
    _MODELS.clear()  # free the previous model before loading the next
    loaded = load_model(name, device=device)
    check_model_sha(name, loaded[2].weights_sha256, expected_sha256)
    _MODELS[key] = loaded
    while len(_MODELS) > _MODEL_SLOTS:
        _MODELS.popitem(last=False)
    return loaded


def check_model_sha(name: str, actual: str, expected: str | None) -> None:
    if expected and actual != expected:
        raise FFSplitError(
            f"model {name!r}: weights sha256 {actual[:12]}... differ from the {expected[:12]}... "
            "this run started with; the model changed under the pipeline, start the run again"
        )


def check_prefect_api(timeout_s: float = 5.0) -> str | None:
    """Check PREFECT_API_URL answers (None when unset: Prefect then runs ephemeral, in-process)."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        try:
            from prefect.settings import PREFECT_API_URL

            url = PREFECT_API_URL.value()
        except Exception:  # pragma: no cover - prefect missing or settings unreadable
            url = None
    if not url:
        return None
    health = url.rstrip("/") + "/health"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(health, timeout=timeout_s) as response:
            if 200 <= response.status < 300:
                return url
    except (urllib.error.URLError, OSError, ValueError):
        pass
    raise FFSplitError(
        f"Prefect API at PREFECT_API_URL={url} is not reachable (no answer from {health}): start it "
        "with `python -m flows.stack up` or unset PREFECT_API_URL"
    )
