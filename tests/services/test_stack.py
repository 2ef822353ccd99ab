"""services/stack.py: real Prefect / MLflow / Ray processes started, checked and stopped (no mocks)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from ffsplit.errors import FFSplitError
from services.stack import (
    CLIENT_VARS,
    SERVICE_ENV,
    TOKEN_VAR,
    ServiceRecord,
    StackConfig,
    free_port,
    listening_addresses,
    load_records,
    local_stack,
    pick_port,
    port_is_free,
    service_processes,
    stack_status,
    start_stack,
    stop_stack,
)

REPO = Path(__file__).resolve().parents[2]
OUTER_VARS = (*CLIENT_VARS, "FFSPLIT_HOME")


@pytest.fixture(autouse=True)
def _no_outer_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start their own services: an exported stack (e.g. from .ci/run) would be reused."""
    for var in OUTER_VARS:
        monkeypatch.delenv(var, raising=False)


def _get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return response.status, response.read().decode()


def _assert_gone(records: dict[str, ServiceRecord]) -> None:
    for rec in records.values():
        assert service_processes(rec) == [], f"{rec.name} left processes"
        assert not psutil.pid_exists(rec.pid) or psutil.Process(rec.pid).status() == "zombie"
        if rec.name in ("prefect", "mlflow"):
            assert port_is_free("127.0.0.1", rec.port), f"{rec.name} port {rec.port} still bound"


# ------------------------------------------------------------------------- fast, no services


def test_config_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(FFSplitError, match="prefect_port"):
        StackConfig(home=tmp_path, prefect_port=70000)
    with pytest.raises(FFSplitError, match="timeout_s"):
        StackConfig(home=tmp_path, timeout_s=0)
    with pytest.raises(FFSplitError, match="pool"):
        StackConfig(home=tmp_path, pool="bad pool/name")
    with pytest.raises(FFSplitError, match="worker"):
        StackConfig(home=tmp_path, prefect=False, worker=True)


def test_pick_port_skips_busy_and_taken_ports() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert not port_is_free("127.0.0.1", port)
        other = pick_port("127.0.0.1", port)
        assert other != port and port_is_free("127.0.0.1", other)
    spare = free_port()
    assert pick_port("127.0.0.1", spare) == spare
    assert pick_port("127.0.0.1", spare, taken={spare}) != spare


def test_unreachable_external_prefect_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    with pytest.raises(FFSplitError, match=f"PREFECT_API_URL={url} is not reachable"):
        start_stack(StackConfig(home=tmp_path, mlflow=False))
    assert load_records(tmp_path) == {}


def test_record_round_trip_and_unknown_keys() -> None:
    rec = ServiceRecord(name="mlflow", url="http://127.0.0.1:5000", port=5000, pid=1, pgid=1)
    assert ServiceRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
    with pytest.raises(FFSplitError, match="unknown service keys"):
        ServiceRecord.from_dict({**rec.to_dict(), "colour": "red"})


