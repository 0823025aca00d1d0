"""Hostile inputs and faults against the promises of README "Guarantees": longdata removes or
replaces only what it wrote, follows no path out of a build, detects damaged shards and cache
entries, and reports every expected failure as one line (with the traceback under --debug).

Each test names the input it tries; HOSTILE counts them (see the report in the issue)."""

from __future__ import annotations

import ast
import dataclasses
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from longdata.build import build
from longdata.cli import app
from longdata.format import (
    FORMAT,
    BuildFormatError,
    Manifest,
    NotABuildError,
    StreamReader,
    UnsafePathError,
    check_slug,
    inside,
    is_ours,
    parse_split_name,
    split_name,
)
from longdata.output import output_lock
from longdata.recipe import validate_recipe
from tests.builders import make_row, write_build

REPO = Path(__file__).resolve().parents[1]


def recipe_data(tmp: Path, **changes) -> dict:
    """A small staged build: one synthetic source, two curriculum stages, cards under tmp."""
    data = {
        "name": "guard",
        "seed": 1,
        "tokenizer": {"name": "builtin:quickstart"},
        "sources": [
            {"name": "hay", "kind": "antihaystack", "count": 8, "length_range": [200, 500]}
        ],
        "packing": {
            "stages": [{"name": "short", "max_seq_len": 512}, {"name": "long", "max_seq_len": 1024}]
        },
        "validation": {"fraction": 0.25, "max_samples": 2},
        "output": {
            "dir": str(tmp / "out"),
            "card_dir": str(tmp / "cards"),
            "shard_size_limit": "16KB",
        },
        "cache_dir": str(tmp / "cache"),
    }
    data.update(changes)
    return data


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def real_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guarantees")
    data = recipe_data(tmp)
    return tmp, data, build(validate_recipe(data)).out_dir


def copy_build(source: Path, where: Path) -> Path:
    shutil.copytree(source, where)
    return where


def fake_build(where: Path) -> Path:
    """A hand-made build in the exact schema (no tokenizer needed): one stream of 6 rows."""
    rng = np.random.default_rng(0)
    rows = [make_row(rng.integers(2, 20, 3).tolist(), rng, 300) for _ in range(6)]
    return write_build(where, {"le_0064": rows}, 300, 64)


