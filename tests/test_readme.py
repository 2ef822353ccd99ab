"""Every command in the README works when pasted into a fresh shell, or its cheap equivalent runs.

A fresh shell is `env -i` bash with HOME and a system PATH only. Commands that take minutes (the
demo, the test suite, profiling SmolLM2) are checked for what can break without running them: the
script parses, each option the README passes is one the command takes. A bash command the README
gains that no check here knows fails test_every_readme_command_is_checked: give it a check.
The serving requests (curl) are sent to a served model in tests/tracking/test_serving.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def code_blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == language]


def commands(block: str) -> list[str]:
    """A block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def readme_commands() -> list[str]:
    return [c for block in code_blocks("bash") for c in commands(block)]


def _strip_comment(command: str) -> str:
    """The command without a trailing `# comment` (quotes respected)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return " ".join(shlex.quote(t) for t in lexer)


def fresh_shell(
    script: str, *, env: dict[str, str] | None = None, cwd: Path = REPO, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """script in a new bash with nothing inherited but HOME (and what env adds)."""
    base = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/local/bin:/usr/bin:/bin"}
    return subprocess.run(
        ["bash", "-c", script],
        env={**base, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _options(command: str) -> list[str]:
    return sorted({t.split("=", 1)[0] for t in shlex.split(command) if t.startswith("--")})


# The checks by the command's start; each README command must match one.
KNOWN = (
    "bash scripts/demo.sh",
    "bash scripts/test.sh",
    "source scripts/setup.sh",
    "ffsplit ",
    'eval "$(python -m flows.stack env)"',
    "prefect deployment ls",
    "python -m flows.stack ",
    "mlflow models serve ",
    "curl ",
)


def test_every_readme_command_is_checked() -> None:
    found = readme_commands()
    assert len(found) >= 15, found
    unknown = [c for c in found if not c.startswith(KNOWN)]
    assert not unknown, f"README commands without a check in tests/test_readme.py: {unknown}"


def test_the_two_scripts_parse_and_ci_runs_the_readme_test_command() -> None:
    first = code_blocks("bash")[0]
    assert "bash scripts/demo.sh" in first and "bash scripts/test.sh" in first
    for script in ("scripts/demo.sh", "scripts/test.sh", "scripts/setup.sh"):
        parsed = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
        assert parsed.returncode == 0, parsed.stderr
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert "exec bash scripts/test.sh" in ci  # exactly the README's test command, no options


def test_library_commands_in_a_fresh_shell(tmp_path: Path) -> None:
    """`source scripts/setup.sh` from another folder, then every `ffsplit` line of the README:
    `ffsplit models` runs; the long ones must take each option the README gives them."""
    lines = [c for c in readme_commands() if c.startswith("ffsplit ")]
    assert {c.split()[1] for c in lines} >= {"models", "profile", "compress", "eval"}
    script = [f"source {shlex.quote(str(REPO / 'scripts' / 'setup.sh'))}", "set -e"]
    script += ['echo "PATH-FFSPLIT=$(command -v ffsplit)"', "ffsplit models --json"]
    subcommands = sorted({c.split()[1] for c in lines})
    script += [f"echo '=== {sub}'; ffsplit {sub} --help" for sub in subcommands]
    done = fresh_shell("\n".join(script), env={"COLUMNS": "200"}, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"PATH-FFSPLIT={REPO / '.venv' / 'bin' / 'ffsplit'}" in done.stdout
    helps = dict(part.split("\n", 1) for part in done.stdout.split("=== ")[1:])
    for line in lines:
        sub = line.split()[1]
        missing = [o for o in _options(_strip_comment(line)) if o not in helps[sub]]
        assert not missing, f"`{line}`: `ffsplit {sub}` takes no {missing}"


def test_python_snippet_on_a_tiny_variant(tmp_path: Path) -> None:
    """The README's Python block, run as written in a fresh interpreter, on a tiny random
    variant saved where the block looks."""
    [snippet] = code_blocks("python")
    path = re.search(r'load_variant\("([^"]+)"\)', snippet).group(1)
    make = (
        "import sys, torch\n"
        "from ffsplit.adapters import get_adapter\n"
        "from ffsplit.compress.recipe import compress_model\n"
        "from ffsplit.config import ProfileConfig, Recipe\n"
        "from ffsplit.models.tiny import tiny_model\n"
        "from ffsplit.profiling import profile_model\n"
        "from ffsplit.variant import save_variant\n"
        "model, tokenizer = tiny_model('LlamaForCausalLM')  # no tokenizer: None\n"
        "ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))\n"
        "stats = profile_model(model, ids, ProfileConfig(tokens=128, window=16, batch_size=4))\n"
        "report, layers = compress_model(model, stats, Recipe())\n"
        "save_variant(model, tokenizer, sys.argv[1], adapter=get_adapter(model),\n"
        "    base_model={'name': 'tiny'}, report=report, layers=layers)\n"
    )
    subprocess.run([sys.executable, "-c", make, path], cwd=tmp_path, check=True, timeout=300)
    check = snippet + "\nprint(type(model).__name__, manifest['architecture'])\n"
    done = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["LlamaForCausalLM", "LlamaForCausalLM"]


def test_serve_command_takes_the_readme_options_and_requests_are_json() -> None:
    serve = [c for c in readme_commands() if c.startswith("mlflow models serve ")]
    curls = [c for c in readme_commands() if c.startswith("curl ")]
    assert serve and len(curls) >= 2
    done = fresh_shell(
        "source scripts/setup.sh && mlflow models serve --help", env={"COLUMNS": "200"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for command in serve:
        tokens = shlex.split(_strip_comment(command))
        flags = [t for t in tokens if t.startswith("-")]
        assert not [f for f in flags if f not in done.stdout], (flags, done.stdout[-2000:])
        assert tokens[tokens.index("--env-manager") + 1] == "local"
    for command in curls:
        payload = readme_payloads([command])[0]
        assert payload["dataframe_records"], payload


def test_python_modules_named_in_the_readme_answer_help() -> None:
    """Each `python -m flows.X` the README names (in code or in prose) exists and takes --help;
    one interpreter for all of them (they share their imports)."""
    modules = sorted(set(re.findall(r"python -m (flows\.\w+)", README.read_text())))
    assert {"flows.stack", "flows.watch", "flows.deploy"} <= set(modules), modules
    code = (
        "import runpy, sys\n"
        "for name in sys.argv[1:]:\n"
        "    sys.argv = [name, '--help']\n"
        "    try:\n"
        "        runpy.run_module(name, run_name='__main__')\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, None), (name, exc.code)\n"
        "    print('HELP-OK', name, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *modules],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split()[1] for line in done.stderr.splitlines() if line.startswith("HELP-OK")] == (
        modules
    )


def readme_payloads(curls: list[str] | None = None) -> list[dict]:
    """The JSON bodies of the README's curl requests (also sent by test_serving)."""
    curls = curls if curls is not None else [c for c in readme_commands() if c.startswith("curl ")]
    out = []
    for command in curls:
        tokens = shlex.split(command)
        out.append(json.loads(tokens[tokens.index("-d") + 1]))
    return out


