"""Run a function on several gloo ranks (spawned processes), or a command under torchrun.

Both kill every process they started when one fails or the time runs out, so a rank stuck in a
collective cannot hang the test session. Each rank runs with one intra-op thread: the test
machine's cores are few and shared.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.multiprocessing as mp

TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, function: Callable, args: tuple) -> None:
    import torch

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    function(*args)


def run_on_ranks(function: Callable, world_size: int, *args: object) -> None:
    """Call `function(*args)` in `world_size` fresh processes set up like torchrun's ranks.

    `function` must be importable (a module-level function). Raises if any rank fails or if
    they do not all finish within TIMEOUT_S.
    """
    context = mp.start_processes(
        _rank_main,
        args=(world_size, free_port(), function, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} ranks did not finish in {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def run_torchrun(
    nproc: int, arguments: Sequence[str], cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc <arguments>` in its own process group, killed whole on
    timeout."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        *arguments,
    ]
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise TimeoutError(f"torchrun did not finish in {TIMEOUT_S} s:\n{output}") from None
    return subprocess.CompletedProcess(command, process.returncode, output, None)
