from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longdata.stages.packing import (
    ALGORITHMS,
    OVERLENGTH_POLICIES,
    Plan,
    assign_buckets,
    bucket_names,
    fit_to_length,
    packing_stats,
    plan,
)

MAX_LENS = st.integers(min_value=1, max_value=64)
# The first call of each compiled kernel loads it from numba's cache, and the machine is shared:
# per-example wall-clock deadlines would only measure noise.
relaxed = settings(deadline=None)
thorough = settings(deadline=None, max_examples=200)


@st.composite
def packable(draw, max_size: int = 60) -> tuple[np.ndarray, int]:
    """Lengths already valid for plan(): every value in [1, max_len]."""
    max_len = draw(MAX_LENS)
    values = draw(st.lists(st.integers(1, max_len), max_size=max_size))
    return np.array(values, dtype=np.int64), max_len


@st.composite
def raw_samples(draw) -> tuple[np.ndarray, int]:
    """Lengths as they come from data: empty and over-length samples included."""
    max_len = draw(MAX_LENS)
    values = draw(st.lists(st.integers(0, 4 * max_len), max_size=40))
    return np.array(values, dtype=np.int64), max_len


# --- slow, obviously correct references --------------------------------------------------------


def longest_first(lengths: np.ndarray) -> list[int]:
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def reference_decreasing(lengths: np.ndarray, max_len: int, best: bool) -> list[list[int]]:
    """BFD (best=True: the fullest row that fits) or FFD (the oldest row that fits)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for item in longest_first(lengths):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[item]]
        if not fits:
            rows.append([])
            room.append(max_len)
            fits = [len(rows) - 1]
        chosen = min(fits, key=lambda r: (room[r], r)) if best else fits[0]
        rows[chosen].append(item)
        room[chosen] -= lengths[item]
    return rows


def reference_next_fit(lengths: np.ndarray, max_len: int) -> list[list[int]]:
    rows: list[list[int]] = []
    room = 0
    for item, length in enumerate(lengths):
        if length > room:
            rows.append([])
            room = max_len
        rows[-1].append(item)
        room -= length
    return rows


def as_row_sets(rows) -> set[frozenset[int]]:
    return {frozenset(int(i) for i in row) for row in rows}


# --- plan --------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@given(case=packable(), seed=st.integers(0, 2**32 - 1))
@relaxed
def test_every_item_once_and_no_row_over_max_len(algorithm, case, seed):
    lengths, max_len = case
    result = plan(lengths, max_len, algorithm=algorithm, seed=seed)
    assert np.array_equal(np.sort(result.item_index), np.arange(len(lengths)))
    row_lengths = result.row_lengths(lengths)
    assert len(row_lengths) == len(result)
    assert np.all(row_lengths <= max_len)
    assert all(len(row) >= 1 for row in result)
    for row, total in zip(result, row_lengths, strict=True):
        assert np.all(np.diff(row) > 0), "items within a row keep input order"
        assert lengths[row].sum() == total


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@given(case=packable(), seed=st.integers(0, 2**32 - 1))
@relaxed
def test_plan_is_deterministic_for_a_seed(algorithm, case, seed):
    lengths, max_len = case
    assert plan(lengths, max_len, algorithm=algorithm, seed=seed) == plan(
        lengths.copy(), max_len, algorithm=algorithm, seed=seed
    )


@given(case=packable())
@thorough
def test_bfd_matches_reference_row_count_and_row_totals(case):
    # Rows with equal room are interchangeable, so tie-breaking among them can change which
    # items share a row but never the number of rows or the multiset of row totals.
    lengths, max_len = case
    expected = reference_decreasing(lengths, max_len, best=True)
    result = plan(lengths, max_len, algorithm="bfd")
    assert len(result) == len(expected)
    assert sorted(result.row_lengths(lengths)) == sorted(lengths[row].sum() for row in expected)


@given(case=packable())
@thorough
def test_ffd_matches_reference_exactly(case):
    lengths, max_len = case
    expected = reference_decreasing(lengths, max_len, best=False)
    assert as_row_sets(plan(lengths, max_len, algorithm="ffd")) == as_row_sets(expected)


@given(case=packable())
@relaxed
def test_next_fit_preserves_order(case):
    lengths, max_len = case
    result = plan(lengths, max_len, algorithm="next_fit")
    assert np.array_equal(result.item_index, np.arange(len(lengths)))
    assert [row.tolist() for row in result] == reference_next_fit(lengths, max_len)


def test_bfd_prefers_the_fullest_row_and_ffd_the_oldest():
    # 8 opens row A (room 2), 6 opens row B (room 4), 3 must go to B (room 1); the final 1 fits
    # both: best fit picks B, the fuller one, first fit picks A, the older one.
    lengths = [8, 6, 3, 1]
    assert as_row_sets(plan(lengths, 10, algorithm="bfd")) == {frozenset({0}), frozenset({1, 2, 3})}
    assert as_row_sets(plan(lengths, 10, algorithm="ffd")) == {frozenset({0, 3}), frozenset({1, 2})}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_edge_cases(algorithm):
    empty = plan(np.array([], dtype=np.int64), 8, algorithm=algorithm)
    assert len(empty) == 0 and list(empty) == [] and empty.row_lengths([]).size == 0

    single = plan([5], 8, algorithm=algorithm)
    assert [row.tolist() for row in single] == [[0]]

    full = plan([8] * 5, 8, algorithm=algorithm)
    assert len(full) == 5 and all(len(row) == 1 for row in full)

    ones = plan([1] * 20, 8, algorithm=algorithm)
    assert sorted(ones.row_lengths(np.ones(20, dtype=np.int64))) == [4, 8, 8]

    with pytest.raises(ValueError, match="fit_to_length"):
        plan([0, 3], 8, algorithm=algorithm)
    with pytest.raises(ValueError, match="fit_to_length"):
        plan([9], 8, algorithm=algorithm)


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="algorithm"):
        plan([1], 8, algorithm="worst_fit")
    with pytest.raises(ValueError, match="integers"):
        plan([1.5], 8)
    with pytest.raises(ValueError, match="max_len"):
        plan([1], 0)


def test_rows_are_shuffled_by_seed_for_decreasing_algorithms():
    lengths = np.arange(1, 41)
    by_seed = {seed: plan(lengths, 40, seed=seed) for seed in range(4)}
    assert len({tuple(p.item_index.tolist()) for p in by_seed.values()}) > 1
    assert len({frozenset(as_row_sets(p)) for p in by_seed.values()}) == 1
    longest_rows_first = np.all(np.diff(by_seed[0].row_max_item_lengths(lengths)) <= 0)
    assert not longest_rows_first


def test_plan_is_a_sequence_of_arrays():
    result = Plan(item_index=np.array([2, 0, 1]), row_offsets=np.array([0, 1, 3]))
    assert len(result) == 2
    assert result[0].tolist() == [2] and result[-1].tolist() == [0, 1]
    with pytest.raises(IndexError):
        result[2]
    assert [row.tolist() for row in result] == [[2], [0, 1]]
    assert result.row_lengths([10, 20, 30]).tolist() == [30, 30]
    assert result.row_max_item_lengths([10, 20, 30]).tolist() == [30, 20]
    with pytest.raises(ValueError):
        result.item_index[0] = 5  # frozen all the way down
    with pytest.raises(ValueError, match="row_offsets"):
        Plan(item_index=np.array([0, 1]), row_offsets=np.array([0, 0, 2]))


# --- fit_to_length -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", OVERLENGTH_POLICIES)
@given(case=raw_samples())
@relaxed
def test_fit_to_length_accounts_for_every_sample(policy, case):
    lengths, max_len = case
    # Some spans can absorb a cut and some cannot.
    spans = (lengths // 3, lengths - lengths // 5)
    pieces = fit_to_length(lengths, max_len, policy, spans if policy == "truncate_middle" else None)
    overlong = int((lengths > max_len).sum())
    kept = np.unique(pieces.sample)

    assert np.all((pieces.length >= 1) & (pieces.length <= max_len))
    assert len(kept) + pieces.dropped + pieces.empty == len(lengths)
    assert pieces.empty == int((lengths == 0).sum())
    assert not np.isin(kept, np.flatnonzero(lengths == 0)).any()
    assert np.all(np.diff(pieces.sample) >= 0), "pieces are ordered by sample"
    assert (pieces.truncated + pieces.middle_cut, pieces.dropped, pieces.split) == {
        "truncate": (overlong, 0, 0),
        "drop": (0, overlong, 0),
        "split": (0, 0, overlong),
        "truncate_middle": (overlong, 0, 0),
    }[policy]
    assert pieces.middle_cut == int((pieces.gap_length > 0).sum())
    if policy == "truncate_middle":
        cut = pieces.gap_length > 0
        sample = pieces.sample[cut]
        gap_end = pieces.gap_start[cut] + pieces.gap_length[cut]
        assert np.array_equal(pieces.length[cut] + pieces.gap_length[cut], lengths[sample])
        assert np.all((spans[0][sample] < pieces.gap_start[cut]) | (gap_end < spans[1][sample])), (
            "the cut keeps part of its span"
        )
        assert np.all((spans[0][sample] <= pieces.gap_start[cut]) & (gap_end <= spans[1][sample]))
        # Where the span cannot take the whole excess, the sample is truncated instead.
        room = (spans[1] - spans[0])[pieces.sample[~cut]]
        assert np.all(
            room[lengths[pieces.sample[~cut]] > max_len]
            <= (lengths - max_len)[pieces.sample[~cut]][lengths[pieces.sample[~cut]] > max_len]
        )
    else:
        assert not pieces.gap_length.any()

    if policy == "split":
        for sample in range(len(lengths)):
            mine = pieces.sample == sample
            starts, sizes = pieces.start[mine], pieces.length[mine]
            assert sizes.sum() == lengths[sample]
            assert np.array_equal(starts, np.cumsum(sizes) - sizes), "pieces are contiguous"
            assert len(sizes) == -(-lengths[sample] // max_len)
    else:
        assert np.all(pieces.start == 0)
        assert np.array_equal(pieces.length, np.minimum(lengths[pieces.sample], max_len))
        if policy == "drop":
            assert np.all(lengths[pieces.sample] <= max_len)


def test_fit_to_length_examples():
    pieces = fit_to_length([0, 5, 25, 10, 1], 10, "split")
    assert pieces.sample.tolist() == [1, 2, 2, 2, 3, 4]
    assert pieces.start.tolist() == [0, 0, 10, 20, 0, 0]
    assert pieces.length.tolist() == [5, 10, 10, 5, 10, 1]
    assert (pieces.split, pieces.empty) == (1, 1)
    assert fit_to_length([0, 5, 25], 10, "truncate").length.tolist() == [5, 10]
    assert fit_to_length([0, 5, 25], 10, "drop").sample.tolist() == [1]
    empty = fit_to_length([], 10, "split")
    assert len(empty) == 0 and empty.sample.dtype == np.int64
    with pytest.raises(ValueError, match="policy"):
        fit_to_length([1], 10, "wrap")
    # 30 tokens, 10 allowed: the 20 extra come out of the middle of span [4, 28) (2 of its tokens
    # kept on each side); a span of 20 tokens cannot lose 20 and the sample is truncated.
    middle = fit_to_length([30, 30, 8], 10, "truncate_middle", ([4, 5, 0], [28, 25, 0]))
    assert (middle.middle_cut, middle.truncated) == (1, 1)
    assert middle.length.tolist() == [10, 10, 8]
    assert middle.ranges(0) == [(0, 6), (26, 4)]
    assert middle.ranges(1) == [(0, 10)] and middle.ranges(2) == [(0, 8)]
    assert middle.select(np.array([True, False, True])).ranges(0) == [(0, 6), (26, 4)]
    with pytest.raises(ValueError, match="cuttable"):
        fit_to_length([30], 10, "truncate_middle")
    with pytest.raises(ValueError, match=">= 0"):
        fit_to_length([-1], 10)


@given(case=raw_samples(), policy=st.sampled_from(OVERLENGTH_POLICIES))
@relaxed
def test_fit_then_plan_round_trip(case, policy):
    lengths, max_len = case
    spans = (lengths // 3, lengths - lengths // 5) if policy == "truncate_middle" else None
    pieces = fit_to_length(lengths, max_len, policy, spans)
    result = plan(pieces.length, max_len)
    assert np.all(result.row_lengths(pieces.length) <= max_len)
    assert len(result.item_index) == len(pieces)


# --- buckets and stats -------------------------------------------------------------------------


def test_assign_buckets_edges():
    edges = [4096, 16384, 65536]
    values = [1, 4096, 4097, 16384, 16385, 65536]
    assert assign_buckets(values, edges).tolist() == [0, 0, 1, 1, 2, 2]
    assert assign_buckets(np.array([], dtype=np.int64), edges).tolist() == []
    assert bucket_names(edges) == ["le_004096", "le_016384", "le_065536"]
    assert bucket_names([1_048_576]) == ["le_1048576"]
    with pytest.raises(ValueError, match="last bucket edge"):
        assign_buckets([65537], edges)
    with pytest.raises(ValueError, match="strictly increasing"):
        assign_buckets([1], [16384, 4096])
    with pytest.raises(ValueError, match="strictly increasing"):
        bucket_names([4096, 4096])
    with pytest.raises(ValueError, match="at least one"):
        assign_buckets([1], [])


@given(case=packable(), edges=st.lists(st.integers(1, 64), min_size=1, unique=True))
@relaxed
def test_assign_buckets_picks_the_smallest_covering_edge(case, edges):
    lengths, max_len = case
    edges = sorted(edges + [max_len]) if max_len not in edges else sorted(edges)
    values = plan(lengths, max_len).row_max_item_lengths(lengths)
    if values.size and values.max() > edges[-1]:
        return
    buckets = assign_buckets(values, edges)
    for value, bucket in zip(values, buckets, strict=True):
        assert value <= edges[bucket] and (bucket == 0 or value > edges[bucket - 1])


def test_packing_stats():
    lengths = np.array([6, 6, 3, 1])
    stats = packing_stats(plan(lengths, 10), lengths, 10)
    assert stats.as_dict() == {
        "rows": 2,
        "tokens": 16,
        "max_len": 10,
        "fill": 0.8,
        "lower_bound": 2,
        "long_items": 2,
        "rows_over_bound": 1.0,
    }
    empty = packing_stats(plan([], 10), [], 10)
    assert (empty.rows, empty.fill, empty.rows_over_bound) == (0, 0.0, 1.0)
