"""Peak memory and speed of one training step against row length, per memory technique,
beside the way a Hugging Face user trains (CPU-sized: tiny-llama, fp32).

    PYTHONPATH=. python benchmarks/memory.py [--lengths 8192,16384,32768,65536,131072]
        [--shapes all-target,sft] [--setups hf,today,tiled_loss,checkpointed,tiled_mlp,offload]
        [--max-len hf=16384,today=32768] [--threads 1]

Setups, each adding one technique to the one before (after `today`):

- `hf`: `model(**batch, labels=labels)`, transformers' own loss over full logits, with
  transformers' gradient checkpointing (`model.gradient_checkpointing_enable()`);
- `today`: the trainer before the memory work: decoder, then the output layer at target
  positions only, all targets' logits at once, no checkpointing;
- `tiled_loss`: + the loss over chunks of 2048 targets, recomputed in backward;
- `checkpointed`: + per-layer activation checkpointing;
- `tiled_mlp`: + each MLP over chunks of 8192 tokens;
- `offload`: + checkpointed hidden states offloaded to the host. On a CPU run the host *is*
  the device, so this measures only its overhead; its memory effect shows on a GPU
  (benchmarks/gpu.py).

Rows: `all-target` is one sample whose tokens are all targets (continued pretraining on a long
document); `sft` packs samples of 8192 tokens whose last 10% are targets (long prompt, short
answer).

Every (setup, shape, length) runs in a fresh subprocess: one untimed 512-token warm-up step
(allocates the optimizer state), then one timed step of the row. Memory is the process's peak
RSS (`ru_maxrss`) minus its RSS just before the timed step: what the step added, allocator
slack included. Speed is tokens per CPU-second of the process (`time.process_time`), because
the benchmark machine's cores are shared; wall-clock seconds are printed too. The planner's
estimate (`trainer.planner`, tensor bytes) stands beside each measured step. Ratios compare
each setup to `today` (memory) and to the setup before it (time).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SETUPS = ("hf", "today", "tiled_loss", "checkpointed", "tiled_mlp", "offload")
SHAPES = ("all-target", "sft")
SFT_SAMPLE_TOKENS = 8192
VOCAB = 16_384
GIB = 2**30


def _row(tokens: int, shape: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    sample = tokens if shape == "all-target" else SFT_SAMPLE_TOKENS
    lengths = [sample] * (tokens // sample) + ([tokens % sample] if tokens % sample else [])
    loss_mask = np.zeros(tokens, dtype=np.uint8)
    start = 0
    for length in lengths:
        answer = length if shape == "all-target" else max(1, length // 10)
        loss_mask[start + length - answer + 1 : start + length] = 1
        start += length
    return {
        "input_ids": rng.integers(5, VOCAB, tokens).astype(np.uint32),
        "loss_mask": loss_mask,
        "seq_lens": np.asarray(lengths, dtype=np.uint32),
        "source_ids": np.zeros(len(lengths), dtype=np.uint16),
    }


def _techniques(setup: str) -> dict[str, bool]:
    reached = SETUPS.index(setup)
    return {
        "tiled_loss": reached >= SETUPS.index("tiled_loss"),
        "gradient_checkpointing": reached >= SETUPS.index("checkpointed"),
        "tiled_mlp": reached >= SETUPS.index("tiled_mlp"),
        "offload_activations": reached >= SETUPS.index("offload"),
    }


def measure_one(setup: str, shape: str, tokens: int, threads: int) -> dict:
    """One configuration, in this process (the parent runs each in its own)."""
    import psutil
    import torch

    from longdata.trainer import collate, load_model
    from longdata.trainer.attention import best_backend
    from longdata.trainer.config import (
        DEFAULT_LOSS_CHUNK_TOKENS,
        DEFAULT_MLP_CHUNK_TOKENS,
        TrainConfig,
    )
    from longdata.trainer.loss import TargetScorer, step_denominator
    from longdata.trainer.memory import enable_activation_offload, enable_tiled_mlp
    from longdata.trainer.planner import StepShape, plan_memory
    from longdata.trainer.step import micro_step

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    model = load_model("tiny-llama", best_backend("cpu", needs_grad=True), seed=0)
    techniques = _techniques(setup) if setup != "hf" else {}
    if setup == "hf":
        model.gradient_checkpointing_enable()
    if techniques.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if techniques.get("tiled_mlp"):
        enable_tiled_mlp(model, DEFAULT_MLP_CHUNK_TOKENS)
    if techniques.get("offload_activations"):
        enable_activation_offload(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    chunk = DEFAULT_LOSS_CHUNK_TOKENS if techniques.get("tiled_loss") else 0
    scorer = TargetScorer(model, chunk)

    def step(batch: dict) -> None:
        if setup == "hf":
            model(**batch).loss.backward()  # batch holds labels: transformers' own loss
        else:
            denominator = step_denominator("token_mean", [batch])
            micro_step(scorer, batch, "token_mean", denominator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(collate([_row(512, "all-target", rng)]))
    batch = collate([_row(tokens, shape, rng)])
    before = psutil.Process().memory_info().rss
    wall, cpu = time.perf_counter(), time.process_time()
    step(batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    targets = int(batch["sample_target_counts"].sum())
    planned = None
    if setup != "hf":
        plan_shape = StepShape.from_config(
            TrainConfig(precision="fp32", weights="fp32", **{"tiled_loss": False, **techniques}),
            tokens,
            targets,
        )
        planned = plan_memory(model.config, plan_shape).peak_bytes
    return {
        "setup": setup,
        "shape": shape,
        "tokens": tokens,
        "targets": targets,
        "peak_rss_bytes": peak,
        "step_bytes": peak - before,
        "planned_bytes": planned,
        "cpu_s": cpu,
        "wall_s": wall,
    }


def _run_child(setup: str, shape: str, tokens: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--one", f"{setup},{shape},{tokens}"]
    command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["killed"])[-1]
        return {"setup": setup, "shape": shape, "tokens": tokens, "error": last}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(results: list[dict]) -> str:
    lines = [
        "| row | tokens | setup | step memory GiB | planner GiB | vs today | per token KiB | "
        "tokens/CPU-s | time vs previous | wall s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["setup"], r["shape"], r["tokens"]): r for r in results}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['tokens']:,} | {r['setup']} | {r['error']} |")
            continue
        today = by_key.get(("today", r["shape"], r["tokens"]))
        previous_setup = (
            SETUPS[SETUPS.index(r["setup"]) - 1] if r["setup"] not in ("hf", "today") else None
        )
        previous = by_key.get((previous_setup, r["shape"], r["tokens"])) if previous_setup else None
        memory_ratio = (
            f"{r['step_bytes'] / today['step_bytes']:.2f}x"
            if today and "error" not in today
            else ""
        )
        time_ratio = (
            f"{r['cpu_s'] / previous['cpu_s']:.2f}x" if previous and "error" not in previous else ""
        )
        planned = f"{r['planned_bytes'] / GIB:.2f}" if r["planned_bytes"] else ""
        lines.append(
            f"| {r['shape']} | {r['tokens']:,} | {r['setup']} | {r['step_bytes'] / GIB:.2f} | "
            f"{planned} | {memory_ratio} | {r['step_bytes'] / r['tokens'] / 1024:.1f} | "
            f"{r['tokens'] / r['cpu_s']:,.0f} | {time_ratio} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument(
        "--max-len",
        default="hf=16384,today=32768",
        help="Longest row per setup (setup=tokens,...): the full-logit setups need ~0.2 MB a "
        "token and would not fit a shared 24 GB machine beyond these.",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # setup,shape,tokens: a child run
    args = parser.parse_args()
    if args.one:
        setup, shape, tokens = args.one.split(",")
        print(json.dumps(measure_one(setup, shape, int(tokens), args.threads)))
        return
    setups = [s for s in args.setups.split(",") if s]
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(setups) - set(SETUPS)) + sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown setups/shapes {unknown}; choose from {SETUPS} and {SHAPES}")
    limits = dict(item.split("=") for item in args.max_len.split(",") if item)
    results = []
    for tokens in (int(t) for t in args.lengths.split(",")):
        for shape in shapes:
            for setup in setups:
                if tokens > int(limits.get(setup, tokens)):
                    continue
                result = _run_child(setup, shape, tokens, args.threads)
                print(json.dumps(result), file=sys.stderr, flush=True)
                results.append(result)
    layers, hidden = 2, 128
    print(
        f"tiny-llama (2 layers, hidden 128, vocab {VOCAB:,}), fp32, {args.threads} thread(s); "
        f"checkpointed hidden states: {layers * hidden * 4 / 1024:.1f} KiB per token\n"
    )
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
