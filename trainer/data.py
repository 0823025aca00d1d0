"""Stream a longdata build's packed rows with mosaicml-streaming.

The only things read from a build are its `manifest.json` (through `longdata.format.Manifest`,
the build contract) and the MDS streams it lists (see docs/ROW_SCHEMA.md): one
`streaming.Stream` per length bucket, mixed by the manifest's proportions. Every shard is
checked against the hash its index.json records before training reads it, so a damaged shard
stops the run with one line naming the file instead of training on wrong tokens.
`StreamingDataLoader.state_dict()` records how far into the epoch training got, so a resumed
run sees exactly the rows it would have seen.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

from longdata.format import SHARD_HASHES, Manifest, check_stream_files, inside
from longdata.trainer.config import BATCHING_METHODS

__all__ = [
    "Manifest",
    "fetch_remote_manifest",
    "make_dataloader",
    "make_dataset",
    "release_streaming_resources",
]


def fetch_remote_manifest(url: str, local_dir: str | Path) -> Manifest:
    """Download `<url>/manifest.json` (s3://, gs://, ... through streaming's downloaders) into
    `local_dir`, which then serves as the build directory: the shards stream from `url` and are
    cached beside it. Returns the manifest, checked as the build contract says."""
    from streaming.base.storage import CloudDownloader

    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    remote = f"{url.rstrip('/')}/manifest.json"
    # Every rank of a torchrun job downloads it; each writes its own file, then renames.
    staging = local_dir / f".manifest.json.{os.getpid()}.partial"
    try:
        CloudDownloader.direct_download(remote, str(staging))
    except Exception as error:  # each store raises its own types; the user needs the URL and why
        staging.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"{remote} cannot be read: not a finished longdata build there? "
            f"({type(error).__name__}: {error})"
        ) from None
    staging.replace(local_dir / "manifest.json")
    return Manifest.read(local_dir)


def make_dataset(
    manifest: Manifest,
    split: str,
    batch_size: int,
    *,
    shuffle: bool = True,
    shuffle_seed: int = 0,
    batching_method: str = "random",
    remote: str | None = None,
    cache_dir: str | Path | None = None,
    predownload: int | None = None,
    replication: int = 1,
) -> Any:
    """A StreamingDataset over every stream of `split`, weighted by the manifest's proportions.

    Under torchrun, streaming reads the ranks from the environment and gives each rank disjoint
    rows; with `replication=N`, each group of N consecutive ranks (a sequence-parallel group)
    gets the same rows.

    With `remote` (e.g. `s3://bucket/builds/quickstart`), each stream is read from
    `<remote>/<stream path>` and cached under `cache_dir` (default: the build directory);
    otherwise the shards are read in place from the build directory. Local shards are
    hash-checked here, before any is read; downloaded ones by streaming as they arrive
    (`validate_hash`).
    """
    from streaming import Stream, StreamingDataset

    if batching_method not in BATCHING_METHODS:
        raise ValueError(f"batching_method must be one of {BATCHING_METHODS}")
    entries = [entry for entry in manifest.split(split).streams if entry.rows > 0]
    if remote:
        local_root = Path(cache_dir) if cache_dir is not None else manifest.build_dir
        streams = [
            Stream(
                remote=f"{remote.rstrip('/')}/{entry.path}",
                local=str(inside(local_root, entry.path)),
                proportion=entry.proportion,
                validate_hash=SHARD_HASHES[0],
            )
            for entry in entries
        ]
    else:
        streams = []
        for entry in entries:
            stream_dir = manifest.stream_dir(entry)
            check_stream_files(stream_dir)
            streams.append(Stream(local=str(stream_dir), proportion=entry.proportion))
    return StreamingDataset(
        streams=streams,
        batch_size=batch_size,
        shuffle=shuffle,
        shuffle_seed=shuffle_seed,
        batching_method=batching_method,
        predownload=predownload,
        replication=replication if replication > 1 else None,
    )


def make_dataloader(dataset: Any, batch_size: int, pad_to_multiple_of: int | None = None) -> Any:
    """A resumable loader yielding `trainer.collate()` batches, in this process (no workers).

    Worker processes would each hold a copy of the streaming state and leave shared memory
    behind; collating packed rows is cheap next to the model, so the main process does it.
    """
    from streaming import StreamingDataLoader

    from longdata.trainer.collation import collate

    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=partial(collate, pad_to_multiple_of=pad_to_multiple_of),
        num_workers=0,
    )


def release_streaming_resources() -> None:
    """Remove the shared-memory segments and locks streaming leaves behind in this process."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
