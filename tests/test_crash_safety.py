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

from tests.test_build import small_recipe

pytestmark = pytest.mark.slow


def run_build(recipe: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "longdata.cli", "build", str(recipe)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)


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
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "build_info.json"}


@pytest.mark.parametrize("kill_point", ["first_cache_entry", "shards_being_written"])
def test_killed_build_leaves_nothing_complete_and_resumes_identically(tmp_path, kill_point):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    data = small_recipe(tmp_path)
    out = Path(data["output"]["dir"])
    recipe_path = tmp_path / "recipe.yml"

    data["cache_dir"] = str(tmp_path / "cache-reference")
    recipe_path.write_text(yaml.safe_dump(data))
    reference = run_build(recipe_path, env)
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()
    shutil.move(out, tmp_path / "reference")

    data["cache_dir"] = str(tmp_path / "cache")
    recipe_path.write_text(yaml.safe_dump(data))
    cache = tmp_path / "cache" / "tokenized"
    partial = out.parent / f".{out.name}.partial"
    conditions = {
        "first_cache_entry": lambda: cache.exists() and any(
            p.is_dir() and not p.name.endswith(".partial") for p in cache.iterdir()),
        "shards_being_written": lambda: any(partial.glob("train/*/shard.*")),
    }
    kill_when(run_build(recipe_path, env), conditions[kill_point])
    assert not (out / "manifest.json").exists(), "a killed build must not look complete"
    assert not out.exists()

    resumed = run_build(recipe_path, env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    assert files_of(out) == files_of(tmp_path / "reference")
    assert not partial.exists()
