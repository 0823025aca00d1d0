"""One settings grammar: `longdata build --set` and `longdata train --set` type a value the same
way and report a bad key in the same one-line shape (longdata/format/settings.py)."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from longdata.cli import app
from longdata.format.settings import SettingError, parse_assignment, unknown_key
from longdata.recipe import RecipeError, apply_override, load_recipe
from longdata.trainer.config import FIELDS, ConfigError, parse_set, read_config_file

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# `<key>: unknown key[ (<where>)]; did you mean <closest>? allowed keys: <every key>`
UNKNOWN_KEY = re.compile(
    r"^(?P<key>\S+): unknown key(?: \((?P<where>[^)]*)\))?; did you mean (?P<closest>.+)\? "
    r"allowed keys: (?P<allowed>.+)$"
)
# Ten aliases deep, ten items each: 10**6 values from a one-line value.
ALIAS_BOMB = (
    "["
    + ", ".join(
        [f"&a0 [{', '.join(['1'] * 10)}]"]
        + [f"&a{level} [{', '.join([f'*a{level - 1}'] * 10)}]" for level in range(1, 6)]
    )
    + "]"
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("5", 5),
        ("0.5", 0.5),
        ("true", True),
        ("null", None),
        ("", None),
        ("[4096, 8192]", [4096, 8192]),
        ("q_proj,v_proj", "q_proj,v_proj"),
        ("ctx16k/train", "ctx16k/train"),
        ("@run", "@run"),  # not YAML (@ is reserved): kept as the text it is
        ("'5'", "5"),
    ],
)
def test_build_and_train_type_a_value_the_same_way(text: str, value: object) -> None:
    recipe: dict = {}
    apply_override(recipe, f"packing.max_seq_len={text}")
    assert recipe == {"packing": {"max_seq_len": value}}
    assert parse_set(f"split={text}") == ("split", value)
    assert parse_assignment(f"a.b={text}").value == value


def test_a_dotted_key_names_list_items_either_way() -> None:
    assert parse_assignment("sources[1].weight=2").path == ("sources", "1", "weight")
    assert parse_assignment("sources.1.weight=2").path == ("sources", "1", "weight")


@pytest.mark.parametrize("text", ["nothing", "=5", " =5"])
def test_an_assignment_without_a_key_is_one_line_on_both_sides(text: str) -> None:
    with pytest.raises(RecipeError) as recipe_error:
        apply_override({}, text)
    with pytest.raises(ConfigError) as train_error:
        parse_set(text)
    assert (
        str(recipe_error.value) == str(train_error.value) == f"--set {text!r}: expected key=value"
    )


def test_an_alias_bomb_value_is_refused_on_both_sides() -> None:
    with pytest.raises(RecipeError, match="expands to more than 100,000 values") as recipe_error:
        apply_override({}, f"packing.buckets={ALIAS_BOMB}")
    with pytest.raises(ConfigError, match="expands to more than 100,000 values"):
        parse_set(f"lora_targets={ALIAS_BOMB}")
    assert "\n" not in str(recipe_error.value)


def test_the_unknown_key_line_lists_every_key_and_the_closest() -> None:
    line = unknown_key("stpes", FIELDS, "--set")
    found = UNKNOWN_KEY.match(line)
    assert found, line
    assert (found["key"], found["where"], found["closest"]) == ("stpes", "--set", "steps")
    assert found["allowed"].split(", ") == list(FIELDS)
    # Nothing close: no guess, the allowed keys only.
    assert unknown_key("zzz", ["steps", "lr"]) == "zzz: unknown key; allowed keys: steps, lr"
    assert issubclass(SettingError, ValueError)  # the CLI's one-line, exit-2 kind of error


def _error_line(output: str) -> str:
    """The one error line either CLI printed, without its `error` label."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return re.sub(r"^error:? ", "", lines[0])


def test_build_and_train_report_a_bad_set_key_in_the_same_shape(tmp_path: Path) -> None:
    runner = CliRunner()
    build = runner.invoke(
        app, ["validate", str(RECIPES / "quickstart.yml"), "--set", "packing.max_len=4096"]
    )
    train = runner.invoke(app, ["train", str(tmp_path), "--set", "stpes=3"])
    assert build.exit_code == train.exit_code == 2
    build_line, train_line = _error_line(build.output), _error_line(train.stderr)
    build_found, train_found = UNKNOWN_KEY.match(build_line), UNKNOWN_KEY.match(train_line)
    assert build_found and train_found, (build_line, train_line)
    assert (build_found["key"], build_found["closest"]) == ("packing.max_len", "max_seq_len")
    assert (train_found["key"], train_found["closest"]) == ("stpes", "steps")
    assert "max_seq_len" in build_found["allowed"].split(", ")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such recipe file"),
        (b"steps: [1\n", "line 2: not valid YAML (expected ',' or ']', but got '<stream end>')"),
        (b"steps: \xff\n", "not valid YAML (invalid start byte)"),
        (b"- steps\n- lr\n", "a recipe is a mapping of settings, not a list"),
        (b"a: !!python/object/apply:os.system [true]\n", "line 1: not valid YAML"),
        (
            "\n".join(
                [f"a0: &a0 [{', '.join(['1'] * 10)}]"]
                + [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 10)}]" for n in range(1, 6)]
            ).encode(),
            "expands to more than 100,000 values (YAML aliases?); a recipe is a short list",
        ),
        (b"#" * (1 << 20) + b"\n", "1,048,577 bytes; a recipe is at most 1,048,576"),
    ],
)
def test_a_bad_settings_file_is_the_same_line_for_build_and_train(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    path = tmp_path / "settings.yml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RecipeError) as recipe_error:
        load_recipe(path)
    with pytest.raises(ConfigError) as train_error:
        read_config_file(path)
    recipe_line, train_line = str(recipe_error.value), str(train_error.value)
    assert recipe_line.startswith(f"{path}") and expected in recipe_line, recipe_line
    assert "\n" not in recipe_line
    assert recipe_line.replace("recipe", "training config") == train_line
