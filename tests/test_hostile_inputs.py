"""Hostile inputs (issue 22, trust round two): each test is one class of input that today's code
mishandled — a row lost, a hang, or a setting accepted that no run should use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from longdata.records import Quarantined
from longdata.sources import readers
from longdata.trainer.config import ConfigError, TrainConfig, read_config_file


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


def test_one_corrupt_parquet_row_group_quarantines_only_its_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"doc {i}", "output": f"a{i}"} for i in range(8)]
    path = tmp_path / "groups.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2, compression="NONE")
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(path.read_bytes())
    start = column.dictionary_page_offset or column.data_page_offset
    data[start : start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(data))
    good, bad = _split(list(readers.iter_rows(str(path))))
    assert [row for _, row in good] == rows[:2] + rows[4:]
    assert [row.location for row in bad] == ["groups.parquet[2]", "groups.parquet[3]"]
    assert all("row group 1" in row.reason for row in bad)
    assert good[2][0] == "groups.parquet[4]"


def test_a_stray_bracket_inside_a_bad_element_quarantines_only_that_element(tmp_path):
    path = tmp_path / "stray.json"
    path.write_text('[{"a": 1},\n{"a": 2 ]},\n{"a": 3},\n{"a": 4}]')
    good, bad = _split(list(readers.iter_rows(str(path))))
    assert [row for _, row in good] == [{"a": 1}, {"a": 3}, {"a": 4}]
    assert [row.location for row in bad] == ["stray.json[1]"]
    assert [location for location, _ in good] == ["stray.json[0]", "stray.json[2]", "stray.json[3]"]


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


# --- bounds on every training setting ----------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("max_grad_norm", -1.0, "max_grad_norm must be >= 0"),
        ("max_grad_norm", float("inf"), "max_grad_norm must be >= 0"),
        ("min_lr_ratio", -5.0, "min_lr_ratio must be in [0, 1]"),
        ("min_lr_ratio", 1.5, "min_lr_ratio must be in [0, 1]"),
        ("batch_size", 10**12, "batch_size must be <= "),
        ("lora_rank", 10**9, "lora_rank must be <= "),
        ("threads", 10**9, "threads must be <= "),
        ("threads", 0, "threads must be >= 1"),
        ("grad_accum", 10**12, "grad_accum must be <= "),
        ("lr", -1.0, "lr must be a positive finite number"),
        ("lr", float("nan"), "lr must be a positive finite number"),
        ("weight_decay", -0.1, "weight_decay must be >= 0"),
    ],
)
def test_an_out_of_range_training_setting_is_refused_before_work(setting, value, message):
    config = TrainConfig(build_dir="build", **{setting: value})
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.validate()


def test_max_grad_norm_zero_turns_clipping_off():
    TrainConfig(build_dir="build", max_grad_norm=0.0).validate()


def test_a_training_config_alias_bomb_is_refused_quickly(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        prev = chr(ord("a") + level - 1)
        name = chr(ord("a") + level)
        lines.append(f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]")
    bomb = tmp_path / "bomb.yml"
    bomb.write_text("\n".join(lines) + "\nsteps: *i\n")
    assert bomb.stat().st_size < 600
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than"):
        read_config_file(bomb)
    assert time.perf_counter() - started < 5


def test_the_train_cli_prints_a_bad_bound_as_one_line(tmp_path):
    import typer

    from longdata.trainer import cli

    app = typer.Typer()
    app.command("train")(cli.train)
    build = tmp_path / "build"
    build.mkdir()
    result = CliRunner().invoke(app, [str(build), "--max-grad-norm", "-1"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "max_grad_norm must be >= 0" in result.stderr
