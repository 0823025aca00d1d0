"""Time and peak memory of one training step, full vs shifted sparse attention, on CPU.

    .venv/bin/python benchmarks/s2_attention.py --lengths 8192,16384,32768 --repeats 3

One row of one sample per length, tiny-llama in fp32; every (backend, pattern) pair runs once per
round and rounds interleave, so load from other processes hits them alike; the best of the rounds
is kept. Peak memory is the process's peak RSS growth during the step (ru_maxrss cannot be reset,
so each measurement runs in a fresh subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VOCAB = 4096


def one_step(length: int, backend: str, pattern: str) -> dict:
    import resource

    import numpy as np
    import torch

    from longdata.trainer import collate
    from longdata.trainer.attention import shifted_sparse_inputs
    from longdata.trainer.config import TrainConfig
    from longdata.trainer.loss import model_token_losses
    from longdata.trainer.model import load_model
    from longdata.trainer.step import micro_step

    model = load_model("tiny-llama", backend, vocab_size=VOCAB, seed=0)
    rng = np.random.default_rng(0)
    row = {
        "input_ids": rng.integers(5, VOCAB, length).astype(np.uint32),
        "loss_mask": np.ones(length, dtype=np.uint8),
        "seq_lens": np.asarray([length], dtype=np.uint32),
        "source_ids": np.zeros(1, dtype=np.uint16),
    }
    batch = collate([row])
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    if pattern == "shifted_sparse":
        inputs.update(shifted_sparse_inputs(batch, TrainConfig.s2_group))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    micro_step(
        lambda scored: model_token_losses(model, scored, 2048, inputs=inputs),
        batch,
        "token_mean",
        denominator=length,
    )
    seconds = time.perf_counter() - started
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"seconds": seconds, "peak_mib": peak_mib, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="8192,16384,32768")
    parser.add_argument("--backends", default="sdpa_varlen,sdpa_mask")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        length, backend, pattern = args.child.split(":")
        print(json.dumps(one_step(int(length), backend, pattern)))
        return
    print(f"load average at start: {os.getloadavg()}")
    best: dict[tuple, dict] = {}
    for length in map(int, args.lengths.split(",")):
        for _ in range(args.repeats):
            for backend in args.backends.split(","):
                for pattern in ("full", "shifted_sparse"):
                    child = [sys.executable, __file__, "--child", f"{length}:{backend}:{pattern}"]
                    done = json.loads(subprocess.run(child, capture_output=True, check=True).stdout)
                    key = (length, backend, pattern)
                    if key not in best or done["seconds"] < best[key]["seconds"]:
                        best[key] = done
        for backend in args.backends.split(","):
            full = best[(length, backend, "full")]
            for pattern in ("full", "shifted_sparse"):
                result = best[(length, backend, pattern)]
                print(
                    f"{length:>6} {backend:>12} {pattern:>15}: {result['seconds']:.2f} s/step "
                    f"({result['seconds'] / full['seconds']:.2f}x full), "
                    f"peak +{result['peak_mib']:.0f} MiB"
                )
        print(f"load average after {length}: {os.getloadavg()}", flush=True)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
