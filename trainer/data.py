"""Read a longdata build's packed rows for training, with longdata's own MDS reader.

The only things read from a build are its `manifest.json` (through `longdata.format.Manifest`,
the build contract) and the MDS streams it lists (see docs/ROW_SCHEMA.md), one per length
bucket. Every shard is checked against the size and hash its index.json records before training
reads it (`check_stream_files`, then `load_shard` again on each load), so a damaged shard stops
the run with one line naming the file instead of training on wrong tokens.

One epoch's order (`epoch_plan`), a pure function of (seed, epoch):
1. each stream contributes `round(proportion * total rows)` samples: its rows permuted, repeated
   (each repeat permuted anew) when its proportion asks for more rows than it has;
2. `batching_method='random'` permutes all those samples together; `'per_stream'` cuts each
   stream's samples into global batches and permutes the batches, so a batch holds one stream;
3. the plan is cut to a multiple of the number of data-parallel groups, and group g (the ranks
   `g*replication .. g*replication+replication-1`) takes samples g, g+groups, g+2*groups, ...
   Dataloader workers of one rank split that rank's samples the same way again.
The random generator is numpy's PCG64 seeded with `[seed, epoch]`. The loader's position is
plain numbers (epoch, samples of the epoch consumed by the whole world, seed), so a checkpoint
holds it as JSON and a resumed run sees exactly the rows it would have seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longdata.format import Manifest, check_stream_files
from longdata.format.mds import INDEX_FILE, StreamReader, read_index, shard_file
from longdata.trainer.collation import collate
from longdata.trainer.config import BATCHING_METHODS, ConfigError

__all__ = [
    "LOADER_FORMAT",
    "Manifest",
    "OldLoaderStateError",
    "RowDataset",
    "RowLoader",
    "epoch_plan",
    "fetch_remote_manifest",
    "make_dataloader",
    "make_dataset",
]

LOADER_FORMAT = "longdata-loader-1"


class OldLoaderStateError(ConfigError):
    """A checkpoint's data position written by the mosaicml-streaming based loader; a
    ConfigError, so `longdata train --resume` prints it as one line."""


def fetch_remote_manifest(url: str, local_dir: str | Path) -> Manifest:
    """Download `<url>/manifest.json` (s3://, gs://, ... through fsspec) into `local_dir`,
    which then serves as the build directory. Returns the manifest, checked as the build
    contract says."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    remote = f"{url.rstrip('/')}/manifest.json"
    # Every rank of a torchrun job downloads it; each writes its own file, then renames.
    staging = local_dir / f".manifest.json.{os.getpid()}.partial"
    try:
        with _open_remote(remote) as source:
            staging.write_bytes(source.read())
    except Exception as error:  # each store raises its own types; the user needs the URL and why
        staging.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"{remote} cannot be read: not a finished longdata build there? "
            f"({type(error).__name__}: {error})"
        ) from None
    staging.replace(local_dir / "manifest.json")
    return Manifest.read(local_dir)


def _open_remote(url: str) -> Any:
    """`url` opened for reading through fsspec; an s3:// URL goes to `S3_ENDPOINT_URL` when
    that is set, the variable `longdata build` uploads honour too."""
    import fsspec

    options = {}
    if url.startswith("s3://") and os.environ.get("S3_ENDPOINT_URL"):
        options["client_kwargs"] = {"endpoint_url": os.environ["S3_ENDPOINT_URL"]}
    return fsspec.open(url, "rb", **options)


def _download(url: str, target: Path) -> None:
    """`url` into `target` through a temp name of this process, so concurrent ranks never
    read a half-written file."""
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with _open_remote(url) as source:
            staging.write_bytes(source.read())
    except Exception as error:  # each store raises its own types; the user needs the URL and why
        staging.unlink(missing_ok=True)
        raise FileNotFoundError(f"{url} cannot be read ({type(error).__name__}: {error})") from None
    staging.replace(target)


