"""What each over-length policy keeps: one recipe packed under truncate, drop, split and
truncate_middle, side by side (samples by fate, target tokens reaching the rows, ratio to
truncate). The first build tokenizes; the others reuse its token cache.

    python benchmarks/overlength.py --recipe recipes/quickstart.yml --max-seq-len 16384
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import polars as pl

from longdata.build import build
from longdata.recipe import load_recipe
from longdata.stages.packing import OVERLENGTH_POLICIES
from longdata.stages.sample_index import read_sample_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/quickstart.yml")
    parser.add_argument("--max-seq-len", type=int, default=16384)
    parser.add_argument(
        "--out", type=Path, default=None, help="scratch directory (default: a temporary one)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        print(f"{args.recipe} packed to {args.max_seq_len:,} tokens (one split, no stages)\n")
        print(
            "| policy | train samples | whole | truncated | split | middle cut | dropped "
            "| pieces without target | target tokens in rows | vs truncate | seconds |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        baseline = None
        for policy in OVERLENGTH_POLICIES:
            recipe = load_recipe(
                args.recipe,
                [
                    "packing.stages=null",
                    f"packing.max_seq_len={args.max_seq_len}",
                    "packing.buckets=null",
                    f"packing.overlength={policy}",
                    f"output.dir={out}/{policy}",
                    f"output.card_dir={out}/cards",
                    f"cache_dir={out}/cache",
                ],
            )
            started = time.perf_counter()
            result = build(recipe)
            seconds = time.perf_counter() - started
            split = result.manifest.split("train")
            cut = split.overlength
            index = pl.from_arrow(read_sample_index(result.out_dir, "train"))
            whole = index.filter(pl.col("status") == "whole")["sample"].n_unique()
            targets = split.totals.target_tokens
            baseline = baseline or targets
            print(
                f"| {policy} | {split.samples:,} | {whole:,} | {cut.truncated:,} "
                f"| {cut.split:,} "
                f"| {cut.middle_cut:,} | {cut.dropped:,} | {cut.no_target_after_cut:,} "
                f"| {targets:,} | {targets / baseline:.2f}x | {seconds:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
