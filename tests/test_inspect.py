"""`longdata inspect`: the rendered row shows exactly the loss mask, elides without hiding targets,
finds samples by id, and fails with one clear line on bad arguments."""

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from rich.console import Console
from rich.text import Text
from typer.testing import CliRunner

from longdata.build import build
from longdata.cli import app
from longdata.format import Manifest, StreamReader, tokenizer_location
from longdata.recipe import validate_recipe
from longdata.tools.inspection import (
    TARGET_CLOSE,
    TARGET_OPEN,
    Detokenizer,
    InspectError,
    NotPacked,
    inspect_row,
    render,
    segments,
    theme,
)
from tests.builders import manifest_json
from tests.test_build import small_recipe

ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two stages: `short` (1024, over-length samples dropped) and `long` (2048, over-length
    samples split), with a source of weight 1.5 (repeated samples): every kind of placement."""
    tmp = tmp_path_factory.mktemp("inspect")
    data = small_recipe(
        tmp,
        max_seq_len=2048,
        overlength="split",
        stages=[
            {"name": "short", "max_seq_len": 1024, "overlength": "drop"},
            {"name": "long", "max_seq_len": 2048},
        ],
    )
    result = build(validate_recipe(data))
    return result.out_dir, manifest_json(result)


@pytest.fixture(scope="module")
def detok(built):
    return Detokenizer(Manifest.read(built[0]).tokenizer)


@pytest.fixture(scope="module")
def tokenizer(built):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_location(Manifest.read(built[0]).tokenizer))


def index(out: Path, split: str) -> pl.DataFrame:
    return pl.read_parquet(out / split / "samples.parquet")


def every_row(out: Path, manifest: dict, split: str):
    for stream in manifest["splits"][split]["streams"]:
        reader = StreamReader(out / stream["path"])
        for row in range(reader.rows):
            yield stream["name"], row, reader.row(row)


def terminal() -> Console:
    return Console(
        file=io.StringIO(), record=True, force_terminal=True, color_system="truecolor", width=20_000
    )  # wide: no wrapping, so the text is exactly the decoded text


def recorded(view, plain: bool) -> Text:
    """What a colour terminal receives, parsed back from its escape codes into styled text."""
    console = terminal()
    render(view, console, plain=plain)
    return Text.from_ansi(console.export_text(styles=True))


def target_background():
    """The background colour target text gets on that terminal (as parsed back)."""
    console = terminal()
    with console.use_theme(theme()):
        console.print(Text("x", style="inspect.target"))
    background = (
        Text.from_ansi(console.export_text(styles=True)).get_style_at_offset(console, 0).bgcolor
    )
    assert background is not None, "the tests tell targets by their background colour"
    return background


def sample_bodies(text: Text, n_samples: int) -> list[tuple[str, str]]:
    """(all text, target-styled text) of each sample's body: the lines after its title rule."""
    target_bg = target_background()
    lines = text.split("\n", include_separator=True)
    titles = [i for i, line in enumerate(lines) if re.match(r"(▶ )?slot \d+ · ", line.plain)]
    assert len(titles) == n_samples
    bodies = []
    for title, end in zip(titles, [*titles[1:], len(lines)]):
        body = Text("").join(lines[title + 1 : end])
        is_target = np.zeros(len(body.plain), dtype=bool)
        for span in body.spans:  # from escape codes: non-overlapping, with parsed Style objects
            is_target[span.start : span.end] = span.style.bgcolor == target_bg
        target = "".join(np.asarray(list(body.plain), dtype=object)[is_target])
        bodies.append((body.plain.removesuffix("\n"), target))
    return bodies


def test_detokenizer_decodes_as_the_tokenizer_does(built, detok, tokenizer):
    out, manifest = built
    _, _, row = next(every_row(out, manifest, "long/train"))
    ids = row["input_ids"]
    assert detok.decode(ids) == tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    assert detok.special == set(tokenizer.all_special_ids)


@pytest.mark.parametrize("split", ["long/train", "short/validation"])
def test_highlight_is_exactly_the_target_tokens(built, detok, tokenizer, split):
    """Every row of the split, rendered in colour with --full: per sample, the characters styled
    as target are exactly the decoded loss-mask tokens, which are exactly its assistant turns."""
    out, manifest = built
    multi = 0
    for stream, row, data in every_row(out, manifest, split):
        view = inspect_row(out, split=split, stream=stream, row=row, full=True, detok=detok)
        bodies = sample_bodies(recorded(view, plain=False), len(data["seq_lens"]))
        multi += len(bodies) > 1
        start = 0
        for (body, target), length, sample in zip(bodies, data["seq_lens"].tolist(), view.samples):
            ids = data["input_ids"][start : start + length]
            mask = data["loss_mask"][start : start + length]
            start += length
            decoded = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
            assert body == decoded
            assert target == tokenizer.decode(ids[mask == 1], clean_up_tokenization_spaces=False)
            if sample.status == "whole":  # (a piece of a split sample may cut a turn)
                turns = [
                    part.split("<|eot_id|>")[0] + "<|eot_id|>"
                    for part in decoded.split(ASSISTANT_HEADER)[1:]
                ]
                assert target == "".join(turns) and target
    assert multi or split != "long/train", "the split should have rows holding several samples"


