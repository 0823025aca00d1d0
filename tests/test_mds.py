"""longdata.format.mds writes shards as streaming 0.13 does, reads them back, refuses bad ones."""

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from longdata.format import COLUMNS, SHARD_HASHES, ShardError, StreamReader
from longdata.format.mds import MDSWriter, merge_index, read_index
from longdata.tools.verify import iter_stream_rows
from tests.builders import make_row


def _write(out: Path, rows, compression: str | None) -> Path:
    with MDSWriter(
        out=str(out),
        columns=COLUMNS,
        compression=compression,
        hashes=SHARD_HASHES,
        size_limit=4096,
    ) as writer:
        for row in rows:
            writer.write(row)
    return out


@pytest.mark.parametrize("compression", ["zstd", None, "gz"])
def test_rows_match_streaming_reader_across_shards(tmp_path, compression):
    rng = np.random.default_rng(1)
    # Lengths over 255 and 65535 exercise the uint16 and uint32 shape headers.
    lengths = [[3, 9], [300], [70000], [1, 1, 1], *([[50, 60]] * 20)]
    rows = [make_row(seq, rng, vocab_size=70000) for seq in lengths]
    stream = _write(tmp_path / "s", rows, compression)
    reader = StreamReader(stream)
    assert len(reader.shards) > 3, "the test needs rows spread over several shards"
    assert reader.rows == len(rows)
    expected = [row for _, _, row in iter_stream_rows(stream, [])]
    for n in [len(rows) - 1, 0, 7, 2, *range(len(rows))]:  # out of order: shards are re-opened
        got = reader.row(n)
        assert list(got) == sorted(COLUMNS)
        for column in COLUMNS:
            assert got[column].dtype == expected[n][column].dtype
            np.testing.assert_array_equal(got[column], expected[n][column])
            np.testing.assert_array_equal(got[column], rows[n][column])
    shard, inside = reader.locate(len(rows) - 1)
    assert shard == len(reader.shards) - 1 and inside == reader.shards[-1]["samples"] - 1
    with pytest.raises(IndexError, match="out of range"):
        reader.row(len(rows))


def test_corrupted_or_missing_shard_is_reported(tmp_path):
    rng = np.random.default_rng(2)
    stream = _write(tmp_path / "s", [make_row([40, 40], rng) for _ in range(12)], "zstd")
    reader = StreamReader(stream)
    path = reader.shard_path(11)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert reader.locate(0)[0] != reader.locate(11)[0]
    reader.row(0)  # another shard still reads
    with pytest.raises(ShardError, match="hash mismatch"):
        StreamReader(stream).row(11)
    path.unlink()
    with pytest.raises(ShardError, match="missing shard file"):
        StreamReader(stream).row(11)
    with pytest.raises(ShardError, match="index.json: missing"):
        StreamReader(tmp_path / "nowhere")


def _pinned_rows() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [make_row(seq, rng, vocab_size=70000) for seq in [[3, 9], [300], [70000], [5]]]


def _stream_digest(stream: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in stream.rglob("*") if p.is_file()):
        digest.update(path.relative_to(stream).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# sha256 over (name, bytes) of every file streaming 0.13.0's MDSWriter wrote for _pinned_rows()
# with size_limit=4096; test_writer_matches_installed_streaming confirmed it against 0.13.0.
STREAMING_0_13_DIGEST = {
    "zstd": "144ffabb59399a15132498599cea37658abb47790ccf37b08a2798544636c7ea",
    None: "630d5c6fc8fdc7247a7c5df2fe99e8ab1784ef092c740342677eaa84bed24482",
}


@pytest.mark.parametrize("compression", ["zstd", None])
def test_writer_output_is_streaming_0_13_byte_for_byte(tmp_path, compression):
    ours = _write(tmp_path / "ours", _pinned_rows(), compression)
    assert len(read_index(ours)) > 1, "the pinned rows must span several shards"
    assert _stream_digest(ours) == STREAMING_0_13_DIGEST[compression]


@pytest.mark.parametrize("compression", ["zstd", None])
def test_writer_matches_installed_streaming(tmp_path, compression):
    streaming = pytest.importorskip("streaming")
    rows = _pinned_rows()
    with streaming.MDSWriter(
        out=str(tmp_path / "theirs"),
        columns=COLUMNS,
        compression=compression,
        hashes=SHARD_HASHES,
        size_limit=4096,
        progress_bar=False,
    ) as writer:
        for row in rows:
            writer.write(row)
    ours = _write(tmp_path / "ours", rows, compression)
    assert _stream_digest(ours) == _stream_digest(tmp_path / "theirs")


row_lengths = st.lists(st.integers(1, 700), min_size=1, max_size=4)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(row_lengths, min_size=1, max_size=12),
    seed=st.integers(0, 2**32 - 1),
    size_limit=st.sampled_from([256, 2048, None]),
)
def test_written_rows_read_back_equal(tmp_path_factory, lengths, seed, size_limit):
    rng = np.random.default_rng(seed)
    rows = [make_row(seq, rng, vocab_size=70000) for seq in lengths]
    stream = tmp_path_factory.mktemp("s")
    with MDSWriter(
        out=stream, columns=COLUMNS, compression="zstd", hashes=SHARD_HASHES, size_limit=size_limit
    ) as writer:
        for row in rows:
            writer.write(row)
    reader = StreamReader(stream)
    assert reader.rows == len(rows)
    for n, row in enumerate(rows):
        got = reader.row(n)
        for column in COLUMNS:
            assert got[column].dtype == row[column].dtype
            np.testing.assert_array_equal(got[column], row[column])


