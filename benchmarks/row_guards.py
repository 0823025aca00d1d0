"""Cost of the per-row guards in the tokenize stage, side by side on the same rows.

``tokenize_records`` now looks for special tokens spelled in each conversation's text and
catches what one row raises (render per row; encode per batch, then per row only if the batch
fails). This times the stage with those guards and with the special-token search switched off
(its only per-character work), interleaved over several rounds (alternating which goes first) on
the same LongAlign-style rows, and prints the ratio; and it times the special-token search alone
over every row, as a share of the guarded stage. On a shared machine the stage timings are noisy;
the isolated share is the stable number.

    PYTHONPATH=. python benchmarks/row_guards.py --mb 20 --rounds 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from build import write_longalign_jsonl  # benchmarks/build.py: the same rows its benchmark uses

    from longdata.recipe import LongAlignSource, TokenizerConfig
    from longdata.sources import read_source
    from longdata.stages import control_tokens
    from longdata.stages.templates import load_tokenizer
    from longdata.stages.tokenization import tokenize_records

    scratch = Path(tempfile.mkdtemp(prefix="row-guards-"))
    try:
        data = scratch / "rows.jsonl"
        write_longalign_jsonl(data, args.mb)
        tokenizer, _ = load_tokenizer(TokenizerConfig(name="builtin:quickstart"))
        source = LongAlignSource(name="bench", kind="longalign", path=str(data))
        records = list(read_source(source, cache_dir=scratch, count_tokens=len))
        spelled_in = control_tokens.SpecialTokenText.spelled_in
        times: dict[str, list[float]] = {"guarded": [], "no special-token search": []}
        for round_number in range(args.rounds):
            for name in list(times) if round_number % 2 == 0 else list(times)[::-1]:
                control_tokens.SpecialTokenText.spelled_in = (
                    spelled_in if name == "guarded" else lambda self, messages: False
                )
                out = scratch / "cache"
                shutil.rmtree(out, ignore_errors=True)
                started = time.perf_counter()
                stats = tokenize_records(records, tokenizer, out)
                times[name].append(time.perf_counter() - started)
        control_tokens.SpecialTokenText.spelled_in = spelled_in
        search = control_tokens.SpecialTokenText(tokenizer.backend_tokenizer)
        started = time.perf_counter()
        for record in records:
            search.spelled_in(record.messages)
        search_seconds = time.perf_counter() - started
        print(
            f"{len(records)} rows, {stats.tokens:,} tokens, {args.mb:g} MB; "
            f"median of {args.rounds} rounds"
        )
        base = statistics.median(times["no special-token search"])
        for name, values in times.items():
            median = statistics.median(values)
            print(
                f"  {name:26s} {median:7.2f} s  {stats.tokens / median / 1e6:6.2f} M tok/s  "
                f"{median / base:.3f}x"
            )
        guarded = statistics.median(times["guarded"])
        print(
            f"  special-token search alone {search_seconds:7.3f} s  "
            f"{search_seconds / guarded:.2%} of the guarded stage"
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
