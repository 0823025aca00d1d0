"""Near-duplicate removal: MinHash-LSH on token shingles, first copy kept, counted as duplicates."""

import numpy as np
import pytest

from longdata.recipe import RecipeError, validate_recipe
from longdata.stages.mix import SourceSamples, mix
from longdata.stages.near_dedup import NearDuplicateFilter, lsh_bands


def near_copy(tokens: np.ndarray, changed: float, rng) -> np.ndarray:
    """``tokens`` with a ``changed`` fraction of positions replaced (Jaccard drops ~5x faster with
    5-token shingles: each changed token touches five of them)."""
    copy = tokens.copy()
    where = rng.choice(len(tokens), int(changed * len(tokens)), replace=False)
    copy[where] = rng.integers(60_000, 65_000, len(where))
    return copy


@pytest.fixture
def corpus():
    """Five distinct documents, and an edited copy of documents 0 and 3."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50_000, 3_000).astype(np.uint32) for _ in range(5)]
    return docs, near_copy(docs[0], 0.01, rng), near_copy(docs[3], 0.01, rng)


@pytest.mark.parametrize(
    "threshold, num_perm", [(0.8, 128), (0.5, 128), (0.9, 256), (0.7, 100), (1.0, 64)]
)
def test_lsh_bands_are_the_fewest_that_reach_the_recall(threshold, num_perm):
    def recall(bands):
        return 1 - (1 - threshold ** (num_perm // bands)) ** bands

    bands = lsh_bands(threshold, num_perm)
    assert num_perm % bands == 0 and recall(bands) >= 0.9
    assert all(recall(b) < 0.9 for b in range(1, bands) if num_perm % b == 0)


def test_filter_keeps_the_first_and_drops_close_copies(corpus):
    docs, copy0, copy3 = corpus
    near = NearDuplicateFilter(0.8)
    assert [near.keep(f"d{i}", d) for i, d in enumerate(docs)] == [True] * 5
    assert near.keep("copy0", copy0) is False
    assert near.keep("copy3", copy3) is False
    rng = np.random.default_rng(1)
    half = docs[1].copy()
    half[1500:] = rng.integers(0, 50_000, 1500)  # Jaccard about 1/3: a different document
    assert near.keep("half", half) is True


def test_threshold_decides(corpus):
    docs, _, _ = corpus
    rng = np.random.default_rng(2)
    edited = near_copy(docs[2], 0.05, rng)  # about 78% of shingles survive: Jaccard ~0.64
    loose, strict = NearDuplicateFilter(0.5), NearDuplicateFilter(0.9)
    for near in (loose, strict):
        assert near.keep("original", docs[2])
    assert loose.keep("edited", edited) is False
    assert strict.keep("edited", edited) is True


def test_short_samples_are_one_shingle():
    near = NearDuplicateFilter(0.8, ngram=5)
    assert near.keep("a", np.array([1, 2, 3], dtype=np.uint32))
    assert not near.keep("b", np.array([1, 2, 3], dtype=np.uint32))
    assert near.keep("c", np.array([1, 2, 4], dtype=np.uint32))


def samples(name, docs, hashes=None):
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    hashes = (
        np.arange(len(docs), dtype=np.uint64) + 1000 * (hash(name) % 1000)
        if hashes is None
        else np.asarray(hashes, dtype=np.uint64)
    )
    return SourceSamples(
        name,
        1.0,
        lengths,
        hashes,
        np.array(["en"] * len(docs), dtype=object),
        tokens=lambda i: docs[i],
    )


def run(sources, near=True):
    return mix(
        sources,
        seed=0,
        validation_fraction=0.0,
        validation_max=0,
        dedup=True,
        near_duplicates=NearDuplicateFilter(0.8) if near else None,
    )


def test_mix_removes_near_duplicates_within_and_across_sources(corpus):
    docs, copy0, copy3 = corpus
    a = samples("a", [docs[0], docs[1], copy0])  # copy0 repeats a[0] within the source
    b = samples("b", [copy3, docs[2], docs[3]])  # b[2] is the original of b[0]: b[0] came first
    c = samples("c", [docs[1], docs[4]], hashes=[10**6, 10**6 + 1])
    result = run([a, b, c])
    sa, sb, sc = result.stats
    assert (sa.near_duplicates, sb.near_duplicates, sc.near_duplicates) == (1, 1, 1)
    kept = set(zip(result.train.source.tolist(), result.train.index.tolist()))
    assert kept == {(0, 0), (0, 1), (1, 0), (1, 1), (2, 1)}
    for stats in result.stats:
        assert stats.duplicates == stats.near_duplicates
        assert stats.available == (
            stats.too_short
            + stats.too_long
            + stats.duplicates
            + stats.validation
            + stats.train_unique
        )
    assert run([a, b, c], near=False).stats[0].near_duplicates == 0
    assert len(run([a, b, c], near=False).train) == 8


def test_recipe_order_decides_which_copy_stays(corpus):
    docs, copy0, _ = corpus
    first, second = (
        run([samples("x", [docs[0]]), samples("y", [copy0])]),
        run([samples("y", [copy0]), samples("x", [docs[0]])]),
    )
    assert [s.train_unique for s in first.stats] == [1, 0]
    assert [s.train_unique for s in second.stats] == [1, 0]


def test_exact_duplicates_are_not_counted_as_near(corpus):
    docs, copy0, _ = corpus
    a = samples("a", [docs[0], docs[1]], hashes=[1, 2])
    b = samples("b", [docs[0], copy0], hashes=[1, 3])  # b[0] repeats a[0] exactly
    result = run([a, b])
    assert (result.stats[1].duplicates, result.stats[1].near_duplicates) == (2, 1)


def test_near_dedup_needs_the_tokens(corpus):
    docs, _, _ = corpus
    bare = SourceSamples(
        "a", 1.0, np.array([3000]), np.array([1], dtype=np.uint64), np.array(["en"], dtype=object)
    )
    with pytest.raises(ValueError, match="needs its tokens"):
        run([bare])


BASE = {
    "name": "r",
    "tokenizer": {"name": "builtin:quickstart"},
    "output": {"dir": "out"},
    "packing": {"max_seq_len": 1024},
    "sources": [{"name": "a", "kind": "text", "path": "builtin:sample/text"}],
}


def test_recipe_dedup_forms_and_bounds():
    assert validate_recipe(BASE).dedup.model_dump() == {"exact": True, "near": None}
    assert validate_recipe({**BASE, "dedup": "none"}).dedup.exact is False
    near = validate_recipe({**BASE, "dedup": {"near": {"threshold": 0.7}}}).dedup
    assert near.exact and (near.near.threshold, near.near.num_perm, near.near.ngram) == (
        0.7,
        128,
        5,
    )
    for bad, message in (
        ({"near": {"threshold": 0}}, "dedup.near.threshold: must be > 0"),
        ({"near": {"threshold": 1.5}}, "dedup.near.threshold: must be <= 1"),
        ({"near": {"num_perm": 8}}, "dedup.near.num_perm: must be >= 16"),
        ({"near": {"shingle": 3}}, "dedup.near.shingle: unknown key"),
        ("fuzzy", "dedup: must be exact, none or a mapping"),
    ):
        with pytest.raises(RecipeError) as error:
            validate_recipe({**BASE, "dedup": bad})
        assert error.value.problems[0].startswith(message), error.value.problems
