"""Packing engine: decide which samples share a training row.

Everything here is a pure function on integer numpy arrays of sample lengths; no tokens, no I/O.
The pipeline is

1. :func:`fit_to_length` applies the over-length policy and removes empty samples, turning
   samples into :class:`Pieces` whose lengths all lie in ``[1, max_len]``;
2. :func:`plan` assigns the pieces to rows of at most ``max_len`` tokens and returns a
   :class:`Plan` (rows in CSR form);
3. :func:`assign_buckets` / :func:`packing_stats` describe the result.

Algorithms
----------
``bfd`` (best-fit decreasing, the default) takes items longest first and puts each into the
*fullest* open row that still has room, opening a new row when none has. Because lengths are
integers in ``[1, max_len]``, open rows are kept grouped by remaining capacity: one LIFO stack
of rows per capacity ``0..max_len`` and a segment tree over capacities counting open rows, so
"smallest capacity >= s that has an open row" is one O(log max_len) descent. Rows with equal
remaining capacity are interchangeable for everything that follows, so which one of them is
taken does not change the packing's shape, only which samples share a row.

``ffd`` (first-fit decreasing) puts each item into the *oldest* row with room. A segment tree
over row slots stores each slot's remaining capacity (max over subtrees); unopened slots hold
``max_len``, so the leftmost slot with capacity >= s is either an open row or the next new one.
One O(log n) descent per item.

``next_fit`` keeps input order: a new row starts whenever the next item does not fit the
current one. O(n), and the only algorithm that never reorders samples.

Costs: sorting is O(n log n); placement is O(n log max_len) for bfd and O(n log n) for ffd, in
numba-compiled loops (compiled once, cached on disk); building the CSR rows is one stable sort.
Memory is a handful of int64 arrays of length n plus a tree of about ``4 * max_len`` (bfd) or
``4 * n`` (ffd) entries.

Row order: bfd and ffd emit rows in a seeded random order, because in placement order the rows
holding the longest samples all come first and a trainer reading them in order would see every
long sample at the start of an epoch. next_fit keeps source order. Within a row, items are in
input order for every algorithm.

Over-length policies
--------------------
``truncate`` keeps the first ``max_len`` tokens, ``drop`` removes the sample, ``split`` cuts it
into ``ceil(L / max_len)`` consecutive pieces starting at ``0, max_len, 2 * max_len, ...``.
``truncate_middle`` keeps the head and the tail and removes the ``L - max_len`` tokens from the
middle of a *cuttable* span (the tokenizer stage records the longest user turn's content, none
of it a target), so the instruction, the question and every answer survive; a sample whose
span cannot absorb the cut (too short, or none: its targets alone need the room) falls back to
``truncate`` and is counted as truncated.
Only the first piece of a split sample keeps the prompt, and with it the prompt's masking
semantics; later pieces are continuation text whose loss mask is whatever their tokens carried,
except that the materialiser gives every piece's first token loss 0 (as for any sample start),
so no piece is trained to predict its first token from a different piece or sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numba
import numpy as np

from longdata.format.manifest import PackingStats

ALGORITHMS = ("bfd", "ffd", "next_fit")
OVERLENGTH_POLICIES = ("truncate", "drop", "split", "truncate_middle")


def _fields_equal(a, b) -> bool:
    """Value equality for the frozen dataclasses below, which hold numpy arrays."""
    if type(a) is not type(b):
        return NotImplemented
    return all(np.array_equal(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))


def _frozen_int64(values: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(values, dtype=np.int64)
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class Pieces:
    """What actually gets packed once the over-length policy has been applied.

    Pieces are ordered by sample, then by start. A piece is the sample's tokens from ``start``
    on, ``length`` of them, leaving out the ``gap_length`` tokens from ``gap_start`` (a middle
    cut; ``gap_length`` 0 for a contiguous piece): see :meth:`ranges`.
    """

    sample: np.ndarray  # int64: index of the input sample each piece comes from
    start: np.ndarray  # int64: token offset of the piece inside its sample
    length: np.ndarray  # int64: piece length, 1 <= length <= max_len
    truncated: int  # samples cut to max_len (policy truncate, or truncate_middle's fallback)
    dropped: int  # samples removed (policy drop)
    split: int  # samples cut into several pieces (policy split)
    empty: int  # length-0 samples removed (any policy): nothing to train on
    gap_start: np.ndarray | None = (
        None  # int64: token offset in the sample where a middle cut begins
    )
    gap_length: np.ndarray | None = None  # int64: tokens the middle cut removes
    middle_cut: int = 0  # samples cut in the middle (policy truncate_middle)

    def __post_init__(self) -> None:
        for name in ("gap_start", "gap_length"):
            value = getattr(self, name)
            object.__setattr__(
                self, name, _frozen_int64(np.zeros(len(self.length)) if value is None else value)
            )

    def __eq__(self, other: object) -> bool:
        return _fields_equal(self, other)

    def __len__(self) -> int:
        return len(self.length)

    def ranges(self, piece: int) -> list[tuple[int, int]]:
        """(start, length) of each contiguous token range of ``piece`` inside its sample."""
        start, length, gap = (
            int(self.start[piece]),
            int(self.length[piece]),
            int(self.gap_length[piece]),
        )
        if not gap:
            return [(start, length)]
        head = int(self.gap_start[piece]) - start
        return [(start, head), (start + head + gap, length - head)]

    def select(self, keep: np.ndarray) -> Pieces:
        """The pieces where the boolean ``keep`` is true, counts unchanged."""
        return dataclasses.replace(
            self,
            sample=self.sample[keep],
            start=self.start[keep],
            length=self.length[keep],
            gap_start=self.gap_start[keep],
            gap_length=self.gap_length[keep],
        )


def _as_int_array(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _check_max_len(max_len: int) -> int:
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
    return int(max_len)


def fit_to_length(lengths, max_len: int, policy: str = "truncate", cuttable=None) -> Pieces:
    """Apply the over-length ``policy`` to sample ``lengths`` and drop empty samples.

    ``truncate_middle`` needs ``cuttable``: (span starts, span ends), one ``[start, end)`` token
    span per sample that may be cut from ((0, 0) where none).
    """
    lengths = _as_int_array(lengths, "lengths")
    max_len = _check_max_len(max_len)
    if policy not in OVERLENGTH_POLICIES:
        raise ValueError(
            f"unknown over-length policy {policy!r}; expected one of {OVERLENGTH_POLICIES}"
        )
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"lengths must be >= 0, got {lengths.min()}")

    nonempty = lengths > 0
    overlong = lengths > max_len
    n_overlong = int(overlong.sum())
    counts = {"truncated": 0, "dropped": 0, "split": 0, "empty": int((~nonempty).sum())}
    if policy == "truncate_middle":
        return _cut_middle(lengths, max_len, cuttable, nonempty, overlong, counts)

    if policy == "split":
        sample = np.flatnonzero(nonempty)
        n_pieces = -(-lengths[sample] // max_len)
        first_piece = np.cumsum(n_pieces) - n_pieces
        sample = np.repeat(sample, n_pieces)
        piece_rank = np.arange(sample.size, dtype=np.int64) - np.repeat(first_piece, n_pieces)
        start = piece_rank * max_len
        length = np.minimum(lengths[sample] - start, max_len)
        counts["split"] = n_overlong
    else:
        keep = nonempty & ~overlong if policy == "drop" else nonempty
        sample = np.flatnonzero(keep)
        start = np.zeros(sample.size, dtype=np.int64)
        length = np.minimum(lengths[sample], max_len)
        counts["dropped" if policy == "drop" else "truncated"] = n_overlong

    return Pieces(
        sample=_frozen_int64(sample),
        start=_frozen_int64(start),
        length=_frozen_int64(length),
        **counts,
    )


def _cut_middle(
    lengths: np.ndarray,
    max_len: int,
    cuttable,
    nonempty: np.ndarray,
    overlong: np.ndarray,
    counts: dict[str, int],
) -> Pieces:
    """``truncate_middle``: the excess is removed from the centre of each overlong sample's
    cuttable span, which keeps at least one of its tokens; where it cannot, ``truncate``."""
    if cuttable is None:
        raise ValueError("the truncate_middle policy needs each sample's cuttable span")
    span_start, span_end = (_as_int_array(c, "cuttable") for c in cuttable)
    if not len(span_start) == len(span_end) == len(lengths):
        raise ValueError("cuttable spans must be given for every sample")
    sample = np.flatnonzero(nonempty)
    excess = np.maximum(lengths[sample] - max_len, 0)
    room = span_end[sample] - span_start[sample]
    cut = overlong[sample] & (room > excess)
    gap_length = np.where(cut, excess, 0)
    gap_start = np.where(cut, span_start[sample] + (room - excess) // 2, 0)
    counts["truncated"] = int((overlong[sample] & ~cut).sum())
    return Pieces(
        sample=_frozen_int64(sample),
        start=_frozen_int64(np.zeros(sample.size)),
        length=_frozen_int64(np.minimum(lengths[sample], max_len)),
        gap_start=gap_start,
        gap_length=gap_length,
        middle_cut=int(cut.sum()),
        **counts,
    )


@dataclass(frozen=True, eq=False)
class Plan:
    """Rows as CSR: row ``r`` holds items ``item_index[row_offsets[r]:row_offsets[r + 1]]``."""

    item_index: np.ndarray  # int64, indices into the `lengths` given to plan()
    row_offsets: np.ndarray  # int64, len == n_rows + 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "item_index", _frozen_int64(self.item_index))
        object.__setattr__(self, "row_offsets", _frozen_int64(self.row_offsets))
        offsets = self.row_offsets
        if (
            offsets.ndim != 1
            or offsets.size == 0
            or offsets[0] != 0
            or offsets[-1] != self.item_index.size
            or np.any(np.diff(offsets) < 1)
        ):
            raise ValueError(
                "row_offsets must start at 0, end at len(item_index), and grow by >= 1"
            )

    def __eq__(self, other: object) -> bool:
        return _fields_equal(self, other)

    def __len__(self) -> int:
        return self.row_offsets.size - 1

    def __getitem__(self, row: int) -> np.ndarray:
        n_rows = len(self)
        if not -n_rows <= row < n_rows:
            raise IndexError(f"row {row} out of range for a plan of {n_rows} rows")
        row %= n_rows
        return self.item_index[self.row_offsets[row] : self.row_offsets[row + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[row] for row in range(len(self)))

    def row_lengths(self, lengths) -> np.ndarray:
        """Total tokens per row, given the ``lengths`` the plan was made from."""
        token_ends = np.zeros(self.item_index.size + 1, dtype=np.int64)
        np.cumsum(np.asarray(lengths, dtype=np.int64)[self.item_index], out=token_ends[1:])
        return token_ends[self.row_offsets[1:]] - token_ends[self.row_offsets[:-1]]

    def row_max_item_lengths(self, lengths) -> np.ndarray:
        """Longest item per row: the value :func:`assign_buckets` buckets rows by."""
        if len(self) == 0:
            return np.zeros(0, dtype=np.int64)
        item_lengths = np.asarray(lengths, dtype=np.int64)[self.item_index]
        return np.maximum.reduceat(item_lengths, self.row_offsets[:-1])


# --- compiled placement kernels: each returns (row of every item in `order`, number of rows) ---


@numba.njit(cache=True, nogil=True)
def _best_fit_rows(sorted_lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, int]:
    n = sorted_lengths.size
    leaves = 1
    while leaves < max_len + 1:
        leaves *= 2
    # open_rows[leaves + c] = open rows with exactly c tokens of room; inner nodes hold sums.
    open_rows = np.zeros(2 * leaves, dtype=np.int64)
    stack_top = np.full(max_len + 1, -1, dtype=np.int64)  # per capacity: a row with that room
    below = np.empty(n, dtype=np.int64)  # per row: the next row on the same capacity stack
    row_of = np.empty(n, dtype=np.int64)
    n_rows = 0
    for i in range(n):
        size = sorted_lengths[i]
        # Find the smallest capacity >= size with an open row: climb from leaf `size` until a
        # right sibling holds one, then descend to that sibling's leftmost non-empty leaf.
        node = leaves + size
        if open_rows[node] == 0:
            while node > 1 and (node % 2 == 1 or open_rows[node + 1] == 0):
                node //= 2
            if node > 1:
                node += 1
                while node < leaves:
                    node = 2 * node if open_rows[2 * node] > 0 else 2 * node + 1
        if node > 1:
            capacity = node - leaves
            row = stack_top[capacity]
            stack_top[capacity] = below[row]
            while node >= 1:
                open_rows[node] -= 1
                node //= 2
        else:
            capacity = max_len
            row = n_rows
            n_rows += 1
        row_of[i] = row
        remaining = capacity - size
        if remaining > 0:  # a full row can take nothing more; keep it out of the tree
            below[row] = stack_top[remaining]
            stack_top[remaining] = row
            node = leaves + remaining
            while node >= 1:
                open_rows[node] += 1
                node //= 2
    return row_of, n_rows


@numba.njit(cache=True, nogil=True)
def _first_fit_rows(sorted_lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, int]:
    n = sorted_lengths.size
    leaves = 1
    while leaves < max(n, 1):
        leaves *= 2
    # room[leaves + k] = remaining capacity of row slot k (unopened slots: max_len);
    # inner nodes hold the max of their children.
    room = np.full(2 * leaves, max_len, dtype=np.int64)
    row_of = np.empty(n, dtype=np.int64)
    n_rows = 0
    for i in range(n):
        size = sorted_lengths[i]
        node = 1
        while node < leaves:
            node = 2 * node if room[2 * node] >= size else 2 * node + 1
        row = node - leaves
        row_of[i] = row
        n_rows = max(n_rows, row + 1)
        room[node] -= size
        node //= 2
        while node >= 1:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return row_of, n_rows


@numba.njit(cache=True, nogil=True)
def _next_fit_rows(lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, int]:
    row_of = np.empty(lengths.size, dtype=np.int64)
    row = -1
    room = 0
    for i in range(lengths.size):
        if lengths[i] > room:
            row += 1
            room = max_len
        room -= lengths[i]
        row_of[i] = row
    return row_of, row + 1


def _check_lengths(lengths, max_len: int) -> np.ndarray:
    lengths = _as_int_array(lengths, "lengths")
    if lengths.size and (lengths.min() < 1 or lengths.max() > max_len):
        raise ValueError(
            f"every length must be in [1, max_len={max_len}], got range "
            f"[{lengths.min()}, {lengths.max()}]; call fit_to_length() first"
        )
    return lengths


def plan(lengths, max_len: int, *, algorithm: str = "bfd", seed: int = 0) -> Plan:
    """Pack items of the given ``lengths`` into rows of at most ``max_len`` tokens.

    Deterministic for a given ``seed``, which only sets the order rows are emitted in
    (bfd/ffd); see the module docstring for the algorithms.
    """
    max_len = _check_max_len(max_len)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown packing algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    lengths = _check_lengths(lengths, max_len)

    if algorithm == "next_fit":
        row_of, n_rows = _next_fit_rows(lengths, max_len)
        row_rank = np.arange(n_rows, dtype=np.int64)
    else:
        longest_first = np.argsort(-lengths, kind="stable")
        place = _best_fit_rows if algorithm == "bfd" else _first_fit_rows
        row_of_sorted, n_rows = place(lengths[longest_first], max_len)
        row_of = np.empty_like(row_of_sorted)
        row_of[longest_first] = row_of_sorted
        row_rank = np.random.default_rng(seed).permutation(n_rows)

    # A stable sort on each item's output row groups rows in emission order and keeps items
    # within a row in input order.
    output_row = row_rank[row_of]
    item_index = np.argsort(output_row, kind="stable")
    row_offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(output_row, minlength=n_rows), out=row_offsets[1:])
    return Plan(item_index=item_index, row_offsets=row_offsets)


def _check_edges(edges) -> np.ndarray:
    edges = _as_int_array(edges, "edges")
    if edges.size == 0:
        raise ValueError("edges must hold at least one bucket edge")
    if edges[0] < 1 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"edges must be positive and strictly increasing, got {edges.tolist()}")
    return edges


def assign_buckets(row_max_item_length, edges) -> np.ndarray:
    """Bucket index per row: the smallest ``i`` with ``row_max_item_length <= edges[i]``.

    The last edge must cover every value (in a build: be >= max_len).
    """
    edges = _check_edges(edges)
    values = _as_int_array(row_max_item_length, "row_max_item_length")
    if values.size and values.max() > edges[-1]:
        raise ValueError(
            f"the last bucket edge ({edges[-1]}) must be >= max_len; a row's longest item has "
            f"{values.max()} tokens"
        )
    return np.searchsorted(edges, values, side="left").astype(np.int64)


def bucket_names(edges) -> list[str]:
    """Stable directory names, one per edge, e.g. ``le_004096``: they sort like the edges."""
    edges = _check_edges(edges)
    width = max(6, len(str(edges[-1])))
    return [f"le_{edge:0{width}d}" for edge in edges.tolist()]


def packing_stats(plan: Plan, lengths, max_len: int) -> PackingStats:
    """How close ``plan`` is to optimal: no packing can use fewer than ``max(bounds)`` rows."""
    max_len = _check_max_len(max_len)
    item_lengths = np.asarray(lengths, dtype=np.int64)[plan.item_index]
    rows = len(plan)
    tokens = int(item_lengths.sum())
    lower_bound = -(-tokens // max_len)
    long_items = int((2 * item_lengths > max_len).sum())
    bound = max(lower_bound, long_items)
    return PackingStats(
        rows=rows,
        tokens=tokens,
        max_len=max_len,
        fill=tokens / (rows * max_len) if rows else 0.0,
        lower_bound=lower_bound,
        long_items=long_items,
        rows_over_bound=rows / bound if bound else 1.0,
    )
