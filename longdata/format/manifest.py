"""``manifest.json``: the typed, versioned description of a finished build.

A build directory is complete exactly when it holds a ``manifest.json`` (written last). This
module is the one place it is parsed: ``Manifest.read`` checks the format version, the fields a
consumer relies on (tokenizer vocabulary, source names, splits, their streams) and that every
stream path stays inside the build directory; anything else is ``BuildFormatError`` with one
line. ``write_manifest`` runs the same checks before writing, so a build cannot publish a
manifest its readers would refuse.

Splits are kept in *stage order* (curriculum order: stages as the recipe lists them, each stage's
train split before its validation split). New manifests record it as ``split_order``; for
manifests written before that key existed the order is recovered from the recipe's stages.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longdata.format.paths import UnsafePathError, inside

FORMAT = "longdata/1"
# Formats this reader understands. "longdata/1" manifests without `split_order` (older builds)
# read the same; a change readers cannot ignore gets a new version here.
SUPPORTED_FORMATS = (FORMAT,)
MANIFEST_FILE = "manifest.json"


class BuildFormatError(ValueError):
    """A build directory whose manifest (or shards) cannot be used as the build contract says."""

    exit_code = 1  # the data is damaged: a runtime failure, not a typo


class NotABuildError(BuildFormatError):
    """The path holds no finished longdata build at all."""

    exit_code = 2


class UnknownSplitError(BuildFormatError, KeyError):
    """A split the build does not have; the message lists the ones it has."""

    exit_code = 2

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class StreamEntry:
    """One MDS stream (a length bucket) of a split; ``path`` is relative to the build."""

    name: str
    path: str
    rows: int
    tokens: int
    target_tokens: int
    proportion: float
    samples: int | None = None  # absent in manifests of hand-made test builds


@dataclass(frozen=True)
class SplitEntry:
    name: str
    max_seq_len: int
    stage: str | None
    streams: tuple[StreamEntry, ...]

    @property
    def is_train(self) -> bool:
        return self.name.rsplit("/", 1)[-1] == "train"

    @property
    def rows(self) -> int:
        return sum(stream.rows for stream in self.streams)


@dataclass(frozen=True)
class TokenizerEntry:
    """Which tokenizer the build used: ``name`` as the recipe gave it, ``path`` where it was
    loaded from (or the ``builtin:`` name of a bundled one), ``sha256`` per ``tokenizer_digest``."""

    name: str
    path: str | None
    vocab_size: int
    pad_token_id: int | None
    eos_token_id: int | None
    sha256: str | None
    digest_version: int = 1  # absent from manifests written before version 2 existed


@dataclass(frozen=True)
class Manifest:
    """A build's manifest, checked. ``raw`` keeps the whole JSON for the descriptive parts
    (per-source statistics, the recipe, versions) that only the card and reports read."""

    build_dir: Path
    format: str
    name: str
    tokenizer: TokenizerEntry
    source_names: tuple[str, ...]
    splits: dict[str, SplitEntry]  # in stage order
    raw: dict[str, Any]

    @classmethod
    def read(cls, build_dir: str | Path) -> Manifest:
        build_dir = Path(build_dir)
        path = build_dir / MANIFEST_FILE
        if not build_dir.is_dir():
            raise NotABuildError(f"{build_dir}: not a complete longdata build (no such directory)")
        if not path.is_file():
            raise NotABuildError(
                f"{build_dir}: not a complete longdata build (no {MANIFEST_FILE} "
                "in it; it is written last)"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise BuildFormatError(f"{path}: cannot be read ({error})") from None
        if not text.strip():
            raise BuildFormatError(f"{path}: empty (the build was interrupted or the file damaged)")
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise BuildFormatError(
                f"{path}: not valid JSON ({error}); truncated or edited?"
            ) from None
        return cls.parse(build_dir, raw)

    @classmethod
    def parse(cls, build_dir: str | Path, raw: Any) -> Manifest:
        """Check ``raw`` (the decoded JSON) as the manifest of ``build_dir``."""
        build_dir = Path(build_dir)
        where = build_dir / MANIFEST_FILE
        check = _Checker(where)
        if not isinstance(raw, dict):
            raise BuildFormatError(f"{where}: must hold a JSON object, not {type(raw).__name__}")
        if raw.get("format") not in SUPPORTED_FORMATS:
            raise BuildFormatError(
                f"{where}: format {raw.get('format')!r} is not one this longdata "
                f"reads ({', '.join(SUPPORTED_FORMATS)})"
            )
        tokenizer = check.mapping(raw, "tokenizer")
        sources = check.list(raw, "sources")
        names = tuple(
            check.text(check.mapping_item(s, f"sources[{i}]"), "name", f"sources[{i}]")
            for i, s in enumerate(sources)
        )
        splits_raw = check.mapping(raw, "splits")
        splits = {name: _split(check, build_dir, name, value) for name, value in splits_raw.items()}
        order = _stage_order(check, raw, splits)
        return cls(
            build_dir=build_dir,
            format=raw["format"],
            name=check.text(raw, "name", optional=True) or "",
            tokenizer=TokenizerEntry(
                name=check.text(tokenizer, "name", "tokenizer"),
                path=check.text(tokenizer, "path", "tokenizer", optional=True),
                vocab_size=check.count(tokenizer, "vocab_size", "tokenizer", positive=True),
                pad_token_id=check.count(tokenizer, "pad_token_id", "tokenizer", optional=True),
                eos_token_id=check.count(tokenizer, "eos_token_id", "tokenizer", optional=True),
                sha256=check.text(tokenizer, "sha256", "tokenizer", optional=True),
                digest_version=check.count(
                    tokenizer, "digest_version", "tokenizer", optional=True, positive=True
                )
                or 1,
            ),
            source_names=names,
            splits={name: splits[name] for name in order},
            raw=raw,
        )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def split_names(self) -> list[str]:
        return list(self.splits)

    def split(self, name: str) -> SplitEntry:
        if name not in self.splits:
            listed = ", ".join(self.splits) or "none"
            raise UnknownSplitError(f"no split {name!r} in {self.build_dir}; its splits: {listed}")
        return self.splits[name]

    def training_splits(self) -> list[str]:
        """The train splits in stage order: a staged build's curriculum, or just ``train``."""
        return [name for name, split in self.splits.items() if split.is_train]

    def stream_dir(self, stream: StreamEntry) -> Path:
        """Where a stream's shards are (its path was checked to stay inside the build)."""
        return inside(self.build_dir, stream.path)

    def recipe_value(self, *keys: str) -> Any:
        """``raw["recipe"][k1][k2]...``, or None where any level is missing."""
        node: Any = self.raw.get("recipe")
        for key in keys:
            if not isinstance(node, dict):
                return None
            node = node.get(key)
        return node


