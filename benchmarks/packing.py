"""Packing benchmark: longdata's planner against TRL's `pack_dataset` and a plain first fit.

    python benchmarks/packing.py [--only NAME]

Every measurement runs in its own subprocess, so one method's memory (numpy, numba, Arrow and
Python allocations alike) cannot hide or inflate another's: a child builds its inputs, resets
the kernel's peak-RSS counter (/proc/self/clear_refs), runs the method, and reports wall time
and peak RSS above what it held just before (Arrow on the system allocator, see CHILD_ENV).
Inputs are seeded and identical in every child.

Two tables:
- plan: rows, fill, rows over the lower bound, planning time and memory, from lengths alone.
  TRL's time is its whole `pack_dataset` call (it has no planning-only entry point);
- plan + gather: packing real token data end to end, an Arrow `input_ids: list<uint32>` column
  in, a packed `input_ids` column plus per-row `seq_lens` out, as TRL produces.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longdata.stages.packing import ALGORITHMS, packing_stats, plan

REPO_ROOT = Path(__file__).resolve().parents[1]

FIRST_FIT_TIMEOUT_S = 30
# Arrow's default allocator (jemalloc/mimalloc) keeps freed pages resident, which would let one
# allocation hide inside another's pages; the system allocator maps and unmaps large buffers.
CHILD_ENV = os.environ | {"ARROW_DEFAULT_MEMORY_POOL": "system"}


@dataclass(frozen=True)
class Distribution:
    name: str
    max_len: int
    make: Callable[[np.random.Generator], np.ndarray]
    with_tokens: bool  # False where the token data would not fit in memory


def log_uniform(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    return np.exp(rng.uniform(np.log(low), np.log(high), n))


def fusang_mix(rng: np.random.Generator, n: int) -> np.ndarray:
    n_long = int(0.7 * n)
    long = np.clip(rng.lognormal(np.log(12_000), 0.5, n_long), 1_000, 24_000)
    short = rng.uniform(200, 2_000, n - n_long)
    return rng.permutation(np.concatenate([long, short]))


DISTRIBUTIONS = {
    d.name: d
    for d in (
        Distribution(
            "longalign", 65_536, lambda rng: log_uniform(rng, 10_000, 8_000, 64_000), True
        ),
        Distribution("fusang_mix", 24_576, lambda rng: fusang_mix(rng, 40_000), True),
        Distribution(
            "chat_short",
            4_096,
            lambda rng: np.clip(rng.lognormal(np.log(400), 1.0, 100_000), 16, 4_096),
            True,
        ),
        Distribution("scale", 24_576, lambda rng: fusang_mix(rng, 1_000_000), False),
    )
}


def lengths_of(dist: Distribution) -> np.ndarray:
    return np.round(dist.make(np.random.default_rng(1234))).astype(np.int64)


def token_table(lengths: np.ndarray):
    import pyarrow as pa

    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.random.default_rng(99).integers(0, 150_000, int(offsets[-1]), dtype=np.uint32)
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids))
    return pa.table({"input_ids": column})


# --- measurement (child side) ------------------------------------------------------------------


def resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def measured(run: Callable[[], dict]) -> dict:
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = resident_kib("VmRSS")
    start = time.perf_counter()
    result = run()
    result["seconds"] = time.perf_counter() - start
    result["peak_extra_mb"] = (resident_kib("VmHWM") - before) / 1024
    return result


def first_fit_rows(lengths: list[int], max_len: int) -> int:
    """The textbook baseline: each item, in input order, into the first row with room."""
    room: list[int] = []
    for size in lengths:
        for row, free in enumerate(room):
            if free >= size:
                room[row] = free - size
                break
        else:
            room.append(max_len - size)
    return len(room)


def measure(dist: Distribution, method: str) -> dict:
    lengths = lengths_of(dist)
    max_len = dist.max_len
    tokens = int(lengths.sum())

    if method in ALGORITHMS:
        plan(lengths[:100], max_len, algorithm=method)  # load the compiled kernels first
        runs = [
            measured(lambda: {"plan": plan(lengths, max_len, algorithm=method)}) for _ in range(3)
        ]
        stats = packing_stats(runs[0]["plan"], lengths, max_len)
        return {
            "rows": stats.rows,
            "fill": stats.fill,
            "seconds": min(run["seconds"] for run in runs),
            "peak_extra_mb": max(run["peak_extra_mb"] for run in runs),
        }

    if method == "first_fit":
        as_list = lengths.tolist()
        result = measured(lambda: {"rows": first_fit_rows(as_list, max_len)})
    elif method == "trl":
        import datasets
        from trl.data_utils import pack_dataset

        datasets.disable_progress_bars()
        dataset = datasets.Dataset(token_table(lengths))
        result = measured(lambda: {"rows": len(pack_dataset(dataset, max_len, strategy="bfd"))})
    elif method == "gather":
        column = token_table(lengths).column("input_ids").combine_chunks()
        plan(lengths[:100], max_len)
        result = measured(lambda: {"rows": plan_and_gather(column, max_len).num_rows})
    else:
        raise ValueError(f"unknown method {method!r}")
    return result | {"fill": tokens / (result["rows"] * max_len)}


def plan_and_gather(column, max_len: int):
    """longdata end to end: lengths from the Arrow column, plan, copy each item's token slice."""
    import pyarrow as pa

    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy()
    sample_lengths = np.diff(offsets)
    packed = plan(sample_lengths, max_len)
    item_lengths = sample_lengths[packed.item_index]
    out_offsets = np.zeros(len(item_lengths) + 1, dtype=np.int64)
    np.cumsum(item_lengths, out=out_offsets[1:])
    # One slice copy per item: no per-token index array, so memory stays at the output's size.
    tokens = np.empty(out_offsets[-1], dtype=values.dtype)
    for item, out_start, out_end in zip(
        packed.item_index.tolist(), out_offsets[:-1].tolist(), out_offsets[1:].tolist(), strict=True
    ):
        tokens[out_start:out_end] = values[offsets[item] : offsets[item] + out_end - out_start]
    row_token_offsets = out_offsets[packed.row_offsets]
    return pa.table(
        {
            "input_ids": pa.LargeListArray.from_arrays(row_token_offsets, tokens),
            "seq_lens": pa.LargeListArray.from_arrays(
                packed.row_offsets, item_lengths.astype(np.uint32)
            ),
        }
    )


