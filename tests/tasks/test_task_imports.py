"""Ray workers import a stage's module to run its task body: that import must not pull in Prefect."""

from __future__ import annotations

import subprocess
import sys

from tasks.runtime import REPO_ROOT, PrefectTask

STAGES = ("aggregate", "assemble", "compress", "evaluate", "heal", "observation", "profile")


def test_stage_modules_import_without_prefect() -> None:
    code = (
        "import sys\n"
        + "".join(f"import tasks.{name}\n" for name in STAGES)
        + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_prefect_tasks_are_built_on_first_use() -> None:
    from prefect import Task

    from tasks.profile import profile_unit

    task = profile_unit.task
    assert isinstance(task, PrefectTask)
    assert task.__name__ == "profile_unit" and "calibration unit" in task.__doc__
    built = task.with_options(task_run_name="x")
    assert isinstance(built, Task) and built.name == "profile-unit"
    assert task.fn.__name__ == "profile_unit"