@pytest.mark.pipeline
@pytest.mark.slow
def test_after_the_demo_block_against_a_stack_the_test_starts(tmp_path: Path) -> None:
    """The 'servers from a new shell' block, pasted into a fresh shell where a stack runs (the
    test's own, in FFSPLIT_HOME, started like the demo starts it but with MLflow's port busy):
    `up` says which port it took instead, env reaches the servers, `prefect deployment ls` asks
    that server (no temporary one), status sees both healthy, down stops them."""
    import socket

    from services.stack import load_records, service_processes, stop_stack

    [block] = [b for b in code_blocks("bash") if "flows.stack env" in b and "deployment ls" in b]
    home = tmp_path / "home"
    env = {
        k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")
    }
    try:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            taken = busy.getsockname()[1]
            up = subprocess.run(
                [sys.executable, "-m", "flows.stack", "up", "--home", str(home)]
                + ["--prefect-port", "0", "--mlflow-port", str(taken), "--timeout", "300"],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=400,
            )
            assert up.returncode == 0, up.stderr[-3000:]
        records = load_records(home)
        port = records["mlflow"].port
        assert port != taken
        assert f"note: port {taken} was busy, so mlflow listens on port {port}" in up.stderr
        down = [c for c in commands(block) if c.startswith("python -m flows.stack down")]
        script = "set -e\n" + "\n".join(
            f"echo '=== {c}'\n{c}" for c in commands(block) if c not in down
        )
        script += '\necho "=== env"; echo "PREFECT_API_URL=$PREFECT_API_URL"\n'
        script += 'echo "MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI"\n' + "\n".join(down)
        done = fresh_shell(script, env={"FFSPLIT_HOME": str(home)}, timeout=600)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-3000:]
        assert "temporary server" not in out.lower(), out[-3000:]
        assert f"PREFECT_API_URL={records['prefect'].url}" in done.stdout
        assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}" in done.stdout
        status = done.stdout.split("=== python -m flows.stack status", 1)[1].split("=== env")[0]
        services = json.loads(status[status.index("{") :])["services"]
        assert set(services) == {"prefect", "mlflow"}
        assert all(s["healthy"] for s in services.values()), services
        assert "stopped: mlflow, prefect" in done.stderr
        assert all(service_processes(r) == [] for r in records.values())
    finally:
        stop_stack(home)
