"""Hostile outputs (issue 22, "Written outside" and "Messy"): directories, links and files a user
or someone else left where longdata writes, and expected failures that must be one line.

Each test fails on the code before issue 22's fixes. Each snapshots the tree around it (every
path's mode and bytes, or a link's target) and checks that nothing outside the directory the
command may write changed."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch

import longdata.trainer.checkpoint as checkpoint_module
from longdata.build import build
from longdata.format import is_ours
from longdata.recipe import validate_recipe
from tests.test_guarantees_paths import (
    assert_one_line,
    copy_build,
    invoke,
    recipe_data,
    write_recipe,
)

DEEP_JSON = "[" * 100_000 + "]" * 100_000


def snapshot(root: Path, *skip: str) -> dict[str, tuple]:
    """path -> (mode, bytes) for files, (mode, target) for links, (mode,) for the rest; paths
    under ``skip`` (relative to ``root``) are left out: the directories a command may write."""
    tree = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if any(name == s or name.startswith(f"{s}/") for s in skip):
            continue
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            tree[name] = (mode, os.readlink(path))
        elif stat.S_ISREG(mode):
            tree[name] = (mode, path.read_bytes())
        else:
            tree[name] = (mode,)
    return tree


def precious(directory: Path, name: str = "thesis.tex") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text("years of work")
    return directory


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished small build (two stages) and its recipe data."""
    tmp = tmp_path_factory.mktemp("made")
    data = recipe_data(tmp)
    return data, build(validate_recipe(data)).out_dir