def write_manifest(build_dir: Path, data: dict[str, Any]) -> Manifest:
    """Check ``data`` as the manifest of ``build_dir`` and write it (atomically: a reader finds
    the old manifest or the new one, never a half-written file). ``split_order`` is set from
    ``data["splits"]`` as given, which the builder lists in stage order."""
    data = {**data, "split_order": list(data["splits"])}
    manifest = Manifest.parse(build_dir, data)
    staging = build_dir / f".{MANIFEST_FILE}.partial"
    staging.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(staging, build_dir / MANIFEST_FILE)
    return manifest


def _split(check: _Checker, build_dir: Path, name: str, value: Any) -> SplitEntry:
    where = f"splits[{name!r}]"
    if not isinstance(name, str) or not name:
        raise check.error(f"{where}: a split needs a name")
    try:
        inside(build_dir, name)
    except UnsafePathError as error:
        raise check.error(f"{where}: {error}") from None
    split = check.mapping_item(value, where)
    streams = []
    for i, entry in enumerate(check.list(split, "streams", where)):
        stream_where = f"{where}.streams[{i}]"
        entry = check.mapping_item(entry, stream_where)
        path = check.text(entry, "path", stream_where)
        try:
            inside(build_dir, path)
        except UnsafePathError as error:
            raise check.error(f"{stream_where}.path: {error}") from None
        streams.append(
            StreamEntry(
                name=check.text(entry, "name", stream_where),
                path=path,
                rows=check.count(entry, "rows", stream_where),
                tokens=check.count(entry, "tokens", stream_where),
                target_tokens=check.count(entry, "target_tokens", stream_where),
                proportion=check.fraction(entry, "proportion", stream_where),
                samples=check.count(entry, "samples", stream_where, optional=True),
            )
        )
    return SplitEntry(
        name=name,
        max_seq_len=check.count(split, "max_seq_len", where, positive=True),
        stage=check.text(split, "stage", where, optional=True),
        streams=tuple(streams),
    )


