"""Start and stop the local services the pipeline runs on: Prefect server, MLflow server, a Prefect
process worker and a Ray head.

Each service runs in its own process group (it outlives SIGTERM for a while, see
docs/stack-notes.md), is recorded in STATE/stack.json (pid, process group, port, log, startup
time) and is stopped by process group: SIGTERM, a grace period, SIGKILL. Services bind to
127.0.0.1 (Ray excepted: it always advertises a routable address). A PREFECT_API_URL or
MLFLOW_TRACKING_URI already set is honoured: nothing is started for it, it is only checked.

Usage: ``python -m flows.stack up|down|status|env [--home DIR]``; ``eval "$(python -m flows.stack
up)"`` exports PREFECT_API_URL, MLFLOW_TRACKING_URI (and RAY_ADDRESS with ``--ray-head``). In Python:
``with local_stack(StackConfig(home=...)) as stack: ...`` (sets and restores os.environ).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ffsplit.errors import FFSplitError

# Set for every service and for every process that uses them (Ray workers included, see
# cluster/runtime_env.yaml): no telemetry from an offline machine, no hub downloads.
SERVICE_ENV: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
}

# Variables that point a client at services; never inherited by the services themselves.
CLIENT_VARS = (
    "PREFECT_API_URL",
    "MLFLOW_TRACKING_URI",
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
)
DEFAULT_HOST = "127.0.0.1"
DEFAULT_POOL = "ffsplit-process"
STATE_FILE = "stack.json"
SERVICES = ("prefect", "mlflow", "worker", "ray")  # start order; stopped in reverse
REPO_ROOT = Path(__file__).resolve().parents[1]
# Environment variable carried by every process a service spawns: lets `down` find children that
# left the process group (Ray workers, flow-run subprocesses) and never touch anyone else's.
TOKEN_VAR = "FFSPLIT_STACK_TOKEN"
# SIGTERM grace per service. Prefect exits in <1 s, MLflow ~3 s; Ray's gcs_server ignores SIGTERM
# for >30 s, and `ray stop --force` SIGKILLs at once too (a head holds no state worth a clean exit).
_GRACE_S = {"prefect": 10.0, "mlflow": 10.0, "worker": 10.0, "ray": 2.0}


def default_home() -> Path:
    """State folder: $FFSPLIT_HOME, else .ffsplit/ in the repository (git-ignored)."""
    env = os.environ.get("FFSPLIT_HOME")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".ffsplit"


@dataclass(frozen=True)
class StackConfig:
    """Which services to start and where. A port of 0 means any free port; a busy default port is
    replaced by a free one."""

    home: Path = field(default_factory=default_home)
    host: str = DEFAULT_HOST
    prefect: bool = True
    mlflow: bool = True
    worker: bool = False
    ray_head: bool = False
    prefect_port: int = 4200
    mlflow_port: int = 5000
    ray_port: int = 6379
    pool: str = DEFAULT_POOL
    ray_num_cpus: int | None = None
    ray_num_gpus: int | None = None
    timeout_s: float = 180.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "home", Path(self.home).expanduser().resolve())
        for name in ("prefect_port", "mlflow_port", "ray_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or not 0 <= port <= 65535:
                raise FFSplitError(f"StackConfig.{name}={port!r}: use a port in 0..65535")
        for name in ("ray_num_cpus", "ray_num_gpus"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise FFSplitError(f"StackConfig.{name}={value!r}: use a count >= 0 or None")
        if not self.timeout_s > 0:
            raise FFSplitError(f"StackConfig.timeout_s={self.timeout_s!r}: use seconds > 0")
        if not self.pool or not self.pool.replace("-", "").replace("_", "").isalnum():
            raise FFSplitError(f"StackConfig.pool={self.pool!r}: use letters, digits, - and _")
        if self.worker and not self.prefect and not os.environ.get("PREFECT_API_URL"):
            raise FFSplitError(
                "StackConfig.worker=True needs a Prefect server: set prefect=True or PREFECT_API_URL"
            )


@dataclass(frozen=True)
class ServiceRecord:
    """One service as recorded in stack.json. External services (an existing PREFECT_API_URL or
    MLFLOW_TRACKING_URI) have no pid and are never stopped."""

    name: str
    url: str
    port: int | None = None
    pid: int | None = None
    pgid: int | None = None
    token: str | None = None
    log: str | None = None
    startup_s: float | None = None
    started_at: float | None = None
    external: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "port": self.port,
            "pid": self.pid,
            "pgid": self.pgid,
            "token": self.token,
            "log": self.log,
            "startup_s": self.startup_s,
            "started_at": self.started_at,
            "external": self.external,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServiceRecord:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise FFSplitError(f"stack.json: unknown service keys {sorted(unknown)}; run `down`")
        return cls(**data)


@dataclass(frozen=True)
class StackState:
    """The services of one state folder; `started` names those this call started (and will stop)."""

    home: Path
    services: dict[str, ServiceRecord]
    started: tuple[str, ...] = ()

    def env(self) -> dict[str, str]:
        """Environment a client process needs to use these services."""
        env = dict(SERVICE_ENV)
        if "prefect" in self.services:
            env["PREFECT_API_URL"] = self.services["prefect"].url
        if "mlflow" in self.services:
            env["MLFLOW_TRACKING_URI"] = self.services["mlflow"].url
        if "ray" in self.services:
            ray = self.services["ray"]
            env["RAY_ADDRESS"] = ray.url
            env.update(ray.extra.get("client_env", {}))
        return env


RUNTIME_ENV_FILE = REPO_ROOT / "cluster" / "runtime_env.yaml"
# Client variables a Ray task needs to reach the same servers as its driver.
FORWARDED_VARS = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")


def ray_runtime_env(path: Path | None = None) -> dict[str, Any]:
    """The Ray runtime env for the flows: cluster/runtime_env.yaml plus the driver's
    PREFECT_API_URL / MLFLOW_TRACKING_URI (a Ray worker inherits its raylet's environment, not the
    driver's, so tasks on other nodes would otherwise miss them)."""
    import yaml

    path = Path(path) if path is not None else RUNTIME_ENV_FILE
    try:
        runtime_env = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise FFSplitError(f"{path}: cannot read the Ray runtime env ({exc})") from exc
    env_vars = runtime_env.get("env_vars", {})
    if not isinstance(env_vars, dict) or not all(isinstance(v, str) for v in env_vars.values()):
        raise FFSplitError(f"{path}: env_vars must map names to quoted strings")
    env_vars = dict(env_vars)
    for var in FORWARDED_VARS:
        if os.environ.get(var):
            env_vars[var] = os.environ[var]
    return {**runtime_env, "env_vars": env_vars}


# ---------------------------------------------------------------------------------------- state


def _state_path(home: Path) -> Path:
    return home / STATE_FILE


def load_records(home: Path) -> dict[str, ServiceRecord]:
    """Records in HOME/stack.json ({} when there is none)."""
    path = _state_path(home)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return {name: ServiceRecord.from_dict(rec) for name, rec in data["services"].items()}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise FFSplitError(
            f"{path}: unreadable stack state ({exc}); stop leftovers by hand"
        ) from exc


def _save_records(home: Path, records: Mapping[str, ServiceRecord]) -> None:
    """Write stack.json atomically (temp file + rename) so a crash never leaves half a record."""
    home.mkdir(parents=True, exist_ok=True)
    path = _state_path(home)
    if not records:
        path.unlink(missing_ok=True)
        return
    payload = {"version": 1, "services": {n: r.to_dict() for n, r in records.items()}}
    fd, tmp = tempfile.mkstemp(dir=home, prefix=".stack.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------- processes


def _owned(proc: psutil.Process, token: str) -> bool:
    try:
        return proc.environ().get(TOKEN_VAR) == token
    except (psutil.Error, OSError):
        return False


def service_processes(record: ServiceRecord) -> list[psutil.Process]:
    """Live processes of a service: processes carrying its token, its whole process group once a
    member carries the token (Ray's agents and workers overwrite /proc/PID/environ with
    setproctitle), and all their descendants (Ray workers leave the group)."""
    if record.external or record.token is None:
        return []
    found: dict[int, psutil.Process] = {}
    group: dict[int, psutil.Process] = {}
    group_is_ours = False
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        owned = _owned(proc, record.token)
        if owned:
            found[proc.pid] = proc
        with contextlib.suppress(OSError, psutil.Error):
            if record.pgid is not None and os.getpgid(proc.pid) == record.pgid:
                group[proc.pid] = proc
                group_is_ours = group_is_ours or owned
    if group_is_ours:  # else the number was reused by someone else's group: never touch it
        found.update(group)
    for proc in list(found.values()):
        with contextlib.suppress(psutil.Error):
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
    alive = []
    for proc in found.values():
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def rss_bytes(processes: list[psutil.Process]) -> int:
    """Summed resident set size (shared pages counted once per process: an upper bound)."""
    total = 0
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def _signal_all(record: ServiceRecord, procs: list[psutil.Process], sig: int) -> None:
    if record.pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pgid, sig)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def _stop_services(records: list[ServiceRecord]) -> list[str]:
    """SIGTERM the services' processes together, wait each one's grace period, SIGKILL what is
    left. Returns the names of services with processes left after SIGKILL."""
    procs = {r.name: service_processes(r) for r in records}
    records = [r for r in records if procs[r.name]]  # already gone: never signal its group number
    for record in records:
        _signal_all(record, procs[record.name], signal.SIGTERM)
    t0 = time.monotonic()
    for record in sorted(records, key=lambda r: _GRACE_S.get(r.name, 10.0)):
        left = _GRACE_S.get(record.name, 10.0) - (time.monotonic() - t0)
        _, alive = psutil.wait_procs(procs[record.name], timeout=max(left, 0.0))
        # Children started during the grace period are caught by a fresh scan; the final killpg
        # also sweeps group members that lost their token and their parent meanwhile.
        alive = list({p.pid: p for p in alive + service_processes(record)}.values())
        _signal_all(record, alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5.0)
    return [r.name for r in records if service_processes(r)]


def _stop_service(record: ServiceRecord) -> bool:
    """Stop one service (see _stop_services). True if nothing is left."""
    return not _stop_services([record])


def _start_process(
    name: str, argv: list[str], env: Mapping[str, str], home: Path, token: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start argv in its own session (own process group), output appended to HOME/logs/NAME.log."""
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    full_env = {**env, TOKEN_VAR: token}
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            env=full_env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log_path


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _bin(name: str) -> str:
    """An executable of this interpreter's environment (the venv), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FFSplitError(
            f"`{name}` not found next to {sys.executable} or on PATH: install .[pipeline]"
        )
    return found


# ------------------------------------------------------------------------------------------ ports


def port_is_free(host: str, port: int) -> bool:
    """True if a server could bind host:port now (SO_REUSEADDR, as the servers themselves set)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port the OS considers free on host now (racy by nature: callers retry on bind errors)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pick_port(host: str, wanted: int, taken: Collection[int] = ()) -> int:
    """wanted if it is free (and not in taken), else a free port; wanted=0 means any."""
    if wanted and wanted not in taken and port_is_free(host, wanted):
        return wanted
    for _ in range(50):
        port = free_port(host)
        if port not in taken:
            return port
    raise FFSplitError(f"no free TCP port on {host}")


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on port (to check what a service binds to)."""
    out = set()
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            out.add(conn.laddr.ip)
    return out


# ------------------------------------------------------------------------------------------ health


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """True if GET url answers 2xx (a proxy is never used: the services are local or explicit)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _health_url(name: str, url: str) -> str:
    """Prefect: API_URL/health (the URL ends in /api); MLflow: URL/health."""
    return url.rstrip("/") + "/health"


def _prefect_json(api_url: str, method: str, path: str, body: Any = None) -> Any:
    """A small Prefect REST call (stdlib only, so the CLI stays quick to start)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        api_url.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=5.0) as response:
        return json.loads(response.read() or b"null")


