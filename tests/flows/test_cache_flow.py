"""flows/cache.py: the cache's size per kind, pruning as a Prefect flow run and from the CLI."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flows.cache import main, prune_cache, usage


def _entries(root: Path) -> tuple[Path, Path, Path]:
    old = root / "variants" / "old"
    mid = root / "shards" / "mid"
    new = root / "evals" / "new.json"
    for folder in (old, mid):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"x" * 3000)
    new.parent.mkdir(parents=True)
    new.write_bytes(b"x" * 1000)
    for path, hours in ((old, 48), (mid, 24), (new, 2)):
        when = time.time() - hours * 3600
        os.utime(path, (when, when))
    return old, mid, new


def test_prune_flow_run_keeps_the_most_recently_used(pipeline_env: dict) -> None:
    old, mid, new = _entries(pipeline_env["cache"])
    assert usage()["bytes"] == 7000 and usage()["kinds"]["variants"]["entries"] == 1
    summary = prune_cache(max_gb=4500 / 1e9)  # a flow run against the test's Prefect server
    assert [r["path"] for r in summary["removed"]] == [str(old)]
    assert summary["freed_bytes"] == 3000 and summary["kept_bytes"] == 4000
    assert not old.exists() and mid.exists() and new.exists()


def test_cli_shows_prunes_and_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], own_lines: Callable[[str], list[str]]
) -> None:
    root = tmp_path / "cache"
    old, mid, new = _entries(root)
    assert main(["show", "--cache-dir", str(root)]) == 0
    shown = capsys.readouterr().out
    assert "variants" in shown and "compressed shards" in shown and "total" in shown
    assert main(["prune", "--max-gb", "0", "--dry-run", "--cache-dir", str(root)]) == 0
    assert "would free 0.00 GB in 3 entries" in capsys.readouterr().out
    assert old.exists() and mid.exists() and new.exists()
    assert main(["prune", "--max-gb", "0.000001", "--cache-dir", str(root)]) == 0
    assert not old.exists() and not mid.exists() and new.exists()
    assert main(["prune", "--max-gb", "-1", "--cache-dir", str(root)]) == 2
    [line] = own_lines(capsys.readouterr().err)
    assert "max_gb must be a number >= 0, got -1.0" in line
    assert main(["show", "--cache-dir", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
