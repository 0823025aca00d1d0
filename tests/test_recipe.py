from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from longdata.cli import app
from longdata.recipe import RecipeError, apply_override, load_recipe, validate_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def quickstart() -> dict:
    return yaml.safe_load((RECIPES / "quickstart.yml").read_text())


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yml")))
def test_shipped_recipes_validate(name):
    recipe = load_recipe(RECIPES / name)
    assert recipe.sources and recipe.longest_seq_len >= 4096


def problems(data: dict) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        validate_recipe(data)
    return caught.value.problems


def test_negative_weight_names_the_key_path():
    data = quickstart()
    data["sources"][1]["weight"] = -1
    assert problems(data) == ["sources[1].weight: must be > 0, got -1"]


def test_unknown_key_lists_allowed_keys():
    data = quickstart()
    data["packing"]["max_len"] = 4096
    [line] = problems(data)
    assert line.startswith("packing.max_len: unknown key; did you mean max_seq_len? allowed keys: ")
    assert "max_seq_len" in line and "overlength" in line


def test_unknown_key_inside_a_source_lists_that_kinds_keys():
    data = quickstart()
    data["sources"][2]["lenght_range"] = [1, 2]
    [line] = problems(data)
    assert line.startswith("sources[2].lenght_range: unknown key; did you mean length_range")
    assert "length_range" in line


def test_bad_literal_and_kind():
    data = quickstart()
    data["packing"]["algorithm"] = "magic"
    data["sources"][0]["kind"] = "wikipedia"
    lines = problems(data)
    assert "packing.algorithm: must be one of 'bfd', 'ffd' or 'next_fit', got 'magic'" in lines
    assert any(line.startswith("sources[0].kind: must be one of longalign") for line in lines)


def test_missing_required_key():
    data = quickstart()
    del data["packing"]["stages"]
    assert problems(data) == ["packing: max_seq_len is required (or list curriculum stages)"]
    del data["tokenizer"]
    assert "tokenizer: required key is missing" in problems(data)


def test_stages_and_top_level_length_must_agree():
    data = quickstart()
    data["packing"]["max_seq_len"] = 8192
    [line] = problems(data)
    assert line.startswith("packing: max_seq_len (8192) must equal the last stage's max_seq_len")


def test_stage_lengths_must_increase():
    data = quickstart()
    data["packing"]["stages"] = [
        {"name": "a", "max_seq_len": 8192},
        {"name": "b", "max_seq_len": 4096},
    ]
    data["packing"]["max_seq_len"] = None
    [line] = problems(data)
    assert line.startswith("packing: stages must have strictly increasing max_seq_len")


def test_shard_size_parsing():
    data = quickstart()
    data["output"]["shard_size_limit"] = "2MB"
    assert validate_recipe(data).output.shard_size_limit == 2 << 20
    data["output"]["shard_size_limit"] = "lots"
    assert problems(data) == [
        "output.shard_size_limit: must be a size like 64MB or 1GB, got 'lots'"
    ]


def test_overrides_reach_nested_fields_and_list_items():
    data = quickstart()
    apply_override(data, "packing.stages=null")
    apply_override(data, "packing.max_seq_len=16384")
    apply_override(data, "sources[1].weight=2.5")
    apply_override(data, "sources.0.sample.rows=3")
    apply_override(data, "packing.buckets=[4096, 16384]")
    recipe = validate_recipe(data)
    assert recipe.packing.max_seq_len == 16384
    assert recipe.sources[1].weight == 2.5
    assert recipe.sources[0].sample.rows == 3
    assert recipe.packing.buckets == (4096, 16384)


def test_override_out_of_range_index_is_an_error():
    with pytest.raises(RecipeError, match="sources.9 is not an index"):
        apply_override(quickstart(), "sources[9].weight=1")


def test_cli_validate_exit_codes(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(RECIPES / "quickstart.yml")])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(
        app, ["validate", str(RECIPES / "quickstart.yml"), "--set", "sources[1].weight=-1"]
    )
    assert bad.exit_code == 2
    assert "sources[1].weight: must be > 0, got -1" in bad.output
