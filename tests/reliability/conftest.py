"""Shared by the reliability tests: small real inputs, a CLI runner, and the outcome collector.

Inputs are real files: tiny random Llama folders saved with safetensors (one without tokenizer, one
with SmolLM2's real tokenizer), a text file, statistics profiled on the tiny model and a variant
compressed from it. Every test records what it tried and what happened (`record`); after a complete
run of tests/reliability the outcomes are rendered into docs/reliability.md by
scripts/reliability_report.py (a partial run, e.g. with -k, only writes the JSON beside its temp
files and leaves the page alone).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
DOC = REPO_ROOT / "docs" / "reliability.md"
OUTCOMES_JSON = "reliability-outcomes.json"
# The CLI's environment: offline, never pip-installs, wide unstyled stderr (one line stays one).
CLI_ENV = {
    "HF_HUB_OFFLINE": "1",
    "FFSPLIT_NO_INSTALL": "1",
    "COLUMNS": "400",
    "TERM": "dumb",
    "NO_COLOR": "1",
    "FFSPLIT_PROGRESS": "0",
}
CLI_TIMEOUT_S = 300


# ------------------------------------------------------------------------------ outcome collector


@dataclass
class Outcome:
    """One row of the reliability table."""

    nodeid: str
    kind: str  # bad-input, fault, security, property (scripts/reliability_report.SECTIONS)
    area: str
    what: str
    command: str = ""
    exit_code: int | None = None
    message: str = ""
    nothing_written: bool | None = None
    injected: str = ""  # faults: how the fault was injected
    expected: str = ""  # faults: what must happen
    result: str = "not run"

    def observe(self, text: str) -> None:
        """Set what was observed (faults record their row first, so a failure still shows it)."""
        self.message = normalise(text)


@dataclass
class _Session:
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # by node id, in test order
    collected: set[str] = field(default_factory=set)
    modules: set[str] = field(default_factory=set)
    deselected: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)
    tmp_roots: list[Path] = field(default_factory=list)
    basetemp: Path | None = None
    written: tuple[Path, Path | None] | None = None


_SESSION = _Session()
_HEX = re.compile(r"\b(?=[0-9]*[a-f])[0-9a-f]{12,64}\b")  # a digest, not a long decimal


def normalise(text: str) -> str:
    """Machine-independent text for the page: temp folders as <tmp>, digests as <sha256>."""
    roots = [*_SESSION.tmp_roots, *([_SESSION.basetemp] if _SESSION.basetemp else [])]
    for root in sorted(roots, key=lambda r: len(str(r)), reverse=True):  # innermost first
        text = text.replace(str(root), "<tmp>")
    text = text.replace(str(REPO_ROOT), "<repo>").replace(str(Path.home()), "~")
    return _HEX.sub("<sha256>", text)


def _ours(item: pytest.Item) -> bool:
    return Path(str(item.path)).resolve().parent == HERE


@pytest.fixture(scope="session", autouse=True)
def _basetemp(tmp_path_factory: pytest.TempPathFactory) -> None:
    _SESSION.basetemp = tmp_path_factory.getbasetemp()


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[..., Outcome]:
    """record(kind=, area=, what=, command=, exit_code=, message=, nothing_written=, injected=,
    expected=): one table row.

    The row's result (ok / FAILED / skipped) is filled in from the test's own outcome. Fault tests
    record their row before injecting anything and fill in what they saw with Outcome.observe.
    """

    def add(**fields: Any) -> Outcome:
        clean = {k: normalise(v) if isinstance(v, str) else v for k, v in fields.items()}
        outcome = Outcome(nodeid=request.node.nodeid, **clean)
        _SESSION.outcomes[outcome.nodeid] = outcome
        return outcome

    return add


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Remember what was collected before -k / -m deselect anything."""
    ours = [item for item in items if _ours(item)]
    _SESSION.collected = {item.nodeid for item in ours}
    _SESSION.modules = {Path(str(item.path)).name for item in ours}


def pytest_deselected(items: Sequence[pytest.Item]) -> None:
    _SESSION.deselected |= {item.nodeid for item in items if _ours(item)}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = (yield).get_result()
    outcome = _SESSION.outcomes.get(item.nodeid)
    if outcome is not None:
        if report.when == "call":
            outcome.result = "ok" if report.passed else "skipped" if report.skipped else "FAILED"
        elif report.failed:
            outcome.result = "FAILED"


