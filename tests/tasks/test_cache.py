"""Content-hash keys: equal inputs give equal keys, any changed input (or code) another key."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from ffsplit.errors import FFSplitError
from tasks import cache

PROFILE = {"tokens": 512, "window": 64}
SHA = "ab" * 32


def test_keys_are_deterministic_and_sensitive_to_every_input() -> None:
    key = cache.unit_stats_key(SHA, PROFILE, 0, 4)
    assert key == cache.unit_stats_key(SHA, dict(reversed(list(PROFILE.items()))), 0, 4)
    assert len(key) == 64 and int(key, 16) >= 0
    others = {
        cache.unit_stats_key("cd" * 32, PROFILE, 0, 4),
        cache.unit_stats_key(SHA, {**PROFILE, "tokens": 1024}, 0, 4),
        cache.unit_stats_key(SHA, PROFILE, 1, 4),
        cache.unit_stats_key(SHA, PROFILE, 0, 2),
        cache.unit_stats_key(SHA, PROFILE, 0, 4, "layer_groups", 2),
    }
    assert key not in others and len(others) == 5
    recipe = {"method": "lowrank", "heavy_ratio": 0.1}
    shard = cache.shard_key(SHA, "s" * 64, recipe, [0, 1])
    assert shard == cache.shard_key(SHA, "s" * 64, recipe, [1, 0])  # a set of layers
    assert shard != cache.shard_key(SHA, None, recipe, [0, 1])
    assert shard != cache.shard_key(SHA, "s" * 64, {**recipe, "heavy_ratio": 0.2}, [0, 1])
    assert shard != cache.shard_key(SHA, "s" * 64, recipe, [0, 1, 2])
    assert cache.variant_key(SHA, ["a", "b"]) != cache.variant_key(SHA, ["b", "a"])
    assert cache.merged_stats_key(["a", "b"]) != cache.merged_stats_key(["b", "a"])
    assert cache.eval_key("v", {"max_tokens": 1}) != cache.eval_key("v", {"max_tokens": 2})
    # kinds never collide even on equal parts
    assert cache.content_key("stats", x=1) != cache.content_key("shard", x=1)


def test_code_version_follows_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "ffsplit_cache_probe.py"
    module.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cache.CODE, "probe", ("ffsplit_cache_probe",))
    cache.code_version.cache_clear()
    first = cache.content_key("probe", a=1)
    module.write_text("X = 2\n")
    cache.code_version.cache_clear()
    second = cache.content_key("probe", a=1)
    cache.code_version.cache_clear()
    assert first != second
    sys.modules.pop("ffsplit_cache_probe", None)


def test_every_kind_resolves_its_modules() -> None:
    for kind in cache.CODE:
        assert len(cache.code_version(kind)) == 64
    with pytest.raises(FFSplitError, match="unknown artifact kind"):
        cache.code_version("nope")


def test_non_json_inputs_are_refused() -> None:
    with pytest.raises(FFSplitError, match="plain JSON"):
        cache.content_key("stats", bad=object())
    with pytest.raises(FFSplitError, match="plain JSON"):
        cache.content_key("stats", bad=float("nan"))


def test_cache_root_from_argument_env_or_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cache.cache_root(tmp_path / "x") == (tmp_path / "x").resolve()
    monkeypatch.setenv("FFSPLIT_HOME", str(tmp_path / "home"))
    assert cache.cache_root() == (tmp_path / "home" / "cache").resolve()
    monkeypatch.delenv("FFSPLIT_HOME")
    monkeypatch.chdir(tmp_path)
    assert cache.cache_root() == (tmp_path / ".ffsplit" / "cache").resolve()


def test_read_json_treats_missing_or_corrupt_as_absent(tmp_path: Path) -> None:
    assert cache.read_json(tmp_path / "none.json") is None
    (tmp_path / "bad.json").write_text('{"truncated": ')
    assert cache.read_json(tmp_path / "bad.json") is None
    (tmp_path / "list.json").write_text("[1]")
    assert cache.read_json(tmp_path / "list.json") is None
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert cache.read_json(tmp_path / "ok.json") == {"a": 1}


def test_stale_temps_of_killed_runs_are_removed_young_ones_kept(tmp_path: Path) -> None:
    old_file = tmp_path / "stats" / "units" / ".abc.safetensors.x1.tmp"
    old_dir = tmp_path / "shards" / ".def.x2.tmp"
    young = tmp_path / "shards" / ".ghi.x3.tmp"
    done = tmp_path / "shards" / "finished"
    for folder in (old_dir, young, done):
        folder.mkdir(parents=True)
    old_file.parent.mkdir(parents=True)
    old_file.write_text("half")
    past = time.time() - 7200
    for path in (old_file, old_dir):
        os.utime(path, (past, past))
    assert cache.remove_stale_temps(tmp_path, older_than_s=3600) == 2
    assert not old_file.exists() and not old_dir.exists()
    assert young.exists() and done.exists()
    assert cache.remove_stale_temps(tmp_path / "missing") == 0


def _entry(root: Path, kind: str, name: str, size: int, age_s: float) -> Path:
    """A fake cache entry (a folder with one file, or a file) last used age_s ago."""
    path = root / kind / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind in ("evals", "stats/units", "plots"):
        path.write_bytes(b"x" * size)
    else:
        path.mkdir()
        (path / "data.safetensors").write_bytes(b"x" * size)
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def test_prune_removes_least_recently_used_entries_down_to_the_size(tmp_path: Path) -> None:
    oldest = _entry(tmp_path, "variants", "a", 4000, 30 * 3600)
    shard = _entry(tmp_path, "shards", "b", 3000, 20 * 3600)
    units = _entry(tmp_path, "stats/units", "c.safetensors", 2000, 10 * 3600)
    recent = _entry(tmp_path, "evals", "d.json", 1000, 60)  # used a minute ago: a live run's
    (tmp_path / "variants" / ".e.x1.tmp").mkdir()  # a run's temp folder: never an entry
    assert {e.path for e in cache.entries(tmp_path)} == {oldest, shard, units, recent}
    assert sum(e.bytes for e in cache.entries(tmp_path)) == 10000

    planned = cache.prune(tmp_path, max_bytes=4000, dry_run=True)
    assert [e.path for e in planned.removed] == [oldest, shard]
    assert oldest.exists() and shard.exists()  # dry run: nothing touched

    report = cache.prune(tmp_path, max_bytes=4000)
    assert [e.path for e in report.removed] == [oldest, shard]
    assert report.freed_bytes == 7000 and report.kept_bytes == 3000
    assert not oldest.exists() and not shard.exists() and units.exists() and recent.exists()
    assert not list((tmp_path / "variants").glob(".a.*"))  # the renamed folder is gone too

    # below the size of what was used within the hour: kept, and said so
    report = cache.prune(tmp_path, max_bytes=0)
    assert [e.path for e in report.removed] == [units]
    assert recent.exists() and report.kept_bytes == 1000 and report.recent_bytes == 1000
    assert cache.prune(tmp_path, max_bytes=0, min_idle_s=0).removed[0].path == recent
    with pytest.raises(FFSplitError, match="max_bytes must be >= 0"):
        cache.prune(tmp_path, max_bytes=-1)


def test_mark_used_makes_an_entry_recent_and_skips_absent_ones(tmp_path: Path) -> None:
    old = _entry(tmp_path, "variants", "a", 10, 30 * 3600)
    other = _entry(tmp_path, "variants", "b", 10, 20 * 3600)
    cache.mark_used(old, None, tmp_path / "variants" / "missing")
    assert time.time() - old.stat().st_mtime < 60
    assert [e.path for e in cache.prune(tmp_path, max_bytes=10, min_idle_s=0).removed] == [other]