def _worker_online(api_url: str, pool: str, worker_name: str) -> bool:
    try:
        workers = _prefect_json(api_url, "POST", f"/work_pools/{pool}/workers/filter", {})
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return any(w.get("name") == worker_name and w.get("status") == "ONLINE" for w in workers)


def _pool_exists(api_url: str, pool: str) -> bool:
    try:
        _prefect_json(api_url, "GET", f"/work_pools/{pool}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise FFSplitError(f"Prefect at {api_url}: GET /work_pools/{pool} failed ({exc})") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise FFSplitError(
            f"Prefect at {api_url} is not reachable ({exc}): start it or fix PREFECT_API_URL"
        ) from exc
    return True


def _healthy(record: ServiceRecord) -> bool:
    if record.name in ("prefect", "mlflow"):
        if not record.url.startswith(("http://", "https://")):
            return True  # a sqlite/file MLflow store has no server to ask
        return http_ok(_health_url(record.name, record.url))
    if record.name == "worker":
        return _worker_online(record.extra["api_url"], record.extra["pool"], record.extra["worker"])
    if record.name == "ray":
        host, _, port = record.url.rpartition(":")
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=2.0):
            return True
        return False
    return False


# ------------------------------------------------------------------------------------------ starts


@dataclass
class _Pending:
    """A started process not yet ready."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str
    port: int | None
    token: str
    t0: float
    extra: dict[str, Any] = field(default_factory=dict)


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(SERVICE_ENV)
    for var in CLIENT_VARS:
        env.pop(var, None)
    return env


def _prefect_env(home: Path, api_url: str) -> dict[str, str]:
    env = _base_env()
    env["PREFECT_HOME"] = str(home / "prefect")
    env["PREFECT_API_URL"] = api_url
    return env


def _launch_prefect(config: StackConfig, port: int) -> _Pending:
    api_url = f"http://{config.host}:{port}/api"
    argv = [_bin("prefect"), "server", "start", "--host", config.host, "--port", str(port)]
    (config.home / "prefect").mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    proc, log = _start_process(
        "prefect", argv, _prefect_env(config.home, api_url), config.home, token
    )
    return _Pending("prefect", proc, log, api_url, port, token, time.monotonic())


def _launch_mlflow(config: StackConfig, port: int) -> _Pending:
    # Proxied artifacts (--serve-artifacts): clients anywhere (Ray workers on other nodes, a fresh
    # process loading models:/NAME@ALIAS) read and write artifacts through the server with nothing
    # but MLFLOW_TRACKING_URI; a plain --default-artifact-root path would only work on this machine.
    artifacts = config.home / "mlartifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    argv = [
        _bin("mlflow"),
        "server",
        "--host",
        config.host,
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{config.home / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        str(artifacts),
    ]
    env = _base_env()
    # The job-execution consumers cost ~17 s and ~1.7 GB at startup (stack.md); the pipeline needs none.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    token = uuid.uuid4().hex
    proc, log = _start_process("mlflow", argv, env, config.home, token)
    return _Pending(
        "mlflow", proc, log, f"http://{config.host}:{port}", port, token, time.monotonic()
    )


def _record(p: _Pending, startup_s: float) -> ServiceRecord:
    return ServiceRecord(
        name=p.name,
        url=p.url,
        port=p.port,
        pid=p.proc.pid,
        pgid=p.proc.pid,  # start_new_session: the child leads its own group
        token=p.token,
        log=str(p.log),
        startup_s=round(startup_s, 2),
        started_at=time.time(),
        extra=p.extra,
    )


def _wait_ready(
    pending: list[_Pending], timeout_s: float
) -> tuple[dict[str, float], list[_Pending]]:
    """Poll health until all are ready; returns startup seconds and the ones whose process died."""
    ready: dict[str, float] = {}
    dead: list[_Pending] = []
    deadline = time.monotonic() + timeout_s
    while len(ready) + len(dead) < len(pending):
        for p in pending:
            if p.name in ready or p in dead:
                continue
            # Alive and answering: never mistake another server on a lost port for ours.
            if http_ok(_health_url(p.name, p.url), timeout_s=1.0) and p.proc.poll() is None:
                ready[p.name] = time.monotonic() - p.t0
            elif p.proc.poll() is not None:
                dead.append(p)
        if time.monotonic() > deadline:
            break
        time.sleep(0.25)
    return ready, dead


def _check_external(name: str, var: str, url: str) -> ServiceRecord:
    record = ServiceRecord(name=name, url=url, external=True)
    if not _healthy(record):
        raise FFSplitError(
            f"{var}={url} is not reachable (no answer from {_health_url(name, url)}): "
            f"start that server or unset {var} to start a local one"
        )
    return record


def start_stack(config: StackConfig) -> StackState:
    """Start the configured services (reusing healthy ones already recorded in config.home) and wait
    until they answer. On failure, stops whatever this call started and raises FFSplitError."""
    home = config.home
    home.mkdir(parents=True, exist_ok=True)
    records = load_records(home)
    # Drop records of services that died (a crash, a reboot) so they are started afresh.
    for name, rec in list(records.items()):
        if rec.external or not service_processes(rec) or not _healthy(rec):
            if not rec.external:
                _stop_service(rec)
            del records[name]
    _save_records(home, records)
    started: list[str] = []
    try:
        _start_servers(config, records, started)
        if config.worker:
            _start_worker(config, records, started)
        if config.ray_head:
            _start_ray(config, records, started)
    except BaseException:
        for name in reversed(started):
            _stop_service(records.pop(name))
        _save_records(home, {n: r for n, r in records.items() if not r.external})
        raise
    return StackState(home=home, services=dict(records), started=tuple(started))


def _start_servers(
    config: StackConfig, records: dict[str, ServiceRecord], started: list[str]
) -> None:
    home = config.home
    taken = {r.port for r in records.values() if r.port}
    wanted: dict[str, int] = {}
    if config.prefect and "prefect" not in records:
        external = os.environ.get("PREFECT_API_URL")
        if external:
            records["prefect"] = _check_external("prefect", "PREFECT_API_URL", external)
        else:
            wanted["prefect"] = config.prefect_port
    if config.mlflow and "mlflow" not in records:
        external = os.environ.get("MLFLOW_TRACKING_URI")
        if external:
            records["mlflow"] = _check_external("mlflow", "MLFLOW_TRACKING_URI", external)
        else:
            wanted["mlflow"] = config.mlflow_port
    launchers = {"prefect": _launch_prefect, "mlflow": _launch_mlflow}
    for _attempt in range(3):  # a port taken between the check and the bind: retry on another
        if not wanted:
            return
        pending = []
        for name, port in wanted.items():
            port = pick_port(config.host, port, taken)
            taken.add(port)
            pending.append(launchers[name](config, port))
        ready, dead = _wait_ready(pending, config.timeout_s)
        for p in pending:
            if p.name in ready:
                records[p.name] = _record(p, ready[p.name])
                started.append(p.name)
                del wanted[p.name]
        _save_records(home, {n: r for n, r in records.items() if not r.external})
        for p in pending:
            if p.name in ready:
                continue
            # Not ready: stop it whatever happened, then retry only a lost port race.
            _stop_service(_record(p, 0.0))
            tail = _log_tail(p.log)
            if p in dead and "address already in use" in tail.lower():
                wanted[p.name] = 0
                continue
            why = f"exited with code {p.proc.returncode}" if p in dead else "not ready in time"
            raise FFSplitError(
                f"{p.name} server on port {p.port} {why} (timeout {config.timeout_s:.0f} s); "
                f"see {p.log}:\n{tail}"
            )
    if wanted:
        raise FFSplitError(
            f"could not bind {sorted(wanted)} on {config.host}: ports kept being taken"
        )


def _start_worker(
    config: StackConfig, records: dict[str, ServiceRecord], started: list[str]
) -> None:
    if "worker" in records:
        return
    api_url = records["prefect"].url if "prefect" in records else os.environ["PREFECT_API_URL"]
    env = _prefect_env(config.home, api_url)
    t0 = time.monotonic()
    if not _pool_exists(api_url, config.pool):
        create = [_bin("prefect"), "work-pool", "create", config.pool, "--type", "process"]
        result = subprocess.run(create, env=env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0 and not _pool_exists(api_url, config.pool):
            raise FFSplitError(
                f"`{' '.join(create[1:])}` failed against {api_url}: "
                f"{(result.stdout + result.stderr).strip()[-500:]}"
            )
    worker_name = f"ffsplit-{uuid.uuid4().hex[:8]}"
    argv = [_bin("prefect"), "worker", "start", "--pool", config.pool, "--type", "process"]
    argv += ["--name", worker_name]
    token = uuid.uuid4().hex
    proc, log = _start_process("worker", argv, env, config.home, token)
    extra = {"api_url": api_url, "pool": config.pool, "worker": worker_name}
    pending = _Pending("worker", proc, log, api_url, None, token, t0, extra)
    deadline = time.monotonic() + config.timeout_s
    while not _worker_online(api_url, config.pool, worker_name):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_service(_record(pending, 0.0))
            why = f"exited with code {proc.returncode}" if proc.poll() is not None else "not online"
            raise FFSplitError(
                f"Prefect worker for pool {config.pool!r} {why}; see {log}:\n{_log_tail(log)}"
            )
        time.sleep(0.5)
    records["worker"] = _record(pending, time.monotonic() - t0)
    started.append("worker")
    _save_records(config.home, {n: r for n, r in records.items() if not r.external})


def _start_ray(config: StackConfig, records: dict[str, ServiceRecord], started: list[str]) -> None:
    """A `ray start --head` for cluster-like runs (embedded runs use ray.init(address="local")).

    Its own short temp dir keeps the address file out of /tmp/ray/ray_current_cluster, so a plain
    ray.init() elsewhere never joins (or hangs on) this head; short because Ray's unix sockets live
    there (107-byte path limit).

    Token auth is set explicitly, with a token file per state dir: left unset, Ray 2.60 turns it on
    for a head whenever ~/.ray/auth_token exists (any earlier ray.init() writes one) but not for
    nodes joining it, and the head listens on a routable address (it ignores 127.0.0.1)."""
    if "ray" in records:
        return
    external = os.environ.get("RAY_ADDRESS")
    if external:
        raise FFSplitError(
            f"RAY_ADDRESS={external} is set: unset it to start a local head, or drop --ray-head"
        )
    # Ray listens on all interfaces: check ports there. The Ray Client port (default 10001) gets a
    # free one too, so two heads (two state dirs) can run on one machine.
    taken = {r.port for r in records.values() if r.port}
    port = pick_port("0.0.0.0", config.ray_port, taken)
    client_port = pick_port("0.0.0.0", 0, taken | {port})
    temp_dir = tempfile.mkdtemp(prefix="ffray-", dir="/tmp")
    argv = [_bin("ray"), "start", "--head", "--port", str(port), "--temp-dir", temp_dir]
    argv += ["--ray-client-server-port", str(client_port)]
    argv += ["--include-dashboard=false", "--disable-usage-stats"]
    if config.ray_num_cpus is not None:
        argv += ["--num-cpus", str(config.ray_num_cpus)]
    if config.ray_num_gpus is not None:
        argv += ["--num-gpus", str(config.ray_num_gpus)]
    auth_file = config.home / "ray_auth_token"
    if not auth_file.exists():
        fd = os.open(auth_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(auth_file)}
    token = uuid.uuid4().hex
    t0 = time.monotonic()
    proc, log = _start_process("ray", argv, {**_base_env(), **client_env}, config.home, token)
    extra = {"temp_dir": temp_dir, "client_env": client_env, "client_port": client_port}
    pending = _Pending("ray", proc, log, "", port, token, t0, extra)
    try:
        code = proc.wait(timeout=config.timeout_s)  # `ray start` returns once the head is up
    except subprocess.TimeoutExpired:
        code = None
    address_file = Path(temp_dir) / "ray_current_cluster"
    if code != 0 or not address_file.exists():
        _stop_service(_record(pending, 0.0))
        shutil.rmtree(temp_dir, ignore_errors=True)
        why = "timed out" if code is None else f"exited with code {code}"
        raise FFSplitError(f"`ray start --head --port {port}` {why}; see {log}:\n{_log_tail(log)}")
    pending.url = address_file.read_text().strip()
    records["ray"] = _record(pending, time.monotonic() - t0)
    started.append("ray")
    _save_records(config.home, {n: r for n, r in records.items() if not r.external})


# ------------------------------------------------------------------------------------------ stops


def stop_stack(home: Path | None = None, names: tuple[str, ...] | None = None) -> list[str]:
    """Stop the recorded services of HOME (all, or only NAMES), all at once to keep `down` quick;
    returns the names stopped. Raises FFSplitError if a process survives SIGKILL."""
    home = Path(home).resolve() if home is not None else default_home()
    records = load_records(home)
    chosen = [
        records[name]
        for name in reversed(SERVICES)
        if name in records and (names is None or name in names)
    ]
    survivors = _stop_services([r for r in chosen if not r.external])
    stopped = [r.name for r in chosen if r.name not in survivors]
    for name in stopped:
        temp_dir = records.pop(name).extra.get("temp_dir")
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    _save_records(home, {n: r for n, r in records.items() if not r.external})
    if survivors:
        raise FFSplitError(
            f"{home}: processes of {survivors} survived SIGKILL; check `ps -eo pid,pgid,args`"
        )
    return stopped


def stack_status(home: Path | None = None) -> dict[str, Any]:
    """Per recorded service: url, port, pid, alive, healthy, process count, RSS MiB, startup s."""
    home = Path(home).resolve() if home is not None else default_home()
    out: dict[str, Any] = {"home": str(home), "services": {}}
    for name, rec in load_records(home).items():
        procs = service_processes(rec)
        out["services"][name] = {
            "url": rec.url,
            "port": rec.port,
            "pid": rec.pid,
            "external": rec.external,
            "alive": rec.external or bool(procs),
            "healthy": _healthy(rec),
            "processes": len(procs),
            "rss_mib": round(rss_bytes(procs) / 2**20, 1),
            "startup_s": rec.startup_s,
            "log": rec.log,
        }
    return out


@contextlib.contextmanager
def local_stack(
    config: StackConfig | None = None, *, apply_env: bool = True
) -> Iterator[StackState]:
    """Start the services, export their env into os.environ (restored after), stop on exit the
    services this context started (ones already running in the same home are left running)."""
    config = config or StackConfig()
    state = start_stack(config)
    saved = {k: os.environ.get(k) for k in state.env()}
    try:
        if apply_env:
            os.environ.update(state.env())
        yield state
    finally:
        if apply_env:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        if state.started:
            stop_stack(state.home, names=state.started)


# ------------------------------------------------------------------------------------------- CLI


def _port_notes(state: StackState, config: StackConfig) -> list[str]:
    """A line per service this call started on another port than the one asked for (busy)."""
    asked = {"prefect": config.prefect_port, "mlflow": config.mlflow_port, "ray": config.ray_port}
    notes = []
    for name in state.started:
        rec = state.services[name]
        want = asked.get(name)
        if want and rec.port is not None and rec.port != want:
            notes.append(
                f"note: port {want} was busy, so {name} listens on port {rec.port}; clients find "
                f'it through the exported variables (`eval "$(python -m flows.stack env)"`)'
            )
    return notes


def _env_notes(home: Path, records: Mapping[str, ServiceRecord]) -> list[str]:
    """Why `env` exports no server, or one that does not answer (a client would silently start a
    temporary Prefect server instead)."""
    if not records:
        return [f"note: no services recorded in {home}: start them with `python -m flows.stack up`"]
    return [
        f"note: {name} at {rec.url} does not answer: restart with `python -m flows.stack up`"
        for name, rec in records.items()
        if not _healthy(rec)
    ]


def _exports(env: Mapping[str, str]) -> str:
    import shlex

    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.stack",
        description="Start/stop the local Prefect, MLflow (and optional worker, Ray head) services.",
    )
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument(
        "--home", type=Path, default=None, help="state dir (default $FFSPLIT_HOME or ./.ffsplit)"
    )
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--no-prefect", action="store_true", help="do not start a Prefect server")
    parser.add_argument("--no-mlflow", action="store_true", help="do not start an MLflow server")
    parser.add_argument("--worker", action="store_true", help="also a process work pool + worker")
    parser.add_argument("--pool", default=DEFAULT_POOL, help="work pool name for --worker")
    parser.add_argument("--ray-head", action="store_true", help="also a local `ray start --head`")
    parser.add_argument("--ray-num-cpus", type=int, default=None)
    parser.add_argument("--ray-num-gpus", type=int, default=None)
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--ray-port", type=int, default=6379)
    parser.add_argument("--timeout", type=float, default=180.0, help="readiness timeout, seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry: `up` prints `export ...` lines on stdout (eval them) and a summary on stderr."""
    args = _parser().parse_args(argv)
    home = (args.home or default_home()).expanduser().resolve()
    try:
        if args.command == "up":
            config = StackConfig(
                home=home,
                host=args.host,
                prefect=not args.no_prefect,
                mlflow=not args.no_mlflow,
                worker=args.worker,
                ray_head=args.ray_head,
                prefect_port=args.prefect_port,
                mlflow_port=args.mlflow_port,
                ray_port=args.ray_port,
                pool=args.pool,
                ray_num_cpus=args.ray_num_cpus,
                ray_num_gpus=args.ray_num_gpus,
                timeout_s=args.timeout,
            )
            state = start_stack(config)
            for name, rec in state.services.items():
                how = (
                    "external"
                    if rec.external
                    else (
                        f"started in {rec.startup_s} s"
                        if name in state.started
                        else "already running"
                    )
                )
                print(f"{name}: {rec.url} ({how}; log {rec.log})", file=sys.stderr)
            for line in _port_notes(state, config):
                print(line, file=sys.stderr)
            print(_exports(state.env()))
        elif args.command == "down":
            stopped = stop_stack(home)
            print(f"stopped: {', '.join(stopped) or 'nothing'}", file=sys.stderr)
        elif args.command == "status":
            print(json.dumps(stack_status(home), indent=2))
        else:
            records = load_records(home)
            for line in _env_notes(home, records):
                print(line, file=sys.stderr)
            print(_exports(StackState(home=home, services=records).env()))
    except FFSplitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
