"""Source partitions read, in order, exactly the records of the whole source: the same rows, the
same quarantined rows, positions, locations and file labels, whatever the format and however it
is cut."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longdata.recipe import AntiHaystackSource, GenericSource, TextSource
from longdata.records import Conversation, Document
from longdata.sources import read_source
from longdata.sources.partitions import Partition, count_rows, place, plan_partitions


def chat(i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"question {i} " + "word " * (i % 7)},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    }


def records(source, cache_dir: Path, partition=None) -> list[tuple]:
    out = []
    for record in read_source(source, cache_dir=cache_dir, count_tokens=len, partition=partition):
        if isinstance(record, Conversation):
            out.append(("row", record.location, record.file, record.position, record.messages))
        elif isinstance(record, Document):
            out.append(("document", record.location, record.file, record.position, record.text))
        else:
            out.append(("quarantined", record.location, record.file, record.reason))
    return out


def partitioned(source, path: str | None, wanted: int) -> list[Partition]:
    planned = plan_partitions(source, path, wanted)
    return place(planned, [count_rows(p) for p in planned], wanted)


def assert_partitions_read_the_whole(source, path, tmp_path, wanted) -> list[Partition]:
    parts = partitioned(source, path, wanted)
    whole = records(source, tmp_path)
    assert [r for p in parts for r in records(source, tmp_path, p)] == whole
    assert sum(p.rows for p in parts) == len(whole)
    return parts


def generic(path: Path, fmt: str = "messages") -> GenericSource:
    return GenericSource(name="s", kind="generic", format=fmt, path=str(path))


def test_jsonl_by_byte_range_keeps_lines_positions_and_quarantine(tmp_path):
    lines = []
    for i in range(40):
        lines.append(json.dumps(chat(i)))
        if i % 9 == 3:
            lines.append("")  # blank lines are skipped but still numbered
        if i % 11 == 5:
            lines.append("{not json")
        if i % 13 == 7:
            lines.append(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines))  # no newline at the end: the last line still counts
    parts = assert_partitions_read_the_whole(generic(path), str(path), tmp_path, wanted=5)
    assert len(parts) == 5 and [p.reader for p in parts] == ["jsonl"] * 5
    assert parts[0].span[0] == 0 and parts[-1].span[1] == path.stat().st_size
    assert all(a.span[1] == b.span[0] for a, b in zip(parts, parts[1:]))  # contiguous, no gap
    content = path.read_bytes()
    assert all(content[p.span[0] - 1 : p.span[0]] == b"\n" for p in parts[1:])  # cut at line starts


def test_jsonl_smaller_than_the_wanted_cuts_gives_fewer_partitions(tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_text(json.dumps(chat(1)) + "\n" + json.dumps(chat(2)) + "\n")
    parts = assert_partitions_read_the_whole(generic(path), str(path), tmp_path, wanted=8)
    assert len(parts) == 2


def test_json_array_by_element_range(tmp_path):
    path = tmp_path / "rows.json"
    rows = [{"instruction": f"doc {i}", "input": "", "output": f"out {i}"} for i in range(17)]
    rows[4] = {"instruction": "", "input": None, "output": "x"}  # quarantined by the parser
    path.write_text(json.dumps(rows, indent=1))
    parts = assert_partitions_read_the_whole(generic(path, "alpaca"), str(path), tmp_path, wanted=3)
    assert [p.span for p in parts] == [(0, 5), (5, 11), (11, 17)]


def test_parquet_by_row_group_and_a_directory_of_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    table = pa.table({"messages": [chat(i)["messages"] for i in range(23)]})
    pq.write_table(table, data / "a.parquet", row_group_size=5)  # 5 row groups
    (data / "b.jsonl").write_text("".join(json.dumps(chat(i)) + "\n" for i in range(30, 41)))
    parts = assert_partitions_read_the_whole(generic(data), str(data), tmp_path, wanted=3)
    assert [p.reader for p in parts] == ["parquet"] * 3 + ["jsonl"] * 3
    assert [p.first_position for p in parts][3] == 23  # the second file continues the positions


def test_hub_dataset_by_groups_of_data_files(tmp_path):
    """A dataset loaded through ``datasets`` (here from local Parquet files in the hub layout)
    is cut into contiguous groups of its data files."""
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    for shard in range(3):
        rows = [chat(10 * shard + i)["messages"] for i in range(4 + shard)]
        pq.write_table(pa.table({"messages": rows}), data / f"train-0000{shard}-of-00003.parquet")
    source, root = generic(tmp_path / "hub"), str(tmp_path / "hub")
    one = Partition("hub", root, (0, 1))
    whole = records(source, tmp_path, place([one], [count_rows(one)], 1)[0])
    parts = [Partition("hub", root, (i, 2)) for i in range(2)]
    placed = place(parts, [count_rows(p) for p in parts], 2)
    assert [r for p in placed for r in records(source, tmp_path, p)] == whole
    assert len(whole) == 4 + 5 + 6 and [p.rows for p in placed] == [9, 6]


@pytest.mark.parametrize("wanted", [2, 3])
def test_generated_source_by_item_index(tmp_path, wanted):
    source = AntiHaystackSource(name="h", kind="antihaystack", count=7, length_range=(200, 400))
    parts = assert_partitions_read_the_whole(source, None, tmp_path, wanted)
    assert [p.span[0] for p in parts] == [i * 7 // wanted for i in range(wanted)]


def test_files_of_a_directory_keep_their_labels_bom_and_resync_under_partitions(tmp_path):
    """Per-file accounting needs each record's file label (its path inside the directory) to be
    the one an uncut read gives; the readers' BOM, resync and trailing-content handling too."""
    data = tmp_path / "data"
    for folder in ("x", "y"):
        (data / folder).mkdir(parents=True)
        lines = [json.dumps(chat(i)) for i in range(12)]
        lines[5] = "{broken"
        (data / folder / "part.jsonl").write_bytes(
            b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n"
        )
    elements = [json.dumps(chat(i)) for i in range(9)]
    elements[3] = '{"messages": "bad", oops}'  # read resumes at the next element
    (data / "z.json").write_text("[\n" + ",\n".join(elements) + "\n]\ntrailing text")
    whole = records(generic(data), tmp_path)
    bad = [r for r in whole if r[0] == "quarantined"]
    assert [r[1] for r in bad] == [
        "x/part.jsonl:6",
        "y/part.jsonl:6",
        "z.json[3]",
        "z.json[after the array]",
    ]
    assert [r[2] for r in bad] == ["x/part.jsonl", "y/part.jsonl", "z.json", "z.json"]
    assert sum(r[1] == "x/part.jsonl:1" for r in whole) == 1  # the BOM did not break line 1
    parts = assert_partitions_read_the_whole(generic(data), str(data), tmp_path, wanted=3)
    assert {p.label for p in parts} == {"x/part.jsonl", "y/part.jsonl", "z.json"}


