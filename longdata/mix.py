"""Mix stage: per-source sample metadata -> the train and validation sample lists.

Works on lengths and hashes only. In order: length filters, exact deduplication across sources
(first occurrence in recipe order wins), a seeded validation hold-out, then recipe weights in
tokens (weight 2.0 = the source contributes twice its tokens: whole repeats, then a seeded sample
for the fraction). Everything is deterministic from the recipe seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class SourceSamples:
    """What the mix needs to know about one source's tokenized samples."""

    name: str
    weight: float
    lengths: np.ndarray  # int64 tokens per sample
    text_hash: np.ndarray  # uint64 hash of the rendered sample
    min_tokens: int = 1
    max_tokens: int | None = None


@dataclass(frozen=True)
class SampleList:
    """Samples of one split as references into the per-source caches, in mixed order."""

    source: np.ndarray  # int64 source index
    index: np.ndarray  # int64 sample index inside that source's cache
    length: np.ndarray  # int64 tokens

    def __len__(self) -> int:
        return len(self.length)


@dataclass
class SourceMixStats:
    available: int = 0
    too_short: int = 0
    too_long: int = 0
    duplicates: int = 0
    validation: int = 0
    train_unique: int = 0
    train_samples: int = 0  # after weighting, repeats counted
    train_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Mix:
    train: SampleList
    validation: SampleList
    stats: list[SourceMixStats]


def mix(sources: Sequence[SourceSamples], *, seed: int, validation_fraction: float,
        validation_max: int, dedup: bool, shuffle: bool = True) -> Mix:
    """``shuffle=False`` keeps recipe source order then input order (for order-preserving packing)."""
    rng = np.random.default_rng(seed)
    seen: set[int] = set()
    train_parts, validation_parts, stats = [], [], []
    keep = [_filtered(s, seen if dedup else None) for s in sources]
    holdout = _validation_counts([len(k[0]) for k in keep], validation_fraction, validation_max)
    for source_index, (source, (kept, source_stats), n_validation) in enumerate(zip(sources, keep, holdout)):
        order = rng.permutation(kept)
        validation, train = order[:n_validation], np.sort(order[n_validation:])
        weighted = _weighted(train, source.lengths, source.weight, rng)
        source_stats.validation = len(validation)
        source_stats.train_unique = len(train)
        source_stats.train_samples = len(weighted)
        source_stats.train_tokens = int(source.lengths[weighted].sum())
        train_parts.append((source_index, weighted, source.lengths[weighted]))
        validation_parts.append((source_index, np.sort(validation), source.lengths[np.sort(validation)]))
        stats.append(source_stats)
    train = _concat(train_parts)
    shuffle = rng.permutation(len(train)) if shuffle else np.arange(len(train))
    return Mix(
        train=SampleList(train.source[shuffle], train.index[shuffle], train.length[shuffle]),
        validation=_concat(validation_parts),
        stats=stats,
    )


def _filtered(source: SourceSamples, seen: set[int] | None) -> tuple[np.ndarray, SourceMixStats]:
    stats = SourceMixStats(available=len(source.lengths))
    short = source.lengths < source.min_tokens
    long = source.lengths > source.max_tokens if source.max_tokens else np.zeros_like(short)
    stats.too_short, stats.too_long = int(short.sum()), int((long & ~short).sum())
    kept = np.flatnonzero(~short & ~long)
    if seen is None:
        return kept, stats
    unique = []
    for index, digest in zip(kept.tolist(), source.text_hash[kept].tolist()):
        if digest not in seen:
            seen.add(digest)
            unique.append(index)
    stats.duplicates = len(kept) - len(unique)
    return np.asarray(unique, dtype=np.int64), stats


def _validation_counts(sizes: list[int], fraction: float, cap: int) -> list[int]:
    """Per-source hold-out sizes: ``fraction`` of each source, at most ``cap`` in total, and
    never a source's last training sample."""
    counts = [min(max(n - 1, 0), int(round(fraction * n))) for n in sizes]
    total = sum(counts)
    if total > cap:
        counts = [c * cap // total for c in counts]
    return counts


def _weighted(train: np.ndarray, lengths: np.ndarray, weight: float, rng) -> np.ndarray:
    whole = int(weight)
    parts = [train] * whole
    fraction = weight - whole
    if fraction > 0 and len(train):
        candidates = rng.permutation(train)
        budget = fraction * lengths[train].sum()
        covered = np.cumsum(lengths[candidates])
        take = int(np.searchsorted(covered, budget, side="left")) + 1
        parts.append(np.sort(candidates[: min(take, len(candidates))]))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _concat(parts: list[tuple[int, np.ndarray, np.ndarray]]) -> SampleList:
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return SampleList(empty, empty, empty)
    return SampleList(
        source=np.concatenate([np.full(len(idx), s, dtype=np.int64) for s, idx, _ in parts]),
        index=np.concatenate([idx.astype(np.int64) for _, idx, _ in parts]),
        length=np.concatenate([lens.astype(np.int64) for _, _, lens in parts]),
    )
