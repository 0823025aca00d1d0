"""The CLI commands, registered the way longdata/cli.py registers them."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import typer
from typer.testing import CliRunner

from longdata.trainer import cli
from tests.builders import make_row, write_build

app = typer.Typer()
app.command("train")(cli.train)
app.command("check-packing")(cli.check_packing)


def _build(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = [make_row(rng.integers(2, 20, 3).tolist(), rng, 300) for _ in range(6)]
    return write_build(tmp_path / "build", {"le_0064": rows}, 300, 64)


def test_cli_imports_without_torch() -> None:
    code = "import sys, trainer.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_teaches() -> None:
    result = CliRunner().invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    assert "sequence_mean" in result.output and "--resume" in result.output


def test_train_and_check_packing(tmp_path: Path) -> None:
    build = _build(tmp_path)
    out = tmp_path / "run"
    trained = CliRunner().invoke(
        app, ["train", str(build), "--steps", "2", "--out", str(out), "--batch-size", "2"]
    )
    assert trained.exit_code == 0, trained.output
    assert (out / "final" / "config.json").is_file()
    assert (out / "metrics.jsonl").read_text().count("\n") == 2

    checked = CliRunner().invoke(app, ["check-packing", str(build), "--rows", "2"])
    assert checked.exit_code == 0, checked.output
    assert "sdpa_varlen: ok" in checked.output
    assert "flash_attn: skipped" in checked.output
