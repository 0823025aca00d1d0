"""Readers and schema parsers: good rows normalise, every bad row is quarantined with a reason."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longdata.records import Conversation, Message, Quarantined, RowError
from longdata.sources.readers import iter_hub_rows, iter_rows
from longdata.sources.schemas import parse_alpaca, parse_messages, parse_sharegpt


def good_messages(i: int = 0) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"doc {i}\n\nquestion?"},
            {"role": "assistant", "content": f"answer {i}"},
        ],
        "dataset": "longalign",
        "id": f"row-{i}",
        "length": 123,
    }


def split(items):
    good = [item for item in items if not isinstance(item, Quarantined)]
    bad = [item for item in items if isinstance(item, Quarantined)]
    return good, bad


def test_jsonl_bad_lines_are_quarantined_with_location_and_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps(good_messages(0)).encode(),
        b'{"messages": [',
        b"",
        "caf\u00e9".encode("latin-1") + b'"}',
        json.dumps(good_messages(1)).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    good, bad = split(list(iter_rows(str(path))))
    assert [loc for loc, _ in good] == ["mixed.jsonl:1", "mixed.jsonl:5"]
    assert [(q.location, q.reason.split(":")[0]) for q in bad] == [
        ("mixed.jsonl:2", "invalid JSON"),
        ("mixed.jsonl:4", "not UTF-8"),
    ]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"messages": []}, "empty conversation"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn with content"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role must be one of"),
        (
            {"messages": [{"role": "user", "content": 3}]},
            "messages[0].content must be a string, got int",
        ),
        ({"text": "x"}, "messages must be a list, got NoneType"),
        ([1, 2], "row must be a JSON object, got list"),
        ({"messages": [{"role": "assistant", "content": "  "}]}, "no assistant turn with content"),
    ],
)
def test_messages_schema_rejects(row, reason):
    with pytest.raises(RowError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        parse_messages(row)


WHITESPACE_EDGED = {
    "messages": [
        {"role": "system", "content": " be brief\r\n"},
        {"role": "user", "content": "a\r\nb"},
        {"role": "assistant", "content": "c "},
    ]
}


def test_messages_schema_keeps_text_as_written():
    assert parse_messages(WHITESPACE_EDGED) == (
        Message("system", " be brief\r\n"),
        Message("user", "a\r\nb"),
        Message("assistant", "c "),
    )


def test_strip_messages_normalises_whitespace_and_crlf():
    assert parse_messages(WHITESPACE_EDGED, strip=True) == (
        Message("system", "be brief"),
        Message("user", "a\nb"),
        Message("assistant", "c"),
    )


def test_alpaca_appends_input_to_the_user_turn():
    longalpaca = {
        "instruction": "Below is a paper.\n\nPAPER",
        "input": "What is it about?",
        "output": "Cats.",
        "file": "paper_1",
    }
    assert parse_alpaca(longalpaca) == (
        Message("user", "Below is a paper.\n\nPAPER\n\nWhat is it about?"),
        Message("assistant", "Cats."),
    )
    assert parse_alpaca({"instruction": "Q", "input": None, "output": "A"})[0] == Message(
        "user", "Q"
    )
    with pytest.raises(RowError, match="output must be a string"):
        parse_alpaca({"instruction": "Q", "input": ""})


def test_sharegpt_maps_speakers():
    row = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
        ]
    }
    assert [m.role for m in parse_sharegpt(row)] == ["system", "user", "assistant"]
    with pytest.raises(RowError, match="conversations\\[0\\].from must be one of"):
        parse_sharegpt({"conversations": [{"from": "alien", "value": "q"}]})


def test_json_array_streams_elements(tmp_path, monkeypatch):
    import longdata.sources.readers as readers

    monkeypatch.setattr(readers, "READ_CHUNK", 64)  # force elements across chunk boundaries
    rows = [
        {"instruction": f"doc {i} " + "x" * 100, "input": "", "output": f"a{i}"} for i in range(20)
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows, indent=2))
    good, bad = split(list(iter_rows(str(path))))
    assert not bad
    assert [row for _, row in good] == rows
    assert good[3][0] == "alpaca.json[3]"


def test_json_array_cut_short_quarantines_only_the_tail(tmp_path):
    rows = [{"instruction": f"doc {i}", "input": "", "output": f"a{i}"} for i in range(5)]
    text = json.dumps(rows)
    path = tmp_path / "cut.json"
    path.write_text(text[: text.index('"a3"') + 2])
    good, bad = split(list(iter_rows(str(path))))
    assert [row for _, row in good] == rows[:3]
    [tail] = bad
    assert tail.location == "cut.json[3]" and "cut short" in tail.reason


def test_json_array_element_with_bad_bytes(tmp_path):
    path = tmp_path / "bytes.json"
    path.write_bytes(
        b'[{"instruction": "ok", "output": "a"}, {"instruction": "caf\xe9", "output": "b"},'
        b' {"instruction": "fine", "output": "c"}]'
    )
    good, bad = split(list(iter_rows(str(path))))
    assert [row["output"] for _, row in good] == ["a", "c"]
    assert bad[0].location == "bytes.json[1]" and bad[0].reason.startswith("not UTF-8")


def test_parquet_and_directories(tmp_path):
    table = pa.Table.from_pylist([good_messages(i) for i in range(3)])
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "part-0.parquet")
    (tmp_path / "data" / "part-1.jsonl").write_text(json.dumps(good_messages(9)) + "\n")
    good, bad = split(list(iter_rows(str(tmp_path / "data"))))
    assert not bad
    assert [row["id"] for _, row in good] == ["row-0", "row-1", "row-2", "row-9"]


def test_hub_reader_goes_through_datasets(tmp_path):
    """The code path an online user takes for `path: THUDM/LongAlign-10k`, fed a local dataset
    dir."""
    folder = tmp_path / "LongAlign-10k"
    folder.mkdir()
    (folder / "long.jsonl").write_text(
        "".join(json.dumps(good_messages(i)) + "\n" for i in range(4))
    )
    rows = list(iter_hub_rows(str(folder), "train"))
    assert [loc for loc, _ in rows] == [f"{folder}[{i}]" for i in range(4)]
    assert parse_messages(rows[2][1])[1].content == "answer 2"


def test_missing_path_that_is_no_hub_dataset_fails_clearly():
    with pytest.raises(FileNotFoundError, match="not a local path and not loadable"):
        list(iter_rows("/nonexistent/surely/not/a/dataset", "train"))


def test_conversation_record_is_the_only_shape_downstream():
    conversation = Conversation(parse_messages(good_messages()), "x:1")
    assert conversation.messages[-1].role == "assistant"