# --- orchestration (parent side) ---------------------------------------------------------------


def in_child(dist: str, method: str, timeout: float | None = None) -> dict:
    command = [sys.executable, __file__, "--measure", dist, method]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=True, env=CHILD_ENV
        )
    except subprocess.TimeoutExpired:
        return {"skipped": f"stopped after {timeout:.0f} s"}
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"{dist}/{method} failed:\n{error.stderr}") from error
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_seconds() -> tuple[float, float]:
    """(cold compile of all kernels, load from numba's on-disk cache), each in a fresh process."""
    snippet = (
        "import time; t = time.perf_counter(); "
        "from longdata.stages.packing import plan, ALGORITHMS\n"
        "[plan([1, 2], 4, algorithm=a) for a in ALGORITHMS]; print(time.perf_counter() - t)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = os.environ | {"NUMBA_CACHE_DIR": cache, "PYTHONPATH": str(REPO_ROOT)}
        timings = [
            float(
                subprocess.run(
                    [sys.executable, "-c", snippet],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            for _ in range(2)
        ]
    return timings[0], timings[1]


def fmt_seconds(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(DISTRIBUTIONS), help="run one distribution")
    parser.add_argument("--measure", nargs=2, metavar=("DIST", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(DISTRIBUTIONS[args.measure[0]], args.measure[1])))
        return

    cold, cached = compile_seconds()
    print(
        f"numba kernels: {cold:.2f} s to compile cold (paid once), "
        f"{cached:.2f} s to import and load from cache\n"
    )
    names = [args.only] if args.only else list(DISTRIBUTIONS)

    plan_rows, gather_rows = [], []
    for name in names:
        dist = DISTRIBUTIONS[name]
        lengths = lengths_of(dist)
        too_big = {"skipped": f"skipped: needs {4 * lengths.sum() / 1e9:.0f} GB of token data"}
        bound = max(-(-int(lengths.sum()) // dist.max_len), int((2 * lengths > dist.max_len).sum()))
        print(
            f"{name}: {len(lengths):,} samples, {lengths.sum():,} tokens, max_len {dist.max_len:,}",
            file=sys.stderr,
        )
        trl = in_child(name, "trl") if dist.with_tokens else too_big
        for algorithm in ALGORITHMS:
            plan_rows.append((name, f"longdata {algorithm}", in_child(name, algorithm), trl, bound))
        plan_rows.append((name, "trl pack_dataset bfd", trl, trl, bound))
        first_fit = (
            in_child(name, "first_fit", FIRST_FIT_TIMEOUT_S)
            if dist.with_tokens
            else {"skipped": "skipped: O(n * rows) Python"}
        )
        plan_rows.append((name, "python first fit", first_fit, trl, bound))
        if dist.with_tokens:
            gather_rows.append((name, int(lengths.sum()), in_child(name, "gather"), trl))

    print(
        "| dataset | method | rows | fill % | rows/bound | time | TRL time / this | peak extra MB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, method, result, trl, bound in plan_rows:
        if "skipped" in result:
            print(f"| {name} | {method} | {result['skipped']} | | | | | |")
            continue
        ratio = f"{trl['seconds'] / result['seconds']:,.0f}x" if "seconds" in trl else "—"
        print(
            f"| {name} | {method} | {result['rows']:,} | {100 * result['fill']:.2f} | "
            f"{result['rows'] / bound:.4f} | {fmt_seconds(result['seconds'])} | {ratio} | "
            f"{result['peak_extra_mb']:.0f} |"
        )

    print(
        "\n| dataset | tokens | longdata plan + gather | TRL pack_dataset | speed-up | "
        "peak extra MB (longdata / TRL) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, tokens, gather, trl in gather_rows:
        print(
            f"| {name} | {tokens:,} | {fmt_seconds(gather['seconds'])} | "
            f"{fmt_seconds(trl['seconds'])} | {trl['seconds'] / gather['seconds']:.1f}x | "
            f"{gather['peak_extra_mb']:.0f} / {trl['peak_extra_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
