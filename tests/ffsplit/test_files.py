"""ffsplit/files.py: atomic writes whose temporaries name their writer, stale ones swept only when
their writer is provably gone, no-replace publishing (one of two racing writers wins whole),
output paths checked before any work, and strict JSON (issue 16)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from ffsplit.errors import FFSplitError
from ffsplit.files import (
    atomic_dir,
    atomic_path,
    check_output_path,
    claim_output,
    parse_json_strict,
    rename_noreplace,
    sweep_stale_temps,
    temp_name,
)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temp_names_carry_the_writers_pid():
    name = temp_name("variant")
    assert name.startswith(f".variant.{os.getpid()}-") and name.endswith(".tmp")
    assert temp_name("variant") != name


def test_sweep_removes_only_temporaries_of_dead_writers(tmp_path):
    target = tmp_path / "variant"
    dead = tmp_path / f".variant.{dead_pid()}-0123abcd.tmp"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".variant.{os.getppid()}-0123abcd.tmp"  # our parent: alive
    live.mkdir()
    mine = tmp_path / temp_name("variant")
    mine.write_text("in progress")
    other = tmp_path / ".variant.notapid.tmp"  # not a name temp_name makes: never touched
    other.write_text("?")
    unrelated = tmp_path / f".other.{dead_pid()}-0123abcd.tmp"
    unrelated.write_text("another target's")
    assert sweep_stale_temps(target) == [dead]
    assert not dead.exists() and live.exists() and mine.exists()
    assert other.exists() and unrelated.exists()


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_of_two_racing_writers_one_wins_whole(tmp_path):
    target = tmp_path / "variant"
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def writer(tag: str) -> None:
        try:
            with atomic_dir(target) as tmp:
                (tmp / "who").write_text(tag)
                barrier.wait()  # both temp folders complete before either publishes
            outcomes.append(f"won {tag}")
        except FileExistsError:
            outcomes.append("lost")

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o.split()[0] for o in outcomes) == ["lost", "won"]
    winner = next(o for o in outcomes if o.startswith("won")).split()[1]
    assert (target / "who").read_text() == winner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["variant"]  # no temp left


def test_rename_noreplace_never_replaces(tmp_path):
    (tmp_path / "a").write_text("new")
    (tmp_path / "b").write_text("old")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "old"
    (tmp_path / "d").mkdir()
    (tmp_path / "e").mkdir()  # an empty folder: plain rename(2) would replace it
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "d", tmp_path / "e")
    rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").read_text() == "new" and not (tmp_path / "a").exists()


def test_atomic_path_can_refuse_to_replace(tmp_path):
    target = tmp_path / "stats.safetensors"
    target.write_text("first")
    with pytest.raises(FileExistsError), atomic_path(target, replace=False) as tmp:
        tmp.write_text("second")
    assert target.read_text() == "first" and len(list(tmp_path.iterdir())) == 1
    with atomic_path(target) as tmp:
        tmp.write_text("second")
    assert target.read_text() == "second"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "f").write_text("x") and d / "f" / "out", "is a file, not a folder"),
        (lambda d: (d / "link").symlink_to(d / "none") or d / "link", "a dangling symlink"),
        (lambda d: (d / "link").symlink_to(d / "none") or d / "link" / "out", "dangling symlink"),
        (lambda d: (d / "there").mkdir() or d / "there", "already exists"),
        (lambda d: d / ("n" * 300), "the name is 300 bytes"),
        (lambda d: d.joinpath(*["p" * 200] * 25), "bytes long; paths must stay under"),
        (lambda d: d / "a\nb", r"'.*/a\\nb': control characters"),
    ],
)
def test_output_paths_are_refused_before_any_work(tmp_path, make, message):
    path = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(FFSplitError, match=message) as error:
        check_output_path(path)
    assert "\n" not in str(error.value)
    assert sorted(tmp_path.rglob("*")) == before


def test_a_good_output_path_sweeps_dead_temporaries(tmp_path):
    stale = tmp_path / f".out.{dead_pid()}-deadbeef.tmp"
    stale.mkdir()
    assert check_output_path(tmp_path / "new" / "deeper" / "out") == tmp_path / "new/deeper/out"
    assert check_output_path(tmp_path / "out") == tmp_path / "out"
    assert not stale.exists()


def test_an_output_is_claimed_by_one_run_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setenv("FFSPLIT_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "out"
    with claim_output(target):
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from ffsplit.files import claim_output\n"
                "try:\n    with claim_output(sys.argv[1]): pass\n"
                "except Exception as e: print(e)",
                str(target),
            ],
            capture_output=True,
            text=True,
            env={**os.environ},
            check=True,
        )
        assert f"another ffsplit run (pid {os.getpid()}) is writing it" in child.stdout
    with claim_output(target):  # released: claimable again
        pass
    assert list((tmp_path / "cache" / "locks").iterdir()) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b'{"a": -Infinity}', "-Infinity is not a JSON number"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'\xff{"a": 1}', "not UTF-8 text"),
        (b'{"a": ', "invalid or truncated JSON"),
    ],
)
def test_strict_json_means_one_thing(text, message):
    with pytest.raises(FFSplitError, match=message):
        parse_json_strict(text, "x.json")
    assert parse_json_strict(b'{"a": [1, 2.5, "x", null]}', "x.json") == {"a": [1, 2.5, "x", None]}
