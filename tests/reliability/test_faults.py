"""Faults injected into the real pipeline (issue 7): Ray workers killed mid-task, the flow process
killed midway, MLflow unreachable at registration, writes killed or failing, three sweeps at once.

Every fault comes from outside the code under test: SIGKILL to a Ray worker found by its process
title (`ray::<task function>` while it runs a task), SIGKILL to a flow process or to a writer
subprocess, a TCP link to the real MLflow server that the test cuts, a file-size limit
(RLIMIT_FSIZE) under which writes fail. One Prefect server, one MLflow server and one
`ray start --head` (services/stack.py, free ports) serve the module: flows run as subprocesses join
the head, flows run in this process an embedded Ray. The tiny random Llama of
tests/tasks/conftest.py keeps each pipeline run to seconds. Each test records its row (fault, how
injected, expected, observed) for docs/reliability.md before injecting anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
import torch

from ffsplit.errors import FFSplitError

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RAY_CPUS = 2  # CPUs of the head and of the embedded Ray: two tasks at once, as on a 2-core CI box
# One recipe for every compress run here; the sweeps below build the same one (lowrank at 0.3), so
# runs sharing a cache share its statistics, shards and variant.
RECIPE = {
    "method": "lowrank",
    "heavy_ratio": 0.1,
    "ffn_reduction": 0.3,
    "profile": {"tokens": 512, "window": 64},
}
FLOW = {
    "eval_tokens": 256,
    "eval_window": 64,
    "latency": False,
    "profile_units": 2,
    "compress_shards": 2,
}
# A one-variant sweep (plus the dense reference); a budget no variant misses makes the champion
# the smallest variant, so the expected aliases follow from the grid alone.
SWEEP = {
    "methods": ["lowrank"],
    "heavy_ratios": [0.1],
    "baselines": [],
    "calib_tokens": 512,
    "calib_window": 64,
    "eval_tokens": 256,
    "eval_window": 64,
    "profile_units": 2,
    "compress_shards": 2,
    "latency": False,
    "champion_objective": "size",
    "quality_budget_pct": 1e6,
}
PROBE_IDS = torch.tensor([[1, 17, 404, 9000, 23, 5, 77, 311]])


# -------------------------------------------------------------------------------------- services


@dataclass(frozen=True)
class Services:
    """The module's Prefect server, MLflow server and Ray head (services/stack.py state in home)."""

    home: Path
    # what a flow subprocess needs: PREFECT_API_URL, MLFLOW_TRACKING_URI, RAY_ADDRESS, Ray's auth
    env: dict[str, str]
    mlflow: str
    ray: Any  # services.stack.ServiceRecord of the head


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """Prefect, MLflow and a Ray head on free ports. Flows run as subprocesses join the head
    through RAY_ADDRESS; flows run in this process use an embedded Ray, as the flow tests do (or
    theirs, when it is up already): joining a token-auth head from a process that imported Ray
    before the token was configured fails, and an embedded Ray is what an in-process run uses."""
    import ray
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from services.stack import CLIENT_VARS, StackConfig, start_stack, stop_stack
    from tasks.runtime import ensure_ray

    home = tmp_path_factory.mktemp("fault-stack")
    saved = dict(os.environ)
    for var in CLIENT_VARS:  # never the lead's servers: this module starts its own
        os.environ.pop(var, None)
    started = False
    try:
        state = start_stack(
            StackConfig(
                home=home,
                ray_head=True,
                prefect_port=0,
                mlflow_port=0,
                ray_port=0,
                ray_num_cpus=RAY_CPUS,
                timeout_s=240,
            )
        )
        try:
            env = state.env()
            head = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
            os.environ.update({k: v for k, v in env.items() if k not in head})
            os.environ["FFSPLIT_HOME"] = str(home)
            if not ray.is_initialized():
                started = ensure_ray(num_cpus=RAY_CPUS)
            with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
                yield Services(home, env, env["MLFLOW_TRACKING_URI"], state.services["ray"])
        finally:
            if started:
                ray.shutdown()
            stop_stack(home)
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("fault-model") / "tiny-llama"
    from ffsplit.models.tiny import save_tiny_lm

    return str(save_tiny_lm(folder))


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pipeline cache shared by the undisturbed runs of this module (keys are content hashes)."""
    return tmp_path_factory.mktemp("fault-cache") / "cache"


@pytest.fixture(scope="module")
def reference(
    tiny_lm: str,
    services: Services,
    shared_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict:
    """The undisturbed compress run that disturbed runs must equal, bit for bit."""
    from flows.compress import compress

    run_dir = tmp_path_factory.mktemp("fault-reference")
    return compress(
        model=tiny_lm,
        recipe=RECIPE,
        register_model=False,
        cache_dir=str(shared_cache),
        run_dir=str(run_dir),
        **FLOW,
    )


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# ------------------------------------------------------------------------- comparing run outputs


def _artifact_tensors(cache: Path) -> dict[str, Path]:
    """Every safetensors file of finished cache entries (temp leftovers, dot-names, excluded)."""
    out = {}
    for path in sorted(cache.rglob("*.safetensors")):
        relative = path.relative_to(cache)
        if not any(part.startswith(".") for part in relative.parts):
            out[str(relative)] = path
    return out


def _equal_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta
    )


def _logits(variant: str) -> torch.Tensor:
    from ffsplit.variant import load_variant

    model, _, _ = load_variant(variant)
    with torch.no_grad():
        return model(PROBE_IDS).logits


def _same_outputs(reference: dict, ref_cache: Path, run: dict, cache: Path) -> list[str]:
    """Files of statistics, shards and variant, tensor by tensor, plus the variant's logits and
    perplexity; returns the files compared (asserts they are identical)."""
    mine, theirs = _artifact_tensors(cache), _artifact_tensors(ref_cache)
    stages = ("stats/units/", "stats/merged/", "shards/", "variants/")
    assert all(any(n.startswith(s) for n in mine) for s in stages), sorted(mine)
    assert set(mine) <= set(theirs), sorted(set(mine) - set(theirs))
    different = [name for name in mine if not _equal_tensors(mine[name], theirs[name])]
    assert different == [], different
    assert run["variant_key"] == reference["variant_key"]
    assert torch.equal(_logits(run["variant"]), _logits(reference["variant"]))
    assert run["metrics"]["perplexity"] == reference["metrics"]["perplexity"]
    return sorted(mine)


# ------------------------------------------------------------------------ Ray worker killing


def _thread_children(pid: int) -> set[int]:
    """Children of a process, from /proc/PID/task/*/children (cheap enough to poll often)."""
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    found.update(int(x) for x in f.read().split())
    return found


def _title(pid: int) -> str:
    """A process's title (Ray task workers: `ray::<function>` while running it)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0", 1)[0].decode(errors="replace").strip()
    except OSError:
        return ""


def _raylets() -> list[int]:
    """Raylets of the Ray that this process's flows use (embedded: a child of this process)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.name() == "raylet":
                found.append(proc.pid)
    assert found, "no raylet under this process: is Ray embedded here?"
    return found


class WorkerKiller:
    """A test thread that SIGKILLs the first Ray worker seen running each named task function
    (once per name), as a crash or the OOM killer would. Worker titles are read every 2 ms; the
    raylets' children are listed every 50 ms (a new worker takes far longer to start a task)."""

    def __init__(self, raylets: list[int], tasks: tuple[str, ...]) -> None:
        self.raylets, self.tasks = raylets, tasks
        self.killed: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-killer", daemon=True)

    def __enter__(self) -> WorkerKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        workers: set[int] = set()
        listed = 0.0
        while not self._stop.is_set() and len(self.killed) < len(self.tasks):
            if time.monotonic() - listed > 0.05:
                workers = set().union(*(_thread_children(r) for r in self.raylets))
                listed = time.monotonic()
            for pid in workers:
                title = _title(pid)
                for task in self.tasks:
                    if task not in self.killed and title.startswith(f"ray::{task}"):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                            self.killed[task] = pid
            time.sleep(0.002)


def test_ray_workers_killed_mid_profile_and_mid_compress_are_retried_to_identical_results(
    tiny_lm: str,
    services: Services,
    reference: dict,
    shared_cache: Path,
    tmp_path: Path,
    record: Callable,
) -> None:
    from flows.compress import compress

    row = record(
        kind="fault",
        area="Ray",
        what="a Ray worker dies (SIGKILL) while running a profile task, and another while "
        "running a compress task, in one compress flow",
        injected="a test thread polls the raylet's children and SIGKILLs the first worker whose "
        "title is ray::profile_unit, then the first with ray::compress_shard",
        expected="Ray runs each task again on a new worker (tasks/runtime.py RETRY_POLICY: "
        "3 retries on worker death); the flow completes; statistics, shards, variant weights, "
        "logits and perplexity bitwise equal to an undisturbed run",
        message="not reached",
    )
    cache = tmp_path / "cache"
    with WorkerKiller(_raylets(), ("profile_unit", "compress_shard")) as killer:
        run = compress(
            model=tiny_lm,
            recipe=RECIPE,
            register_model=False,
            cache_dir=str(cache),
            run_dir=str(tmp_path / "run"),
            **FLOW,
        )
    assert set(killer.killed) == {"profile_unit", "compress_shard"}, killer.killed
    assert not any(psutil.pid_exists(pid) for pid in killer.killed.values())
    assert run["cached"] == {"profile": False, "variant": False, "evaluation": False}
    files = _same_outputs(reference, shared_cache, run, cache)
    row.observe(
        "both workers killed mid-task; Ray ran both tasks again on new workers and the flow "
        f"completed; {len(files)} statistics, shard and variant files tensor-equal to the "
        "undisturbed run's, and so are the variant's logits and perplexity"
    )


# ------------------------------------------------------------------ flow process killed midway


def _token_processes(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get("FFSPLIT_TEST_TOKEN") == token:
                found.append(proc)
    return found


def _finished_shards(cache: Path) -> dict[str, int]:
    """Finished shard folders (name -> mtime of its spec): temp folders start with a dot."""
    root = cache / "shards"
    if not root.is_dir():
        return {}
    return {
        p.name: (p / "shard.json").stat().st_mtime_ns
        for p in root.iterdir()
        if not p.name.startswith(".") and (p / "shard.json").is_file()
    }


DRIVER = (
    "import json, sys; from flows.compress import compress; compress(**json.loads(sys.argv[1]))"
)


def test_a_compress_flow_killed_midway_resumes_from_cached_statistics_and_shards(
    tiny_lm: str,
    services: Services,
    reference: dict,
    tmp_path: Path,
    record: Callable,
) -> None:
    from flows.compress import compress

    row = record(
        kind="fault",
        area="flow",
        what="the compress flow's process is killed (SIGKILL, whole process group) once the "
        "first shard is written, then the flow is started again",
        injected="the flow runs as a subprocess (python -c compress(...)) against the module's "
        "Prefect, MLflow and Ray head; the test kills its group when a finished shard folder "
        "appears in the cache (the sweep's variant of this fault: tests/flows/test_sweep_flow.py)",
        expected="the restart takes the statistics and every finished shard from the cache "
        "(files untouched), finishes, registers one complete version; its variant's weights and "
        "logits equal an undisturbed run's (cut into 2 shards there, 4 here)",
        message="not reached",
    )
    cache = tmp_path / "cache"
    name = f"t-fault-resume-{uuid.uuid4().hex[:6]}"
    params = {
        "model": tiny_lm,
        "recipe": RECIPE,
        "register_as": name,
        "cache_dir": str(cache),
        "run_dir": str(tmp_path / "run"),
        **FLOW,
        "compress_shards": 4,  # one layer each: the kill lands with shards still to do
    }
    token = uuid.uuid4().hex
    env = {
        **os.environ,
        **services.env,
        "FFSPLIT_HOME": str(tmp_path / "home"),
        "FFSPLIT_TEST_TOKEN": token,
    }
    log_path = tmp_path / "killed.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, json.dumps(params)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 300
            while not _finished_shards(cache):
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "no shard was written in time"
                time.sleep(0.01)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            for leftover in _token_processes(token):
                leftover.kill()
    assert _token_processes(token) == []
    assert not (tmp_path / "run" / "summary.json").exists()
    shards_before = _finished_shards(cache)
    run = compress(**params)
    assert run["cached"]["profile"] is True
    shards_after = _finished_shards(cache)
    assert {k: shards_after.get(k) for k in shards_before} == shards_before  # reused, not rewritten
    weights = "model.safetensors"
    assert _equal_tensors(Path(run["variant"], weights), Path(reference["variant"], weights))
    assert torch.equal(_logits(run["variant"]), _logits(reference["variant"]))
    versions = _client(services.mlflow).search_model_versions(f"name = '{name}'")
    assert [v.tags.get("ffsplit.complete") for v in versions] == ["true"]
    row.observe(
        f"killed with {len(shards_before)} of {len(shards_after)} shards finished; the restart "
        "took the statistics from the cache, reused the finished shard(s) untouched, finished and "
        "registered 1 complete version; its variant's weights and logits equal the "
        "undisturbed run's"
    )


# ------------------------------------------------------------------- MLflow unreachable


class CuttableLink:
    """A TCP link to a real server that the test can cut: a network fault, not a fake server.

    While up it forwards bytes both ways. cut() closes its port (new connections are refused) and
    resets every open connection; restore() listens on the same port again. cut_when(pattern, n)
    makes the link cut itself when the n-th request carrying `pattern` passes (that request is not
    forwarded), so a fault lands at an exact step of a protocol without touching the code.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.cuts = 0
        self.cut_at: list[float] = []  # time.monotonic() of each cut
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._rule: tuple[bytes, int] | None = None
        self._matches = 0
        self._listener: socket.socket | None = None
        self.port = 0
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
            self._rule, self._matches = None, 0
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut_when(self, pattern: bytes, nth: int = 1) -> None:
        with self._lock:
            self._rule, self._matches = (pattern, nth), 0

    def cut(self) -> None:
        with self._lock:
            self.cuts += 1
            self.cut_at.append(time.monotonic())
            if self._listener is not None:
                # shutdown first: close() alone leaves the port listening while _accept is
                # blocked in accept() (the blocked call keeps the socket alive)
                with contextlib.suppress(OSError):
                    self._listener.shutdown(socket.SHUT_RDWR)
                self._listener.close()
                self._listener = None
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
            self._open.clear()

    def close(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    server.close()
                    return
                self._open |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _should_cut(self, data: bytes) -> bool:
        with self._lock:
            if self._rule is None or self._rule[0] not in data:
                return False
            self._matches += 1
            return self._matches >= self._rule[1]

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        try:
            while data := source.recv(65536):
                if requests and self._should_cut(data):
                    self.cut()
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for conn in (source, sink):
                with contextlib.suppress(OSError):
                    conn.close()
            with self._lock:
                self._open -= {source, sink}


def _registry_state(uri: str, name: str) -> dict[str, Any]:
    """Versions (number -> complete tag) and aliases of a registered model, read directly."""
    client = _client(uri)
    versions = {
        str(v.version): v.tags.get("ffsplit.complete")
        for v in client.search_model_versions(f"name = '{name}'")
    }
    aliases = dict(client.get_registered_model(name).aliases)
    return {"versions": dict(sorted(versions.items())), "aliases": aliases}


# 4 attempts with 1 + 2 + 4 s of backoff between them (tracking.registry.register_variant defaults),
# each failing at once on a refused connection, plus the abort's calls: well under this bound.
RETRY_BOUND_S = 30.0


def test_mlflow_unreachable_at_registration_fails_cleanly_and_never_moves_an_alias(
    tiny_lm: str,
    services: Services,
    shared_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    record: Callable,
) -> None:
    from flows.sweep import sweep
    from tracking.registry import RegistryError

    row = record(
        kind="fault",
        area="MLflow",
        what="the MLflow server becomes unreachable (a) in the middle of a sweep's registration, "
        "(b) after the flow's start-up check, before registration",
        injected="the flows reach the real MLflow server through a TCP link the test cuts "
        "(port closed, open connections reset): (a) at the first artifact upload of the new "
        "variant's version, (b) at the second /health probe (the first is the start-up check)",
        expected="(a) bounded retries, then one-line RegistryError; (b) one-line RegistryError "
        "(the reachability probe, not retried); both: no new complete version, aliases unchanged; once the link is back the same "
        "sweep registers the version and moves the champion alias to it",
        message="not reached",
    )
    server = urlsplit(services.mlflow)
    link = CuttableLink((server.hostname or "127.0.0.1", int(server.port or 80)))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", link.url)
    # MLflow's own HTTP retries off: tracking.registry's bounded retries are what is under test
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    name = f"t-fault-mlflow-{uuid.uuid4().hex[:6]}"
    common = {
        "model": tiny_lm,
        "register_as": name,
        "cache_dir": str(shared_cache),
        "run_dir": str(tmp_path / "run"),
        **SWEEP,
    }
    try:
        first = sweep(budgets=[0.3], **common)
        before = _registry_state(services.mlflow, name)
        assert before == {
            "versions": {"1": "true", "2": "true"},
            "aliases": {"dense": "1", "champion": "2"},
        }, before
        assert [r["version"] for r in first["rows"]] == ["1", "2"]

        # (a) cut mid-registration: the dense version is reused (read only); the new variant's
        # run is created, its params and metrics logged, and the first artifact upload is cut
        link.cut_when(b"PUT /api/2.0/mlflow-artifacts/artifacts/")
        opened_after_ms = int(time.time() * 1000)
        with pytest.raises(RegistryError) as cut_midway:
            sweep(budgets=[0.5], **common)
        retried_s = time.monotonic() - link.cut_at[-1]
        message_a = str(cut_midway.value)
        assert link.cuts == 1 and "\n" not in message_a
        assert "failed after 4 attempts (connection errors)" in message_a, message_a
        assert retried_s < RETRY_BOUND_S, retried_s
        assert link.url.split("//")[1] in message_a
        after_a = _registry_state(services.mlflow, name)
        assert after_a == before, after_a
        client = _client(services.mlflow)
        experiment = client.get_experiment_by_name("ffsplit/tiny-llama")
        orphans = [
            r
            for r in client.search_runs([experiment.experiment_id])
            if r.info.start_time >= opened_after_ms
        ]
        assert len(orphans) == 1, [r.info.run_id for r in orphans]
        orphan = orphans[0]
        assert orphan.data.tags.get("ffsplit.complete") is None
        assert client.list_artifacts(orphan.info.run_id) == []

        # (b) the link goes down after the start-up check: the probe that opens registration
        # refuses at once (it is not retried: 'is unreachable', not 'failed after 4 attempts')
        link.restore()
        link.cut_when(b"GET /health", nth=2)
        with pytest.raises(RegistryError, match="is unreachable") as before_registration:
            sweep(budgets=[0.5], **common)
        assert link.cuts == 2 and "\n" not in str(before_registration.value)
        assert _registry_state(services.mlflow, name) == before

        # the link is back: the same sweep finishes from the cache and registers version 3
        link.restore()
        last = sweep(budgets=[0.5], **common)
    finally:
        link.close()
    assert [r["version"] for r in last["rows"]] == ["1", "3"]
    assert all(r["cached"] for r in last["rows"])
    after = _registry_state(services.mlflow, name)
    assert after == {
        "versions": {"1": "true", "2": "true", "3": "true"},
        "aliases": {"dense": "1", "champion": "3"},
    }, after
    why_a = message_a[message_a.index(" failed after ") + 1 :].split(": ", 1)[0]
    why_b = str(before_registration.value).replace(str(link.port), "PORT")
    row.observe(
        f"(a) RegistryError within {RETRY_BOUND_S:.0f} s of the cut: '... {why_a}: <the "
        "refused connection>'; versions and "
        f"aliases unchanged (dense -> 1, champion -> 2); the run it had opened is left "
        f"{orphan.info.status} with params and metrics but no artifacts, no version (its abort "
        f"could not reach the server either). (b) without retrying: '{why_b}'; "
        "registry unchanged. Link back: the same sweep, all cached, registers version 3 "
        "complete; champion 2 -> 3, dense stays 1"
    )


# ------------------------------------------------------------------------ interrupted writes


def write_artifact(kind: str, model: str, stats_path: str, out: str) -> None:
    """Write one artifact with ffsplit's own writer: a variant, a shard or a statistics file."""
    from ffsplit.config import Recipe
    from ffsplit.profiling import load_stats

    recipe = Recipe(method="lowrank", heavy_ratio=0.1, ffn_reduction=0.3)
    if kind == "variant":
        from ffsplit.jobs import compress_job

        compress_job(model, recipe, out, stats_path=stats_path)
    elif kind == "shard":
        from ffsplit.adapters import get_adapter
        from ffsplit.compress.recipe import compress_layer
        from ffsplit.models.loading import load_model
        from ffsplit.variant.shards import save_shard

        net, _, _ = load_model(model)
        adapter = get_adapter(net)
        stats = load_stats(stats_path)
        layers = {
            h.layer: compress_layer(adapter.weights(net, h), stats.layers[h.layer], recipe, h.layer)
            for h in adapter.ffns(net)
        }
        save_shard(layers, out, recipe=recipe.to_dict())
    else:
        from ffsplit.profiling import save_stats

        save_stats(load_stats(stats_path), out)


# Child process for the interrupted-write faults: write_artifact of this file, stalling at a
# chosen step (the parent SIGKILLs it there). The stalls patch library calls in the child only.
WRITER = r"""
import importlib.util, os, sys, time
from pathlib import Path

here, kind, stall, model, stats_path, out = sys.argv[1:7]


def stall_here(where):
    print(f"STALLED {where}", flush=True)
    time.sleep(600)


if stall == "after-weights":
    import safetensors.torch as st

    real_save = st.save_file

    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        if Path(filename).name == "model.safetensors":
            stall_here(filename)

    st.save_file = save_file
elif stall == "before-rename":
    real_replace = os.replace

    def replace(src, dst, **kwargs):
        name = Path(str(src)).name
        if name.startswith(".") and name.endswith(".tmp"):
            stall_here(dst)
        return real_replace(src, dst, **kwargs)

    os.replace = replace
    import ffsplit.files as files  # folders are published with a no-replace rename

    real_publish = files.rename_noreplace

    def publish(src, dst):
        stall_here(dst)
        return real_publish(src, dst)

    files.rename_noreplace = publish
spec = importlib.util.spec_from_file_location("fault_writers", here)
module = importlib.util.module_from_spec(spec)
sys.modules["fault_writers"] = module  # dataclasses look their module up there
spec.loader.exec_module(module)
module.write_artifact(kind, model, stats_path, out)
print("DONE", flush=True)
"""

KILLED_WRITES = {
    "variant-after-weights": ("variant", "after-weights", "model.safetensors written, no manifest"),
    "variant-before-rename": ("variant", "before-rename", "complete temp folder, not renamed"),
    "shard-before-rename": ("shard", "before-rename", "complete temp folder, not renamed"),
    "stats-before-rename": ("stats", "before-rename", "complete temp file, not renamed"),
}


def _reader(kind: str) -> Callable[[Path], Any]:
    from ffsplit.profiling import load_stats
    from ffsplit.variant import load_variant
    from ffsplit.variant.shards import load_shard

    return {"variant": load_variant, "shard": load_shard, "stats": load_stats}[kind]


@pytest.mark.parametrize("case", sorted(KILLED_WRITES))
def test_a_write_killed_midway_leaves_nothing_that_reads_as_complete(
    case: str, inputs: Any, tmp_path: Path, record: Callable
) -> None:
    from tasks.cache import remove_stale_temps

    kind, stall, moment = KILLED_WRITES[case]
    thing = {"variant": "variant folder", "shard": "shard folder", "stats": "statistics file"}[kind]
    target = tmp_path / "out" / (f"{kind}.safetensors" if kind == "stats" else kind)
    row = record(
        kind="fault",
        area="storage",
        what=f"the process writing a {thing} is killed (SIGKILL) mid-write: {moment}",
        injected=f"a subprocess writes the {thing} (ffsplit's own writer) with a stall patched "
        f"into it {stall.replace('-', ' ')}; the test kills it there",
        expected=f"no {thing} at the target path; the reader refuses it in one FFSplitError "
        "line; the leftover is a dot-named temp that the cache sweeper removes; writing again "
        "succeeds",
        message="not reached",
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, __file__, kind, stall]
        + [str(inputs.notok), str(inputs.stats), str(target)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the child stalls (or ends)
        assert line.startswith("STALLED"), line + proc.stderr.read()[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    leftovers = [p.name for p in target.parent.iterdir()]
    assert not target.exists()
    assert leftovers and all(
        n.startswith(f".{target.name}.") and n.endswith(".tmp") for n in leftovers
    )
    with pytest.raises(FFSplitError) as refused:
        _reader(kind)(target)
    assert "\n" not in str(refused.value)
    assert remove_stale_temps(target.parent, older_than_s=0) == len(leftovers)
    assert list(target.parent.iterdir()) == []
    write_artifact(kind, str(inputs.notok), str(inputs.stats), str(target))  # not blocked
    _reader(kind)(target)  # the rewrite is complete and reads back
    leftover = f".{target.name}.*.tmp"
    row.observe(
        f"killed with {moment}: {target.name} absent; the reader says '{refused.value}'; "
        f"the leftover {leftover} is removed by tasks.cache.remove_stale_temps; writing again "
        "succeeds and reads back"
    )


FSIZE_LIMIT = 4096  # bytes a file may reach: the variant's weights do not fit


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def test_a_failing_write_disk_full_leaves_nothing(
    inputs: Any, tmp_path: Path, record: Callable
) -> None:
    out = tmp_path / "out" / "variant"
    out.parent.mkdir()
    args = ["compress", str(inputs.notok), "--out", str(out), "--stats", str(inputs.stats)]
    row = record(
        kind="fault",
        area="storage",
        what="a write fails mid-way (disk full, simulated): `ffsplit compress` cannot write the "
        "variant's weights",
        injected=f"the real CLI runs with RLIMIT_FSIZE={FSIZE_LIMIT} bytes (SIGXFSZ ignored), so "
        "writing model.safetensors fails with EFBIG",
        expected="non-zero exit; the --out folder absent and nothing left beside it",
        message="not reached",
    )
    script = Path(sys.executable).with_name("ffsplit")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "ffsplit.cli"]
    done = subprocess.run(
        [*command, *args],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "FFSPLIT_NO_INSTALL": "1", "COLUMNS": "400"},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    # A real disk full (ENOSPC) surfaces the same way: as safetensors' SafetensorError, not an
    # OSError; the CLI turns it into one line (ffsplit/cli.py _user_errors).
    shape = "one line" if len(lines) == 1 else f"NOT one line: a {len(lines)}-line traceback"
    row.observe(
        f"exit {done.returncode}; nothing written, nothing left beside --out; stderr is {shape}, "
        f"ending '{lines[-1] if lines else ''}'"
    )
    assert done.returncode == 2
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert len(lines) == 1 and "disk full?" in lines[0], done.stderr[-2000:]


# ---------------------------------------------------------------------- three sweeps at once


def _sweep_argv(model: str, name: str, run_dir: Path, **changes: Any) -> list[str]:
    """`python -m flows.sweep run` with the SWEEP grid and `changes` (what a user would type)."""
    grid = {**SWEEP, **changes}
    return [
        sys.executable,
        "-m",
        "flows.sweep",
        "run",
        "--model",
        model,
        "--methods",
        ",".join(grid["methods"]),
        "--heavy-ratios",
        ",".join(str(r) for r in grid["heavy_ratios"]),
        "--budgets",
        ",".join(str(b) for b in grid["budgets"]),
        "--baselines",
        ",".join(grid["baselines"]),
        "--calib-tokens",
        str(grid["calib_tokens"]),
        "--calib-window",
        str(grid["calib_window"]),
        "--eval-tokens",
        str(grid["eval_tokens"]),
        "--eval-window",
        str(grid["eval_window"]),
        "--profile-units",
        str(grid["profile_units"]),
        "--compress-shards",
        str(grid["compress_shards"]),
        "--no-latency",
        "--objective",
        grid["champion_objective"],
        "--quality-budget-pct",
        str(grid["quality_budget_pct"]),
        "--register-as",
        name,
        "--run-dir",
        str(run_dir),
    ]


def _last_error(log: str) -> str:
    """The last exception line of a flow log (what failed, in one line)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if line.split(":", 1)[0].endswith(("Error", "Exception"))]
    return (errors or lines or ["(empty log)"])[-1][:400]


def test_three_sweeps_at_once_on_one_stack_register_as_if_run_one_after_another(
    tiny_lm: str, services: Services, tmp_path: Path, record: Callable
) -> None:
    from tracking.registry import choose_champion

    row = record(
        kind="fault",
        area="concurrency",
        what="three sweeps started at once against one Prefect server, one MLflow server and one "
        "Ray head, sharing one (empty) cache",
        injected="three `python -m flows.sweep run` processes with PREFECT_API_URL, "
        "MLFLOW_TRACKING_URI and RAY_ADDRESS of the module's stack and one FFSPLIT_HOME; same "
        "grid (dense + lowrank 0.3; one profile unit, one shard), each under its own model name",
        expected="all three complete; each name holds exactly the versions a sequential run "
        "gives (1 = dense, 2 = the variant, both complete), dense -> 1, champion -> the policy's "
        "choice; the three agree on every metric but timings",
        message="not reached",
    )
    home = tmp_path / "home"
    env = {**os.environ, **services.env, "FFSPLIT_HOME": str(home)}
    names = [f"t-fault-conc{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    procs = []
    for i, name in enumerate(names):
        log = (tmp_path / f"sweep{i}.log").open("w")
        argv = _sweep_argv(
            tiny_lm, name, tmp_path / f"run{i}", budgets=[0.3], profile_units=1, compress_shards=1
        )
        procs.append(
            (
                subprocess.Popen(
                    argv,
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                ),
                log,
            )
        )
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=480))
    finally:
        for proc, log in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            log.close()
    failures = [
        f"sweep {i} exited {code}: " + _last_error((tmp_path / f"sweep{i}.log").read_text())
        for i, code in enumerate(codes)
        if code != 0
    ]
    row.observe("; ".join(failures) or "all three exited 0")
    assert failures == []
    results = [json.loads((tmp_path / f"run{i}" / "results.json").read_text()) for i in range(3)]
    client = _client(services.mlflow)
    champions = []
    for name, result in zip(names, results, strict=True):
        rows = result["rows"]
        assert [r["series"] for r in rows] == ["dense", "ffsplit-lowrank"]
        assert [r["version"] for r in rows] == ["1", "2"]
        champion = choose_champion(
            [{**r, "name": name} for r in rows[1:]], SWEEP["quality_budget_pct"], "size"
        )
        assert champion is not None
        champions.append(champion["version"])
        assert _registry_state(services.mlflow, name) == {
            "versions": {"1": "true", "2": "true"},
            "aliases": {"dense": "1", "champion": champion["version"]},
        }
        for version in ("1", "2"):
            run = client.get_run(client.get_model_version(name, version).run_id)
            assert run.info.status == "FINISHED" and run.data.metrics["perplexity"] > 1
    steady = ("perplexity", "bytes", "ffn_reduction", "perplexity_change_pct", "variant_key")
    views = [[{k: r.get(k) for k in steady} for r in result["rows"]] for result in results]
    assert views[0] == views[1] == views[2]
    row.observe(
        "all three exited 0; each name: versions 1 (dense) "
        f"and 2 (lowrank 0.3), both complete, dense -> 1, champion -> {'/'.join(champions)}; "
        f"rows identical across the three (perplexity {results[0]['rows'][1]['perplexity']:.4f})"
    )