def test_merged_parts_equal_the_one_shot_index(tmp_path):
    rng = np.random.default_rng(3)
    rows = [make_row([40, 30], rng) for _ in range(9)]
    parts = [rows[:4], rows[4:]]
    for i, part in enumerate(parts):
        _write(tmp_path / "merged" / f"part-{i:05d}", part, "zstd")
    merge_index(
        [tmp_path / "merged" / f"part-{i:05d}" / "index.json" for i in range(2)],
        tmp_path / "merged",
    )
    merged = read_index(tmp_path / "merged")
    one_shot = read_index(_write(tmp_path / "one", rows, "zstd"))
    assert [s["samples"] for s in merged] == [
        s["samples"] for s in read_index(tmp_path / "merged" / "part-00000")
    ] + [s["samples"] for s in read_index(tmp_path / "merged" / "part-00001")]
    assert sum(s["samples"] for s in merged) == sum(s["samples"] for s in one_shot)
    strip = {k: v for k, v in one_shot[0].items() if k not in ("raw_data", "zip_data", "samples")}
    assert all({k: s[k] for k in strip} == strip for s in merged)
    assert merged[0]["zip_data"]["basename"] == "part-00000/shard.00000.mds.zstd"
    reader = StreamReader(tmp_path / "merged")
    for n, row in enumerate(rows):
        np.testing.assert_array_equal(reader.row(n)["input_ids"], row["input_ids"])


def _rewrite_index(stream: Path, edit) -> None:
    index = json.loads((stream / "index.json").read_text())
    for shard in index["shards"]:
        edit(shard)
    (stream / "index.json").write_text(json.dumps(index, sort_keys=True))


def test_verify_refuses_a_planted_pickle_column_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"

    class Plant:
        def __reduce__(self):
            return (Path.touch, (marker,))

    payload = pickle.dumps(Plant())
    stream = _write(tmp_path / "s", [make_row([20], np.random.default_rng(4))], None)
    shard_path = stream / "shard.00000.mds"
    shard_path.write_bytes(shard_path.read_bytes() + payload)

    def plant(shard):
        shard["column_names"] = [*shard["column_names"], "zz_extra"]
        shard["column_encodings"] = [*shard["column_encodings"], "pkl"]
        shard["column_sizes"] = [*shard["column_sizes"], None]
        shard["raw_data"]["bytes"] = shard_path.stat().st_size
        shard["raw_data"]["hashes"] = {"xxh64": xxhash.xxh64(shard_path.read_bytes()).hexdigest()}

    _rewrite_index(stream, plant)
    problems: list[str] = []
    assert list(iter_stream_rows(stream, problems)) == []
    assert len(problems) == 1 and "not longdata's row schema" in problems[0]
    assert "\n" not in problems[0]
    with pytest.raises(ShardError, match="row schema"):
        StreamReader(stream).row(0)
    assert not marker.exists()


def test_verify_refuses_missing_hashes_and_a_flipped_byte(tmp_path):
    stream = _write(tmp_path / "s", [make_row([20], np.random.default_rng(5))], "zstd")
    packed = stream / "shard.00000.mds.zstd"
    original = packed.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    packed.write_bytes(bytes(flipped))
    problems: list[str] = []
    assert list(iter_stream_rows(stream, problems)) == []
    assert len(problems) == 1 and "hash mismatch" in problems[0]

    packed.write_bytes(original)
    _rewrite_index(stream, lambda shard: shard["zip_data"].update(hashes={}))
    problems = []
    assert list(iter_stream_rows(stream, problems)) == []
    assert len(problems) == 1 and "records no hash" in problems[0]
