"""One helper turns a library step into a pipeline stage: a cached Ray task and its Prefect task.

A stage body is a function of keyword arguments, one of them `out` (where it writes its artifact,
atomically), returning a typed record (tasks/records.py). `done(**kwargs)` reads the record of a
finished artifact, or None. Then:

- `stage.run(**kwargs)`: the record at once when the artifact is there (no Ray round trip),
  else the body as a Ray task with the stage's resources (checked again on the worker: a
  concurrent run, or a retried task whose worker died after writing, finds it done);
- `stage.task`: the Prefect task of `run`, built on first use (a Ray worker that imports a stage
  module for its body never imports Prefect), with the body's signature, so `.submit(**kwargs)`,
  `.with_options(...)` and task-run names over the parameters work as for any Prefect task;
- `stage(**kwargs)`: the body in this process (tests, and callers that hold no Ray).

The parameter list is written once, in the body's signature.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from tasks.runtime import PrefectTask, run_remote, submit, wait

R = TypeVar("R")


@dataclass(frozen=True, eq=False)
class Stage(Generic[R]):
    """A library step as a cached Ray task with a Prefect task (see the module docstring)."""

    name: str
    body: Callable[..., R]
    done: Callable[..., R | None]
    resources: Callable[..., dict[str, Any]]
    task_run_name: str | None = None
    _task: list[PrefectTask] = field(default_factory=list, repr=False)

    def __call__(self, **kwargs: Any) -> R:
        """The body in this process, unless its artifact is already there."""
        record = self.done(**kwargs)
        return record if record is not None else self.body(**kwargs)

    def run(self, **kwargs: Any) -> R:
        """The finished artifact's record, else the body as a Ray task (waited for)."""
        record = self.done(**kwargs)
        if record is not None:
            return record
        return run_remote(execute, self, kwargs, resources=self.options(kwargs))

    def options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Ray options of one call: the stage's resources, and the body's name as the task's
        (so `ray::compress_shard` is what a worker running it shows, in ps and Ray's state)."""
        return {**self.resources(**kwargs), "name": self.body.__name__}

    def run_many(
        self, calls: list[dict[str, Any]], resources: dict[str, Any] | None = None
    ) -> list[R]:
        """`run` over many keyword sets at once (parallel Ray tasks; no Prefect); in call order.

        resources: Ray options instead of the stage's own (e.g. a custom resource that caps how
        many run at once).
        """
        records: list[R | None] = [self.done(**kwargs) for kwargs in calls]
        todo = [i for i, record in enumerate(records) if record is None]
        refs = [
            submit(
                execute, self, calls[i], resources={**self.options(calls[i]), **(resources or {})}
            )
            for i in todo
        ]
        for i, record in zip(todo, wait(refs), strict=True):
            records[i] = record
        return records  # type: ignore[return-value]

    @property
    def task(self) -> PrefectTask:
        """The Prefect task of `run` (named after the stage; the body's parameters)."""
        if not self._task:

            @functools.wraps(self.body)
            def run(**kwargs: Any) -> R:
                return self.run(**kwargs)

            options: dict[str, Any] = {"name": self.name}
            if self.task_run_name is not None:
                options["task_run_name"] = self.task_run_name
            self._task.append(PrefectTask(run, options))
        return self._task[0]


def execute(stage: Stage[R], kwargs: dict[str, Any]) -> R:
    """Ray task body of every stage: the stage (pickled with its body by reference) on a worker."""
    return stage(**kwargs)


def stage(
    name: str,
    *,
    done: Callable[..., Any],
    resources: Callable[..., dict[str, Any]],
    task_run_name: str | None = None,
) -> Callable[[Callable[..., R]], Stage[R]]:
    """Decorator: the body below becomes a Stage (see the module docstring)."""
    return lambda body: Stage(name, body, done, resources, task_run_name)
