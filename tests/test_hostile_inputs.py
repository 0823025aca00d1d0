"""Hostile inputs (issue 22, trust round two): each test is one class of input that today's code
mishandled — a row lost, a hang, or a setting accepted that no run should use."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from longdata.records import Quarantined
from longdata.sources import readers


def _split(rows):
    good = [row for row in rows if not isinstance(row, Quarantined)]
    return good, [row for row in rows if isinstance(row, Quarantined)]


# --- readers that lose nothing -----------------------------------------------------------------


@pytest.mark.parametrize("chunk", [7, 8, 9, 10, 64])
def test_a_character_straddling_a_chunk_boundary_keeps_its_element(tmp_path, monkeypatch, chunk):
    # Every offset of the 3-byte "中" relative to the chunk boundary is tried across the chunk
    # sizes and elements below, so some element always has the character split between chunks.
    monkeypatch.setattr(readers, "READ_CHUNK", chunk)
    rows = [{"instruction": "中" * (i % 5 + 1) + "文", "output": f"a{i}"} for i in range(12)]
    path = tmp_path / "zh.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    good, bad = _split(list(readers.iter_rows(str(path))))
    assert not bad, bad[0].reason
    assert [row for _, row in good] == rows


def test_undecodable_bytes_at_a_chunk_boundary_still_quarantine_only_their_element(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(readers, "READ_CHUNK", 5)
    path = tmp_path / "bytes.json"
    path.write_bytes(b'[{"a": "ok"}, {"a": "caf\xe9"}, {"a": "\xe4\xb8\xad"}]')
    good, bad = _split(list(readers.iter_rows(str(path))))
    assert [row for _, row in good] == [{"a": "ok"}, {"a": "中"}]
    [row] = bad
    assert row.location == "bytes.json[1]" and row.reason.startswith("not UTF-8")


# --- regular files only ------------------------------------------------------------------------


def test_a_fifo_as_a_source_path_is_one_line_not_a_hang(tmp_path):
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    # In a child process: a hang on today's code must fail the test, not stall the suite.
    code = (
        "import sys\n"
        "from longdata.sources.readers import iter_rows, NotRegularFileError\n"
        "try:\n"
        f"    list(iter_rows({str(fifo)!r}))\n"
        "except NotRegularFileError as error:\n"
        "    print(error); sys.exit(3)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("reading a FIFO source hung")
    assert done.returncode == 3, done.stderr
    assert done.stdout.count("\n") == 1 and "not a regular file" in done.stdout


def test_dev_zero_as_a_source_path_is_refused():
    with pytest.raises(readers.NotRegularFileError, match="not a regular file"):
        readers.local_files("/dev/zero")
