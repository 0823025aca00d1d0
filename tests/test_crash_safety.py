"""A build killed with SIGKILL never leaves output that looks complete, and re-running it gives
exactly the output of an uninterrupted build."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from longdata.build import build
from longdata.recipe import validate_recipe
from tests.test_build import small_recipe

pytestmark = pytest.mark.slow


def run_build(recipe: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "longdata.cli", "build", str(recipe)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )


def kill_when(process: subprocess.Popen, condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            assert process.poll() is None, "the build finished before the kill point"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.01)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the whole group: no orphan survives the test
        process.wait()


def files_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "build_info.json"
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted build (in-process), moved aside; kill tests rebuild the same recipe."""
    tmp = tmp_path_factory.mktemp("crash")
    data = small_recipe(tmp)
    data["cache_dir"] = str(tmp / "cache-reference")
    out = Path(build(validate_recipe(data)).out_dir)
    shutil.move(out, tmp / "reference")
    return tmp, data, files_of(tmp / "reference")


@pytest.mark.parametrize("kill_point", ["first_cache_entry", "shards_being_written"])
def test_killed_build_leaves_nothing_complete_and_resumes_identically(reference, kill_point):
    tmp, data, expected = reference
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = Path(data["output"]["dir"])
    data = {**data, "cache_dir": str(tmp / f"cache-{kill_point}")}
    recipe_path = tmp / f"{kill_point}.yml"
    recipe_path.write_text(yaml.safe_dump(data))
    cache = Path(data["cache_dir"]) / "tokenized"
    partial = out.parent / f".{out.name}.partial"
    conditions = {
        "first_cache_entry": lambda: (
            cache.exists()
            and any(p.is_dir() and not p.name.endswith(".partial") for p in cache.iterdir())
        ),
        "shards_being_written": lambda: any(partial.glob("train/*/shard.*")),
    }
    kill_when(run_build(recipe_path, env), conditions[kill_point])
    assert not (out / "manifest.json").exists(), "a killed build must not look complete"
    assert not out.exists()

    resumed = run_build(recipe_path, env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    try:
        assert files_of(out) == expected
        assert not partial.exists()
    finally:
        shutil.rmtree(out, ignore_errors=True)
