"""A build split across worker processes and merged equals the single-process build: the same
rows in the same order and the same manifest; only the shard files are cut differently."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from longdata.build import build
from longdata.format import StreamReader
from longdata.partition import merge
from longdata.recipe import validate_recipe
from longdata.verify import iter_stream_rows, verify_build
from tests.test_build import small_recipe

pytestmark = pytest.mark.slow


def all_rows(build_dir: Path, scratch: Path) -> dict[str, list[dict]]:
    manifest = json.loads((build_dir / "manifest.json").read_text())
    problems: list[str] = []
    rows = {stream["path"]: [row for _, _, row in iter_stream_rows(build_dir / stream["path"], scratch, problems)]
            for split in manifest["splits"].values() for stream in split["streams"]}
    assert not problems
    return rows


def test_three_workers_then_merge_equal_one_process(tmp_path):
    data = small_recipe(tmp_path)
    out = Path(data["output"]["dir"])
    single = build(validate_recipe(data))
    expected_rows = all_rows(single.out_dir, tmp_path)
    expected_manifest = (single.out_dir / "manifest.json").read_text()
    single.out_dir.rename(tmp_path / "single")

    data["cache_dir"] = str(tmp_path / "shared-cache")  # shared by the workers
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    workers = [subprocess.Popen([sys.executable, "-m", "longdata.cli", "build", str(recipe_path),
                                 "--workers", "3", "--worker-index", str(i)],
                                env=env, stderr=subprocess.PIPE, start_new_session=True)
               for i in range(3)]
    for worker in workers:
        assert worker.wait(timeout=600) == 0, worker.stderr.read().decode()[-3000:]
    assert not out.exists(), "nothing is published before the merge"

    merged = merge(out)
    assert (merged.out_dir / "manifest.json").read_text() == expected_manifest
    assert_same_rows(all_rows(merged.out_dir, tmp_path), expected_rows)
    index = json.loads((merged.out_dir / "train" / "le_004096" / "index.json").read_text())
    assert {s["raw_data"]["basename"].split("/")[0] for s in index["shards"]} <= {"part-00000", "part-00001", "part-00002"}
    assert verify_build(merged.out_dir).ok
    # longdata.mds (inspect's reader) resolves the merged "part-0000N/shard..." names too.
    readers = {path: StreamReader(merged.out_dir / path) for path in expected_rows}
    assert_same_rows({path: [r.row(i) for i in range(r.rows)] for path, r in readers.items()},
                     expected_rows)


def assert_same_rows(got: dict[str, list[dict]], expected: dict[str, list[dict]]) -> None:
    import numpy as np

    assert got.keys() == expected.keys()
    for path in expected:
        assert len(got[path]) == len(expected[path]), path
        for a, b in zip(got[path], expected[path]):
            for column in b:
                assert np.array_equal(a[column], b[column]), (path, column)


def test_merge_refuses_until_every_worker_is_done(tmp_path):
    from longdata.build import BuildError
    from longdata.partition import build_worker

    data = small_recipe(tmp_path)
    data["sources"] = data["sources"][:1]
    recipe = validate_recipe(data)
    with pytest.raises(BuildError, match="timed out waiting for another worker"):
        build_worker(recipe, workers=2, worker_index=0, timeout=0)
    with pytest.raises(BuildError, match="0 of"):
        merge(recipe.output.dir)
