"""`overlength: truncate_middle` end to end: the middle of the longest user turn is cut, the head
(instruction) and the tail (question, answers) survive, every target survives, and the sample
fills max_seq_len exactly; samples the cut cannot fit are truncated and counted."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from longdata.build import build
from longdata.recipe import RecipeError, TokenizerConfig, validate_recipe
from longdata.stages.sample_index import read_sample_index
from longdata.stages.templates import load_tokenizer
from longdata.stages.tokenization import TokenCache
from longdata.tools.verify import iter_stream_rows, verify_build
from tests.builders import manifest_json

MAX_LEN = 256
QUESTION = "QUESTION: where is the lake?"


def filler(seed: int) -> str:
    words = ["river", "stone", "meadow", "harbor", "cloud", "lantern", "orchard", "valley"]
    return " ".join(words[(seed * 7 + i * 3) % len(words)] + str(i % 10) for i in range(260))


def rows() -> list[dict]:
    def chat(*turns):
        return {"messages": [{"role": role, "content": content} for role, content in turns]}

    return [
        chat(
            ("system", "Follow the instruction."),
            ("user", f"INSTRUCTION: summarise the text. {filler(0)} {QUESTION}"),
            ("assistant", "ANSWER: north of the river."),
        ),
        chat(
            ("user", f"INSTRUCTION: read this. {filler(1)} {QUESTION}"),
            ("assistant", "ANSWER: by the meadow."),
            ("user", "And the harbor?"),
            ("assistant", "ANSWER: east."),
        ),
        chat(("user", "A short question?"), ("assistant", "A short answer.")),
        # The answer alone is longer than a row: no user turn can make room.
        chat(("user", "Write at length."), ("assistant", "ANSWER: " + filler(2))),
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("middle")
    data = tmp / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows()))
    recipe = validate_recipe(
        {
            "name": "middle",
            "tokenizer": {"name": "builtin:quickstart"},
            "sources": [
                {"name": "chats", "kind": "generic", "format": "messages", "path": str(data)}
            ],
            "packing": {
                "max_seq_len": MAX_LEN,
                "overlength": "truncate_middle",
                "algorithm": "next_fit",
            },
            "validation": {"fraction": 0.0},
            "output": {"dir": str(tmp / "out"), "card_dir": str(tmp / "cards")},
            "cache_dir": str(tmp / "cache"),
        }
    )
    return tmp, build(recipe)


def packed_samples(out: Path, tmp: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, loss mask) of every packed sample, read back from the shards."""
    samples = []
    for stream in sorted((out / "train").glob("le_*")):
        for _, _, row in iter_stream_rows(stream, []):
            ends = np.cumsum(row["seq_lens"], dtype=np.int64)
            for start, end in zip(np.concatenate(([0], ends[:-1])), ends):
                samples.append((row["input_ids"][start:end], row["loss_mask"][start:end]))
    return samples


def test_head_tail_and_every_target_survive_and_the_sample_fills_the_row(built):
    tmp, result = built
    overlength = manifest_json(result)["splits"]["train"]["overlength"]
    assert (
        overlength["middle_cut"],
        overlength["truncated"],
        overlength["no_target_after_cut"],
    ) == (2, 1, 0)
    assert verify_build(result.out_dir).ok

    index = pl.from_arrow(read_sample_index(result.out_dir, "train")).sort("slot")
    cache = TokenCache(next((tmp / "cache" / "tokenized").glob("chats-*")))
    tokenizer, _ = load_tokenizer(TokenizerConfig(name="builtin:quickstart"))
    packed = {
        int(line["position"]): sample
        for line, sample in zip(
            index.sort("stream", "row", "slot").iter_rows(named=True),
            packed_samples(result.out_dir, tmp),
        )
    }
    cut = index.filter(pl.col("status") == "middle_cut")
    assert sorted(cut["position"].to_list()) == [0, 1]
    for line in cut.iter_rows(named=True):
        whole_ids, whole_mask = cache.tokens(line["position"], 0, line["sample_tokens"])
        ids, mask = packed[line["position"]]
        gap_start, gap = line["gap_start"], line["gap_tokens"]
        assert len(ids) == MAX_LEN == line["sample_tokens"] - gap
        np.testing.assert_array_equal(
            ids, np.concatenate([whole_ids[:gap_start], whole_ids[gap_start + gap :]])
        )
        assert mask.sum() == whole_mask.sum() == line["target_tokens"]  # every target survived
        assert not whole_mask[gap_start : gap_start + gap].any()
        text = tokenizer.decode(ids.tolist())
        assert "INSTRUCTION:" in text[:200]
        assert QUESTION + "<|eot_id|>" in text and text.count("ANSWER:") == (
            1 if line["position"] == 0 else 2
        )
        # The cut lies inside the user turn's filler: its head and tail are both still there.
        user_turn = text[text.index("INSTRUCTION:") : text.index(QUESTION)]
        assert len(user_turn.split()) > 8

    truncated = index.filter(pl.col("status") == "truncated")
    assert truncated["position"].to_list() == [3] and truncated["tokens"].to_list() == [MAX_LEN]
    assert index.filter(pl.col("position") == 2)["status"].to_list() == ["whole"]


def test_the_card_counts_middle_cuts(built):
    _, result = built
    card = (result.out_dir / "README.md").read_text(encoding="utf-8")
    header = next(
        line for line in card.splitlines() if line.startswith("| split | source | samples | whole")
    )
    assert "middle cut" in header
    row = next(line for line in card.splitlines() if line.startswith("| train | chats |"))
    cells = dict(
        zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in row.split("|")[1:-1]])
    )
    assert (cells["whole"], cells["cut to fit"], cells["middle cut"]) == ("1", "1", "2")


def test_recipe_lists_the_policies_when_one_is_unknown():
    recipe = {
        "name": "r",
        "tokenizer": {"name": "builtin:quickstart"},
        "sources": [{"name": "a", "kind": "antihaystack", "count": 1, "length_range": [10, 20]}],
        "packing": {"max_seq_len": 64, "overlength": "middle"},
        "output": {"dir": "out"},
    }
    with pytest.raises(RecipeError, match="truncate_middle") as error:
        validate_recipe(recipe)
    assert "packing.overlength" in str(error.value) and "'split'" in str(error.value)


def test_inspect_shows_the_two_kept_spans(built):
    from longdata.tools.inspection import inspect_row, sample_title

    _, result = built
    index = pl.from_arrow(read_sample_index(result.out_dir, "train"))
    line = index.filter(pl.col("status") == "middle_cut").row(0, named=True)
    view = inspect_row(result.out_dir, sample_id=line["sample_id"])
    [sample] = [s for s in view.samples if s.sample_id == line["sample_id"]]
    kept_head, resumes = line["gap_start"], line["gap_start"] + line["gap_tokens"]
    assert (
        f"middle_cut (tokens 0..{kept_head:,} + {resumes:,}..{line['sample_tokens']:,} "
        f"of {line['sample_tokens']:,})"
    ) in sample_title(view, sample)
