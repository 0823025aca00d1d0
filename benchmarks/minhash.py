"""Near-duplicate search on token shingles: rensa (what longdata uses) against datasketch.

Both libraries see the same samples: documents of synthetic prose tokenized with the quickstart
tokenizer, a tenth of them followed by an edited copy (1% of tokens replaced), as a token cache
holds them. Each contender computes a 128-permutation MinHash of every sample's 5-token shingles
and keeps a sample unless an LSH candidate kept before it has estimated Jaccard >= 0.8:

1. rensa: ``longdata.stages.near_dedup.NearDuplicateFilter`` (RMinHash over shingle bytes,
   RMinHashDeduplicator), exactly the build's code path;
2. datasketch, its documented use: ``MinHash.update_batch`` on shingle bytes (SHA-1 per shingle),
   ``MinHashLSH`` query, verify, insert;
3. datasketch, its fastest use found: shingles pre-hashed to 32 bits with numpy and an identity
   ``hashfunc``, same LSH.

    python benchmarks/minhash.py --tokens 4000000
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

THRESHOLD, NUM_PERM, NGRAM = 0.8, 128, 5


def corpus(total_tokens: int, seed: int = 0) -> tuple[list[np.ndarray], int]:
    """Samples and how many of them are planted near copies."""
    from longdata.recipe import TokenizerConfig
    from longdata.sources import synthetic
    from longdata.stages.templates import load_tokenizer

    tokenizer, _ = load_tokenizer(TokenizerConfig(name="builtin:quickstart"))
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    samples, copies, tokens = [], 0, 0
    while tokens < total_tokens:
        text = "\n\n".join(synthetic.document(rng, "en", rng.randint(4_000, 60_000)))
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.uint32)
        samples.append(ids)
        tokens += len(ids)
        if rng.random() < 0.1:
            edited = ids.copy()
            where = np_rng.choice(len(ids), len(ids) // 100, replace=False)
            edited[where] = np_rng.integers(0, 16_000, len(where))
            samples.append(edited)
            copies += 1
            tokens += len(ids)
    return samples, copies


def rensa_dedup(samples: list[np.ndarray]) -> int:
    from longdata.stages.near_dedup import NearDuplicateFilter

    near = NearDuplicateFilter(THRESHOLD, NUM_PERM, NGRAM)
    return sum(not near.keep(str(i), ids) for i, ids in enumerate(samples))


def datasketch_dedup(samples: list[np.ndarray], prehashed: bool) -> int:
    from datasketch import MinHash, MinHashLSH

    from longdata.stages.near_dedup import shingles

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    kept: dict[str, MinHash] = {}
    permutations = MinHash(num_perm=NUM_PERM).permutations
    found = 0
    for i, ids in enumerate(samples):
        if prehashed:
            minhash = MinHash(
                num_perm=NUM_PERM, hashfunc=int, permutations=permutations, scheme="affine32"
            )
            windows = np.lib.stride_tricks.sliding_window_view(ids.astype(np.uint64), NGRAM)
            mixed = np.zeros(len(windows), dtype=np.uint64)
            for column in range(NGRAM):
                mixed = (mixed ^ windows[:, column]) * np.uint64(0x100000001B3)
            minhash.update_batch(
                np.unique((mixed ^ (mixed >> np.uint64(32))) & np.uint64(0xFFFFFFFF))
            )
        else:
            minhash = MinHash(num_perm=NUM_PERM, permutations=permutations, scheme="affine32")
            minhash.update_batch(shingles(ids, NGRAM))
        if any(kept[key].jaccard(minhash) >= THRESHOLD for key in lsh.query(minhash)):
            found += 1
            continue
        lsh.insert(str(i), minhash)
        kept[str(i)] = minhash
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokens", type=int, default=4_000_000, help="tokens of samples to deduplicate"
    )
    args = parser.parse_args()
    samples, copies = corpus(args.tokens)
    tokens = sum(len(s) for s in samples)
    print(f"{len(samples):,} samples, {tokens:,} tokens, {copies} planted near copies")
    contenders = [
        ("rensa (longdata NearDuplicateFilter)", lambda: rensa_dedup(samples)),
        ("datasketch, update_batch on shingle bytes", lambda: datasketch_dedup(samples, False)),
        ("datasketch, numpy-prehashed shingles", lambda: datasketch_dedup(samples, True)),
    ]
    results = []
    for label, run in contenders:
        started = time.perf_counter()
        found = run()
        results.append((label, found, time.perf_counter() - started))
    base = results[0][2]
    print(
        f"| {'contender':<42} | {'near dups':>9} | {'seconds':>7} "
        f"| {'M tok/s':>7} | {'vs rensa':>8} |"
    )
    print(f"|{'-' * 44}|{'-' * 10}:|{'-' * 8}:|{'-' * 8}:|{'-' * 9}:|")
    for label, found, seconds in results:
        print(
            f"| {label:<42} | {found:>9} | {seconds:>7.2f} | {tokens / seconds / 1e6:>7.2f} | "
            f"{seconds / base:>7.1f}x |"
        )


if __name__ == "__main__":
    main()