def test_plain_output_brackets_exactly_the_targets(built, tokenizer):
    out, manifest = built
    stream, row, data = next(
        (s, r, d) for s, r, d in every_row(out, manifest, "long/train") if len(d["seq_lens"]) > 1
    )
    view = inspect_row(out, split="long/train", stream=stream, row=row, full=True)
    console = Console(file=io.StringIO(), record=True, width=100_000)  # no terminal: no colour
    render(view, console)  # plain is chosen because colour is off
    text = console.export_text()
    assert "\x1b[" not in text
    text = text[text.index("slot 0 · ") :]  # after the header (its legend shows the brackets)
    bracketed = "".join(re.findall(f"{TARGET_OPEN}(.*?){TARGET_CLOSE}", text, flags=re.S))
    ids, mask = data["input_ids"], data["loss_mask"]
    starts = np.cumsum([0, *data["seq_lens"][:-1].tolist()])
    expected = "".join(
        tokenizer.decode(ids[a : a + n][mask[a : a + n] == 1])
        for a, n in zip(starts, data["seq_lens"].tolist())
    )
    assert bracketed == expected and bracketed.count("<|eot_id|>") >= len(starts)


def mask_runs(mask: np.ndarray) -> list[tuple[int, int, bool]]:
    cuts = [0, *(np.flatnonzero(np.diff(mask)) + 1).tolist(), len(mask)]
    return [(a, b, bool(mask[a])) for a, b in zip(cuts[:-1], cuts[1:])]


@pytest.mark.parametrize("context", [0, 7, 40])
def test_elision_keeps_targets_and_counts_what_it_hides(built, detok, context):
    out, manifest = built
    elided_any = False
    for stream, row, data in every_row(out, manifest, "long/train"):
        view = inspect_row(
            out, split="long/train", stream=stream, row=row, context=context, detok=detok
        )
        for sample in view.samples:
            ids = data["input_ids"][sample.offset : sample.offset + sample.tokens]
            mask = data["loss_mask"][sample.offset : sample.offset + sample.tokens]
            segs = sample.segments
            assert sum(s.tokens for s in segs) == sample.tokens == len(ids)
            assert sum(s.tokens for s in segs if s.target and not s.elided) == mask.sum()
            # Walk the mask's runs: short ones (and every target run here) are shown whole; a
            # long one keeps `context` tokens at each end (up to 3 more where a character's
            # bytes straddle the cut) around one elided gap.
            walk = iter(segs)
            for a, b, target in mask_runs(mask):
                n, seg = b - a, next(walk)
                if target or n - 2 * context < 16:
                    assert (seg.tokens, seg.target, seg.text) == (n, target, detok.decode(ids[a:b]))
                    continue
                elided_any = True
                if context:
                    assert context <= seg.tokens <= context + 3 and not seg.elided
                    assert seg.text == detok.decode(ids[a : a + seg.tokens])
                    a, seg = a + seg.tokens, next(walk)
                assert seg.elided and not seg.target
                a += seg.tokens
                if context:
                    seg = next(walk)
                    assert context <= seg.tokens <= context + 3 and not seg.elided
                    assert seg.text == detok.decode(ids[a:b])
                    a += seg.tokens
                assert a == b
            assert next(walk, None) is None
            text = recorded_plain(view)
            for s in segs:
                if s.elided:
                    assert f"… {s.tokens:,} tokens …" in text
    assert elided_any


def recorded_plain(view) -> str:
    console = Console(file=io.StringIO(), record=True, width=100)
    render(view, console, plain=True)
    return console.export_text()


