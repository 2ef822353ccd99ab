"""cluster/: the Ray cluster configs parse, have a head and a GPU worker group, pin the project's Ray
and Python, and carry the same service env as services/stack.py; the local cluster script works."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import psutil
import pytest
import yaml

from services.stack import SERVICE_ENV, free_port, ray_runtime_env

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"


def _pinned_ray_version() -> str:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = [
        d for d in pyproject["project"]["optional-dependencies"]["pipeline"] if d.startswith("ray")
    ]
    assert len(pins) == 1, pins
    return pins[0].split("==")[1]


def _assignments(text: str) -> dict[str, str]:
    """NAME=value pairs in shell text (export lines, env prefixes, quoted echo lines)."""
    return dict(re.findall(r"\b([A-Z][A-Z0-9_]*)=([^\s'\";]+)", text))


def _load(name: str) -> dict:
    data = yaml.safe_load((CLUSTER / name).read_text())
    assert isinstance(data, dict)
    return data


def test_runtime_env_is_the_service_env(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime_env = _load("runtime_env.yaml")
    assert runtime_env == {"env_vars": SERVICE_ENV}  # no working_dir upload: nodes install the code
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    env_vars = ray_runtime_env()["env_vars"]
    assert env_vars == {**SERVICE_ENV, "MLFLOW_TRACKING_URI": "http://10.0.0.5:5000"}


def test_ray_up_config_has_cpu_head_and_gpu_workers() -> None:
    config = _load("ray-cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] >= 1
    gpu_groups = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_groups, "no worker group requests GPUs"
    # >= 1 GPU node up: flows request GPUs only when the cluster already has some.
    assert all(1 <= t["min_workers"] <= t["max_workers"] for t in gpu_groups.values())
    version = _pinned_ray_version()
    images = [config["docker"]["head_image"], config["docker"]["worker_image"]]
    assert all(
        image == f"rayproject/ray:{version}-py311-{kind}"
        for image, kind in zip(images, ["cpu", "gpu"], strict=True)
    )
    assert "gpu" in config["docker"]["worker_image"]
    setup = " ; ".join(config["setup_commands"])
    assert SERVICE_ENV.items() <= _assignments(setup).items()
    assert "[pipeline]" in setup  # nodes import ffsplit/tasks by reference
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert _assignments(start)["RAY_USAGE_STATS_ENABLED"] == "0"
        assert _assignments(start)["RAY_AUTH_MODE"] == "token"
        assert "--disable-usage-stats" in start
    assert ".venv" in config["rsync_exclude"] and ".ffsplit" in config["rsync_exclude"]


def test_ray_up_config_passes_rays_own_schema() -> None:
    """What `ray up` does before touching the cloud: fill in defaults, validate against its schema."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(_load("ray-cluster.yaml")))


def test_kuberay_manifest_has_head_and_gpu_group() -> None:
    manifest = _load("kuberay-raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    spec = manifest["spec"]
    assert spec["rayVersion"] == _pinned_ray_version()
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["disable-usage-stats"] == "true"
    containers = list(head["template"]["spec"]["containers"])
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            containers.append(container)
            gpus = container["resources"]["limits"].get("nvidia.com/gpu", 0)
            if gpus:
                assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
                assert group["rayStartParams"]["num-gpus"] == str(gpus)
                assert 1 <= group["minReplicas"] <= group["maxReplicas"]
                gpu_groups.append(group["groupName"])
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    for container in containers:
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert SERVICE_ENV.items() <= env.items(), container["name"]
        assert env["RAY_AUTH_MODE"] == "token"
        assert container["image"].endswith("ffsplit-ray:0.1.0")


def test_dockerfile_pins_ray_and_sets_the_service_env() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{_pinned_ray_version()}-py311-gpu" in text
    env_block = re.search(r"^ENV (.*?)(?:\n\n|\Z)", text, re.S | re.M).group(1).replace("\\\n", " ")
    assert _assignments(env_block) == SERVICE_ENV


def test_local_cluster_script_is_executable_and_parses() -> None:
    script = CLUSTER / "start_local_cluster.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(script)], check=True)
    exports = {}
    for line in script.read_text().splitlines():
        if line.startswith("export "):
            exports.update(_assignments(line))
    assert exports == SERVICE_ENV
    usage = subprocess.run([str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


@pytest.mark.pipeline
@pytest.mark.slow
def test_local_cluster_script_start_task_stop(tmp_path: Path) -> None:
    """A head and one worker node: a task pinned to the worker runs; stop leaves no process."""
    script = str(CLUSTER / "start_local_cluster.sh")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(FFSPLIT_HOME=str(tmp_path), RAY_PORT=str(free_port()))
    state = tmp_path / "local-cluster"
    try:
        up = subprocess.run(
            [script, "start", "1"], env=env, capture_output=True, text=True, timeout=300
        )
        assert up.returncode == 0, up.stderr[-3000:]
        client = _assignments(up.stdout)
        assert client["RAY_AUTH_MODE"] == "token"
        pgids = [int(p) for p in (state / "pgids").read_text().split()]
        temp_dir = Path((state / "temp_dir").read_text().strip())
        code = (
            "import ray; ray.init()\n"
            "@ray.remote(resources={'worker_0': 1})\n"
            "def where(): return ray.get_runtime_context().get_node_id()\n"
            "worker = [n['NodeID'] for n in ray.nodes() if 'worker_0' in n['Resources']]\n"
            "print(len(ray.nodes()), [ray.get(where.remote())] == worker)"
        )
        run = subprocess.run(
            [sys.executable, "-c", code],
            env={**env, **client},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.split()[-2:] == ["2", "True"]  # head + worker; the task ran on the worker
    finally:
        down = subprocess.run(
            [script, "stop"], env=env, capture_output=True, text=True, timeout=120
        )
    assert down.returncode == 0, down.stderr
    assert not state.exists() and not temp_dir.exists()
    left = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) in pgids and proc.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(proc.pid)
    assert left == []