def pytest_runtest_logfinish(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _SESSION.finished.add(nodeid)


def _complete_run(config: pytest.Config) -> bool:
    """Every reliability test of every module ran (no -k/-m deselection, no node-id subset)."""
    modules = {p.name for p in HERE.glob("test_*.py")}
    by_node_id = any("::" in str(arg) for arg in config.args)
    return (
        bool(_SESSION.collected)
        and _SESSION.modules == modules
        and not _SESSION.deselected
        and not by_node_id
        and _SESSION.collected <= _SESSION.finished
        and all(outcome.result != "not run" for outcome in _SESSION.outcomes.values())
    )


def _renderer() -> Any:
    spec = importlib.util.spec_from_file_location(
        "reliability_report", REPO_ROOT / "scripts" / "reliability_report.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Outcomes to JSON (always) and to docs/reliability.md (after a complete run only)."""
    if not _SESSION.outcomes or _SESSION.basetemp is None:
        return
    rows = [
        {k: v for k, v in asdict(o).items() if k != "nodeid"} for o in _SESSION.outcomes.values()
    ]
    json_path = _SESSION.basetemp / OUTCOMES_JSON
    json_path.write_text(json.dumps(rows, indent=1) + "\n")
    doc = None
    if _complete_run(session.config):
        renderer = _renderer()
        page = renderer.render(rows)
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != page:
            renderer.write_atomic(DOC, page)
        doc = DOC
    _SESSION.written = (json_path, doc)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _SESSION.written is None:
        return
    json_path, doc = _SESSION.written
    where = f"{doc} regenerated" if doc else f"{DOC} left alone (partial run)"
    terminalreporter.write_line(f"reliability: {len(_SESSION.outcomes)} outcomes; {where}")


# ---------------------------------------------------------------------------------- CLI runner


@dataclass(frozen=True)
class CliResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    @property
    def command(self) -> str:
        return "ffsplit " + " ".join(self.args)


def ffsplit_command() -> list[str]:
    """The installed console script beside this interpreter, else `python -m ffsplit.cli`."""
    script = Path(sys.executable).with_name("ffsplit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ffsplit.cli"]


def run_cli(
    args: Sequence[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = CLI_TIMEOUT_S,
    prefix: Sequence[str] = (),
) -> CliResult:
    """Run `ffsplit ARGS` in a subprocess (never a shell) and capture everything; prefix: a
    command that runs it (e.g. in a private mount namespace)."""
    started = time.perf_counter()
    done = subprocess.run(
        [*prefix, *ffsplit_command(), *args],
        cwd=cwd,
        env={**os.environ, **CLI_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return CliResult(
        tuple(args), done.returncode, done.stdout, done.stderr, time.perf_counter() - started
    )


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under folder (hidden ones too) with its size and mtime: 'nothing written' checks."""
    out = {}
    for path in sorted(folder.rglob("*")):
        stat = path.lstat()
        out[str(path.relative_to(folder))] = (
            stat.st_size if path.is_file() else -1,
            stat.st_mtime_ns,
        )
    return out


@pytest.fixture(scope="session")
def cli() -> Callable[..., CliResult]:
    """cli(args, cwd, env=None): the real `ffsplit` in a subprocess (see run_cli)."""
    return run_cli


@pytest.fixture(scope="session")
def cli_launch() -> tuple[list[str], dict[str, str]]:
    """(argv prefix that runs `ffsplit`, its environment): for tests that start it themselves."""
    return ffsplit_command(), {**os.environ, **CLI_ENV}


@pytest.fixture(scope="session")
def snap() -> Callable[[Path], dict[str, tuple[int, int]]]:
    """snap(folder): everything under folder, to prove a failed command wrote nothing."""
    return snapshot


# ------------------------------------------------------------------------------------- inputs

TINY_HIDDEN, TINY_FFN, TINY_LAYERS = 16, 48, 2


@dataclass(frozen=True)
class Inputs:
    """Good inputs that the bad ones are made from (all in one session temp folder)."""

    root: Path
    notok: Path  # tiny Llama (vocab 160), no tokenizer files
    tok: Path  # tiny Llama with SmolLM2's tokenizer (vocab 49152, hidden 16)
    text: Path  # a plain UTF-8 text file, a few thousand tokens
    stats: Path  # statistics of `notok` (random token ids), model_sha256 recorded
    variant: Path  # a lowrank variant of `notok` (no tokenizer)
    variant_tok: Path  # a lowrank variant of `tok` (with tokenizer; for eval --latency)


def _save_tiny_llama(folder: Path, vocab: int | None = None, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from ffsplit.models.tiny import tiny_model

    if vocab is None:
        model, _ = tiny_model("LlamaForCausalLM", seed=seed)
    else:
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=TINY_HIDDEN,
            intermediate_size=TINY_FFN,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
        config.architectures = ["LlamaForCausalLM"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _profile_random(model_dir: Path, out: Path, vocab: int) -> Path:
    """Statistics of a tokenizer-free model on random token ids (profiling needs no text)."""
    from ffsplit.config import ProfileConfig
    from ffsplit.models.loading import load_model
    from ffsplit.profiling import profile_model, save_stats

    model, _, ref = load_model(model_dir)
    ids = torch.randint(0, vocab, (8, 16), generator=torch.Generator().manual_seed(0))
    config = ProfileConfig(tokens=128, window=16, batch_size=4, hit_top_fraction=0.05)
    stats = profile_model(model, ids, config, meta={"model_sha256": ref.weights_sha256})
    return save_stats(stats, out)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    from transformers import AutoTokenizer

    from ffsplit.config import Recipe
    from ffsplit.jobs import compress_job
    from ffsplit.models.registry import materialize
    from ffsplit.models.tiny import VOCAB

    root = tmp_path_factory.mktemp("reliability")
    _SESSION.tmp_roots.append(root)
    notok = _save_tiny_llama(root / "tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(
        str(materialize("smollm2-135m")), local_files_only=True
    )
    tok = _save_tiny_llama(root / "tiny-llama-tok", vocab=len(tokenizer))
    tokenizer.save_pretrained(str(tok))
    text = root / "text.txt"
    text.write_text(
        "\n\n".join(
            f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(300)
        ),
        encoding="utf-8",
    )
    stats = _profile_random(notok, root / "tiny-llama.stats.safetensors", VOCAB)
    recipe = Recipe(method="lowrank", heavy_ratio=0.1, ffn_reduction=0.3)
    variant = Path(compress_job(notok, recipe, root / "variant", stats_path=stats)["path"])
    stats_tok = _profile_random(tok, root / "tiny-llama-tok.stats.safetensors", len(tokenizer))
    variant_tok = Path(
        compress_job(tok, recipe, root / "variant-tok", stats_path=stats_tok)["path"]
    )
    return Inputs(root, notok, tok, text, stats, variant, variant_tok)
