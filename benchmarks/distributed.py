"""Ulysses sequence parallelism on CPU (gloo): step-time overhead and the longest trainable row.

    PYTHONPATH=. python benchmarks/distributed.py [--length 8192] [--budget-mb 1200]

Every measurement runs in fresh processes (`torchrun --nproc-per-node SP` for SP=2, a plain
process for SP=1), one intra-op thread per rank, so peak resident memory (ru_maxrss) is that
of one training step and nothing else. The step is the trainer's: tiny-llama (fp32), one
packed row of `--sample-len`-token samples (the last third of each is target), the
sdpa_varlen backend (Ulysses-wrapped for SP=2, under DDP over the SP ranks), forward and
backward, repeated `--repeats` times after a warm-up step.

1. Overhead: SP=1 vs SP=2 at the same row length: seconds per step, and the extra work SP=2
   does in total (2 ranks x step time vs 1 rank x step time).
2. Memory: the longest row (doubling from `--start-length`) whose step stays within
   `--budget-mb` peak RSS on every rank, for SP=1 and SP=2.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def _resident_mb() -> float:
    """Current resident memory of this process (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _row(length: int, sample_length: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    seq_lens = [sample_length] * (length // sample_length)
    if length % sample_length:
        seq_lens.append(length % sample_length)
    loss_mask = np.concatenate(
        [np.arange(n) >= n // 3 for n in seq_lens]  # prompt, then the trained response
    ).astype(np.uint8)
    return {
        "input_ids": rng.integers(5, 16_384, length).astype(np.uint32),
        "loss_mask": loss_mask,
        "seq_lens": np.asarray(seq_lens, dtype=np.uint32),
        "source_ids": np.zeros(len(seq_lens), dtype=np.uint16),
    }


def worker(args: argparse.Namespace) -> None:
    """One rank: build the model, run the steps, write this rank's timings and memory."""
    import torch

    from longdata.trainer import collate, load_model
    from longdata.trainer.distributed import (
        enable_sequence_parallel,
        init_parallel,
        shard_batch,
        shutdown_parallel,
        wrap_model,
    )
    from longdata.trainer.loss import TargetScorer, TokenLosses, micro_batch_loss, step_denominator

    torch.set_num_threads(1)
    context = init_parallel(args.sp)
    model = load_model("tiny-llama", "sdpa_varlen", seed=0)
    if context.sp_size > 1:
        enable_sequence_parallel(model, "sdpa_varlen", context.sp_group)
    scorer = wrap_model(TargetScorer(model), "ddp", context)
    batch = collate([_row(args.length, args.sample_len)], pad_to_multiple_of=context.sp_size)
    denominator = step_denominator("token_mean", [batch])
    shard = shard_batch(batch, context.sp_rank, context.sp_size)
    before_mb = _resident_mb()

    seconds = []
    for _ in range(args.repeats + 1):  # the first step warms up
        started = time.perf_counter()
        loss = micro_batch_loss(TokenLosses(*scorer(shard)), shard, "token_mean", denominator)
        (loss * context.gradient_scale).backward()
        model.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    result = {
        "step_s": statistics.median(seconds[1:]),
        "before_mb": before_mb,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(f"{args.result}.{context.rank}").write_text(json.dumps(result))
    shutdown_parallel(context)


def measure(sp: int, length: int, args: argparse.Namespace) -> list[dict] | None:
    """Run one configuration in fresh processes; each rank's result, or None if it failed."""
    with tempfile.TemporaryDirectory() as scratch:
        result = f"{scratch}/result.json"
        options = [
            "--worker",
            f"--sp={sp}",
            f"--length={length}",
            f"--sample-len={args.sample_len}",
            f"--repeats={args.repeats}",
            f"--result={result}",
        ]
        script = str(Path(__file__).resolve())
        if sp == 1:
            command = [sys.executable, script, *options]
        else:
            command = [sys.executable, "-m", "torch.distributed.run"]
            command += [f"--nproc-per-node={sp}", script, *options]
        env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1"}
        completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            print(f"sp={sp} length={length} failed:\n{completed.stderr[-2000:]}", file=sys.stderr)
            return None
        return [json.loads(Path(f"{result}.{rank}").read_text()) for rank in range(sp)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192, help="row length for the overhead")
    parser.add_argument("--sample-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget-mb", type=float, default=2048.0)
    parser.add_argument("--start-length", type=int, default=4096)
    parser.add_argument("--max-length", type=int, default=131_072)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print(
        f"tiny-llama (2 layers, hidden 128, 4 heads / 2 kv heads, vocab 16,384), fp32, "
        f"sdpa_varlen, samples of {args.sample_len} tokens (last 2/3 target), gloo, "
        f"1 thread per rank, median of {args.repeats} fwd+bwd steps after a warm-up\n"
    )
    print(f"Overhead at {args.length:,} tokens per row:\n")
    print(
        "| SP | ranks | s / step | tokens/s | total rank-seconds vs SP=1 | peak RSS MB per rank |"
    )
    print("|---|---|---|---|---|---|")
    baseline = None
    for sp in (1, 2):
        ranks = measure(sp, args.length, args)
        if ranks is None:
            print(f"| {sp} | {sp} | failed | | | |")
            continue
        step = max(r["step_s"] for r in ranks)
        baseline = baseline or step
        peaks = " / ".join(f"{r['peak_mb']:,.0f}" for r in ranks)
        print(
            f"| {sp} | {sp} | {step:.2f} | {args.length / step:,.0f} | "
            f"{sp * step / baseline:.2f}x | {peaks} |"
        )

    print(f"\nLongest row whose step fits in {args.budget_mb:,.0f} MB peak RSS per rank:\n")
    print("| SP | row length | s / step | peak RSS MB (max over ranks) | RSS growth MB in step |")
    print("|---|---|---|---|---|")
    for sp in (1, 2):
        length, fitted = args.start_length, None
        while length <= args.max_length:
            ranks = measure(sp, length, args)
            if ranks is None:
                break
            peak = max(r["peak_mb"] for r in ranks)
            growth = max(r["peak_mb"] - r["before_mb"] for r in ranks)
            print(
                f"| {sp} | {length:,} | {max(r['step_s'] for r in ranks):.2f} | "
                f"{peak:,.0f} | {growth:,.0f} |"
            )
            if peak > args.budget_mb:
                break
            fitted = length
            length *= 2
        print(f"| **{sp}** | **longest within budget: {fitted or 'none'}** | | | |")


if __name__ == "__main__":
    main()
