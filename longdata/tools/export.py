"""`longdata export`: a build's packed rows as Parquet files or a Hugging Face `datasets` dataset.

Every row keeps its columns (docs/ROW_SCHEMA.md: `input_ids`, `loss_mask`, `seq_lens`,
`source_ids`) plus `stream` (the length bucket it came from); `with_labels=True` adds what a
trainer that does not know the row schema needs:

- `labels`: the token where `loss_mask` is 1, else -100, and -100 at every sample's first token
  (the bundled trainer's rule, `trainer.collation.collate`; the tests hold the two equal);
- `position_ids`: 0, 1, ... restarting at every sample.

Layouts (`format`):

- `parquet`: one file per split, `OUT/<split>.parquet`, with `/` in a staged split's name
  written as `__` (`ctx16k/train` -> `ctx16k__train.parquet`). `datasets.load_dataset(
  "parquet", data_files=...)`, polars and pandas read them.
- `hf`: `DatasetDict.save_to_disk(OUT)`, one split per build split (named as above), which
  `datasets.load_from_disk(OUT)` loads.

The export is written next to OUT and moved into place when complete. OUT must be missing, an
empty directory, or an earlier export (it carries longdata's marker file); anything else is
refused, never overwritten. `push_to_hub` uploads the result: the `hf` layout with
`DatasetDict.push_to_hub` (the Hub stores it as Parquet), the `parquet` files with
`HfApi.upload_folder`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from longdata.format import Manifest, is_ours, mark_ours, row_labels, sample_starts
from longdata.format.mds import StreamReader

FORMATS = ("parquet", "hf")
MARKER_KIND = "export"  # the ownership marker (longdata.format.mark_ours) of an export
ROWS_PER_GROUP = 256  # Parquet row group / Arrow batch: bounds memory for 128K-token rows


class ExportError(ValueError):
    """An export that cannot be done as asked (bad split, an output directory not ours)."""

    exit_code = 2


class UploadError(RuntimeError):
    """The export is written, but uploading it to the Hub failed."""

    exit_code = 1


@dataclass
class ExportResult:
    out_dir: Path
    format: str
    rows: dict[str, int] = field(default_factory=dict)  # per build split
    files: list[Path] = field(default_factory=list)
    pushed_to: str | None = None


def split_file_name(split: str) -> str:
    """A build split's name as a file or `datasets` split name: `ctx16k/train` ->
    `ctx16k__train`."""
    return split.replace("/", "__")


def labels_and_positions(row: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, position_ids) of one packed row, as int64 arrays of its length."""
    seq_lens = row["seq_lens"].astype(np.int64)
    positions = np.arange(len(row["input_ids"])) - np.repeat(sample_starts(seq_lens), seq_lens)
    return row_labels(row), positions


def iter_split_rows(manifest: Manifest, split: str, with_labels: bool) -> Iterator[dict[str, Any]]:
    """Every row of `split`, stream after stream, as plain lists for Arrow."""
    for stream in manifest.split(split).streams:
        if stream.rows == 0:
            continue
        reader = StreamReader(manifest.stream_dir(stream))
        for index in range(reader.rows):
            row = reader.row(index)
            record = {
                "input_ids": row["input_ids"].tolist(),
                "loss_mask": row["loss_mask"].tolist(),
                "seq_lens": row["seq_lens"].tolist(),
                "source_ids": row["source_ids"].tolist(),
                "stream": stream.name,
            }
            if with_labels:
                labels, positions = labels_and_positions(row)
                record["labels"] = labels.tolist()
                record["position_ids"] = positions.tolist()
            yield record


def _schema(with_labels: bool) -> Any:
    import pyarrow as pa

    fields = [
        ("input_ids", pa.list_(pa.uint32())),
        ("loss_mask", pa.list_(pa.uint8())),
        ("seq_lens", pa.list_(pa.uint32())),
        ("source_ids", pa.list_(pa.uint16())),
        ("stream", pa.string()),
    ]
    if with_labels:
        fields += [("labels", pa.list_(pa.int64())), ("position_ids", pa.list_(pa.int64()))]
    return pa.schema(fields)


def _batches(records: Iterator[dict[str, Any]], schema: Any) -> Iterator[Any]:
    import pyarrow as pa

    chunk: list[dict[str, Any]] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == ROWS_PER_GROUP:
            yield pa.RecordBatch.from_pylist(chunk, schema=schema)
            chunk = []
    if chunk:
        yield pa.RecordBatch.from_pylist(chunk, schema=schema)