@pytest.fixture()
def work(tmp_path, monkeypatch):
    """A working directory of its own, with the recipe's card directory relative to it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def local_recipe(work: Path, data: dict, **output) -> Path:
    """The recipe, writing under ``work`` (cards in work/data_cards, like the default)."""
    changed = {
        **data,
        "output": {**data["output"], "dir": "out", "card_dir": "data_cards", **output},
        "cache_dir": "cache",
    }
    return write_recipe(work / "recipe.yml", changed)


# --- ownership by marker only ----------------------------------------------------------------


def test_a_copied_manifest_does_not_make_a_user_directory_a_build(made, work):
    data, out = made
    user = precious(work / "mine")
    (user / "manifest.json").write_bytes((out / "manifest.json").read_bytes())
    assert not is_ours(user) and not is_ours(user, "build")
    recipe = local_recipe(work, data)
    before = snapshot(work)
    result = invoke("build", recipe, "--out", user)
    assert_one_line(result, 2, "not a longdata build", "no .longdata marker", "--overwrite")
    assert snapshot(work, "cache") == before


def test_a_directory_holding_only_a_readme_is_not_taken_for_a_card_copy(made, work):
    _, out = made
    cards = precious(work / "cards", "README.md")
    before = snapshot(work, "b")
    result = invoke("card", copy_build(out, work / "b"), "--copy-to", cards)
    assert_one_line(result, 2, "not a data card longdata wrote")
    assert snapshot(work, "b") == before


# --- locks never through links ---------------------------------------------------------------


def test_a_planted_lock_symlink_is_refused_and_its_target_untouched(made, work):
    data, _ = made
    victim = precious(work / "victim") / "thesis.tex"
    (work / ".out.lock").symlink_to(victim)
    recipe = local_recipe(work, data)
    before = snapshot(work)
    result = invoke("build", recipe)
    assert_one_line(result, 2, ".out.lock is a symbolic link")
    assert snapshot(work, "cache") == before


@pytest.mark.parametrize("kind", ["fifo", "user file"])
def test_a_lock_that_is_not_a_lock_file_is_refused_and_kept(made, work, kind):
    data, _ = made
    lock = work / ".out.lock"
    if kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.write_text("my notes\n")
    recipe = local_recipe(work, data)
    before = snapshot(work)
    result = invoke("build", recipe)
    needle = "not a regular file" if kind == "fifo" else "not a longdata lock file"
    assert_one_line(result, 2, needle)
    assert snapshot(work, "cache") == before


# --- cards never written through links -------------------------------------------------------


@pytest.mark.parametrize("planted", ["README.md", "card/mix.png"])
def test_card_replaces_a_planted_link_in_the_build_instead_of_writing_through_it(
    made, work, planted
):
    _, out = made
    build_dir = copy_build(out, work / "b")
    victim = precious(work / "victim") / "thesis.tex"
    (build_dir / planted).unlink()
    (build_dir / planted).symlink_to(victim)
    before = snapshot(work, "b")
    assert invoke("card", build_dir, "--no-copy").exit_code == 0
    assert snapshot(work, "b") == before
    assert not (build_dir / planted).is_symlink() and (build_dir / planted).stat().st_size > 0


@pytest.mark.parametrize("planted", ["README.md", "lengths.png"])
def test_card_copy_replaces_a_planted_link_in_its_own_card_directory(made, work, planted):
    _, out = made
    build_dir = copy_build(out, work / "b")
    cards = work / "cards"
    assert invoke("card", build_dir, "--copy-to", cards).exit_code == 0
    victim = precious(work / "victim") / "thesis.tex"
    (cards / planted).unlink()
    (cards / planted).symlink_to(victim)
    before = snapshot(work, "b", "cards")
    assert invoke("card", build_dir, "--copy-to", cards).exit_code == 0
    assert snapshot(work, "b", "cards") == before
    assert not (cards / planted).is_symlink()


@pytest.mark.parametrize("card_dir", ["absolute", "../outside", "nested/../../outside"])
def test_a_card_dir_edited_to_leave_the_working_directory_is_refused(
    made, tmp_path, monkeypatch, card_dir
):
    _, out = made
    build_dir = copy_build(out, tmp_path / "b")
    work = tmp_path / "work"
    work.mkdir()
    value = str(tmp_path / "outside") if card_dir == "absolute" else card_dir
    manifest = json.loads((build_dir / "manifest.json").read_text())
    manifest["recipe"]["output"]["card_dir"] = value
    (build_dir / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(tmp_path, "b")
    monkeypatch.chdir(work)
    result = invoke("card", build_dir)
    assert_one_line(result, 2, "outside the working directory", "--copy-to")
    assert snapshot(tmp_path, "b") == before and not (tmp_path / "outside").exists()


@pytest.mark.parametrize(
    "variant", [("--out", "variant"), ("--set", "packing.stages[0].max_seq_len=384")]
)
def test_a_variant_build_leaves_the_default_builds_tracked_card_alone(made, work, variant):
    data, _ = made
    recipe = local_recipe(work, data)
    assert invoke("build", recipe).exit_code == 0
    tracked = work / "data_cards" / "guard" / "README.md"
    # The tracked card as committed, which a variant's card (even an identical one) must not touch.
    tracked.write_text(tracked.read_text() + "\nReviewed.\n")
    before = snapshot(work, "cache", "out", "variant", ".out.lock", ".variant.lock")
    result = invoke("build", recipe, *variant)
    assert result.exit_code == 0, result.output
    assert snapshot(work, "cache", "out", "variant", ".out.lock", ".variant.lock") == before
    # Naming the card directory says where the variant's card goes.
    elsewhere = invoke("build", recipe, *variant, "--set", "output.card_dir=variant_cards")
    assert elsewhere.exit_code == 0, elsewhere.output
    assert is_ours(work / "variant_cards" / "guard", "card")


def test_a_refused_card_directory_fails_before_the_build_runs(made, work):
    data, _ = made
    precious(work / "data_cards" / "guard", "README.md")
    recipe = local_recipe(work, data)
    before = snapshot(work)
    result = invoke("build", recipe)
    assert_one_line(result, 2, "not a data card longdata wrote")
    assert snapshot(work) == before  # no output, no cache: nothing was tokenised


# --- train and eval outputs owned like builds ------------------------------------------------


def train_args(build_dir: Path, out: Path, *more: str) -> list:
    return ["train", build_dir, "--out", out, "--steps", "2", "--warmup-steps", "1", *more]


def test_train_out_into_a_user_directory_is_refused(made, work):
    _, out = made
    user = precious(work / "mine", "config.json")
    before = snapshot(work)
    result = invoke(*train_args(out, user, "--save", "none"))
    assert_one_line(result, 2, "not written by longdata", "--out")
    assert snapshot(work) == before


@pytest.mark.parametrize(
    ("inside", "expected"),
    [
        ("", ("a longdata build directory", "not a run directory")),
        ("run", ("inside the longdata build", "rebuild")),
    ],
)
def test_train_out_into_or_inside_a_build_is_refused(made, work, inside, expected):
    _, out = made
    build_dir = copy_build(out, work / "b")
    before = snapshot(work)
    result = invoke(*train_args(build_dir, build_dir / inside, "--save", "none"))
    assert_one_line(result, 2, *expected)
    assert snapshot(work) == before


def test_a_run_directory_with_checkpoints_needs_resume(made, work):
    _, out = made
    run = work / "run"
    first = invoke(*train_args(out, run, "--save", "none", "--checkpoint-every", "1"))
    assert first.exit_code == 0, first.output
    assert is_ours(run, "run") and list((run / "checkpoints").iterdir())
    before = snapshot(work)
    again = invoke(*train_args(out, run, "--save", "none"))
    assert_one_line(again, 2, "holds checkpoints of an earlier run", "--resume")
    assert snapshot(work) == before


@pytest.mark.parametrize("command", [("niah",), ("ruler",), ("loss", ".")])
def test_eval_out_into_a_user_directory_is_refused_before_the_model_loads(work, command):
    user = precious(work / "mine", "loss.json" if command[0] == "loss" else "results.json")
    before = snapshot(work)
    result = invoke("eval", *command, "--model", work / "no-such-model", "--out", user)
    assert_one_line(result, 2, "not written by longdata", "--out")
    assert snapshot(work) == before


# --- messy: expected failures as one line ------------------------------------------------------


@pytest.mark.parametrize("damaged", ["manifest.json", "short/train/le_000512/index.json"])
@pytest.mark.parametrize("command", [["inspect"], ["verify"], ["export", "--out", "exported"]])
def test_deep_json_in_a_build_is_one_line(made, work, damaged, command):
    _, out = made
    build_dir = copy_build(out, work / "b")
    (build_dir / damaged).write_text(DEEP_JSON)
    before = snapshot(work)
    result = invoke(command[0], build_dir, *command[1:])
    assert result.exit_code in (1, 2), result.output
    assert "unexpected" not in result.output and "Traceback" not in result.output
    assert "maximum recursion depth" in result.output
    assert snapshot(work) == before


@pytest.mark.parametrize("command", [["inspect"], ["card", "--no-copy"]])
def test_a_corrupt_sample_index_is_one_line(made, work, command):
    _, out = made
    build_dir = copy_build(out, work / "b")
    (build_dir / "short" / "train" / "samples.parquet").write_bytes(b"not parquet")
    before = snapshot(work)
    result = invoke(command[0], build_dir, *command[1:])
    assert_one_line(result, 1, "samples.parquet: not a readable sample index")
    assert snapshot(work) == before


def test_a_corrupt_sample_index_is_a_verify_problem(made, work):
    _, out = made
    build_dir = copy_build(out, work / "b")
    (build_dir / "short" / "train" / "samples.parquet").write_bytes(b"not parquet")
    result = invoke("verify", build_dir)
    assert result.exit_code == 1
    assert "samples.parquet: not a readable sample index" in result.output
    assert "unexpected" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ m.content ",  # syntax error
        "{{ messages.__class__.__mro__ }}",  # sandbox refusal
        "{{ raise_exception('no') }}",
        "{{ nothing.here }}",
    ],
)
def test_a_chat_template_that_cannot_render_is_one_line_before_any_work(made, work, template):
    data, _ = made
    changed = {**data, "tokenizer": {**data["tokenizer"], "chat_template": template}}
    recipe = local_recipe(work, changed)
    before = snapshot(work)
    for command in ("validate", "build"):
        result = invoke(command, recipe)
        assert_one_line(result, 2, "the chat template cannot render")
    assert snapshot(work, "cache") == before and not (work / "out").exists()


@pytest.fixture()
def checkpointed(made, work):
    """A two-step run with a checkpoint at each step."""
    _, out = made
    run = work / "run"
    result = invoke(*train_args(out, run, "--save", "none", "--checkpoint-every", "1"))
    assert result.exit_code == 0, result.output
    return out, run, sorted((run / "checkpoints").iterdir())[-1]


@pytest.mark.parametrize("damage", ["deep meta.json", "state without optimizer"])
def test_a_malformed_checkpoint_is_one_line(checkpointed, work, damage):
    out, run, step = checkpointed
    if damage == "deep meta.json":
        (step / "meta.json").write_text(DEEP_JSON)
    else:
        state = torch.load(step / "state.pt", weights_only=True)
        torch.save({"model": state["model"]}, step / "state.pt")
    before = snapshot(work, "run")
    result = invoke(*train_args(out, run, "--steps", "3", "--save", "none", "--resume", step))
    assert_one_line(result, 2, str(step))
    assert "unexpected" not in result.output
    assert snapshot(work, "run") == before


def test_disk_full_at_checkpoint_save_is_one_line(made, work, monkeypatch):
    _, out = made

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    run = work / "run"
    result = invoke(*train_args(out, run, "--save", "none", "--checkpoint-every", "1"))
    assert_one_line(result, 1, "saving checkpoint", "No space left on device")
    assert not list((run / "checkpoints").glob("*.partial"))
