"""Executors run the pipeline's tasks (``longdata.pipeline``); they know nothing of the stages.

A task is a module-level function ``task(shared, item, progress)``: ``shared`` is what every item
of one stage needs (sent once per stage), ``item`` one unit of work, ``progress`` the driver's
rich progress when the task runs in the driver's process, else None. ``map`` returns the
results in item order. ``parallelism`` is how many tasks can run at once: the pipeline cuts
sources and streams into that many shares (1: nothing is cut, today's single-process build).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from rich.progress import Progress

Item = TypeVar("Item")
Result = TypeVar("Result")
Task = Callable[[Any, Item, "Progress | None"], Result]
ENGINES = ("local", "ray")


class ExecutorError(RuntimeError):
    """An executor that cannot run; nothing was built. ``exit_code`` 2 when the user can fix it
    (Ray not installed, a malformed address), 1 when it failed while running (no cluster
    answers)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class Executor(Protocol):
    parallelism: int

    def map(
        self, task: Task, items: Sequence[Item], shared: Any, progress: Progress, label: str
    ) -> list[Result]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Every task in this process, one after the other, in item order."""

    parallelism = 1

    def map(
        self, task: Task, items: Sequence[Item], shared: Any, progress: Progress, label: str
    ) -> list[Result]:
        return [task(shared, item, progress) for item in items]

    def close(self) -> None:
        pass


def make_executor(engine: str, *, ray_address: str | None = None) -> Executor:
    """The executor for ``--engine``; Ray is imported only when asked for."""
    if engine == "local":
        return LocalExecutor()
    if engine == "ray":
        from longdata.executors.ray import RayExecutor

        return RayExecutor(address=ray_address)
    raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
