"""Training throughput: packed rows vs padding, side by side in one run (CPU-sized).

    PYTHONPATH=. python benchmarks/training.py [--max-len 4096] [--samples 32] [--threads 1]

One synthetic length mix (log-uniform sample lengths, as LongAlign's mix is roughly), one tiny
Llama, one pass over the same samples three ways:

- packed: samples first-fit packed into rows of max_len, trainer's best exact CPU backend;
- padded per-sample: one sample per row padded to max_len, stock sdpa with a padding mask;
- sorted pad-to-longest: samples sorted by length, batched up to max_len tokens per batch,
  padded to the batch's longest, stock sdpa with a padding mask.

Then the attention cost alone at a fixed row length with more and more samples, to show that
per-segment attention costs sum(L_i^2) while a dense mask costs T^2 whatever the packing.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from longdata.trainer import collate, load_model
from longdata.trainer.attention import best_backend, sdpa_mask_attention, sdpa_varlen_attention
from longdata.trainer.loss import model_token_losses, step_denominator
from longdata.trainer.step import micro_step


def _samples(count: int, max_len: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    lengths = np.exp(rng.uniform(np.log(32), np.log(max_len), count)).astype(int)
    samples = []
    for length in lengths:
        loss_mask = np.zeros(length, dtype=np.uint8)
        loss_mask[length // 3 :] = 1  # prompt, then a response that is trained on
        samples.append(
            {
                "input_ids": rng.integers(5, 16_384, length).astype(np.uint32),
                "loss_mask": loss_mask,
                "seq_lens": np.array([length], dtype=np.uint32),
                "source_ids": np.zeros(1, dtype=np.uint16),
            }
        )
    return samples


def _pack(samples: list[dict], max_len: int) -> list[dict[str, np.ndarray]]:
    """First-fit decreasing into rows of at most max_len tokens."""
    rows: list[list[dict]] = []
    for sample in sorted(samples, key=lambda s: -len(s["input_ids"])):
        for row in rows:
            if sum(len(s["input_ids"]) for s in row) + len(sample["input_ids"]) <= max_len:
                row.append(sample)
                break
        else:
            rows.append([sample])
    return [{key: np.concatenate([s[key] for s in row]) for key in row[0]} for row in rows]


def _sorted_batches(samples: list[dict], max_len: int) -> list[list[dict]]:
    """Consecutive samples of the length-sorted list, while batch x longest <= max_len."""
    batches: list[list[dict]] = [[]]
    for sample in sorted(samples, key=lambda s: len(s["input_ids"])):
        longest = len(sample["input_ids"])
        if batches[-1] and (len(batches[-1]) + 1) * longest > max_len:
            batches.append([])
        batches[-1].append(sample)
    return batches


def _padded_inputs(batch: dict) -> dict:
    """What a padding trainer feeds a stock model: ids, labels and a 2-D padding mask."""
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": (batch["sample_ids"] >= 0).long(),
        "use_cache": False,
    }


def _run(model: torch.nn.Module, batches: list[dict], packed: bool) -> tuple[float, int, int]:
    """Seconds for one training pass over `batches` (after one untimed warm-up step)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch: dict) -> None:
        # Every layout runs the trainer's micro-step: decoder, then the output layer at targets.
        inputs = None if packed else _padded_inputs(batch)
        denominator = step_denominator("token_mean", [batch])
        micro_step(
            lambda b: model_token_losses(model, b, inputs=inputs), batch, "token_mean", denominator
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])
    started = time.perf_counter()
    for batch in batches:
        step(batch)
    seconds = time.perf_counter() - started
    tokens = sum(int((b["sample_ids"] >= 0).sum()) for b in batches)
    targets = sum(int(b["sample_target_counts"].sum()) for b in batches)
    return seconds, tokens, targets


def _attention_seconds(function, total: int, samples: int, repeats: int = 3) -> float:
    """fwd+bwd of one attention call on a row of `total` tokens split into equal samples."""
    length = total // samples
    row = {
        "input_ids": np.zeros(total, dtype=np.uint32),
        "loss_mask": np.zeros(total, dtype=np.uint8),
        "seq_lens": np.full(samples, length, dtype=np.uint32),
        "source_ids": np.zeros(samples, dtype=np.uint16),
    }
    batch = collate([row])
    module = torch.nn.Module()
    best = float("inf")
    for _ in range(repeats):
        query = torch.randn(1, 4, total, 32, requires_grad=True)
        key = torch.randn(1, 2, total, 32, requires_grad=True)
        value = torch.randn(1, 2, total, 32, requires_grad=True)
        started = time.perf_counter()
        output, _ = function(
            module,
            query,
            key,
            value,
            None,
            cu_seqlens=batch["cu_seqlens"],
            document_ids=batch["document_ids"],
        )
        output.sum().backward()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    samples = _samples(args.samples, args.max_len, rng)
    backend = best_backend("cpu", needs_grad=True)

    setups = {
        f"packed ({backend})": ([collate([row]) for row in _pack(samples, args.max_len)], True),
        "padded per-sample": (
            [collate([s], pad_to_multiple_of=args.max_len) for s in samples],
            False,
        ),
        "sorted pad-to-longest": (
            [collate(b) for b in _sorted_batches(samples, args.max_len)],
            False,
        ),
    }
    lengths = [len(s["input_ids"]) for s in samples]
    print(
        f"{len(samples)} samples, lengths {min(lengths)}..{max(lengths)} (median "
        f"{int(np.median(lengths))}), {sum(lengths):,} tokens, max_len {args.max_len}, "
        f"tiny-llama (2 layers, hidden 128, 4 heads / 2 kv heads, vocab 16,384), fp32, "
        f"{args.threads} thread(s)\n"
    )
    results = {}
    for name, (batches, packed) in setups.items():
        attention = backend if packed else "sdpa_mask"
        model = load_model("tiny-llama", attention, seed=0)
        if not packed:
            model.set_attn_implementation("sdpa")  # stock attention + padding mask
        model.train()
        results[name] = (len(batches), *_run(model, batches, packed))

    packed_rate = None
    print(
        "| layout | steps | padded tokens | seconds | real tok/s | target tok/s | packed speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (steps, seconds, tokens, targets) in results.items():
        batches = setups[name][0]
        computed = sum(b["input_ids"].numel() for b in batches)
        rate = targets / seconds
        packed_rate = packed_rate or rate
        print(
            f"| {name} | {steps} | {computed:,} | {seconds:.1f} | {tokens / seconds:,.0f} | "
            f"{rate:,.0f} | {packed_rate / rate:.2f}x |"
        )

    total = args.max_len
    print(
        f"\nOne attention call, fwd+bwd, one row of {total} tokens split into k equal samples "
        "(4 heads, 2 kv heads, head dim 32):\n"
    )
    print("| k samples | sum(L_i^2) / T^2 | sdpa_varlen s | sdpa_mask (dense) s |")
    print("|---|---|---|---|")
    for samples_per_row in (1, 4, 16, 64):
        varlen = _attention_seconds(sdpa_varlen_attention, total, samples_per_row)
        dense = _attention_seconds(sdpa_mask_attention, total, samples_per_row)
        print(f"| {samples_per_row} | {1 / samples_per_row:.4f} | {varlen:.3f} | {dense:.3f} |")


if __name__ == "__main__":
    main()