def download_stream(url: str, stream_dir: Path) -> None:
    """Copy the stream at `url` (its index.json and the shard files it names) into
    `stream_dir`, a directory longdata owns (under OUT/remote_build). Every shard name is
    checked to lie inside `stream_dir` before any shard is fetched; the hashes are checked by
    `check_stream_files` afterwards, before any row is read."""
    stream_dir.mkdir(parents=True, exist_ok=True)
    _download(f"{url}/{INDEX_FILE}", stream_dir / INDEX_FILE)
    wanted = [
        (shard_file(stream_dir, stored), stored["basename"])
        for shard in read_index(stream_dir)
        for stored in [shard.get("zip_data") or shard["raw_data"]]
    ]
    for target, basename in wanted:
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _download(f"{url}/{basename}", target)


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def epoch_plan(
    stream_rows: list[int],
    proportions: list[float],
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    batching_method: str,
    global_batch: int,
) -> np.ndarray:
    """The epoch's samples in order, as (stream, row) pairs: an int64 array of shape (n, 2)."""
    rng = np.random.Generator(np.random.PCG64([seed, epoch]))
    total = sum(stream_rows)
    weight = sum(proportions)
    per_stream = []
    for stream, (rows, proportion) in enumerate(zip(stream_rows, proportions)):
        count = round(proportion / weight * total) if rows else 0
        repeats = -(-count // rows) if rows else 0
        order = [rng.permutation(rows) if shuffle else np.arange(rows) for _ in range(repeats)]
        picked = np.concatenate(order)[:count] if order else np.zeros(0, np.int64)
        per_stream.append(np.stack([np.full(count, stream), picked], axis=1).astype(np.int64))
    if batching_method == "per_stream":
        batches = [
            samples[start : start + global_batch]
            for samples in per_stream
            for start in range(0, len(samples), global_batch)
        ]
        order = rng.permutation(len(batches)) if shuffle else range(len(batches))
        return np.concatenate([batches[i] for i in order] or [np.zeros((0, 2), np.int64)])
    plan = np.concatenate(per_stream or [np.zeros((0, 2), np.int64)])
    return plan[rng.permutation(len(plan))] if shuffle else plan


class RowDataset(torch.utils.data.IterableDataset):
    """This rank's rows of every stream of one split, in `epoch_plan` order."""

    def __init__(
        self,
        stream_dirs: list[Path],
        proportions: list[float],
        batch_size: int,
        *,
        shuffle: bool,
        shuffle_seed: int,
        batching_method: str,
        replication: int,
    ) -> None:
        self.readers = [StreamReader(stream_dir) for stream_dir in stream_dirs]
        self.proportions = proportions
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = shuffle_seed
        self.batching_method = batching_method
        rank, world = _rank_and_world()
        if replication < 1 or world % replication:
            raise ValueError(f"replication {replication} does not divide {world} ranks")
        self.groups = world // replication
        self.group = rank // replication
        self.epoch = 0
        self.samples_in_epoch = 0  # consumed by the whole world, the same on every rank

    @property
    def num_samples(self) -> int:
        return sum(reader.rows for reader in self.readers)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """Row `index` of the streams read one after another (no shuffle, no partition)."""
        for reader in self.readers:
            if index < reader.rows:
                return reader.row(index)
            index -= reader.rows
        raise IndexError(index)

    def _plan(self) -> np.ndarray:
        """The samples of this rank's group in the current epoch, from the saved position."""
        plan = epoch_plan(
            [reader.rows for reader in self.readers],
            self.proportions,
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.shuffle,
            batching_method=self.batching_method,
            global_batch=self.batch_size * self.groups,
        )
        plan = plan[: len(plan) - len(plan) % self.groups]
        return plan[self.samples_in_epoch + self.group :: self.groups]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        mine = self._plan()
        worker = torch.utils.data.get_worker_info()
        if worker is not None:
            mine = mine[worker.id :: worker.num_workers]
        for stream, row in mine.tolist():
            yield self.readers[stream].row(row)


class RowLoader:
    """Batches of `collate()`d rows, one pass per epoch, resumable from `state_dict()`."""

    def __init__(
        self,
        dataset: RowDataset,
        batch_size: int,
        pad_to_multiple_of: int | None,
        position_span: int | None = None,
        position_seed: int = 0,
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self._collate_options = {
            "pad_to_multiple_of": pad_to_multiple_of,
            "position_span": position_span,
            "position_seed": position_seed,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = self.dataset
        batch: list[dict[str, np.ndarray]] = []
        for row in dataset:
            batch.append(row)
            if len(batch) == self.batch_size:
                dataset.samples_in_epoch += len(batch) * dataset.groups
                yield collate(batch, **self._collate_options)
                batch = []
        if batch:
            yield collate(batch, **self._collate_options)
        dataset.epoch += 1
        dataset.samples_in_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": LOADER_FORMAT,
            "epoch": self.dataset.epoch,
            "samples_in_epoch": self.dataset.samples_in_epoch,
            "seed": self.dataset.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != LOADER_FORMAT:
            raise OldLoaderStateError(
                "this checkpoint was written by the streaming-based loader of longdata < 0.2; "
                "restart without --resume or use an older longdata"
            )
        if state["seed"] != self.dataset.seed:
            raise ValueError(f"the checkpoint's data seed {state['seed']} is not the run's seed")
        self.dataset.epoch = int(state["epoch"])
        self.dataset.samples_in_epoch = int(state["samples_in_epoch"])


def make_dataset(
    manifest: Manifest,
    split: str,
    batch_size: int,
    *,
    shuffle: bool = True,
    shuffle_seed: int = 0,
    batching_method: str = "random",
    remote: str | None = None,
    replication: int = 1,
) -> RowDataset:
    """This rank's rows of every stream of `split`, weighted by the manifest's proportions;
    every shard hash-checked before any row is read. With `replication=N`, each group of N
    consecutive ranks (a sequence-parallel group) gets the same rows. With `remote` (e.g.
    `s3://bucket/builds/quickstart`), each stream is first downloaded from `<remote>/<path>`
    into the manifest's directory (OUT/remote_build for `longdata train s3://...`)."""
    if batching_method not in BATCHING_METHODS:
        raise ValueError(f"batching_method must be one of {BATCHING_METHODS}")
    entries = [entry for entry in manifest.split(split).streams if entry.rows > 0]
    stream_dirs = [manifest.stream_dir(entry) for entry in entries]
    if remote:
        for entry, stream_dir in zip(entries, stream_dirs):
            download_stream(f"{remote.rstrip('/')}/{entry.path}", stream_dir)
    for stream_dir in stream_dirs:
        check_stream_files(stream_dir)
    return RowDataset(
        stream_dirs,
        [entry.proportion for entry in entries],
        batch_size,
        shuffle=shuffle,
        shuffle_seed=shuffle_seed,
        batching_method=batching_method,
        replication=replication,
    )


def make_dataloader(
    dataset: RowDataset,
    batch_size: int,
    pad_to_multiple_of: int | None = None,
    position_span: int | None = None,
    position_seed: int = 0,
) -> RowLoader:
    """A resumable loader yielding `trainer.collate()` batches in this process."""
    return RowLoader(dataset, batch_size, pad_to_multiple_of, position_span, position_seed)
