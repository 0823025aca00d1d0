"""End to end: a small offline recipe builds, reads back with plain StreamingDataset, and every
row honours the contract; malformed rows are quarantined and counted; rebuilds are identical."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from longdata.build import build
from longdata.format import BUILTIN_TOKENIZERS, COLUMNS, StreamReader, check_row
from longdata.recipe import validate_recipe
from longdata.tools.verify import verify_build
from tests.builders import manifest_json


def small_recipe(tmp: Path, **packing) -> dict:
    broken = tmp / "sharegpt.jsonl"
    good = {
        "conversations": [
            {"from": "human", "value": "Summarise: " + "river lake " * 300},
            {"from": "gpt", "value": "Water."},
        ]
    }
    broken.write_text(
        json.dumps(good)
        + "\n{not json\n"
        + json.dumps({"conversations": [{"from": "human", "value": "no answer"}]})
        + "\n"
        + json.dumps(good)
        + "\n"
    )  # the last row duplicates the first
    return {
        "name": "small",
        "seed": 3,
        "tokenizer": {"name": "builtin:quickstart"},
        "sources": [
            {
                "name": "longalign",
                "kind": "longalign",
                "path": "builtin:sample/longalign",
                "sample": {"rows": 12, "min_chars": 2000, "max_chars": 12000},
            },
            {
                "name": "longalpaca",
                "kind": "longalpaca",
                "path": "builtin:sample/longalpaca",
                "sample": {"rows": 10, "min_chars": 2000, "max_chars": 12000, "seed": 1},
                "weight": 1.5,
            },
            {
                "name": "haystack",
                "kind": "antihaystack",
                "count": 8,
                "length_range": [800, 3000],
                "weight": 0.5,
            },
            {"name": "chat", "kind": "generic", "format": "sharegpt", "path": str(broken)},
        ],
        "packing": {"max_seq_len": 4096, "buckets": [1024, 2048], **packing},
        "validation": {"fraction": 0.1, "max_samples": 4},
        "output": {
            "dir": str(tmp / "out"),
            "shard_size_limit": "64KB",
            "card_dir": str(tmp / "cards"),
        },
        "cache_dir": str(tmp / "cache"),
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build")
    recipe = validate_recipe(small_recipe(tmp))
    result = build(recipe)
    return recipe, result


def read_rows(stream_dir: Path) -> list[dict]:
    reader = StreamReader(stream_dir)
    return [reader.row(i) for i in range(reader.rows)]


def test_build_publishes_complete_output(built):
    recipe, result = built
    out = result.out_dir
    assert (out / "manifest.json").exists() and (out / "README.md").exists()
    assert (out / "card" / "lengths.png").stat().st_size > 1000
    assert (Path(recipe.output.card_dir) / "small" / "README.md").exists()
    assert not list(out.parent.glob(".out.*")), "no partial or previous directory is left behind"
    assert set(manifest_json(result)["splits"]) == {"train", "validation"}
    # A bundled tokenizer is recorded by name, so the manifest is the same in any checkout.
    assert manifest_json(result)["tokenizer"]["path"] == "builtin:quickstart"


def test_rows_read_back_and_honour_the_contract(built):
    recipe, result = built
    manifest = manifest_json(result)
    for split in manifest["splits"].values():
        assert abs(sum(s["proportion"] for s in split["streams"]) - 1) < 1e-9
        for stream in split["streams"]:
            rows = read_rows(result.out_dir / stream["path"])
            assert len(rows) == stream["rows"] > 0
            for row in rows:
                assert check_row(row, split["max_seq_len"], len(manifest["sources"])) is None
            longest = [int(r["seq_lens"].max()) for r in rows]
            edge = int(stream["name"].removeprefix("le_"))
            assert max(longest) <= edge
            assert sum(len(r["input_ids"]) for r in rows) == stream["tokens"]


def test_streaming_reads_the_same_rows(built, tmp_path):
    """Where mosaicml-streaming is installed, its StreamingDataset reads what longdata reads."""
    StreamingDataset = pytest.importorskip("streaming").StreamingDataset
    recipe, result = built
    stream_dir = result.out_dir / manifest_json(result)["splits"]["train"]["streams"][0]["path"]
    local = tmp_path / "copy"  # streaming decompresses shards next to the index
    shutil.copytree(stream_dir, local)
    dataset = StreamingDataset(local=str(local), remote=None, shuffle=False, batch_size=1)
    theirs = [dataset[i] for i in range(len(dataset))]
    ours = read_rows(stream_dir)
    assert len(theirs) == len(ours) > 0
    for their_row, our_row in zip(theirs, ours):
        for column in COLUMNS:
            np.testing.assert_array_equal(their_row[column], our_row[column])


def test_loss_mask_covers_exactly_assistant_text(built):
    from transformers import AutoTokenizer

    recipe, result = built
    tokenizer = AutoTokenizer.from_pretrained(BUILTIN_TOKENIZERS["builtin:quickstart"])
    stream = manifest_json(result)["splits"]["train"]["streams"][0]
    row = read_rows(result.out_dir / stream["path"])[0]
    start = 0
    for length in row["seq_lens"].tolist():
        ids = row["input_ids"][start : start + length]
        mask = row["loss_mask"][start : start + length]
        text = tokenizer.decode(ids)
        targets = tokenizer.decode(ids[mask == 1])
        assert mask[0] == 0 and ids[0] == tokenizer.bos_token_id
        # Every target token belongs to an assistant turn: the text after the last assistant header.
        assistant_turns = [
            part.split("<|eot_id|>")[0] + "<|eot_id|>"
            for part in text.split("<|start_header_id|>assistant<|end_header_id|>\n\n")[1:]
        ]
        assert targets == "".join(assistant_turns)
        start += length


def test_quarantine_and_dedup_are_counted(built):
    _, result = built
    chat = next(s for s in manifest_json(result)["sources"] if s["name"] == "chat")
    assert chat["tokenize"]["quarantined"] == 2 and chat["tokenize"]["samples"] == 2
    assert chat["mix"]["duplicates"] == 1
    lines = [
        json.loads(x)
        for x in (result.out_dir / "quarantine" / "chat.jsonl").read_text().splitlines()
    ]
    assert [(q["location"], q["reason"].split(":")[0]) for q in lines] == [
        ("sharegpt.jsonl:2", "invalid JSON"),
        ("sharegpt.jsonl:3", "no assistant turn with content"),
    ]
    assert manifest_json(result)["totals"]["quarantined"] == 2


def test_every_good_sample_is_in_the_shards(built):
    _, result = built
    manifest = manifest_json(result)
    in_train = sum(s["mix"]["train_samples"] for s in manifest["sources"])
    split = manifest["splits"]["train"]
    cut = split["overlength"]
    assert split["samples"] == in_train
    assert (
        sum(s["samples"] for s in split["streams"])
        == in_train - cut["dropped"] - cut["empty"] - cut["no_target_after_cut"]
    )
    for source in manifest["sources"]:
        m = source["mix"]
        assert m["available"] == source["tokenize"]["samples"]
        assert (
            m["available"]
            == m["too_short"]
            + m["too_long"]
            + m["duplicates"]
            + m["validation"]
            + m["train_unique"]
        )


def test_sample_index_places_every_sample_exactly_where_the_rows_hold_it(built, tmp_path):
    import polars as pl

    from longdata.stages.sample_index import read_sample_index
    from longdata.tools.verify import iter_stream_rows

    _, result = built
    manifest = manifest_json(result)
    index = pl.from_arrow(read_sample_index(result.out_dir, "train"))
    per_source = dict(index.filter(pl.col("start") == 0).group_by("source").len().iter_rows())
    assert per_source == {s["name"]: s["mix"]["train_samples"] for s in manifest["sources"]}
    assert index.filter(pl.col("status") == "whole")["tokens"].equals(
        index.filter(pl.col("status") == "whole")["sample_tokens"]
    )
    assert set(index["status"]) <= {"whole", "truncated", "dropped"}
    for stream in manifest["splits"]["train"]["streams"]:
        pieces = index.filter(pl.col("stream") == stream["name"]).sort("row", "slot")
        rows = [row for _, _, row in iter_stream_rows(result.out_dir / stream["path"], [])]
        assert pieces["row"].max() + 1 == len(rows) == stream["rows"]
        for piece in pieces.iter_rows(named=True):
            row = rows[piece["row"]]
            begin = int(row["seq_lens"][: piece["slot"]].sum())
            assert row["seq_lens"][piece["slot"]] == piece["tokens"]
            assert row["source_ids"][piece["slot"]] == piece["source_id"]
            assert row["loss_mask"][begin : begin + piece["tokens"]].sum() == piece["target_tokens"]


def test_verify_passes_then_catches_a_flipped_byte(built, tmp_path):
    _, result = built
    assert verify_build(result.out_dir).ok
    copy = tmp_path / "copy"
    shutil.copytree(result.out_dir, copy)
    shard = sorted(copy.glob("train/*/shard.*"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = verify_build(copy)
    assert (
        not report.ok and "hash mismatch" in report.problems[0] and shard.name in report.problems[0]
    )


def test_verify_catches_a_sample_index_that_disagrees_with_the_rows(built, tmp_path):
    import pyarrow.parquet as pq

    _, result = built
    copy = tmp_path / "copy"
    shutil.copytree(result.out_dir, copy)
    path = copy / "train" / "samples.parquet"
    table = pq.read_table(path)
    rows = table.column("row").to_numpy().copy()
    rows[np.flatnonzero(rows >= 0)[0]] += 1  # claim a piece sits one row later than it does
    pq.write_table(table.set_column(table.schema.get_field_index("row"), "row", [rows]), path)
    report = verify_build(copy)
    assert not report.ok and any("the sample index lists" in p for p in report.problems)


def test_rebuild_is_byte_identical_and_reuses_the_cache(built, tmp_path):
    recipe, first = built
    before = tmp_path / "first"
    shutil.copytree(first.out_dir, before)
    again = build(recipe)
    assert again.seconds["read_tokenize"] < first.seconds["read_tokenize"]
    info = json.loads((again.out_dir / "build_info.json").read_text())
    assert len(info["cached_sources"]) == 4
    files = sorted(p.relative_to(before) for p in before.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(again.out_dir) for p in again.out_dir.rglob("*") if p.is_file()
    )
    for rel in files:
        if rel.name != "build_info.json":
            assert (before / rel).read_bytes() == (again.out_dir / rel).read_bytes(), rel


def test_split_policy_and_stages(tmp_path):
    data = small_recipe(
        tmp_path,
        overlength="split",
        stages=[{"name": "short", "max_seq_len": 1024}, {"name": "long", "max_seq_len": 4096}],
    )
    result = build(validate_recipe(data))
    splits = manifest_json(result)["splits"]
    assert set(splits) == {"short/train", "short/validation", "long/train", "long/validation"}
    assert splits["short/train"]["overlength"]["split"] > 0
    assert [s["name"] for s in splits["short/train"]["streams"]] == ["le_001024"]
    assert splits["long/train"]["max_seq_len"] == 4096
    assert verify_build(result.out_dir).ok
    long_lengths = np.array([s["tokens"] for s in splits["long/train"]["streams"]])
    assert long_lengths.sum() == splits["long/train"]["tokens"]
    import polars as pl

    from longdata.stages.sample_index import read_sample_index

    index = pl.from_arrow(read_sample_index(result.out_dir, "short/train"))
    cut = index.filter(pl.col("status") == "split")
    cut_away = index.filter(
        (pl.col("status") == "no_target_after_cut") & (pl.col("sample_tokens") > 1024)
    )
    assert cut["sample"].n_unique() + len(cut_away) == splits["short/train"]["overlength"]["split"]
    # A split sample is cut every max_seq_len tokens (pieces without a target are left out).
    assert (cut["start"] % 1024 == 0).all()
    assert cut["tokens"].equals((cut["sample_tokens"] - cut["start"]).clip(upper_bound=1024))


def test_strict_refuses_quarantined_rows_and_publishes_nothing(tmp_path):
    from longdata.build import BuildError

    data = small_recipe(tmp_path)
    data["sources"] = data["sources"][3:]
    with pytest.raises(BuildError, match="--strict: 2 source rows were quarantined"):
        build(validate_recipe(data), strict=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
