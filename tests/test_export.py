"""`longdata export`: a build's rows as Parquet or a `datasets` dataset, and the Hub upload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from longdata.cli import app
from longdata.format import mark_ours, marker_kind
from longdata.tools.export import ExportError, export_build, labels_and_positions
from tests.builders import make_row, write_build

VOCAB = 512


def _build(tmp_path: Path) -> tuple[Path, list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(5)
    short = [make_row([10, 20, 4], rng, VOCAB), make_row([64], rng, VOCAB)]
    long = [make_row([90, 38], rng, VOCAB), make_row([1, 100, 2], rng, VOCAB)]
    build = write_build(tmp_path / "build", {"le_0064": short, "le_0128": long}, VOCAB, 128)
    return build, [*short, *long]


def _same_rows(exported, written) -> None:
    assert len(exported) == len(written)
    for got, row in zip(exported, written):
        for column in ("input_ids", "loss_mask", "seq_lens", "source_ids"):
            assert list(got[column]) == row[column].tolist(), column


def test_labels_and_positions_match_the_trainers_collate() -> None:
    from longdata.trainer.collation import collate

    rng = np.random.default_rng(0)
    for seq_lens in ([5, 1, 9], [30], [2, 2, 2, 7]):
        row = make_row(seq_lens, rng, VOCAB, target_fraction=0.9)
        labels, positions = labels_and_positions(row)
        batch = collate([row])
        assert labels.tolist() == batch["labels"][0].tolist()
        assert positions.tolist() == batch["position_ids"][0].tolist()


def test_parquet_export_keeps_every_row_and_column(tmp_path: Path) -> None:
    import polars as pl

    build, written = _build(tmp_path)
    out = tmp_path / "parquet"
    result = export_build(build, out, format="parquet", with_labels=True)
    assert result.rows == {"train": 4}
    frame = pl.read_parquet(out / "train.parquet")
    assert frame["stream"].to_list() == ["le_0064", "le_0064", "le_0128", "le_0128"]
    _same_rows(frame.to_dicts(), written)
    for got, row in zip(frame.to_dicts(), written):
        labels, positions = labels_and_positions(row)
        assert got["labels"] == labels.tolist() and got["position_ids"] == positions.tolist()
    assert sorted(p.name for p in out.iterdir()) == [".longdata", "train.parquet"]
    # Without --with-labels, the stored columns only.
    plain = tmp_path / "plain"
    export_build(build, plain)
    assert "labels" not in pl.read_parquet(plain / "train.parquet").columns


def test_hf_export_loads_with_load_from_disk(tmp_path: Path) -> None:
    import datasets

    build, written = _build(tmp_path)
    out = tmp_path / "hf"
    result = export_build(build, out, format="hf", split="train")
    assert result.rows == {"train": 4}
    loaded = datasets.load_from_disk(str(out))
    assert list(loaded) == ["train"]
    _same_rows(list(loaded["train"]), written)
    assert not (out / ".cache").exists()


def test_export_refuses_a_directory_it_did_not_write(tmp_path: Path) -> None:
    build, _ = _build(tmp_path)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="refusing to overwrite"):
        export_build(build, theirs)
    assert (theirs / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / ".theirs.export-partial").exists()
    # An empty directory and an earlier export are fine to (re)write.
    empty = tmp_path / "empty"
    empty.mkdir()
    export_build(build, empty)
    export_build(build, empty, format="hf")
    assert not (empty / "train.parquet").exists() and (empty / "dataset_dict.json").is_file()
    # Another longdata output (a build: marker of another kind) is not an export to replace.
    mark_ours(build, "build")
    with pytest.raises(ExportError, match="refusing to overwrite"):
        export_build(build, build)
    assert (build / "manifest.json").is_file() and marker_kind(build) == "build"


def test_export_cli(tmp_path: Path) -> None:
    build, _ = _build(tmp_path)
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["export", str(build), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "train 4 rows" in result.output and (out / "train.parquet").is_file()
    bad = CliRunner().invoke(app, ["export", str(build), "--out", str(out), "--split", "test"])
    assert bad.exit_code == 2 and "no split 'test'" in bad.output
    assert "Traceback" not in bad.output
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("")
    refused = CliRunner().invoke(app, ["export", str(build), "--out", str(occupied)])
    assert refused.exit_code == 2 and "refusing to overwrite" in refused.output


def test_push_to_hub_uploads_the_export(tmp_path: Path, monkeypatch) -> None:
    """Offline: everything runs up to the upload call, which is recorded instead."""
    import datasets
    import huggingface_hub

    build, written = _build(tmp_path)
    calls = []

    def push_dataset(self, repo_id, **kwargs):
        calls.append(("push_to_hub", repo_id, {k: len(v) for k, v in self.items()}, kwargs))

    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", push_dataset)
    result = export_build(build, tmp_path / "hf", format="hf", push_to_hub="me/longdata-test")
    assert calls == [("push_to_hub", "me/longdata-test", {"train": 4}, {"private": False})]
    assert result.pushed_to == "https://huggingface.co/datasets/me/longdata-test"

    calls.clear()
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "create_repo",
        lambda self, repo_id, **kwargs: calls.append(("create_repo", repo_id, kwargs)),
    )

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = sorted(p.name for p in folder.iterdir() if p.suffix == ".parquet")
        calls.append(("upload_folder", kwargs["repo_id"], kwargs["repo_type"], files))

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    export_build(build, tmp_path / "pq", push_to_hub="me/pq", private=True)
    assert calls == [
        ("create_repo", "me/pq", {"repo_type": "dataset", "private": True, "exist_ok": True}),
        ("upload_folder", "me/pq", "dataset", ["train.parquet"]),
    ]


def test_a_failed_upload_is_one_line_and_exit_1(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub

    build, _ = _build(tmp_path)

    def offline(self, repo_id, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    out = tmp_path / "pq"
    result = CliRunner().invoke(
        app, ["export", str(build), "--out", str(out), "--push-to-hub", "me/x"]
    )
    assert result.exit_code == 1
    assert "uploading it to me/x failed: OSError: network is unreachable" in result.output
    assert (out / "train.parquet").is_file()  # the export itself is kept
