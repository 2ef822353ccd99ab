"""Suite-wide: slow-tier tests get a longer per-test timeout than the default tier's 600 s."""

from __future__ import annotations

import pytest

SLOW_TIMEOUT_S = 2400


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
