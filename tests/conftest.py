"""Suite-wide: the slow tier's longer per-test timeout, and the one embedded Ray of a session."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest

SLOW_TIMEOUT_S = 2400


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """A task body run in-process sets torch's thread count to its worker's CPUs (e.g. 1); later
    tests compare logits bitwise with fresh processes, which a changed count would break."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


# One embedded Ray per test session, shared by every package's tests. Ray lives once per process: a
# second fixture's ray_session would silently reuse the first one's instance, without its custom
# resources (tasks asking for them then wait forever). So the one instance carries all of them:
# "one_worker" / "three_workers" cap concurrency for the worker-count tests (tests/tasks).
RAY_CPUS = 3
RAY_RESOURCES = {"one_worker": 1, "three_workers": 3}


@pytest.fixture(scope="session")
def ray_embedded() -> Iterator[dict]:
    from tasks.runtime import ray_session

    with ray_session(num_cpus=RAY_CPUS, resources=RAY_RESOURCES) as info:
        yield info


# Ray's log monitor forwards raylet and worker lines ("(raylet) ...", "(pid=123) ...", maybe
# coloured) into the driver's stderr from a background thread, whenever they happen: e.g. the raylet's
# disk-space warning on a nearly full CI disk. A CLI's own error output is the rest.
_RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|gcs_server|[\w.]*\s*pid=\d+[^)]*)\)")


@pytest.fixture
def own_lines() -> Callable[[str], list[str]]:
    """Split captured stderr into lines, dropping those Ray forwarded from other processes."""

    def split(err: str) -> list[str]:
        return [line for line in err.splitlines() if not _RAY_FORWARDED.match(line)]

    return split
