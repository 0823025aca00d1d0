"""Mix stage: per-source sample metadata -> the train and validation sample lists.

Works on lengths and hashes (and, for near-duplicates only, the cached tokens). In order:
length filters, exact deduplication across sources (first occurrence in recipe order wins), near
deduplication (MinHash-LSH, longdata/stages/near_dedup.py; again the first in recipe then source
order
is kept), a seeded validation hold-out of whole input rows, then recipe weights in tokens (weight
2.0 = the source
contributes twice its tokens: whole repeats, then a seeded sample for the fraction), and last an
optional language ratio, met by down-sampling whichever language is over its share (``trim``)
or by repeating whichever is under it (``upsample``). Everything is deterministic from the
recipe seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from longdata.format.manifest import LanguageBalance, MixCounts
from longdata.stages.near_dedup import NearDuplicateFilter

LANGUAGE_SHARE_MODES = ("trim", "upsample")
_FLOAT_SLACK = 1e-9  # token budgets are products of float shares: equal within this is equal


@dataclass(frozen=True)
class SourceSamples:
    """What the mix needs to know about one source's tokenized samples."""

    name: str
    weight: float
    lengths: np.ndarray  # int64 tokens per sample
    text_hash: np.ndarray  # uint64 hash of the rendered sample
    lang: np.ndarray  # language tag per sample ("en", "zh")
    min_tokens: int = 1
    max_tokens: int | None = None
    tokens: Callable[[int], np.ndarray] | None = None  # a sample's token ids (near dedup only)
    # The input row each sample came from (samples of one conversation made per assistant turn
    # share it): the validation hold-out takes whole rows, so no row is on both sides.
    row: np.ndarray | None = None


@dataclass(frozen=True)
class SampleList:
    """Samples of one split as references into the per-source caches, in mixed order."""

    source: np.ndarray  # int64 source index
    index: np.ndarray  # int64 sample index inside that source's cache
    length: np.ndarray  # int64 tokens

    def __len__(self) -> int:
        return len(self.length)


@dataclass(frozen=True)
class Mix:
    train: SampleList
    validation: SampleList
    stats: list[MixCounts]
    language: LanguageBalance | None = None


def mix(
    sources: Sequence[SourceSamples],
    *,
    seed: int,
    validation_fraction: float,
    validation_max: int,
    dedup: bool,
    shuffle: bool = True,
    language_share: dict[str, float] | None = None,
    language_share_mode: str = "trim",
    near_duplicates: NearDuplicateFilter | None = None,
) -> Mix:
    """``shuffle=False`` keeps recipe source order then input order (for order-preserving packing).
    ``language_share`` maps a language tag to its wanted share of train tokens (e.g. zh: 0.1),
    met as ``language_share_mode`` says. ``near_duplicates`` removes samples too similar to one
    kept before it (every source needs ``tokens``)."""
    if language_share_mode not in LANGUAGE_SHARE_MODES:
        raise ValueError(
            f"language_share_mode must be one of {LANGUAGE_SHARE_MODES}, "
            f"got {language_share_mode!r}"
        )
    rng = np.random.default_rng(seed)
    seen: set[int] = set()
    keep = [
        _filtered(s, i, seen if dedup else None, near_duplicates) for i, s in enumerate(sources)
    ]
    holdout = _validation_counts([len(k[0]) for k in keep], validation_fraction, validation_max)
    weighted, validation_parts, stats = [], [], []
    for source_index, (source, (kept, source_stats), n_validation) in enumerate(
        zip(sources, keep, holdout)
    ):
        order = rng.permutation(kept)
        held_out = _whole_rows(order, source.row, n_validation)
        validation, train = np.sort(order[held_out]), np.sort(order[~held_out])
        source_stats.validation = len(validation)
        source_stats.train_unique = len(train)
        weighted.append(_weighted(train, source.lengths, source.weight, rng))
        validation_parts.append((source_index, validation, source.lengths[validation]))
        stats.append(source_stats)
    balance = None
    if language_share:
        weighted, balance = _balance_languages(
            weighted, sources, language_share, language_share_mode, stats, rng
        )
    train_parts = []
    for source_index, (source, chosen, source_stats) in enumerate(zip(sources, weighted, stats)):
        source_stats.train_samples = len(chosen)
        source_stats.train_tokens = int(source.lengths[chosen].sum())
        train_parts.append((source_index, chosen, source.lengths[chosen]))
    train = _concat(train_parts)
    order = rng.permutation(len(train)) if shuffle else np.arange(len(train))
    return Mix(
        train=SampleList(train.source[order], train.index[order], train.length[order]),
        validation=_concat(validation_parts),
        stats=stats,
        language=balance,
    )