def test_stop_kills_group_and_escaped_children_but_nothing_else(tmp_path: Path) -> None:
    """A service whose child left the process group (like Ray workers) is still stopped, through
    the inherited token; a process of the same kind that is not ours survives."""
    token = "t" + os.urandom(8).hex()
    escaped = tmp_path / "escaped.pid"
    # The escaped child reports its pid only after setsid() (setsid runs sh in the new session):
    # listing before that would still find it in the group. Ignores SIGTERM: needs SIGKILL.
    report = 'echo $$ > "$0.tmp" && mv "$0.tmp" "$0"; exec sleep 300'
    script = f"trap '' TERM; setsid sh -c '{report}' {shlex.quote(str(escaped))} & sleep 300 & wait"
    service = subprocess.Popen(
        ["bash", "-c", script], env={**os.environ, TOKEN_VAR: token}, start_new_session=True
    )
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        rec = ServiceRecord(name="ray", url="-", pid=service.pid, pgid=service.pid, token=token)
        deadline = time.monotonic() + 30
        while not escaped.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        escaped_pid = int(escaped.read_text())
        assert os.getpgid(escaped_pid) == escaped_pid != service.pid  # left the group
        while len(service_processes(rec)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # bash, its plain child and the escaped one
        procs = service_processes(rec)
        assert len(procs) == 3 and escaped_pid in {p.pid for p in procs}
        state = {"version": 1, "services": {"ray": rec.to_dict()}}
        (tmp_path / "stack.json").write_text(json.dumps(state))
        t0 = time.monotonic()
        assert stop_stack(tmp_path) == ["ray"]
        assert time.monotonic() - t0 < 20
        service.wait(timeout=5)
        assert service_processes(rec) == []
        assert bystander.poll() is None
        assert not (tmp_path / "stack.json").exists()
    finally:
        bystander.kill()
        bystander.wait()
        if service.poll() is None:
            os.killpg(service.pid, signal.SIGKILL)


def test_env_without_services_says_so(tmp_path: Path) -> None:
    """`env` on a state dir with nothing recorded exports only the offline settings and says why
    (a Prefect client would otherwise start a temporary server without a word)."""
    env = _cli("env", "--home", str(tmp_path), timeout=60)
    assert env.returncode == 0, env.stderr
    assert "PREFECT_API_URL" not in env.stdout and "export HF_HUB_OFFLINE=1" in env.stdout
    assert env.stderr.strip() == (
        f"note: no services recorded in {tmp_path.resolve()}: start them with "
        "`python -m flows.stack up`"
    )


# ---------------------------------------------------------------------------- real services

MLFLOW_LOG = textwrap.dedent(
    """
    import mlflow, pathlib, sys
    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return pathlib.Path(context.artifacts["weights"]).read_text()
    weights = pathlib.Path(sys.argv[1])
    weights.write_text("split-ffn-weights")
    mlflow.set_experiment("stack-test")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="m", python_model=Echo(), artifacts={"weights": str(weights)},
            registered_model_name="stack-test-model")
    mlflow.MlflowClient().set_registered_model_alias(
        "stack-test-model", "champion", info.registered_model_version)
    weights.unlink()
    """
)
MLFLOW_LOAD = (
    "import mlflow; print(mlflow.pyfunc.load_model('models:/stack-test-model@champion')"
    ".predict([0]))"
)


def _run_python(code: str, env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.pipeline
def test_prefect_and_mlflow_lifecycle(tmp_path: Path) -> None:
    """Start both servers, check health, loopback binding, the env, a model registered and loaded
    by alias from fresh processes; after the context, no process is left and ports are free."""
    home = tmp_path / "state"
    config = StackConfig(home=home, prefect_port=0, mlflow_port=0, timeout_s=240)
    with local_stack(config) as stack:
        records = load_records(home)
        assert set(records) == {"prefect", "mlflow"} == set(stack.started)
        prefect, mlflow = records["prefect"], records["mlflow"]
        assert _get(prefect.url + "/health") == (200, "true")
        assert _get(mlflow.url + "/health")[0] == 200
        for rec in (prefect, mlflow):
            assert listening_addresses(rec.port) == {"127.0.0.1"}
            assert Path(rec.log).is_file() and rec.startup_s > 0
        assert os.environ["PREFECT_API_URL"] == prefect.url
        assert os.environ["MLFLOW_TRACKING_URI"] == mlflow.url
        for key, value in SERVICE_ENV.items():
            assert os.environ[key] == value
        status = stack_status(home)["services"]
        assert all(s["alive"] and s["healthy"] and s["rss_mib"] > 10 for s in status.values())
        assert (home / "mlflow.db").is_file() and (home / "prefect").is_dir()

        _run_python(MLFLOW_LOG, stack.env(), str(tmp_path / "weights.txt"))
        assert _run_python(MLFLOW_LOAD, stack.env()).strip() == "split-ffn-weights"
        assert any((home / "mlartifacts").rglob("weights.txt"))  # proxied into the state dir
    assert "PREFECT_API_URL" not in os.environ
    assert not (home / "stack.json").exists()
    _assert_gone(records)


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in OUTER_VARS}
    return subprocess.run(
        [sys.executable, "-m", "flows.stack", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


@pytest.mark.pipeline
@pytest.mark.slow
def test_cli_up_with_worker_status_down(tmp_path: Path) -> None:
    """The CLI that .ci/run uses: `up` exports the env, the worker polls the pool, `up` again
    reuses what runs, `down` leaves nothing."""
    home = str(tmp_path / "state")
    ports = ["--prefect-port", "0", "--mlflow-port", "0"]
    try:
        up = _cli("up", "--home", home, "--worker", "--pool", "stack-test", *ports)
        assert up.returncode == 0, up.stderr
        exports = dict(
            shlex.split(line)[1].split("=", 1) for line in up.stdout.splitlines() if line
        )
        assert exports["PREFECT_API_URL"].startswith("http://127.0.0.1:")
        assert {k: exports[k] for k in SERVICE_ENV} == SERVICE_ENV
        status = json.loads(_cli("status", "--home", home).stdout)["services"]
        assert set(status) == {"prefect", "mlflow", "worker"}
        assert all(s["alive"] and s["healthy"] for s in status.values()), status
        again = _cli("up", "--home", home, "--worker", "--pool", "stack-test", *ports)
        assert again.returncode == 0 and again.stderr.count("already running") == 3
        records = load_records(Path(home))
        assert {n: r.pid for n, r in records.items()} == {n: s["pid"] for n, s in status.items()}
    finally:
        down = _cli("down", "--home", home)
    assert down.returncode == 0, down.stderr
    _assert_gone(records)
    assert _cli("status", "--home", home).stdout.count("url") == 0


@pytest.mark.pipeline
@pytest.mark.slow
def test_ray_head_runs_tasks_and_stops_cleanly(tmp_path: Path) -> None:
    """A `ray start --head` joined by a driver through RAY_ADDRESS; stopping it kills the Ray
    workers too (they leave the process group) and writes nothing to /tmp/ray."""
    address_file = Path("/tmp/ray/ray_current_cluster")
    before = address_file.read_text() if address_file.exists() else None
    config = StackConfig(
        home=tmp_path, prefect=False, mlflow=False, ray_head=True, ray_port=0, ray_num_cpus=1
    )
    with local_stack(config) as stack:
        rec = stack.services["ray"]
        code = (
            "import os, ray; ray.init(); "
            "print(ray.get(ray.remote(lambda: os.getpid()).remote()), ray.cluster_resources()['CPU'])"
        )
        worker_pid, cpus = _run_python(code, stack.env()).split()[-2:]
        assert float(cpus) == 1.0
        temp_dir = Path(rec.extra["temp_dir"])
        assert temp_dir.is_dir()
    _assert_gone({"ray": rec})
    assert not psutil.pid_exists(int(worker_pid))
    assert not temp_dir.exists()
    assert (address_file.read_text() if address_file.exists() else None) == before