def _write_parquet(path: Path, records: Iterator[dict[str, Any]], schema: Any) -> int:
    import pyarrow.parquet as pq

    rows = 0
    with pq.ParquetWriter(path, schema) as writer:
        for batch in _batches(records, schema):
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


def _check_output(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_ours(out, MARKER_KIND):
        raise ExportError(
            f"{out} is not empty and was not written by `longdata export`; refusing to "
            "overwrite it (choose another --out, or empty it yourself)"
        )


def export_build(
    build_dir: str | Path,
    out: str | Path,
    *,
    format: str = "parquet",
    split: str | None = None,
    with_labels: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
) -> ExportResult:
    """Write `split` (default: every split) of the build at `build_dir` to `out`."""
    build_dir, out = Path(build_dir), Path(out)
    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    manifest = Manifest.read(build_dir)
    splits = manifest.split_names
    if split is not None and split not in splits:
        raise ExportError(f"no split {split!r} in {build_dir}; it has {', '.join(splits)}")
    chosen = [split] if split is not None else splits
    names = [split_file_name(name) for name in chosen]
    if len(set(names)) != len(names):
        raise ExportError(f"split names {chosen} collide once '/' becomes '__'; export one --split")
    _check_output(out)

    partial = out.parent / f".{out.name}.export-partial"
    if partial.exists():
        if not is_ours(partial, MARKER_KIND):
            raise ExportError(f"{partial} exists and is not an unfinished longdata export")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    mark_ours(partial, MARKER_KIND)
    result = ExportResult(out, format)
    schema = _schema(with_labels)
    try:
        if format == "parquet":
            for name, file_name in zip(chosen, names):
                path = partial / f"{file_name}.parquet"
                records = iter_split_rows(manifest, name, with_labels)
                result.rows[name] = _write_parquet(path, records, schema)
                result.files.append(out / path.name)
        else:
            result.rows = _save_dataset_dict(manifest, chosen, partial, with_labels)
            result.files.append(out / "dataset_dict.json")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.is_dir():
        if is_ours(out, MARKER_KIND):
            shutil.rmtree(out)
        else:
            out.rmdir()  # checked empty above
    partial.replace(out)
    if push_to_hub:
        try:
            result.pushed_to = push(out, format, push_to_hub, private=private)
        except Exception as error:  # network, auth and Hub errors come in many types
            raise UploadError(
                f"exported to {out}, but uploading it to {push_to_hub} failed: "
                f"{type(error).__name__}: {error}"
            ) from error
    return result


def _save_dataset_dict(
    manifest: Manifest, splits: list[str], target: Path, with_labels: bool
) -> dict[str, int]:
    """Arrow data of every split via `Dataset.from_generator` (its cache inside `target`),
    saved as one DatasetDict in `target`."""
    import datasets

    features = datasets.Features.from_arrow_schema(_schema(with_labels))
    cache = target / ".cache"
    parts = {}
    for name in splits:
        parts[split_file_name(name)] = datasets.Dataset.from_generator(
            iter_split_rows,
            gen_kwargs={
                "manifest": manifest,
                "split": name,
                "with_labels": with_labels,
            },
            features=features,
            cache_dir=str(cache),
        )
    rows = {name: parts[split_file_name(name)].num_rows for name in splits}
    saved = target / "dataset"
    datasets.DatasetDict(parts).save_to_disk(str(saved))
    del parts
    # save_to_disk wrote its own copy of the Arrow data; the generator cache is not needed.
    shutil.rmtree(cache)
    for item in saved.iterdir():
        item.replace(target / item.name)
    saved.rmdir()
    return rows


def push(out: Path, format: str, repo_id: str, *, private: bool = False) -> str:
    """Upload an export to the Hugging Face Hub as dataset `repo_id`; returns its URL.

    Needs a token (`huggingface-cli login` or HF_TOKEN); nothing else in longdata goes online.
    """
    if format == "hf":
        import datasets

        dataset = datasets.load_from_disk(str(out))
        dataset.push_to_hub(repo_id, private=private)
    else:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="dataset",
            folder_path=str(out),
            allow_patterns=["*.parquet"],
        )
    return f"https://huggingface.co/datasets/{repo_id}"