def _stage_order(check: _Checker, raw: dict[str, Any], splits: dict[str, SplitEntry]) -> list[str]:
    recorded = raw.get("split_order")
    if recorded is not None:
        if not isinstance(recorded, list) or sorted(map(str, recorded)) != sorted(splits):
            raise check.error("split_order must list every split exactly once")
        return recorded
    # Older manifests: stage position from the recipe, then train before validation.
    stages = [
        s.get("name")
        for s in ((raw.get("recipe") or {}).get("packing") or {}).get("stages") or []
        if isinstance(s, dict)
    ]

    def position(name: str) -> tuple:
        stage = name.split("/")[0] if "/" in name else None
        rank = (
            stages.index(stage) if stage in stages else (splits[name].max_seq_len if stage else -1)
        )
        return rank, not splits[name].is_train, name

    return sorted(splits, key=position)


class _Checker:
    """Field checks that name the manifest and the key path in one line."""

    def __init__(self, where: Path):
        self.where = where

    def error(self, message: str) -> BuildFormatError:
        return BuildFormatError(f"{self.where}: {message}")

    def _get(self, node: dict, key: str, parent: str, optional: bool) -> Any:
        label = f"{parent}.{key}" if parent else key
        if key not in node or node[key] is None:
            if optional:
                return None
            raise self.error(f"{label} is missing")
        return node[key]

    def mapping(self, node: dict, key: str, parent: str = "") -> dict:
        value = self._get(node, key, parent, False)
        return self.mapping_item(value, f"{parent}.{key}" if parent else key)

    def mapping_item(self, value: Any, label: str) -> dict:
        if not isinstance(value, dict):
            raise self.error(f"{label} must be an object, not {type(value).__name__}")
        return value

    def list(self, node: dict, key: str, parent: str = "") -> list:
        value = self._get(node, key, parent, False)
        if not isinstance(value, list):
            raise self.error(
                f"{parent + '.' if parent else ''}{key} must be a list, not {type(value).__name__}"
            )
        return value

    def text(self, node: dict, key: str, parent: str = "", optional: bool = False) -> str | None:
        value = self._get(node, key, parent, optional)
        if value is not None and not isinstance(value, str):
            raise self.error(
                f"{parent + '.' if parent else ''}{key} must be a string, got {value!r:.80}"
            )
        return value

    def count(
        self, node: dict, key: str, parent: str = "", optional: bool = False, positive: bool = False
    ) -> int | None:
        value = self._get(node, key, parent, optional)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if positive else 0):
            bound = "a positive" if positive else "a non-negative"
            raise self.error(
                f"{parent + '.' if parent else ''}{key} must be {bound} integer, got {value!r:.80}"
            )
        return value

    def fraction(self, node: dict, key: str, parent: str = "") -> float:
        value = self._get(node, key, parent, False)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not 0 <= value <= 1
        ):
            raise self.error(
                f"{parent + '.' if parent else ''}{key} must be a number in [0, 1], "
                f"got {value!r:.80}"
            )
        return float(value)
