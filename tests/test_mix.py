"""Mix stage: filters, dedup, hold-out and weights in tokens, all deterministic from the seed."""

import numpy as np
import pytest

from longdata.stages.mix import SourceSamples, mix


def source(name, lengths, weight=1.0, hashes=None, langs=None, **kw) -> SourceSamples:
    lengths = np.asarray(lengths, dtype=np.int64)
    hashes = (
        np.arange(len(lengths), dtype=np.uint64) + (hash(name) % 1000) * 10_000
        if hashes is None
        else np.asarray(hashes, dtype=np.uint64)
    )
    langs = (
        np.array(["en"] * len(lengths), dtype=object)
        if langs is None
        else np.asarray(langs, dtype=object)
    )
    return SourceSamples(name, weight, lengths, hashes, langs, **kw)


def run(sources, **kw):
    options = dict(seed=0, validation_fraction=0.0, validation_max=0, dedup=True)
    return mix(sources, **{**options, **kw})


def tokens_of(result, index):
    return int(result.train.length[result.train.source == index].sum())


def test_weights_are_in_tokens():
    rng = np.random.default_rng(1)
    a = source("a", rng.integers(100, 1000, 400))
    b = source("b", rng.integers(100, 1000, 400), weight=2.5)
    result = run([a, b])
    assert tokens_of(result, 0) == a.lengths.sum()
    ratio = tokens_of(result, 1) / b.lengths.sum()
    assert 2.5 <= ratio < 2.5 + 1000 / b.lengths.sum() + 1e-9
    assert result.stats[1].train_samples > 2 * 400


def test_weight_below_one_subsamples_without_repeats():
    b = source("b", np.full(1000, 10), weight=0.3)
    result = run([b])
    chosen = result.train.index
    assert len(np.unique(chosen)) == len(chosen) == 300


def test_filters_dedup_and_holdout_account_for_every_sample():
    a = source("a", [5, 50, 500, 5000, 60], hashes=[1, 2, 3, 4, 5], min_tokens=10, max_tokens=1000)
    b = source("b", [70, 80, 90, 100], hashes=[2, 9, 10, 11])  # its first sample duplicates a[1]
    result = run([a, b], validation_fraction=0.5, validation_max=2)
    sa, sb = result.stats
    assert (sa.too_short, sa.too_long, sa.duplicates) == (1, 1, 0)
    assert sb.duplicates == 1
    for stats in (sa, sb):
        assert (
            stats.available
            == stats.too_short
            + stats.too_long
            + stats.duplicates
            + stats.validation
            + stats.train_unique
        )
    assert sa.validation + sb.validation == len(result.validation) == 2
    train_pairs = set(zip(result.train.source.tolist(), result.train.index.tolist()))
    validation_pairs = set(zip(result.validation.source.tolist(), result.validation.index.tolist()))
    assert not train_pairs & validation_pairs


def test_deterministic_for_a_seed_and_different_across_seeds():
    rng = np.random.default_rng(2)
    sources = [
        source("a", rng.integers(1, 100, 200), weight=1.7),
        source("b", rng.integers(1, 100, 50)),
    ]
    first, again, other = run(sources), run(sources), run(sources, seed=1)
    assert np.array_equal(first.train.index, again.train.index)
    assert np.array_equal(first.train.source, again.train.source)
    assert not np.array_equal(first.train.index, other.train.index)


def test_no_shuffle_keeps_source_then_input_order():
    result = run([source("a", [3, 4, 5]), source("b", [6, 7])], shuffle=False)
    assert result.train.source.tolist() == [0, 0, 0, 1, 1]
    assert result.train.index.tolist() == [0, 1, 2, 0, 1]


@pytest.mark.parametrize("wanted", [0.1, 0.5, 0.0])
def test_language_share_is_met_by_down_sampling(wanted):
    rng = np.random.default_rng(3)
    lengths = rng.integers(100, 300, 2000)
    langs = np.where(rng.random(2000) < 0.3, "zh", "en")
    result = run(
        [
            source("a", lengths[:1000], langs=langs[:1000]),
            source("b", lengths[1000:], langs=langs[1000:], weight=2.0),
        ],
        language_share={"zh": wanted},
    )
    train_langs = np.concatenate(
        [
            np.asarray(langs[:1000])[result.train.index[result.train.source == 0]],
            np.asarray(langs[1000:])[result.train.index[result.train.source == 1]],
        ]
    )
    train_lengths = np.concatenate(
        [
            lengths[:1000][result.train.index[result.train.source == 0]],
            lengths[1000:][result.train.index[result.train.source == 1]],
        ]
    )
    share = train_lengths[train_langs == "zh"].sum() / train_lengths.sum()
    assert share == pytest.approx(wanted, abs=0.01)
    assert sum(s.language_trimmed for s in result.stats) > 0


