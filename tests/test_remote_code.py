"""A model or tokenizer directory that ships its own Python code (auto_map) is refused by the
build, the trainer and the evals in one line, before transformers could import that code, and
without asking on stdin."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longdata.format.remote_code import RemoteCodeRefused, refuse_remote_code
from longdata.format.tokenizer import BUILTIN_TOKENIZERS
from longdata.trainer import load_model
from tests.builders import make_row, write_build

REFUSAL = "asks to run its own Python code (auto_map"


def _plant(directory: Path, marker: Path) -> Path:
    """A working tiny model + tokenizer directory whose configs point at code that, if ever
    imported, creates `marker`."""
    shutil.copytree(BUILTIN_TOKENIZERS["builtin:quickstart"], directory)
    load_model("tiny-llama", "sdpa_mask", vocab_size=16_384, seed=0).save_pretrained(directory)
    (directory / "planted.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class PlantedModel(LlamaForCausalLM): pass\n"
        "class PlantedTokenizer(PreTrainedTokenizerFast): pass\n"
    )
    for name, auto_map in (
        ("config.json", {"AutoModelForCausalLM": "planted.PlantedModel"}),
        ("tokenizer_config.json", {"AutoTokenizer": ["planted.PlantedTokenizer", None]}),
    ):
        config = json.loads((directory / name).read_text())
        config["auto_map"] = auto_map
        (directory / name).write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("remote")
    marker = root / "code_ran"
    return _plant(root / "model", marker), marker


def _longdata(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # "y" on stdin: transformers would take it as consent if it asked whether to trust the code.
    return subprocess.run(
        [sys.executable, "-c", "from longdata.cli import app; app()", *args],
        input="y\ny\n",
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def _assert_refused(result: subprocess.CompletedProcess, marker: Path) -> None:
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode != 0
    assert len(lines) == 1 and REFUSAL in lines[0], lines
    assert "Traceback" not in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_auto_map_in_either_config_is_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text(json.dumps({"auto_map": {"AutoConfig": "x.Y"}}))
    with pytest.raises(RemoteCodeRefused, match="never runs remote code"):
        refuse_remote_code(tmp_path)


def test_directories_without_auto_map_and_hub_ids_pass(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    refuse_remote_code(tmp_path)
    refuse_remote_code(BUILTIN_TOKENIZERS["builtin:quickstart"])
    refuse_remote_code("some-org/some-model")


def test_build_refuses_a_tokenizer_with_code(planted, tmp_path: Path) -> None:
    directory, marker = planted
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"name: planted\ntokenizer:\n  name: {directory}\n"
        "sources:\n  - name: longalign\n    kind: longalign\n"
        "    path: builtin:sample/longalign\n    sample: {rows: 2}\n"
        f"packing:\n  max_seq_len: 8192\noutput:\n  dir: {tmp_path / 'build'}\n"
    )
    _assert_refused(_longdata(["build", str(recipe)], tmp_path), marker)
    assert not (tmp_path / "build").exists()


def test_train_refuses_a_model_with_code(planted, tmp_path: Path) -> None:
    directory, marker = planted
    rng = np.random.default_rng(0)
    rows = [make_row(rng.integers(2, 20, 3).tolist(), rng, 300) for _ in range(4)]
    build = write_build(tmp_path / "build", {"le_0064": rows}, 300, 64)
    args = ["train", str(build), "--model", str(directory), "--steps", "1"]
    _assert_refused(_longdata([*args, "--out", str(tmp_path / "run")], tmp_path), marker)


def test_eval_refuses_a_model_with_code(planted, tmp_path: Path) -> None:
    directory, marker = planted
    args = ["eval", "niah", "--model", str(directory), "--lengths", "1k", "--depths", "0.5"]
    _assert_refused(_longdata([*args, "--out", str(tmp_path / "eval")], tmp_path), marker)