def test_a_huge_target_run_is_elided_in_its_middle_and_counted(detok):
    ids = np.asarray(detok._tokenizer.encode("river lake " * 4000).ids, dtype=np.uint32)
    n = len(ids)
    mask = np.zeros(n, dtype=np.uint8)
    mask[100:3100] = 1  # a 3,000-token target run between two non-target ones
    segs = segments(ids, mask, detok, context=5)  # targets keep 1,000 tokens at each end
    assert [(s.tokens, s.target, s.elided) for s in segs] == [
        (5, False, False),
        (90, False, True),
        (5, False, False),
        (1000, True, False),
        (1000, True, True),
        (1000, True, False),
        (5, False, False),
        (n - 3110, False, True),
        (5, False, False),
    ]
    assert segs[3].text == detok.decode(ids[100:1100]) and segs[5].text == detok.decode(
        ids[2100:3100]
    )
    assert [s.as_dict() for s in segs][4] == {"elided": 1000, "target": True}
    segs = segments(ids, mask, detok, context=200)  # 10x the context: 2,000 > 3,000 / 2
    assert [(s.tokens, s.target, s.elided) for s in segs] == [
        (100, False, False),
        (3000, True, False),
        (200, False, False),
        (n - 3500, False, True),
        (200, False, False),
    ]
    segs = segments(ids, mask, detok, context=0)
    assert [(s.tokens, s.target, s.elided) for s in segs] == [
        (100, False, True),
        (1000, True, False),
        (1000, True, True),
        (1000, True, False),
        (n - 3100, False, True),
    ]
    assert [(s.tokens, s.target, s.elided) for s in segments(ids, mask, detok, full=True)] == [
        (100, False, False),
        (3000, True, False),
        (n - 3100, False, False),
    ]


def test_elision_does_not_cut_a_character_spread_over_byte_tokens(detok):
    ids = np.asarray(detok._tokenizer.encode("龘🎉" * 200).ids, dtype=np.uint32)
    assert "\ufffd" in detok.decode(ids[:1]), "the test needs characters spread over tokens"
    for context in range(1, 12):
        segs = segments(ids, np.zeros(len(ids), dtype=np.uint8), detok, context=context)
        head, gap, tail = segs
        assert gap.elided and head.tokens + gap.tokens + tail.tokens == len(ids)
        assert context <= head.tokens <= context + 3 and context <= tail.tokens <= context + 3
        assert "\ufffd" not in head.text + tail.text
        assert head.text == detok.decode(ids[: head.tokens])
        assert tail.text == detok.decode(ids[len(ids) - tail.tokens :])


def first_placements(out: Path, manifest: dict, split: str) -> dict[str, list[dict]]:
    order = {s["name"]: i for i, s in enumerate(manifest["splits"][split]["streams"])}
    packed = index(out, split).filter(pl.col("row") >= 0).to_dicts()
    by_id: dict[str, list[dict]] = {}
    for line in sorted(packed, key=lambda p: (order[p["stream"]], p["row"], p["slot"])):
        by_id.setdefault(line["sample_id"], []).append(line)
    return by_id


def test_sample_id_finds_its_row_and_slot(built, detok):
    out, manifest = built
    by_id = first_placements(out, manifest, "long/train")
    several = [i for i, p in by_id.items() if len(p) > 1]
    split_pieces = [i for i, p in by_id.items() if p[0]["status"] == "split"]
    assert several and split_pieces
    for sample_id in {*several, *split_pieces, *list(by_id)[:5]}:
        first = by_id[sample_id][0]
        view = inspect_row(out, split="long/train", sample_id=sample_id, detok=detok)
        assert (view.split, view.stream, view.row) == ("long/train", first["stream"], first["row"])
        slot = view.focus["slot"]
        assert slot == first["slot"]
        assert [(p["stream"], p["row"], p["slot"]) for p in view.focus["placements"]] == [
            (p["stream"], p["row"], p["slot"]) for p in by_id[sample_id]
        ]
        data = StreamReader(out / "long/train" / first["stream"]).row(first["row"])
        sample = view.samples[slot]
        assert sample.sample_id == sample_id and sample.tokens == first["tokens"]
        assert data["seq_lens"][slot] == first["tokens"]
        assert sample.offset == int(data["seq_lens"][:slot].sum())
        assert data["source_ids"][slot] == first["source_id"]
        assert (sample.start, sample.status) == (first["start"], first["status"])
    # Every row's slots carry the ids the index gives them.
    for stream, row, _ in every_row(out, manifest, "long/train"):
        view = inspect_row(out, split="long/train", stream=stream, row=row, detok=detok)
        lines = index(out, "long/train").filter(
            (pl.col("stream") == stream) & (pl.col("row") == row)
        )
        assert [s.sample_id for s in view.samples] == lines.sort("slot")["sample_id"].to_list()


def test_sample_id_not_packed_says_why_and_where_it_is(built, detok):
    out, manifest = built
    dropped = index(out, "short/train").filter(pl.col("status") == "dropped").row(0, named=True)
    sample_id = dropped["sample_id"]
    with pytest.raises(NotPacked) as caught:
        inspect_row(out, split="short/train", sample_id=sample_id, detok=detok)
    message = caught.value.report["message"]
    assert f"{dropped['sample_tokens']:,} tokens, longer than max_seq_len 1,024" in message
    first = first_placements(out, manifest, "long/train")[sample_id][0]
    assert f"--split long/train --stream {first['stream']} --row {first['row']}" in message
    # Without --split, the first split that packs it is shown.
    view = inspect_row(out, sample_id=sample_id, detok=detok)
    assert (view.split, view.stream, view.row, view.focus["slot"]) == (
        "long/train",
        first["stream"],
        first["row"],
        first["slot"],
    )


