"""Stream a longdata build's packed rows with mosaicml-streaming.

The only things read from a build are its `manifest.json` and the MDS streams it lists (see
docs/ROW_SCHEMA.md): one `streaming.Stream` per length bucket, mixed by the manifest's
proportions. `StreamingDataLoader.state_dict()` records how far into the epoch training got, so
a resumed run sees exactly the rows it would have seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from trainer.config import BATCHING_METHODS


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

    def training_splits(self) -> list[str]:
        """The train splits in stage order: a staged build's curriculum, or just `train`.

        manifest.json stores split keys sorted by name; the stage order is the recipe's
        `packing.stages` order, kept in the manifest's copy of the recipe.
        """
        recipe = self.raw.get("recipe") or {}
        stages = [stage["name"] for stage in (recipe.get("packing") or {}).get("stages") or []]
        splits = self.raw["splits"]
        trains = [name for name in splits if name == "train" or name.endswith("/train")]

        def stage_position(name: str) -> int:
            stage = splits[name].get("stage")
            return stages.index(stage) if stage in stages else len(stages)

        return sorted(trains, key=lambda name: (stage_position(name), name))

    def split(self, name: str) -> dict[str, Any]:
        splits = self.raw["splits"]
        if name not in splits:
            raise KeyError(f"split {name!r} not in the build; it has {sorted(splits)}")
        return splits[name]


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
