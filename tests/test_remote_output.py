"""Output to s3:// through fsspec, against a real S3 server (moto's server mode on 127.0.0.1),
then read back from the bucket with longdata's reader (and StreamingDataset where installed)."""

import json
import socket
import urllib.request

import numpy as np
import pytest

from longdata.build import build
from longdata.format import StreamReader
from longdata.recipe import validate_recipe
from tests.test_build import small_recipe


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def s3_server(monkeypatch):
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its buckets in process-wide state: without a reset, one test's objects are
    # still listed in the next test's bucket.
    urllib.request.urlopen(
        urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    ).close()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,  # read by botocore, so by s3fs
        "S3_ENDPOINT_URL": endpoint,  # read by streaming
    }.items():
        monkeypatch.setenv(key, value)
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="shards")
    yield client
    server.stop()


def test_build_uploads_to_s3_and_streams_back(s3_server, tmp_path):
    data = small_recipe(tmp_path)
    data["sources"] = data["sources"][:2]
    data["output"]["dir"] = "s3://shards/builds/small"
    result = build(validate_recipe(data))
    assert result.remote == "s3://shards/builds/small"

    keys = [o["Key"] for o in s3_server.list_objects_v2(Bucket="shards")["Contents"]]
    local_files = sorted(
        str(p.relative_to(result.out_dir)) for p in result.out_dir.rglob("*") if p.is_file()
    )
    assert sorted(k.removeprefix("builds/small/") for k in keys) == local_files
    manifest = json.loads(
        s3_server.get_object(Bucket="shards", Key="builds/small/manifest.json")["Body"].read()
    )
    assert manifest == result.manifest.to_json()

    stream = manifest["splits"]["train"]["streams"][0]
    prefix = f"builds/small/{stream['path']}/"
    for key in (k for k in keys if k.startswith(prefix)):
        target = tmp_path / "downloaded" / key.removeprefix(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(s3_server.get_object(Bucket="shards", Key=key)["Body"].read())
    reader = StreamReader(tmp_path / "downloaded")
    downloaded = [reader.row(i) for i in range(reader.rows)]
    assert len(downloaded) == stream["rows"]
    assert sum(len(r["input_ids"]) for r in downloaded) == stream["tokens"]

    StreamingDataset = pytest.importorskip("streaming").StreamingDataset
    dataset = StreamingDataset(
        remote=f"s3://shards/builds/small/{stream['path']}",
        local=str(tmp_path / "stream-cache"),
        shuffle=False,
        batch_size=1,
    )
    rows = [dataset[i] for i in range(len(dataset))]
    assert len(rows) == stream["rows"]
    assert sum(len(r["input_ids"]) for r in rows) == stream["tokens"]
    assert all(r["input_ids"].dtype == np.uint32 for r in rows)


def test_cli_builds_to_an_s3_url_and_trains_from_it(s3_server, tmp_path, monkeypatch):
    """`--out s3://...` reaches the bucket (Path() once turned it into a local "s3:/..." folder),
    and `longdata train s3://...` reads the manifest there and streams the shards from there."""
    import yaml
    from typer.testing import CliRunner

    from longdata.cli import app

    data = small_recipe(tmp_path)
    data["sources"] = data["sources"][:1]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    built = CliRunner().invoke(app, ["build", str(recipe), "--out", "s3://shards/builds/cli"])
    assert built.exit_code == 0, built.output
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "out").exists()
    manifest = json.loads(
        s3_server.get_object(Bucket="shards", Key="builds/cli/manifest.json")["Body"].read()
    )

    run = tmp_path / "run"
    trained = CliRunner().invoke(
        app,
        [
            "train",
            "s3://shards/builds/cli",
            "--steps",
            "2",
            "--out",
            str(run),
            "--save",
            "none",
            "--warmup-steps",
            "1",
        ],
    )
    assert trained.exit_code == 0, trained.output
    assert (run / "metrics.jsonl").read_text().count("\n") == 2
    assert json.loads((run / "remote_build" / "manifest.json").read_text()) == manifest
    assert list((run / "remote_build" / "train").glob("*/shard.*")), "shards came from the bucket"

    missing = CliRunner().invoke(
        app, ["train", "s3://shards/builds/none", "--out", str(run)], env={"COLUMNS": "400"}
    )
    assert missing.exit_code == 2 and "builds/none/manifest.json cannot be read" in missing.output


@pytest.mark.parametrize("fault", ["no such bucket", "unreachable endpoint"])
def test_an_unwritable_s3_output_fails_in_one_line_before_any_work(
    s3_server, tmp_path, monkeypatch, fault
):
    import yaml
    from typer.testing import CliRunner

    from longdata.cli import app
    from tests.test_hostile_outputs import snapshot

    data = small_recipe(tmp_path)
    data["sources"] = data["sources"][:1]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(data))
    url = "s3://shards/builds/x"
    if fault == "no such bucket":
        url = "s3://no-such-bucket/builds/x"
    else:  # a port nothing listens on
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, ["build", str(recipe), "--out", url])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert f"cannot write to {url}" in lines[0] and "nothing was built" in lines[0]
    assert snapshot(tmp_path) == before  # no cache, no staging: nothing was tokenised