def _balance_languages(
    weighted: list[np.ndarray],
    sources: Sequence[SourceSamples],
    share: dict[str, float],
    mode: str,
    stats: list[MixCounts],
    rng,
) -> tuple[list[np.ndarray], LanguageBalance]:
    """``trim``: down-sample each language whose token share exceeds its target, uniformly across
    sources (seeded), so the others reach their shares without repeating any sample.
    ``upsample``: repeat each language under its target instead (whole repeats, then a seeded
    sample, as weights do), so no sample is lost; a language wanted at 0 is still removed."""
    langs = (
        np.concatenate([s.lang[w] for s, w in zip(sources, weighted)]) if weighted else np.zeros(0)
    )
    lengths = np.concatenate([s.lengths[w] for s, w in zip(sources, weighted)]).astype(np.int64)
    tokens = {lang: int(lengths[langs == lang].sum()) for lang in np.unique(langs)}
    shares = {lang: share.get(lang, 0.0) for lang in tokens}
    rest = [lang for lang in tokens if lang not in share]
    for lang in rest:  # languages the recipe does not name split what the named ones leave
        shares[lang] = (
            max(0.0, 1.0 - sum(share.values()))
            * tokens[lang]
            / max(sum(tokens[r] for r in rest), 1)
        )
    # trim: the largest total every language can support at its share without up-sampling any;
    # upsample: the smallest total in which no language needs down-sampling.
    supported = [tokens[lang] / shares[lang] for lang in tokens if shares[lang] > 0]
    total = (max if mode == "upsample" else min)(supported, default=0.0)
    copies = np.ones(len(lengths), dtype=np.int64)  # how often each weighted sample is trained on
    for lang, have in tokens.items():
        budget = shares[lang] * total
        if have > budget * (1 + _FLOAT_SLACK):
            members = rng.permutation(np.flatnonzero(langs == lang))
            covered = np.cumsum(lengths[members])
            copies[members[np.searchsorted(covered, budget, side="right") :]] = 0
        elif mode == "upsample" and have * (1 + _FLOAT_SLACK) < budget:
            members = np.flatnonzero(langs == lang)
            chosen = _weighted(members, lengths, budget / have, rng)
            copies[members] = np.bincount(chosen, minlength=len(lengths))[members]
    result = []
    start = 0
    for index, chosen in enumerate(weighted):
        own = copies[start : start + len(chosen)]
        stats[index].language_trimmed = int((own == 0).sum())
        stats[index].language_upsampled = int(np.maximum(own - 1, 0).sum())
        result.append(np.repeat(chosen, own))
        start += len(chosen)
    after = {lang: int((lengths * copies)[langs == lang].sum()) for lang in tokens}
    return result, LanguageBalance(
        mode,
        {lang: float(v) for lang, v in shares.items()},
        {lang: int(v) for lang, v in tokens.items()},
        after,
    )


def _filtered(
    source: SourceSamples,
    source_index: int,
    seen: set[int] | None,
    near: NearDuplicateFilter | None,
) -> tuple[np.ndarray, MixCounts]:
    stats = MixCounts(available=len(source.lengths))
    short = source.lengths < source.min_tokens
    long = source.lengths > source.max_tokens if source.max_tokens else np.zeros_like(short)
    stats.too_short, stats.too_long = int(short.sum()), int((long & ~short).sum())
    kept = np.flatnonzero(~short & ~long)
    if seen is not None:
        unique = []
        for index, digest in zip(kept.tolist(), source.text_hash[kept].tolist()):
            if digest not in seen:
                seen.add(digest)
                unique.append(index)
        stats.duplicates = len(kept) - len(unique)
        kept = np.asarray(unique, dtype=np.int64)
    if near is not None:
        if source.tokens is None:
            raise ValueError(f"source {source.name}: near-duplicate removal needs its tokens")
        distinct = [
            index
            for index in kept.tolist()
            if near.keep(f"{source_index}:{index}", source.tokens(index))
        ]
        stats.near_duplicates = len(kept) - len(distinct)
        stats.duplicates += stats.near_duplicates
        kept = np.asarray(distinct, dtype=np.int64)
    return kept, stats


def _validation_counts(sizes: list[int], fraction: float, cap: int) -> list[int]:
    """Per-source hold-out sizes: ``fraction`` of each source, at most ``cap`` in total, and
    never a source's last training sample."""
    counts = [min(max(n - 1, 0), int(round(fraction * n))) for n in sizes]
    total = sum(counts)
    if total > cap:
        counts = [c * cap // total for c in counts]
    return counts


def _whole_rows(order: np.ndarray, row: np.ndarray | None, count: int) -> np.ndarray:
    """Which samples of the shuffled ``order`` to hold out: the first ``count``, widened to
    whole input rows (rows taken in order of their first sample), never every row. With one
    sample per row that is exactly ``order[:count]``."""
    held_out = np.zeros(len(order), dtype=bool)
    if row is None or count == 0:
        held_out[:count] = True
        return held_out
    rows = row[order]
    distinct, first = np.unique(rows, return_index=True)
    rank = np.empty(len(distinct), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(distinct))
    sample_rank = rank[np.searchsorted(distinct, rows)]
    per_rank = np.cumsum(np.bincount(sample_rank, minlength=len(distinct)))
    taken = min(int(np.searchsorted(per_rank, count, side="left")) + 1, len(distinct) - 1)
    return sample_rank < taken


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
