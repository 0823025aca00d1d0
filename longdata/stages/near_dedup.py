"""Near-duplicate removal: MinHash of each sample's token n-gram set, LSH candidates, first kept.

Shingles are n-grams of token ids read from the token cache, not of source text: the cache is
already on disk and memory-mapped, so near-duplicate search reads no source again and repeats no
normalisation or rendering, and it sees exactly the tokens that would be trained on. For a BPE
tokenizer a token is about three quarters of a word, so the default 5-token shingles behave like
the 3-4 word shingles used on text. A chat sample's template tokens (role headers) are shingles
like any other; they are a handful per sample, so they only raise the similarity of samples a few
dozen tokens long.

The library is rensa (MinHash and an LSH deduplicator in Rust, MIT), chosen over datasketch by
measurement (benchmarks/minhash.py, docs/BENCHMARKS.md). Its deduplicator keeps the first sample
of a group and verifies every LSH candidate by the estimated Jaccard similarity, so a later sample
is dropped only when its similarity to a kept one is at least the threshold. The number of LSH
bands is chosen here (``lsh_bands``) for recall: candidates are verified anyway, so extra
candidates cost time, never correctness, while a missed candidate is a duplicate kept.
"""

from __future__ import annotations

import numpy as np

# A fixed permutation seed: signatures, and so the kept samples, are the same in every build.
MINHASH_SEED = 42
CANDIDATE_RECALL = 0.9  # chance that a pair exactly at the threshold becomes an LSH candidate


def lsh_bands(threshold: float, num_perm: int, recall: float = CANDIDATE_RECALL) -> int:
    """The fewest bands (a divisor of ``num_perm``) under which a pair with Jaccard similarity
    ``threshold`` shares at least one band with probability ``recall``: 1 - (1 - t^r)^b."""
    for bands in (b for b in range(1, num_perm + 1) if num_perm % b == 0):
        rows = num_perm // bands
        if 1 - (1 - threshold**rows) ** bands >= recall:
            return bands
    return num_perm


def shingles(tokens: np.ndarray, ngram: int) -> list[bytes]:
    """The token n-grams of one sample as bytes (the whole sample when it is shorter)."""
    tokens = np.ascontiguousarray(tokens, dtype=np.uint32)
    if len(tokens) <= ngram:
        return [tokens.tobytes()]
    windows = np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(tokens, ngram))
    return windows.view(np.dtype((np.void, 4 * ngram))).ravel().tolist()


class NearDuplicateFilter:
    """Samples offered in order; ``keep`` is False for one too similar to a sample kept before."""

    def __init__(self, threshold: float, num_perm: int = 128, ngram: int = 5):
        import rensa

        self._rensa = rensa
        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        self.bands = lsh_bands(threshold, num_perm)
        self._index = rensa.RMinHashDeduplicator(
            threshold=threshold,
            num_perm=num_perm,
            use_lsh=True,
            num_bands=self.bands,
            seed=MINHASH_SEED,
        )

    def signature(self, tokens: np.ndarray):
        minhash = self._rensa.RMinHash(self.num_perm, MINHASH_SEED)
        minhash.update(shingles(tokens, self.ngram))
        return minhash

    def keep(self, key: str, tokens: np.ndarray) -> bool:
        """Index the sample and return True, or return False if it near-duplicates a kept one."""
        return self._index.add(key, self.signature(tokens))
