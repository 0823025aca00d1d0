"""longdata.format.mds reads rows exactly as streaming's own reader does, one shard at a time."""

from pathlib import Path

import numpy as np
import pytest

from longdata.format import COLUMNS, SHARD_HASHES, ShardError, StreamReader
from longdata.tools.verify import iter_stream_rows
from tests.builders import make_row


def _write(out: Path, rows, compression: str | None) -> Path:
    from longdata.format.mds import MDSWriter

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
    expected = [row for _, _, row in iter_stream_rows(stream, tmp_path, [])]
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
