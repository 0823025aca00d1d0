"""A build run on Ray equals the local build: the same rows in the same order, the same manifest,
card, sample indexes and quarantine files; only the shard files are cut differently. Checked on a
Ray instance the tests start (2 CPUs) and on a two-node cluster simulated on this machine
(``ray start --head`` plus ``ray start --address``, each with its own temp dir, on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from longdata.build import build
from longdata.recipe import load_recipe, validate_recipe
from longdata.tools.verify import iter_stream_rows, verify_build
from tests.test_build import small_recipe
from tests.test_remote_output import free_port, s3_server  # noqa: F401 (a fixture)

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
# Every process of the test clusters runs on 127.0.0.1 as this user: no token to hand around.
CLUSTER_ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "RAY_AUTH_MODE": "disabled",
    "OMP_NUM_THREADS": "1",
}


def build_contents(build_dir: Path, scratch: Path) -> dict:
    """Everything a reader of the build sees, minus the timings and the shard file layout."""
    manifest = json.loads((build_dir / "manifest.json").read_text())
    problems: list[str] = []
    rows = {
        stream["path"]: [
            row for _, _, row in iter_stream_rows(build_dir / stream["path"], problems)
        ]
        for split in manifest["splits"].values()
        for stream in split["streams"]
    }
    assert not problems
    return {
        "manifest": manifest,
        "rows": rows,
        "card": (build_dir / "README.md").read_text(),
        "quarantine": {p.name: p.read_bytes() for p in sorted(build_dir.glob("quarantine/*"))},
        "sample_index": {
            split: pq.read_table(build_dir / split / "samples.parquet")
            for split in manifest["splits"]
        },
    }


def assert_same_build(got: dict, expected: dict) -> None:
    assert got["manifest"] == expected["manifest"]
    assert got["card"] == expected["card"]
    assert got["quarantine"] == expected["quarantine"]
    for split, table in expected["sample_index"].items():
        assert got["sample_index"][split].equals(table), split
    assert got["rows"].keys() == expected["rows"].keys()
    for path, rows in expected["rows"].items():
        assert len(got["rows"][path]) == len(rows), path
        for a, b in zip(got["rows"][path], rows):
            for column in b:
                assert np.array_equal(a[column], b[column]), (path, column)


def shard_parts(build_dir: Path) -> set[str]:
    """The part directories the shards of every stream were written into."""
    return {
        shard["raw_data"]["basename"].split("/")[0]
        for index in build_dir.rglob("index.json")
        for shard in json.loads(index.read_text())["shards"]
        if "/" in shard["raw_data"]["basename"]
    }


def test_an_address_nothing_answers_at_fails_in_one_line(tmp_path):
    port = free_port()  # free: nothing listens there
    driver = subprocess.run(
        [
            sys.executable,
            "-m",
            "longdata.cli",
            "build",
            str(ROOT / "recipes" / "quickstart.yml"),
            "--engine",
            "ray",
            "--ray-address",
            f"127.0.0.1:{port}",
            "--out",
            str(tmp_path / "out"),
        ],
        env={**CLUSTER_ENV, "COLUMNS": "300"},
        capture_output=True,
        timeout=120,
    )
    assert driver.returncode == 1
    assert driver.stderr.decode().strip().splitlines() == [
        f"error no Ray cluster answers at 127.0.0.1:{port} ([Errno 111] Connection refused)"
    ]
    assert not (tmp_path / "out").exists()


# --- a Ray instance started by the tests -------------------------------------------------------


@pytest.fixture(scope="module")
def ray_instance():
    from longdata.executors.ray import RayExecutor

    temp_dir = tempfile.mkdtemp(
        prefix="ld-ray-", dir="/tmp"
    )  # short: Ray's socket paths live under it
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=temp_dir,
        object_store_memory=200 << 20,
    )
    try:
        yield RayExecutor()
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small recipe built locally (the reference), and its data for the Ray builds."""
    tmp = tmp_path_factory.mktemp("ray-small")
    data = small_recipe(tmp)
    local = build(validate_recipe(data))
    return tmp, data, build_contents(local.out_dir, tmp)


@pytest.fixture(scope="module")
def ray_small(small, ray_instance):
    tmp, data, _ = small
    data = {**data, "cache_dir": str(tmp / "cache-ray")}
    return data, build(validate_recipe(data), out=tmp / "ray-out", executor=ray_instance)


def test_ray_build_equals_the_local_build(small, ray_small, ray_instance):
    tmp, _, expected = small
    data, result = ray_small
    assert ray_instance.parallelism == 2
    assert_same_build(build_contents(result.out_dir, tmp), expected)
    assert verify_build(result.out_dir).ok
    # It was really cut: every source in two partitions, the streams written by two tasks.
    entries = sorted(
        p.name for p in (Path(data["cache_dir"]) / "tokenized").iterdir() if p.is_dir()
    )
    assert [e.split("-")[0] + e[e.rindex("-") :] for e in entries] == [
        f"{name}-part{i}of2"
        for name in ("chat", "haystack", "longalign", "longalpaca")
        for i in (0, 1)
    ]
    assert shard_parts(result.out_dir) == {"part-00000", "part-00001"}


