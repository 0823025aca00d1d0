"""The data card: its numbers agree with the shards themselves, its plots are real PNGs, and
`longdata card` regenerates exactly what the build wrote."""

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from longdata.build import build
from longdata.cli import app
from longdata.recipe import validate_recipe
from longdata.tools.card import PLOTS
from longdata.tools.verify import iter_stream_rows
from tests.builders import manifest_json
from tests.test_build import small_recipe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("card")
    data = small_recipe(
        tmp,
        stages=[
            {"name": "short", "max_seq_len": 1024, "overlength": "drop"},
            {"name": "long", "max_seq_len": 4096},
        ],
    )
    recipe = validate_recipe(data)
    return recipe, build(recipe)


def card_sections(text: str) -> dict[str, str]:
    sections, name = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            name = line[3:]
            sections[name] = ""
        elif name:
            sections[name] += line + "\n"
    return sections


def table_rows(section: str) -> list[list[str]]:
    lines = [x for x in section.splitlines() if x.startswith("| ")]
    return [
        [c.strip() for c in x.strip("|").split("|")] for x in lines[1:]
    ]  # lines[0] is the header


def rows_of(build_dir: Path, manifest: dict, split: str, scratch: Path) -> list[dict]:
    return [
        row
        for stream in manifest["splits"][split]["streams"]
        for _, _, row in iter_stream_rows(build_dir / stream["path"], [])
    ]


def test_card_is_a_dataset_card_with_plots_in_the_build_and_in_data_cards(built):
    recipe, result = built
    text = (result.out_dir / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["task_categories"] == ["text-generation"] and meta["size_categories"] == ["n<1K"]
    assert (
        meta["longdata"]["splits"]["long/train"]["rows"]
        == manifest_json(result)["splits"]["long/train"]["rows"]
    )
    assert set(meta["language"]) == {"en", "zh"}
    copy = Path(recipe.output.card_dir) / recipe.name
    for plot in PLOTS:
        for image in (result.out_dir / "card" / plot, copy / plot):
            assert image.read_bytes()[:8] == PNG_MAGIC and image.stat().st_size > 5_000
        assert (
            f"](card/{plot})" in text and f"](card/{plot})" not in (copy / "README.md").read_text()
        )
    assert (copy / "README.md").read_text() == text.replace("](card/", "](")


def test_card_counts_agree_with_the_rows(built, tmp_path):
    _, result = built
    manifest = manifest_json(result)
    sections = card_sections((result.out_dir / "README.md").read_text())
    names = [s["name"] for s in manifest["sources"]]
    kept = {(r[0], r[1]): r for r in table_rows(sections["Sources and mix"]) if "/" in r[0]}
    weights = {
        (r[0], r[1]): r for r in table_rows(sections["Loss weight: token_mean vs sequence_mean"])
    }
    for split in ("short/train", "long/train"):
        rows = rows_of(result.out_dir, manifest, split, tmp_path)
        samples = Counter(names[s] for row in rows for s in row["source_ids"].tolist())
        targets, with_target = Counter(), Counter()
        for row in rows:
            start = 0
            for length, source in zip(row["seq_lens"].tolist(), row["source_ids"].tolist()):
                hits = int(row["loss_mask"][start : start + length].sum())
                targets[names[source]] += hits
                with_target[names[source]] += hits > 0
                start += length
        for name in names:
            line = kept[(split, name)]
            # whole + cut to fit + middle cut = the samples the rows hold (no split policy here:
            # one piece each)
            assert sum(int(line[i].replace(",", "")) for i in (3, 4, 5)) == samples[name]
            assert int(line[8].replace(",", "")) == targets[name]
            token_share, sequence_share = weights[(split, name)][2:4]
            assert token_share == f"{targets[name] / sum(targets.values()):.1%}"
            assert sequence_share == f"{with_target[name] / sum(with_target.values()):.1%}"
    dropped = sum(int(r[6].replace(",", "")) for k, r in kept.items() if k[0] == "short/train")
    assert dropped == manifest["splits"]["short/train"]["overlength"]["dropped"] > 0


def test_card_names_sources_whose_text_spells_special_tokens(built):
    from longdata.tools.card import CardData, render_card

    _, result = built
    data = CardData.read(result.out_dir)
    line = "spell a special token in their text"
    assert line not in render_card(data, "card/")
    data.manifest.sources[3].tokenize.special_token_text_rows = 1234
    assert (
        "Source `chat`: 1,234 samples spell a special token in their text, encoded as plain "
        "text, never as control tokens."
    ) in render_card(data, "card/")
    data.manifest = dataclasses.replace(
        data.manifest,
        recipe=dataclasses.replace(data.manifest.recipe, special_tokens_in_text="allow"),
    )
    assert "encoded as control tokens" in render_card(data, "card/")


def test_card_command_regenerates_the_same_card(built, tmp_path):
    _, result = built
    copy = tmp_path / "build"
    shutil.copytree(result.out_dir, copy)
    original = {p: (copy / p).read_bytes() for p in ["README.md", *(f"card/{x}" for x in PLOTS)]}
    shutil.rmtree(copy / "card")
    (copy / "README.md").unlink()
    out = CliRunner().invoke(app, ["card", str(copy), "--copy-to", str(tmp_path / "cards")])
    assert out.exit_code == 0, out.output
    for path, content in original.items():
        assert (copy / path).read_bytes() == content, path
    assert (tmp_path / "cards" / "README.md").exists()


def test_card_command_on_a_directory_that_is_not_a_build(tmp_path):
    out = CliRunner().invoke(app, ["card", str(tmp_path)])
    assert out.exit_code == 2 and "not a complete longdata build" in out.output
