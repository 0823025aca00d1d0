"""longdata's own training loader: order, partition, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longdata.format.mds import ShardError, read_index
from longdata.trainer.data import (
    Manifest,
    OldLoaderStateError,
    epoch_plan,
    make_dataloader,
    make_dataset,
)
from tests.builders import two_bucket_build


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_bucket_build(tmp_path_factory.mktemp("build"), 256, (10, 30), 64)


def _keys(rows) -> list[str]:
    return [row["input_ids"].tobytes().hex() for row in rows]


def _epoch(build: Path, **options) -> list[str]:
    return _keys(make_dataset(Manifest.read(build), "train", 2, **options))


def test_same_seed_and_epoch_give_the_same_order_and_the_next_epoch_another(build: Path) -> None:
    assert _epoch(build, shuffle_seed=3) == _epoch(build, shuffle_seed=3)
    assert _epoch(build, shuffle_seed=3) != _epoch(build, shuffle_seed=4)
    dataset = make_dataset(Manifest.read(build), "train", 2, shuffle_seed=3)
    first = _keys(dataset)
    dataset.epoch = 1
    # (Proportions are by tokens, so an epoch may repeat a row: compare order, not sets.)
    assert _keys(dataset) != first and len(_keys(dataset)) == len(first)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    groups=st.integers(1, 5),
    workers=st.integers(1, 3),
    seed=st.integers(0, 2**32),
    method=st.sampled_from(["random", "per_stream"]),
)
def test_groups_and_workers_are_disjoint_and_cover_the_plan(rows, groups, workers, seed, method):
    plan = epoch_plan(
        rows,
        [1.0] * len(rows),
        seed=seed,
        epoch=0,
        shuffle=True,
        batching_method=method,
        global_batch=2 * groups,
    )
    kept = plan[: len(plan) - len(plan) % groups]
    parts = [
        position
        for group in range(groups)
        for worker in range(workers)
        for position in range(len(plan))[group::groups][worker::workers]
        if position < len(kept)
    ]
    assert sorted(parts) == list(range(len(kept)))


def test_per_stream_batches_hold_one_stream() -> None:
    plan = epoch_plan(
        [8, 12],
        [0.4, 0.6],
        seed=1,
        epoch=0,
        shuffle=True,
        batching_method="per_stream",
        global_batch=4,
    )
    for start in range(0, len(plan), 4):
        assert len(set(plan[start : start + 4, 0].tolist())) == 1


def test_proportions_are_honoured() -> None:
    # 10 000 samples from three streams weighted 0.5 / 0.3 / 0.2: each stream's count is
    # exact up to rounding, so allow one sample per stream, not a loose statistical band.
    plan = epoch_plan(
        [100, 5000, 7],
        [0.5, 0.3, 0.2],
        seed=0,
        epoch=0,
        shuffle=True,
        batching_method="random",
        global_batch=8,
    )
    counts = np.bincount(plan[:, 0], minlength=3)
    total = 5107
    for stream, proportion in enumerate([0.5, 0.3, 0.2]):
        assert abs(counts[stream] - proportion * total) <= 1
    # A small stream asked for more rows than it has repeats every row evenly.
    small = np.bincount(plan[plan[:, 0] == 2, 1], minlength=7)
    assert small.max() - small.min() <= 1


def test_resume_mid_epoch_gives_the_remaining_batches(build: Path) -> None:
    manifest = Manifest.read(build)
    whole = list(make_dataloader(make_dataset(manifest, "train", 2, shuffle_seed=5), 2))
    loader = make_dataloader(make_dataset(manifest, "train", 2, shuffle_seed=5), 2)
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = make_dataloader(make_dataset(manifest, "train", 2, shuffle_seed=5), 2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(whole) - 3
    for got, want in zip(rest, whole[3:]):
        assert got["input_ids"].equal(want["input_ids"])


def test_a_streaming_loader_position_is_refused(build: Path) -> None:
    loader = make_dataloader(make_dataset(Manifest.read(build), "train", 2), 2)
    old = {"epoch": 0, "sample_in_epoch": 4, "num_canonical_nodes": 1, "shuffle_seed": 0}
    with pytest.raises(OldLoaderStateError, match="streaming-based loader"):
        loader.load_state_dict(old)


def test_a_damaged_shard_is_refused_before_training(build: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "build"
    shutil.copytree(build, copy)
    manifest = Manifest.read(copy)
    stream_dir = manifest.stream_dir(manifest.split("train").streams[0])
    shard = read_index(stream_dir)[0]
    path = stream_dir / (shard["zip_data"] or shard["raw_data"])["basename"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="hash mismatch"):
        make_dataset(manifest, "train", 2)


def test_a_remote_shard_name_climbing_out_is_refused_before_any_fetch(tmp_path: Path) -> None:
    from longdata.trainer.data import download_stream

    remote = tmp_path / "bucket" / "train" / "le_0048"
    remote.mkdir(parents=True)
    (tmp_path / "bucket" / "x").write_bytes(b"not a shard")
    shard = {"raw_data": {"basename": "shard.00000.mds", "bytes": 4}, "samples": 1}
    shard["zip_data"] = {"basename": "../../x", "bytes": 11}
    (remote / "index.json").write_text(json.dumps({"shards": [shard], "version": 2}))
    cache = tmp_path / "run" / "remote_build" / "train" / "le_0048"
    with pytest.raises(ShardError, match="bad shard name"):
        download_stream(remote.as_uri(), cache)
    assert sorted(path.name for path in (tmp_path / "run").rglob("*") if path.is_file()) == [
        "index.json"
    ]


def test_a_remote_shard_with_a_wrong_hash_is_refused_before_use(build: Path, tmp_path: Path):
    import shutil

    bucket = tmp_path / "bucket"
    shutil.copytree(build, bucket)
    manifest = Manifest.read(bucket)
    stream_dir = manifest.stream_dir(manifest.split("train").streams[0])
    stored = read_index(stream_dir)[0]
    path = stream_dir / (stored["zip_data"] or stored["raw_data"])["basename"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    local = tmp_path / "run" / "remote_build"
    shutil.copytree(bucket, local, ignore=shutil.ignore_patterns("shard.*", "index.json"))
    with pytest.raises(ShardError, match="hash mismatch"):
        make_dataset(Manifest.read(local), "train", 2, remote=bucket.as_uri())
    assert list(local.rglob("shard.*")), "the shard was downloaded, then refused"


def test_two_trainings_on_one_machine_at_once_both_finish(build: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    def train(out: Path) -> subprocess.Popen:
        arguments = ["train", str(build), "--steps", "3", "--out", str(out), "--save", "none"]
        return subprocess.Popen(
            [sys.executable, "-m", "longdata.cli", *arguments, "--warmup-steps", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    runs = [train(tmp_path / "first"), train(tmp_path / "second")]
    for run in runs:
        output = run.communicate(timeout=300)[0].decode()
        assert run.returncode == 0, output
        assert "step 3:" in output
