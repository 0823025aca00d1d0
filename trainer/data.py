"""Stream a longdata build's packed rows with mosaicml-streaming.

The only things read from a build are its `manifest.json` and the MDS streams it lists (see
docs/ROW_SCHEMA.md): one `streaming.Stream` per length bucket, mixed by the manifest's
proportions. `StreamingDataLoader.state_dict()` records how far into the epoch training got, so
a resumed run sees exactly the rows it would have seen.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

BATCHING_METHODS = ("random", "per_stream")


@dataclass(frozen=True)
class Manifest:
    """The parts of a build's manifest.json the trainer uses."""

    build_dir: Path
    raw: dict[str, Any]

    @classmethod
    def read(cls, build_dir: str | Path) -> Manifest:
        build_dir = Path(build_dir)
        path = build_dir / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: not a finished longdata build (manifest.json is written last)"
            )
        raw = json.loads(path.read_text())
        if raw.get("format") != "longdata/1":
            raise ValueError(f"{path}: unsupported manifest format {raw.get('format')!r}")
        return cls(build_dir, raw)

    @property
    def vocab_size(self) -> int:
        return int(self.raw["tokenizer"]["vocab_size"])

    @property
    def source_names(self) -> list[str]:
        return [source["name"] for source in self.raw.get("sources", [])]

    def split(self, name: str) -> dict[str, Any]:
        splits = self.raw["splits"]
        if name not in splits:
            raise KeyError(f"split {name!r} not in the build; it has {sorted(splits)}")
        return splits[name]


def fetch_remote_manifest(url: str, local_dir: str | Path) -> Path:
    """Download `<url>/manifest.json` (s3://, gs://, ... through streaming's downloaders) into
    `local_dir`, which then serves as the build directory: the shards stream from `url` and are
    cached beside it. Returns `local_dir`."""
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
    return local_dir


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
    otherwise the shards are read in place from the build directory.
    """
    from streaming import Stream, StreamingDataset

    if batching_method not in BATCHING_METHODS:
        raise ValueError(f"batching_method must be one of {BATCHING_METHODS}")
    local_root = Path(cache_dir) if cache_dir is not None else manifest.build_dir
    streams = [
        Stream(
            remote=f"{remote.rstrip('/')}/{entry['path']}" if remote else None,
            local=str(local_root / entry["path"]),
            proportion=entry["proportion"],
        )
        for entry in manifest.split(split)["streams"]
        if entry["rows"] > 0
    ]
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

    from trainer.collation import collate

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