def test_unreadable_parquet_is_one_quarantined_partition(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("".join(json.dumps(chat(i)) + "\n" for i in range(6)))
    (data / "b.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    parts = assert_partitions_read_the_whole(generic(data), str(data), tmp_path, wanted=2)
    assert [(p.reader, p.label, p.rows) for p in parts][-1] == ("parquet", "b.parquet", 1)
    last = records(generic(data), tmp_path, parts[-1])
    assert last[0][:3] == ("quarantined", "b.parquet[0:]", "b.parquet")


def test_text_sources_of_rows_are_cut_and_text_files_are_read_whole(tmp_path):
    rows = tmp_path / "docs.jsonl"
    rows.write_text(
        "".join(json.dumps({"text": f"document {i} " * (i + 1)}) + "\n" for i in range(10))
    )
    source = TextSource(name="t", kind="text", path=str(rows))
    parts = assert_partitions_read_the_whole(source, str(rows), tmp_path, wanted=3)
    assert len(parts) == 3
    files = tmp_path / "files"
    files.mkdir()
    for i in range(3):
        (files / f"{i}.txt").write_text(f"text file {i}")
    assert (
        plan_partitions(
            TextSource(name="f", kind="text", path=str(files), glob="*.txt"), str(files), 3
        )
        is None
    )
