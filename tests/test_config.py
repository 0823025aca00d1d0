"""TrainConfig is the one place training defaults live; --config YAML, --set and options layer
over it; a bad setting is one line."""

import dataclasses
import json
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from longdata.trainer import cli
from longdata.trainer.config import FIELDS, ConfigError, TrainConfig, coerce, resolve

app = typer.Typer()
app.command("train")(cli.train)


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[TrainConfig]:
    """The configs `longdata train` would run, instead of running them."""

    import longdata.trainer.loop as loop

    configs: list[TrainConfig] = []

    def fake_train(config: TrainConfig):
        configs.append(config)
        return loop.TrainResult(metrics=[], final_dir=None)

    monkeypatch.setattr(loop, "train", fake_train)
    return configs


@pytest.fixture
def build_dir(tmp_path: Path) -> Path:
    build = tmp_path / "build"
    build.mkdir()
    return build


def _train_command() -> click.Command:
    return typer.main.get_command(app)


def test_every_field_is_an_option_whose_default_is_the_configs(captured, build_dir) -> None:
    command = _train_command()
    options = {param.name: param for param in command.params}
    for name, config_field in FIELDS.items():
        if name == "build_dir":
            continue  # the BUILD argument
        assert name in options, f"TrainConfig.{name} has no --option"
        # None means "not given": a value here would be a second copy of the default.
        assert options[name].default is None, f"--{name} hard-codes a default"
        assert options[name].help == config_field.metadata["help"]
    result = CliRunner().invoke(app, [str(build_dir)])
    assert result.exit_code == 0, result.output
    assert captured == [TrainConfig(build_dir=str(build_dir))]


def test_lora_alpha_comes_from_the_config_not_twice_the_rank(captured, build_dir) -> None:
    result = CliRunner().invoke(app, [str(build_dir), "--lora", "--lora-rank", "32"])
    assert result.exit_code == 0, result.output
    assert (captured[0].lora_rank, captured[0].lora_alpha) == (32, TrainConfig().lora_alpha)


def test_help_shows_the_configs_defaults() -> None:
    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for text in ("--lora-alpha", "--keep-checkpoints", "--eval-every", "--max-grad-norm", "16"):
        assert text in result.output


def test_yaml_then_set_then_options(captured, build_dir, tmp_path: Path) -> None:
    config_file = tmp_path / "train.yml"
    config_file.write_text(
        f"build_dir: {build_dir}\nsteps: 5\nlora: true\nlora_rank: 4\nlr: 1e-3\n"
        "lora_targets: [q_proj, v_proj]\nreport_to: []\n"
    )
    arguments = ["--config", str(config_file), "--set", "steps=7", "--set", "lr=0.002"]
    result = CliRunner().invoke(app, [*arguments, "--lr", "0.003", "--lora-targets", "o_proj"])
    assert result.exit_code == 0, result.output
    config = captured[0]
    assert config.build_dir == str(build_dir)  # from the file, no BUILD argument
    assert (config.steps, config.lora, config.lora_rank) == (7, True, 4)
    assert config.lr == 0.003 and config.lora_targets == ["o_proj"]

    result = CliRunner().invoke(app, ["--config", str(config_file)])
    assert captured[1].lr == 1e-3 and captured[1].lora_targets == ["q_proj", "v_proj"]


def test_stage_steps_set_the_total_unless_steps_is_given() -> None:
    assert resolve(options={"build_dir": "b", "stage_steps": "3,4"}).steps == 7
    with pytest.raises(ConfigError, match="sum to steps"):
        resolve(assignments=["steps=5"], options={"build_dir": "b", "stage_steps": "3,4"})


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (
            ["--set", "stpes=3"],
            "stpes: unknown key (--set); did you mean steps? allowed keys: build_dir,",
        ),
        (["--set", "steps=many"], "steps must be an integer, not 'many'"),
        (["--set", "lora=maybe"], "lora must be true or false, not 'maybe'"),
        (["--set", "steps=0"], "steps must be >= 1, not 0"),
        (["--position-span", "1"], "position_span must be >= 2, not 1"),
        (["--set", "nothing"], "expected key=value"),
        (["--loss", "mean"], "loss must be one of token_mean, sequence_mean, not 'mean'"),
        (["--report-to", "mlflow"], "report_to: unknown 'mlflow'"),
        (["--weights", "fp16"], "weights must be one of auto, fp32, bf16, fp8, not 'fp16'"),
        (["--weights", "bf16"], "weights bf16 needs lora: full fine-tuning keeps fp32 master"),
        (["--weights", "fp8"], "weights fp8 needs lora"),
        (["--weights", "fp8", "--lora"], "weights fp8 with save merged would bake fp8 rounding"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2(
    captured, build_dir, arguments: list[str], expected: str
) -> None:
    result = CliRunner().invoke(app, [str(build_dir), *arguments])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
    assert not captured


def test_an_unknown_key_in_the_file_names_it_and_the_allowed_keys(
    captured, build_dir, tmp_path: Path
) -> None:
    config_file = tmp_path / "train.yml"
    config_file.write_text("steps: 3\nlearning_rate: 0.1\n")
    result = CliRunner().invoke(app, [str(build_dir), "--config", str(config_file)])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and f"learning_rate: unknown key ({config_file})" in line
    assert all(name in line for name in FIELDS)


def test_unsafe_yaml_is_refused(build_dir, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    config_file = tmp_path / "train.yml"
    config_file.write_text(f"steps: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve(config_file, options={"build_dir": str(build_dir)})
    assert not marker.exists()


def test_coerce_types() -> None:
    assert coerce("lora_targets", "q_proj, v_proj") == ["q_proj", "v_proj"]
    assert coerce("stage_steps", [2, "3"]) == [2, 3]
    assert coerce("lr", 1) == 1.0 and coerce("pad_to_multiple_of", None) is None
    with pytest.raises(ConfigError, match="must be a number"):
        coerce("lr", float("nan"))
    with pytest.raises(ConfigError, match="cannot be null"):
        coerce("steps", None)
    with pytest.raises(ConfigError, match="must be an integer"):
        coerce("steps", True)


def test_the_saved_config_reads_back(tmp_path: Path) -> None:
    config = TrainConfig(build_dir="b", steps=3, lora=True, lora_targets=["o_proj"])
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(dataclasses.asdict(config)))
    assert resolve(saved) == config