def edit_manifest(build_dir: Path, change) -> None:
    path = build_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def invoke(*args, env: dict | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def assert_one_line(result, code: int, *needles: str, progress: bool = False) -> str:
    """The command failed with ``code`` and said so in exactly one line, no traceback (with
    ``progress``, a build's progress lines may come before it)."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    if progress:
        lines = [line for line in lines if not line.startswith(("tokenize ", "write "))]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# --- names and paths -------------------------------------------------------------------------

UNSAFE_NAMES = ["..", ".", "", "a/b", "../x", "-rf", ".hidden", "a\\b", "x" * 101, "a b", "ü"]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_names_are_refused_with_one_line(name):
    with pytest.raises(ValueError) as refused:
        check_slug(name, "stage name")
    assert "\n" not in str(refused.value) and "stage name" in str(refused.value)


def test_safe_names_pass_unchanged():
    for name in ("ctx16k", "le_001024", "a.b-c", "LongAlign_10k"):
        assert check_slug(name) == name


ESCAPING_PATHS = ["../x", "/etc", "a/../../x", "a/..", "", "..\\x"]


@pytest.mark.parametrize("relative", ESCAPING_PATHS)
def test_inside_refuses_paths_that_leave_the_base(tmp_path, relative):
    with pytest.raises(UnsafePathError):
        inside(tmp_path, relative)


def test_inside_refuses_a_symlink_out_and_accepts_a_path_within(tmp_path):
    (tmp_path / "base" / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "base" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePathError, match="outside"):
        inside(tmp_path / "base", "link/x")
    assert inside(tmp_path / "base", "a/b") == (tmp_path / "base" / "a" / "b").resolve()


# --- the manifest: one clear error for every damaged one --------------------------------------


def _valid_manifest() -> dict:
    return {
        "format": FORMAT,
        "name": "t",
        "tokenizer": {"name": "t", "vocab_size": 8},
        "sources": [{"name": "a"}],
        "splits": {
            "train": {
                "max_seq_len": 8,
                "streams": [
                    {
                        "name": "le_8",
                        "path": "train/le_8",
                        "rows": 1,
                        "tokens": 8,
                        "target_tokens": 4,
                        "proportion": 1.0,
                    }
                ],
            }
        },
    }


def _edited(change) -> str:
    manifest = _valid_manifest()
    change(manifest)
    return json.dumps(manifest)


BAD_MANIFESTS = {
    "empty": "",
    "blank": "  \n",
    "truncated": json.dumps(_valid_manifest())[:57],
    "a list": "[]",
    "null": "null",
    "unknown format": _edited(lambda m: m.update(format="longdata/9")),
    "no tokenizer": _edited(lambda m: m.pop("tokenizer")),
    "vocab 0": _edited(lambda m: m["tokenizer"].update(vocab_size=0)),
    "vocab as text": _edited(lambda m: m["tokenizer"].update(vocab_size="8")),
    "sources not a list": _edited(lambda m: m.update(sources={"a": 1})),
    "negative rows": _edited(lambda m: m["splits"]["train"]["streams"][0].update(rows=-1)),
    "NaN proportion": _edited(
        lambda m: m["splits"]["train"]["streams"][0].update(proportion=float("nan"))
    ),
    "stream path ../": _edited(
        lambda m: m["splits"]["train"]["streams"][0].update(path="../../etc")
    ),
    "absolute stream path": _edited(
        lambda m: m["splits"]["train"]["streams"][0].update(path="/etc")
    ),
    "split named ../x": _edited(lambda m: m.update(splits={"../x": m["splits"]["train"]})),
    "split_order not the splits": _edited(lambda m: m.update(split_order=["validation"])),
}


@pytest.mark.parametrize("name", BAD_MANIFESTS)
def test_damaged_manifest_is_one_build_format_error(tmp_path, name):
    (tmp_path / "manifest.json").write_text(BAD_MANIFESTS[name])
    with pytest.raises(BuildFormatError) as refused:
        Manifest.read(tmp_path)
    message = str(refused.value)
    assert "\n" not in message and "manifest.json" in message


# A typed entry's field of the wrong type: the one line names its key path.
BAD_ENTRIES = {
    "sources[0].mix.train_tokens": lambda m: m["sources"][0].update(mix={"train_tokens": "9"}),
    "sources[0].rows.quarantined": lambda m: m["sources"][0].update(rows={"rows_read": 1}),
    "sources[0].weight": lambda m: m["sources"][0].update(weight="heavy"),
    "splits['train'].overlength.policy": lambda m: m["splits"]["train"].update(
        overlength={"policy": 3}
    ),
    "splits['train'].packing.fill": lambda m: m["splits"]["train"].update(
        packing={"rows": 1, "tokens": 8, "max_len": 8, "fill": None}
    ),
    "splits['train'].target_tokens": lambda m: m["splits"]["train"].update(rows=1, tokens=8),
    "tokenizer.chat_template": lambda m: m["tokenizer"].update(chat_template=["{{ x }}"]),
    "recipe.output.card_dir": lambda m: m.update(recipe={"output": {"card_dir": 7}}),
    "recipe.packing.stages[0].name": lambda m: m.update(recipe={"packing": {"stages": [{}]}}),
    "language_balance.share.en": lambda m: m.update(
        language_balance={"mode": "trim", "share": {"en": 2}}
    ),
    "versions.longdata": lambda m: m.update(versions={"longdata": 1}),
}


@pytest.mark.parametrize("key", BAD_ENTRIES)
def test_a_bad_entry_is_one_line_naming_its_key_path(tmp_path, key):
    (tmp_path / "manifest.json").write_text(_edited(BAD_ENTRIES[key]))
    with pytest.raises(BuildFormatError) as refused:
        Manifest.read(tmp_path)
    message = str(refused.value)
    assert "\n" not in message and key in message, message


def test_a_manifest_without_the_newer_entries_still_reads(tmp_path):
    """Builds written before the typed entries (no bound template, the hub revision in the
    recipe only, no middle_cut or turn_samples_added counts) read with those filled in."""
    old = _valid_manifest()
    old["recipe"] = {"tokenizer": {"revision": "v1"}, "output": {"card_dir": "cards"}}
    old["sources"][0].update(
        kind="chat",
        weight=1.0,
        rows=dict.fromkeys(["rows_read", "quarantined", "too_short", "too_long"], 0)
        | {"duplicates": 0, "validation": 0, "train": 0},
    )
    old["splits"]["train"]["overlength"] = {"policy": "drop", "truncated": 0, "dropped": 2}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    manifest = Manifest.read(tmp_path)
    assert manifest.tokenizer.chat_template is None and manifest.tokenizer.revision == "v1"
    assert manifest.recipe.card_dir == "cards" and manifest.recipe.stages == ()
    assert manifest.sources[0].rows.turn_samples_added == 0 and manifest.sources[0].mix is None
    assert manifest.split("train").overlength.middle_cut == 0
    assert manifest.split("train").overlength.left_out == 2
    assert manifest.split("train").totals is None and manifest.split("train").kind == "train"


def test_a_card_of_a_hand_made_manifest_says_what_it_lacks_in_one_line(tmp_path):
    result = invoke("card", fake_build(tmp_path / "build"), "--no-copy")
    assert_one_line(result, 1, "manifest.json", "no recipe, totals, sources[0].kind")


def test_a_real_manifest_reads_back_to_the_same_bytes(real_build):
    """Reading loses nothing: the typed entries serialise to the file the build wrote."""
    *_, out = real_build
    text = (out / "manifest.json").read_text()
    manifest = Manifest.read(out)
    assert json.dumps(manifest.to_json(), indent=1, sort_keys=True) == text
    assert manifest.tokenizer.chat_template.startswith("{{- bos_token }}")
    assert [s.stage for s in manifest.splits.values()] == [
        parse_split_name(name)[0] for name in manifest.splits
    ]


@pytest.mark.parametrize("damage", ["truncated", "empty"])
@pytest.mark.parametrize("command", ["verify", "inspect", "card", "train"])
def test_commands_on_a_damaged_manifest_say_one_line(tmp_path, command, damage):
    build_dir = fake_build(tmp_path / "build")
    text = (build_dir / "manifest.json").read_text()
    (build_dir / "manifest.json").write_text(
        text[: len(text) // 2] if damage == "truncated" else ""
    )
    result = invoke(
        command, build_dir, *(["--out", tmp_path / "run"] if command == "train" else [])
    )
    assert_one_line(result, 1, "manifest.json")


@pytest.mark.parametrize("command", ["verify", "inspect", "card", "train"])
@pytest.mark.parametrize("escape", ["dotdot", "symlink"])
def test_stream_paths_that_leave_the_build_are_not_followed(tmp_path, command, escape):
    build_dir = fake_build(tmp_path / "build")
    # A perfectly readable stream outside the build, which the old readers followed.
    shutil.copytree(build_dir / "train", tmp_path / "outside")
    if escape == "symlink":
        (build_dir / "train" / "link").symlink_to(tmp_path / "outside" / "le_0064")
        path = "train/link"
    else:
        path = "../outside/le_0064"
    edit_manifest(build_dir, lambda m: m["splits"]["train"]["streams"][0].update(path=path))
    before = files_under(tmp_path / "outside")
    result = invoke(
        command, build_dir, *(["--out", tmp_path / "run"] if command == "train" else [])
    )
    assert_one_line(result, 1, "outside")
    assert files_under(tmp_path / "outside") == before


def test_verify_refuses_shard_names_that_leave_the_stream(tmp_path):
    build_dir = fake_build(tmp_path / "build")
    index = build_dir / "train" / "le_0064" / "index.json"
    data = json.loads(index.read_text())
    data["shards"][0]["zip_data"]["basename"] = "../../../planted.mds.zstd"
    index.write_text(json.dumps(data))
    shutil.copy(
        build_dir / "train" / "le_0064" / "shard.00000.mds.zstd", tmp_path / "planted.mds.zstd"
    )
    result = invoke("verify", build_dir)
    assert result.exit_code == 1 and "bad shard name" in result.output, result.output


# --- own only what it made: cards ------------------------------------------------------------


def _precious(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "thesis.tex").write_text("years of work")
    return directory


@pytest.mark.parametrize("name", ["..", "."])
def test_card_named_dot_or_dotdot_deletes_nothing(real_build, tmp_path, name):
    _, _, out = real_build
    build_dir = copy_build(out, tmp_path / "work" / "build")
    cards = tmp_path / "work" / "cards"
    _precious(cards / "other_recipe")
    (tmp_path / "work" / "source.jsonl").write_text("{}\n")
    edit_manifest(
        build_dir,
        lambda m: (m.update(name=name), m["recipe"]["output"].update(card_dir=str(cards))),
    )
    before = {k: v for k, v in files_under(tmp_path).items() if not k.startswith("work/build/")}
    assert_one_line(invoke("card", build_dir), 2, "not a safe name")
    after = {k: v for k, v in files_under(tmp_path).items() if not k.startswith("work/build/")}
    assert after == before


@pytest.mark.parametrize("name", ["..", "."])
def test_a_recipe_named_dot_or_dotdot_fails_before_any_work(real_build, tmp_path, name):
    _, data, _ = real_build
    work = tmp_path / "work"
    _precious(work / "cards" / "other_recipe")
    data = {
        **data,
        "name": name,
        "output": {**data["output"], "dir": str(work / "out"), "card_dir": str(work / "cards")},
    }
    recipe = write_recipe(work / "r.yml", data)
    before = files_under(tmp_path)
    assert_one_line(invoke("build", recipe), 2, "not a safe name")
    assert files_under(tmp_path) == before and not (work / "out").exists()


@pytest.mark.parametrize("card_dir", ["absolute", "relative ../"])
def test_card_dir_naming_a_foreign_directory_is_refused(
    real_build, tmp_path, monkeypatch, card_dir
):
    _, _, out = real_build
    build_dir = copy_build(out, tmp_path / "build")
    victim = _precious(tmp_path / "victims" / "guard")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    value = str(tmp_path / "victims") if card_dir == "absolute" else "../victims"
    edit_manifest(build_dir, lambda m: m["recipe"]["output"].update(card_dir=value))
    assert_one_line(invoke("card", build_dir), 2, "outside the working directory")
    assert files_under(victim) == {"thesis.tex": b"years of work"}


def test_card_copy_to_a_foreign_directory_is_refused(real_build, tmp_path):
    _, _, out = real_build
    victim = _precious(tmp_path / "mine")
    assert_one_line(invoke("card", copy_build(out, tmp_path / "b"), "--copy-to", victim), 2)
    assert files_under(victim) == {"thesis.tex": b"years of work"}


def test_card_rewrites_its_own_copy_but_not_an_unmarked_one(real_build, tmp_path):
    _, _, out = real_build
    build_dir = copy_build(out, tmp_path / "b")
    ours = tmp_path / "cards" / "guard"
    assert invoke("card", build_dir, "--copy-to", ours).exit_code == 0
    assert is_ours(ours, "card")
    assert invoke("card", build_dir, "--copy-to", ours).exit_code == 0
    # Only card files, but no marker: a user's own README.md looks the same, so it is refused.
    (ours / ".longdata").unlink()
    before = files_under(ours)
    assert_one_line(invoke("card", build_dir, "--copy-to", ours), 2, "no .longdata card marker")
    assert files_under(ours) == before


# --- own only what it made: the output directory ---------------------------------------------


def test_out_over_a_foreign_directory_is_refused_then_replaced_with_overwrite(real_build, tmp_path):
    root, data, _ = real_build
    recipe = write_recipe(tmp_path / "r.yml", data)
    foreign = _precious(tmp_path / "foreign")
    assert_one_line(
        invoke("build", recipe, "--out", foreign), 2, "not a longdata build", "--overwrite"
    )
    assert files_under(foreign) == {"thesis.tex": b"years of work"}
    result = invoke("build", recipe, "--out", foreign, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (foreign / "thesis.tex").exists() and is_ours(foreign, "build")


@pytest.mark.parametrize("target", ["working directory", "parent of it", "a file"])
def test_overwrite_never_replaces_the_working_directory_or_a_file(
    real_build, tmp_path, monkeypatch, target
):
    _, data, _ = real_build
    work = _precious(tmp_path / "work")
    monkeypatch.chdir(work)
    recipe = write_recipe(work / "r.yml", data)
    out = {"working directory": ".", "parent of it": "..", "a file": "thesis.tex"}[target]
    assert_one_line(invoke("build", recipe, "--out", out, "--overwrite"), 2)
    assert (work / "thesis.tex").read_text() == "years of work" and (work / "r.yml").exists()


def test_a_partial_directory_longdata_did_not_make_is_kept(real_build, tmp_path):
    _, data, _ = real_build
    recipe = write_recipe(tmp_path / "r.yml", data)
    partial = _precious(tmp_path / ".target.partial")
    assert_one_line(
        invoke("build", recipe, "--out", tmp_path / "target"), 2, "not written by longdata"
    )
    assert files_under(partial) == {"thesis.tex": b"years of work"}


def test_a_stage_named_dotdot_writes_nothing_outside_the_output(real_build, tmp_path):
    _, data, _ = real_build
    data = {
        **data,
        "packing": {"stages": [{"name": "..", "max_seq_len": 512}]},
        "output": {**data["output"], "dir": str(tmp_path / "nest" / "out")},
    }
    (tmp_path / "nest").mkdir()
    result = invoke("build", write_recipe(tmp_path / "r.yml", data))
    # Refused by the recipe's name check before any work (the writers refuse it too: `inside`).
    assert_one_line(result, 2, "'..' is not a safe name", progress=True)
    assert sorted(p.name for p in (tmp_path / "nest").iterdir()) == []
    assert not (tmp_path / "train").exists() and not (tmp_path / "validation").exists()


def test_a_second_build_into_the_same_output_fails_at_once(real_build, tmp_path):
    _, data, _ = real_build
    recipe = write_recipe(tmp_path / "r.yml", data)
    out = tmp_path / "busy"
    with output_lock(out):
        assert_one_line(invoke("build", recipe, "--out", out), 1, "another build is writing")
    assert not out.exists() and not (tmp_path / ".busy.lock").exists()


@pytest.mark.parametrize("fault", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_is_one_line(real_build, tmp_path, monkeypatch, fault):
    _, data, _ = real_build

    def failing_write(*_):
        raise OSError(fault, os.strerror(fault))

    monkeypatch.setattr("longdata.build.write_manifest", failing_write)
    result = invoke("build", write_recipe(tmp_path / "r.yml", data), "--out", tmp_path / "o")
    assert_one_line(result, 1, os.strerror(fault), progress=True)
    assert not (tmp_path / "o").exists()


# --- corruption is detected --------------------------------------------------------------------


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_training_on_a_flipped_shard_fails_naming_it(tmp_path):
    build_dir = fake_build(tmp_path / "build")
    shard = StreamReader(build_dir / "train" / "le_0064").shard_path(0)
    _flip_middle_byte(shard)
    result = invoke("train", build_dir, "--steps", "1", "--out", tmp_path / "run", "--save", "none")
    assert_one_line(result, 1, str(shard), "hash mismatch")


def test_training_writes_nothing_into_the_build(tmp_path):
    """The loader decodes shards in memory: no decompressed copy is left beside the build for a
    later run to read unchecked (mosaicml-streaming left `shard.NNNNN.mds` there)."""
    build_dir = fake_build(tmp_path / "build")
    before = {p: p.stat().st_mtime_ns for p in build_dir.rglob("*")}
    result = invoke("train", build_dir, "--steps", "1", "--out", tmp_path / "a", "--save", "none")
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in build_dir.rglob("*")} == before


def test_validation_loss_checks_shards_too(tmp_path):
    from longdata.format import ShardError
    from longdata.trainer.validation_loss import iter_rows

    rng = np.random.default_rng(1)
    rows = [make_row([5, 7], rng, 300) for _ in range(3)]
    build_dir = write_build(tmp_path / "build", {"le_0064": rows}, 300, 64, split="validation")
    _flip_middle_byte(StreamReader(build_dir / "validation" / "le_0064").shard_path(0))
    with pytest.raises(ShardError, match="hash mismatch"):
        next(iter_rows(Manifest.read(build_dir), "validation"))


def test_training_on_a_shard_without_a_recorded_hash_is_refused(tmp_path):
    build_dir = fake_build(tmp_path / "build")
    index = build_dir / "train" / "le_0064" / "index.json"
    data = json.loads(index.read_text())
    for shard in data["shards"]:
        shard["zip_data"]["hashes"] = {}
    index.write_text(json.dumps(data))
    result = invoke("train", build_dir, "--steps", "1", "--out", tmp_path / "run", "--save", "none")
    assert_one_line(result, 1, "records no hash")


def test_a_flipped_token_cache_entry_is_tokenized_again(real_build, tmp_path):
    root, data, out = real_build
    shutil.copytree(root / "cache", tmp_path / "cache")
    (entry,) = [p for p in (tmp_path / "cache" / "tokenized").iterdir() if p.is_dir()]
    _flip_middle_byte(entry / "tokens.arrow")
    data = {
        **data,
        "cache_dir": str(tmp_path / "cache"),
        "output": {
            **data["output"],
            "dir": str(tmp_path / "out"),
            "card_dir": str(tmp_path / "cards"),
        },
    }
    result = invoke("build", write_recipe(tmp_path / "r.yml", data))
    assert result.exit_code == 0, result.output
    assert "tokens.arrow does not match its checksum" in result.output

    def shards(root: Path) -> dict[str, bytes]:
        return {k: v for k, v in files_under(root).items() if k.startswith(("short/", "long/"))}

    assert shards(tmp_path / "out") == shards(out) != {}


# --- one line, not a traceback -----------------------------------------------------------------


def test_a_missing_split_on_a_staged_build_names_the_splits(real_build, tmp_path):
    _, _, out = real_build
    line = assert_one_line(
        invoke("train", out, "--split", "train", "--out", tmp_path / "run"),
        2,
        "split 'train' is not in",
    )
    assert "short/train" in line and "long/train" in line


@pytest.mark.parametrize(
    "options,needle",
    [
        (["--attention", "bogus"], "unknown attention backend"),
        (["--steps", "0"], "must be >= 1"),
        (["--model", "tiny-lama"], "did you mean 'tiny-llama'"),
    ],
)
def test_bad_train_options_are_one_line(tmp_path, options, needle):
    build_dir = fake_build(tmp_path / "build")
    assert_one_line(invoke("train", build_dir, "--out", tmp_path / "run", *options), 2, needle)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "no/such/build"], "does not exist"),
        (["inspect", ".", "--bogus"], "No such option"),
        (["build"], "Missing argument"),
    ],
)
def test_usage_errors_are_one_line(args, needle):
    assert_one_line(invoke(*args), 2, needle, "--help")


def test_check_packing_on_a_missing_split_is_one_line(tmp_path):
    build_dir = fake_build(tmp_path / "build")
    assert_one_line(
        invoke("check-packing", build_dir, "--split", "stage9/train"),
        2,
        "no split 'stage9/train'",
        "its splits: train",
    )


def test_a_bad_source_is_reported_once(tmp_path):
    (tmp_path / "x.jsonl").write_text("")
    data = recipe_data(
        tmp_path,
        sources=[
            {"name": "a", "kind": "generic", "format": "bogus", "path": str(tmp_path / "x.jsonl")}
        ],
    )
    assert_one_line(
        invoke("validate", write_recipe(tmp_path / "r.yml", data)), 2, "sources[0].format"
    )


def test_debug_shows_the_traceback(tmp_path):
    assert_one_line(invoke("card", tmp_path), 2, "not a complete longdata build")
    for args, env in (
        (["card", tmp_path, "--debug"], None),
        (["--debug", "card", tmp_path], None),
        (["card", tmp_path], {"LONGDATA_DEBUG": "1"}),
    ):
        result = invoke(*args, env=env)
        assert isinstance(result.exception, NotABuildError), result.output
    shown = subprocess.run(
        [sys.executable, "-m", "longdata.cli", "card", str(tmp_path), "--debug"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert (
        shown.returncode == 1 and "Traceback" in shown.stderr and "NotABuildError" in shown.stderr
    )


# --- the contract itself -----------------------------------------------------------------------


def test_training_splits_are_in_stage_order_with_or_without_split_order(real_build, tmp_path):
    _, _, out = real_build
    assert Manifest.read(out).training_splits() == ["short/train", "long/train"]
    legacy = copy_build(out, tmp_path / "legacy")
    edit_manifest(legacy, lambda m: m.pop("split_order"))
    manifest = Manifest.read(legacy)
    assert manifest.training_splits() == ["short/train", "long/train"]
    assert manifest.split_names == [
        "short/train",
        "short/validation",
        "long/train",
        "long/validation",
    ]


def test_the_format_package_needs_no_torch_pydantic_or_numba():
    code = (
        "import sys, longdata.format; heavy = {'torch', 'pydantic', 'numba', 'streaming'} & "
        "set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


# trainer/cli.py builds a recipe handed to `longdata train`: a CLI convenience, not something the
# trainer's training or reading of a build depends on. NIAH prompts live in evals/.
CLI_CONVENIENCES = {"longdata.build"}


def test_the_trainer_imports_only_the_format_package_from_longdata():
    for path in sorted((REPO / "trainer").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            for name in names:
                if name.split(".")[0] != "longdata" or name.startswith(
                    ("longdata.format", "longdata.trainer")
                ):
                    continue
                assert path.name == "cli.py" and name in CLI_CONVENIENCES, f"{path.name}: {name}"


# How a module outside longdata/format/ would read the manifest as a dict, or take a split name
# apart itself, instead of reading the typed entries and `parse_split_name`.
DICT_READS = re.compile(r"manifest\w*\s*\[|manifest\w*\.(raw|get)\b|\brecipe_value\b")
SPLIT_NAME_PARSES = re.compile(
    r"""\.r?(split|partition)\(\s*["']/["']"""  # name.split("/"), rpartition("/"), rsplit("/", 1)
    r"""|\.(endswith|startswith)\(\s*["']/?(train|validation)["']"""  # name.endswith("/train")
    r"""|\.r?partition\(\s*["'](train|validation)["']"""  # name.rpartition("train")
)


def _contract_readers() -> list[Path]:
    """Every module of the installed packages but the contract itself."""
    modules = [*(REPO / "longdata").rglob("*.py"), *(REPO / "trainer").rglob("*.py")]
    modules += (REPO / "evals").rglob("*.py")
    return sorted(p for p in modules if (REPO / "longdata" / "format") not in p.parents)


def test_the_manifest_is_read_as_typed_fields_outside_the_format_package():
    assert "raw" not in {f.name for f in dataclasses.fields(Manifest)}
    assert not hasattr(Manifest, "recipe_value")
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in _contract_readers()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if DICT_READS.search(line) or SPLIT_NAME_PARSES.search(line)
    ]
    assert not found, "read the typed Manifest and parse_split_name instead:\n" + "\n".join(found)


def test_the_scan_finds_each_idiom_it_forbids():
    for line in (
        'manifest["splits"]',
        "data.manifest['sources']",
        "manifest.raw",
        "checked_manifest.get('name')",
        'manifest.recipe_value("output", "card_dir")',
    ):
        assert DICT_READS.search(line), line
    for line in (
        'name.split("/")[-1] == "train"',
        'name.rpartition("/")[0]',
        "name.rsplit('/', 1)",
        's.endswith("/train")',
        'name.endswith("validation")',
        'train_split.rpartition("train")',
    ):
        assert SPLIT_NAME_PARSES.search(line), line
    assert not SPLIT_NAME_PARSES.search("f\"{root.rstrip('/')}/{name}\"")


def test_split_names_compose_and_parse_as_one_pair():
    for stage, kind in ((None, "train"), (None, "validation"), ("ctx16k", "train")):
        assert parse_split_name(split_name(stage, kind)) == (stage, kind)
    assert split_name("ctx16k", "validation") == "ctx16k/validation"
    assert parse_split_name("train") == (None, "train")
