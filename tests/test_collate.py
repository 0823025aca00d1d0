import itertools

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longdata.trainer import collate
from longdata.trainer.collation import IGNORE_INDEX
from tests.builders import make_row


def test_collate_by_hand() -> None:
    row = {
        "input_ids": np.array([10, 11, 12, 20, 21], dtype=np.uint32),
        "loss_mask": np.array([0, 1, 1, 1, 1], dtype=np.uint8),  # 20 is wrongly marked a target
        "seq_lens": np.array([3, 2], dtype=np.uint32),
        "source_ids": np.array([0, 1], dtype=np.uint16),
    }
    other = {
        "input_ids": np.array([30, 31], dtype=np.uint32),
        "loss_mask": np.array([0, 1], dtype=np.uint8),
        "seq_lens": np.array([2], dtype=np.uint32),
        "source_ids": np.array([1], dtype=np.uint16),
    }
    batch = collate([row, other], pad_to_multiple_of=4)
    assert batch["input_ids"].dtype == torch.int64
    assert batch["input_ids"].tolist() == [
        [10, 11, 12, 20, 21, 0, 0, 0],
        [30, 31, 0, 0, 0, 0, 0, 0],
    ]
    # A sample's first token is never a label, even if its loss_mask says so.
    assert batch["labels"].tolist() == [
        [-100, 11, 12, -100, 21, -100, -100, -100],
        [-100, 31, -100, -100, -100, -100, -100, -100],
    ]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 8, 10, 16]
    assert batch["max_seqlen"] == 6
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [3, 3, 4, 4, 4, 4, 4, 4]]
    assert batch["source_ids"].tolist() == [
        [0, 0, 0, 1, 1, -1, -1, -1],
        [1, 1, -1, -1, -1, -1, -1, -1],
    ]
    assert batch["sample_ids"].tolist() == [
        [0, 0, 0, 1, 1, -1, -1, -1],
        [2, 2, -1, -1, -1, -1, -1, -1],
    ]
    assert batch["sample_target_counts"].tolist() == [2, 1, 1]
    assert batch["sample_source_ids"].tolist() == [0, 1, 1]


def test_collate_without_padding_has_no_padding_segment() -> None:
    rng = np.random.default_rng(0)
    batch = collate([make_row([4, 4], rng)])
    assert batch["cu_seqlens"].tolist() == [0, 4, 8]


def test_collate_rejects_inconsistent_rows() -> None:
    rng = np.random.default_rng(0)
    row = make_row([4, 4], rng)
    row["seq_lens"] = np.array([4, 3], dtype=np.uint32)
    try:
        collate([row])
    except ValueError as error:
        assert "inconsistent" in str(error)
    else:
        raise AssertionError("collate accepted a row whose seq_lens do not cover it")


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(1, 12), min_size=1, max_size=5), min_size=1, max_size=3),
    multiple=st.sampled_from([None, 1, 8]),
)
def test_collate_metadata_agrees(rows: list[list[int]], multiple: int | None) -> None:
    rng = np.random.default_rng(0)
    batch = collate([make_row(lens, rng) for lens in rows], pad_to_multiple_of=multiple)
    flat_documents = batch["document_ids"].flatten()
    # cu_seqlens and document_ids describe the same segments.
    boundaries = batch["cu_seqlens"].tolist()
    for segment, (start, end) in enumerate(itertools.pairwise(boundaries)):
        assert (flat_documents[start:end] == segment).all()
        assert batch["position_ids"].flatten()[start:end].tolist() == list(range(end - start))
    assert boundaries[-1] == batch["input_ids"].numel()
    # Every sample's first token and every padding token is ignored by the loss.
    starts = batch["position_ids"] == 0
    assert (batch["labels"][starts] == IGNORE_INDEX).all()
    assert (batch["labels"][batch["sample_ids"] < 0] == IGNORE_INDEX).all()
    assert batch["sample_target_counts"].sum() == (batch["labels"] != IGNORE_INDEX).sum()


def test_package_export_is_the_function() -> None:
    import longdata.trainer as trainer

    assert trainer.collate is collate and callable(trainer.collate)


def _sample_positions(batch: dict) -> list[tuple[tuple[int, ...], list[int]]]:
    """(tokens, positions) of every sample of a batch (padding segments left out)."""
    flat = {key: batch[key].flatten() for key in ("input_ids", "position_ids", "sample_ids")}
    found = []
    for start, end in itertools.pairwise(batch["cu_seqlens"].tolist()):
        if flat["sample_ids"][start] >= 0:
            tokens = tuple(flat["input_ids"][start:end].tolist())
            found.append((tokens, flat["position_ids"][start:end].tolist()))
    return found


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=5), min_size=1, max_size=3),
    span=st.integers(2, 200),
    seed=st.integers(0, 3),
)
def test_skipped_positions_skip_once_within_the_span_and_ignore_the_row(
    rows: list[list[int]], span: int, seed: int
) -> None:
    rng = np.random.default_rng(len(rows))
    made = [make_row(lens, rng) for lens in rows]
    batch = collate(made, pad_to_multiple_of=8, position_span=span, position_seed=seed)
    for tokens, positions in _sample_positions(batch):
        if len(tokens) >= span:
            assert positions == list(range(len(tokens)))
            continue
        steps = np.diff(positions)
        assert positions[0] == 0 and positions[-1] < span
        assert (steps >= 1).all() and (steps > 1).sum() <= 1
        # Alone (its own row), the sample gets the same positions: they come from its tokens.
        alone = {
            "input_ids": np.asarray(tokens, dtype=np.uint32),
            "loss_mask": np.ones(len(tokens), dtype=np.uint8),
            "seq_lens": np.asarray([len(tokens)], dtype=np.uint32),
            "source_ids": np.zeros(1, dtype=np.uint16),
        }
        by_itself = collate([alone], position_span=span, position_seed=seed)
        assert by_itself["position_ids"][0].tolist() == positions
    # cu_seqlens, document_ids and labels do not depend on positions.
    plain = collate(made, pad_to_multiple_of=8)
    for key in ("input_ids", "labels", "cu_seqlens", "document_ids", "sample_ids"):
        assert torch.equal(batch[key], plain[key]), key


def test_skipped_positions_cover_the_span() -> None:
    """Short samples reach distances near the span, and the seed changes the draw."""
    rng = np.random.default_rng(0)
    rows = [make_row([64] * 8, rng) for _ in range(25)]
    batch = collate(rows, position_span=4_096, position_seed=0)
    last = batch["position_ids"].reshape(-1, 64)[:, -1]
    assert last.max() > 3_500 and last.min() < 600
    reseeded = collate(rows, position_span=4_096, position_seed=1)
    assert not torch.equal(batch["position_ids"], reseeded["position_ids"])