def run_cli(*args: str):
    return CliRunner().invoke(app, ["inspect", *args])


def test_json_output(built):
    out, manifest = built
    result = run_cli(
        str(out),
        "--split",
        "long/train",
        "--stream",
        "le_002048",
        "--row",
        "2",
        "--context",
        "10",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["split"], data["stream"], data["row"]) == ("long/train", "le_002048", 2)
    row = StreamReader(out / "long/train/le_002048").row(2)
    assert [s["tokens"] for s in data["samples"]] == row["seq_lens"].tolist()
    assert (
        data["tokens"] == len(row["input_ids"]) and data["target_tokens"] == row["loss_mask"].sum()
    )
    lines = index(out, "long/train").filter(
        (pl.col("stream") == "le_002048") & (pl.col("row") == 2)
    )
    for sample, line in zip(data["samples"], lines.sort("slot").to_dicts()):
        for key in ("slot", "sample_id", "source", "status", "start", "tokens", "target_tokens"):
            assert sample[key] == line[key], key
        for segment in sample["segments"]:
            assert set(segment) in ({"target", "text", "tokens"}, {"elided", "target"})
        assert sum(s.get("tokens", s.get("elided")) for s in sample["segments"]) == sample["tokens"]
        assert (
            sum(s["tokens"] for s in sample["segments"] if s["target"] and "text" in s)
            == sample["target_tokens"]
        )
    assert any("elided" in s for sample in data["samples"] for s in sample["segments"])


def test_cli_renders_plain_when_not_a_terminal(built):
    out, _ = built
    result = run_cli(str(out), "--split", "long/train", "--context", "5")
    assert result.exit_code == 0, result.output
    assert "\x1b[" not in result.stdout and TARGET_OPEN in result.stdout
    assert (
        "slot 0 · " in result.stdout and "long/train · le_001024 · row 0 of 1 row" in result.stdout
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--row", "99"],
            "--row 99 out of range: stream le_001024 of split short/train has 7 rows (0..6)",
        ),
        (["--row", "-1"], "--row -1 out of range"),
        (
            ["--stream", "le_000512"],
            "no stream 'le_000512' in split short/train; streams: le_001024 (7 rows)",
        ),
        (
            ["--split", "nope"],
            "no split 'nope' in this build; splits: short/train, short/validation, "
            "long/train, long/validation",
        ),
        (
            ["--sample-id", "longalign:999"],
            "unknown sample id 'longalign:999' in any split; ids are "
            "<source>:<position>, and source longalign has positions",
        ),
        (["--sample-id", "nosuch:1", "--split", "long/train"], "e.g. chat:"),
        (["--sample-id", "longalign:0", "--row", "1"], "give --row or --sample-id, not both"),
        (["--context", "-1"], "--context must be >= 0"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(built, args, message):
    out, _ = built
    result = run_cli(str(out), *args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("error ") and result.stderr.count("\n") == 1
    assert message in result.stderr


def test_cli_missing_build_and_not_packed(built, tmp_path):
    out, _ = built
    result = run_cli(str(tmp_path / "nothing"))
    assert result.exit_code == 2 and result.stderr.startswith("error ")
    assert "not a complete longdata build" in result.stderr
    dropped = index(out, "short/train").filter(pl.col("status") == "dropped")["sample_id"][0]
    result = run_cli(str(out), "--split", "short/train", "--sample-id", dropped)
    assert result.exit_code == 1 and "is in no row" in result.stdout and "dropped" in result.stdout
    result = run_cli(str(out), "--split", "short/train", "--sample-id", dropped, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and report["packed"] is False
    assert report["splits"]["short/train"][0]["status"] == "dropped"


def test_inspect_error_for_a_bad_stream_with_sample_id(built, detok):
    out, _ = built
    with pytest.raises(InspectError, match="no stream 'le_9' in any split"):
        inspect_row(out, sample_id="longalign:0", stream="le_9", detok=detok)


def test_inspect_reads_one_shard_and_imports_neither_torch_nor_transformers(built):
    out, _ = built
    code = (
        f"import sys; from longdata.tools.inspection import inspect_row; "
        f"inspect_row({str(out)!r}, split='long/train', stream='le_002048', row=17); "
        f"heavy = {{'torch', 'transformers', 'streaming'}} & set(sys.modules); "
        f"assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_cli_reports_a_corrupted_shard(built, tmp_path):
    import shutil

    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = StreamReader(copy / "short/train/le_001024").shard_path(0)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = run_cli(str(copy), "--split", "short/train")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("corrupt ") and "hash mismatch" in result.stderr
