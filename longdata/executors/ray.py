"""Run the pipeline's tasks as Ray tasks, on a cluster or on a local one Ray starts.

``address=None`` starts a Ray instance on this machine for the build (shut down after it);
``"auto"`` or ``"HOST:PORT"`` joins a running cluster (``ray start --head``). Tasks are retried
up to ``max_retries`` times when their worker dies; they are idempotent (see the pipeline), so
a retry redoes exactly one share. Every node must see the recipe's ``cache_dir`` and the build's
output directory at the same path (a shared filesystem), and have longdata installed.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from rich.progress import Progress

from longdata.executors import ExecutorError, Item, Result, Task

MAX_RETRIES = 3


def _check_reachable(address: str) -> None:
    """Fail in seconds on a HOST:PORT nothing listens at (Ray itself retries for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit():
        raise ExecutorError(
            f"--ray-address must be auto or HOST:PORT, got {address!r}", exit_code=2
        )
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
    except OSError as error:
        raise ExecutorError(f"no Ray cluster answers at {address} ({error})") from None


class RayExecutor:
    def __init__(
        self,
        address: str | None = None,
        *,
        max_retries: int = MAX_RETRIES,
        parallelism: int | None = None,
        **init_options: Any,
    ):
        try:
            import ray
        except ImportError:
            raise ExecutorError(
                "--engine ray needs Ray: pip install 'longdata[ray]'", exit_code=2
            ) from None
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started and address not in (None, "auto"):
            _check_reachable(address)
        if self._started:
            # The dashboard is a separate service the build does not use. A task holds one CPU,
            # so its tokenizer's thread pool gets one thread (Rayon would start one per core in
            # every worker process).
            init_options.setdefault("runtime_env", {"env_vars": {"RAYON_NUM_THREADS": "1"}})
            ray.init(address=address, include_dashboard=False, log_to_driver=False, **init_options)
        self.max_retries = max_retries
        self.parallelism = parallelism or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote: dict[Task, Any] = {}

    def map(
        self, task: Task, items: Sequence[Item], shared: Any, progress: Progress, label: str
    ) -> list[Result]:
        if not items:
            return []
        ray = self._ray
        if task not in self._remote:
            self._remote[task] = ray.remote(max_retries=self.max_retries)(task)
        shared_ref = ray.put(shared)  # one copy in the object store for every task of the stage
        refs = [self._remote[task].remote(shared_ref, item, None) for item in items]
        bar = progress.add_task(f"{label} ({len(refs)} ray tasks)", total=len(refs), rate="")
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)  # raises a task's error as soon as it fails
                progress.advance(bar)
        except ray.exceptions.RayTaskError as error:
            for ref in pending:
                ray.cancel(ref)
            # The task's own exception (e.g. a missing source file), not Ray's wrapper of it.
            cause = error.cause if isinstance(error.cause, Exception) else error
            raise cause from None
        return ray.get(refs)

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
