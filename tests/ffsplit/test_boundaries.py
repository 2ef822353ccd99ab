"""The core library imports no orchestration stack and starts no CUDA (style.md, 7)."""

import subprocess
import sys

CHECK = """
import sys
import ffsplit, ffsplit.cli, ffsplit.jobs, ffsplit.eval, ffsplit.data, ffsplit.split, ffsplit.compress
import ffsplit.profiling, ffsplit.variant, ffsplit.models, ffsplit.adapters
banned = sorted(m for m in sys.modules if m.split('.')[0] in {'prefect', 'ray', 'mlflow'})
assert not banned, banned
import torch
assert not torch.cuda.is_initialized(), 'importing ffsplit initialised CUDA'
print('ok')
"""


def test_core_imports_no_orchestration_and_no_cuda():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_no_source_file_in_core_imports_the_stack():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "ffsplit"
    offenders = []
    for path in root.rglob("*.py"):
        for line in path.read_text().splitlines():
            words = line.strip().split()
            if (
                len(words) >= 2
                and words[0] in ("import", "from")
                and words[1].split(".")[0] in {"prefect", "ray", "mlflow"}
            ):
                offenders.append(f"{path.relative_to(root)}: {line.strip()}")
    assert not offenders, offenders