def test_rerun_after_a_killed_driver_tokenizes_only_the_missing_partitions(
    small, ray_small, ray_instance
):
    """A driver killed mid-build leaves some partitions' cache entries finished and others
    missing; the re-run reuses the finished ones untouched and gives the same build."""
    tmp, _, expected = small
    data, result = ray_small
    tokenized = Path(data["cache_dir"]) / "tokenized"
    missing = next(tokenized.glob("longalign-*-part1of2"))
    shutil.rmtree(missing)
    kept = {p: p.stat().st_mtime_ns for p in tokenized.glob("*/tokens.arrow")}
    again = build(validate_recipe(data), out=tmp / "ray-out", executor=ray_instance)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert missing.is_dir()
    info = json.loads((again.out_dir / "build_info.json").read_text())
    assert info["cached_sources"] == ["longalpaca", "haystack", "chat"]
    assert_same_build(build_contents(again.out_dir, tmp), expected)


def test_ray_build_uploads_to_s3(small, ray_small, ray_instance, s3_server):  # noqa: F811
    tmp, _, expected = small
    data, _ = ray_small
    result = build(validate_recipe(data), out="s3://shards/builds/ray", executor=ray_instance)
    keys = {o["Key"] for o in s3_server.list_objects_v2(Bucket="shards")["Contents"]}
    local = {
        f"builds/ray/{p.relative_to(result.out_dir)}"
        for p in result.out_dir.rglob("*")
        if p.is_file()
    }
    assert keys == local
    body = s3_server.get_object(Bucket="shards", Key="builds/ray/manifest.json")["Body"].read()
    assert json.loads(body) == expected["manifest"]


# --- a two-node cluster on this machine --------------------------------------------------------


class TwoNodeCluster:
    """``ray start --head`` and a second ``ray start --address`` (one CPU each), each in its own
    process group and temp dir, stopped by signalling exactly those groups."""

    def __init__(self):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dirs = [
            Path(tempfile.mkdtemp(prefix=f"ld-ray-{role}-", dir="/tmp"))
            for role in ("head", "node")
        ]
        self.nodes: list[subprocess.Popen] = []

    def start(self) -> None:
        head = ["--head", "--port", str(self.port), "--include-dashboard", "false"]
        for role, temp_dir in zip((head, ["--address", self.address]), self.temp_dirs):
            log = (temp_dir / "start.log").open("wb")
            self.nodes.append(
                subprocess.Popen(
                    [
                        str(RAY),
                        "start",
                        "--block",
                        *role,
                        "--num-cpus",
                        "1",
                        "--node-ip-address",
                        "127.0.0.1",
                        "--temp-dir",
                        str(temp_dir),
                        "--object-store-memory",
                        str(200 << 20),
                        "--disable-usage-stats",
                    ],
                    env=CLUSTER_ENV,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            self._wait_started(self.nodes[-1], temp_dir / "start.log")

    @staticmethod
    def _wait_started(node: subprocess.Popen, log: Path, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while b"Ray runtime started" not in log.read_bytes():
            assert node.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            os.killpg(node.pid, signal.SIGTERM)
        for node in reversed(self.nodes):
            try:
                node.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(node.pid, signal.SIGKILL)  # whatever of that group outlived SIGTERM
            except ProcessLookupError:
                pass
            node.wait()
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture()
def two_nodes():
    cluster = TwoNodeCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# The quickstart with a third of its samples: the whole takes minutes on a shared 2-CPU box.
QUICKSTART = ROOT / "recipes" / "quickstart.yml"
SMALLER_QUICKSTART = [
    "sources[0].sample.rows=16",
    "sources[1].sample.rows=16",
    "sources[2].count=16",
]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The (smaller) quickstart built locally, and the overrides every build of it shares."""
    tmp = tmp_path_factory.mktemp("quickstart")
    overrides = [f"output.card_dir={tmp / 'cards'}", *SMALLER_QUICKSTART]
    local = build(
        load_recipe(QUICKSTART, [*overrides, f"cache_dir={tmp / 'cache-local'}"]), out=tmp / "local"
    )
    return tmp, overrides, build_contents(local.out_dir, tmp)


def test_quickstart_on_a_ray_instance_equals_the_local_build(quickstart, ray_instance):
    tmp, overrides, expected = quickstart
    recipe = load_recipe(QUICKSTART, [*overrides, f"cache_dir={tmp / 'cache-instance'}"])
    result = build(recipe, out=tmp / "instance", executor=ray_instance)
    assert_same_build(build_contents(result.out_dir, tmp), expected)
    assert shard_parts(result.out_dir) == {"part-00000", "part-00001"}


def test_quickstart_on_a_two_node_cluster_equals_the_local_build(quickstart, two_nodes):
    tmp, overrides, expected = quickstart
    sets = [
        arg for o in [*overrides, f"cache_dir={tmp / 'cache-two-nodes'}"] for arg in ("--set", o)
    ]
    driver = subprocess.run(
        [
            sys.executable,
            "-m",
            "longdata.cli",
            "build",
            str(QUICKSTART),
            *sets,
            "--engine",
            "ray",
            "--ray-address",
            two_nodes.address,
            "--out",
            str(tmp / "two-nodes"),
        ],
        env=CLUSTER_ENV,
        capture_output=True,
        timeout=500,
    )
    assert driver.returncode == 0, driver.stderr.decode()[-3000:]
    assert_same_build(build_contents(tmp / "two-nodes", tmp), expected)
    assert shard_parts(tmp / "two-nodes") == {"part-00000", "part-00001"}
    # Tasks ran on the second node: it started Python workers of its own.
    assert list(two_nodes.temp_dirs[1].glob("session_*/logs/worker-*"))