def two_language_sources(rng):
    lengths = rng.integers(100, 300, 2000)
    langs = np.where(rng.random(2000) < 0.05, "zh", "en")
    return (
        lengths,
        langs,
        [
            source("a", lengths[:1000], langs=langs[:1000]),
            source("b", lengths[1000:], langs=langs[1000:]),
        ],
    )


def train_tokens_by_language(result, lengths, langs):
    index = result.train.index + 1000 * result.train.source
    return {lang: int(lengths[index][langs[index] == lang].sum()) for lang in ("en", "zh")}


def test_trimming_more_than_the_warning_share_warns_with_the_numbers():
    lengths, langs, sources = two_language_sources(np.random.default_rng(4))
    result = run(sources, language_share={"zh": 0.5})
    balance = result.language
    before = {lang: int(lengths[langs == lang].sum()) for lang in ("en", "zh")}
    assert balance.tokens_before == before
    assert balance.tokens_after == train_tokens_by_language(result, lengths, langs)
    assert balance.discarded["en"] > 0.8 and balance.discarded["zh"] == 0
    [warning] = balance.warnings(0.25)
    assert "discarded" in warning and f"{before['en']:,}" in warning and "en" in warning
    assert "language_share_mode: upsample" in warning
    assert balance.warnings(0.99) == []
    mild = run(sources, language_share={"zh": 0.06}).language
    assert 0 < mild.discarded["en"] < 0.25 and mild.warnings(0.25) == []


def test_upsampling_repeats_the_short_language_and_drops_nothing():
    lengths, langs, sources = two_language_sources(np.random.default_rng(5))
    result = run(sources, language_share={"zh": 0.3}, language_share_mode="upsample")
    tokens = train_tokens_by_language(result, lengths, langs)
    assert tokens["en"] == int(lengths[langs == "en"].sum())  # every English sample, once
    assert tokens["zh"] / (tokens["en"] + tokens["zh"]) == pytest.approx(0.3, abs=0.01)
    assert sum(s.language_trimmed for s in result.stats) == 0
    assert sum(s.language_upsampled for s in result.stats) > 0
    assert result.language.added["zh"] > 1 and result.language.warnings(0.25) == []
    again = run(sources, language_share={"zh": 0.3}, language_share_mode="upsample")
    assert np.array_equal(again.train.index, result.train.index)


def test_upsampling_still_removes_a_language_wanted_at_zero():
    lengths, langs, sources = two_language_sources(np.random.default_rng(6))
    result = run(sources, language_share={"zh": 0.0}, language_share_mode="upsample")
    assert train_tokens_by_language(result, lengths, langs)["zh"] == 0
    assert result.language.discarded["zh"] == 1.0
    assert "discarded 100% of the zh" in result.language.warnings(0.25)[0]


def test_holdout_takes_whole_rows():
    """The per-turn samples of one conversation (one input row) are never on both sides."""
    lengths = np.full(300, 50)
    rows = np.repeat(np.arange(100), 3)  # three samples per row
    result = run([source("a", lengths, row=rows)], validation_fraction=0.1, validation_max=1000)
    held_out = set(rows[result.validation.index].tolist())
    trained = set(rows[result.train.index].tolist())
    assert held_out and not held_out & trained
    assert len(result.validation) == 3 * len(held_out) >= 30
    # With one sample per row the hold-out is the same as without rows.
    unique = run(
        [source("a", lengths, row=np.arange(300))], validation_fraction=0.1, validation_max=1000
    )
    plain = run([source("a", lengths)], validation_fraction=0.1, validation_max=1000)
    np.testing.assert_array_equal(unique.validation.index, plain.validation.index)
    np.testing.assert_array_equal(unique.train.index, plain.train.index)
