"""The GPU check: packing exactness of the CUDA backends in bf16, and long-row memory and speed
of a Llama-3.1-8B-shaped slice with LoRA per memory technique, beside the planner.

    PYTHONPATH=. python benchmarks/gpu.py [--out gpu.jsonl] [--layers 4] \
        [--lengths 32768,65536,131072] [--dry-run]

Each result is appended to `--out` (JSON lines) as soon as it completes, so a run cut short
keeps what it measured. `--dry-run` (any machine) writes and prints the planned rows only.

Sized to finish in under 8 minutes on one H100/H200 (random weights: nothing is downloaded).
On a machine without CUDA it says so and exits 0.

1. Packed == alone, bf16 autocast: for flash_attn, torch_varlen, compiled flex and sdpa_mask,
   `trainer.check.max_packing_error` (each packed sample's logits and gradients against the
   sample alone), and each backend's packed logits and LoRA gradients against sdpa_mask's.
2. Memory and speed: `--layers` decoder layers of the Llama-3.1-8B shape (hidden 4096, GQA
   32/8 heads, MLP 14,336, vocab 128,256), fp32 weights with bf16 autocast, LoRA rank 16 on
   q/k/v/o, one all-target row per step at each length, with the memory techniques added one
   by one. Per run: tokens/s, MFU (model FLOPs: 6 x weights x tokens plus causal attention
   over the row's samples, against the GPU's dense bf16 peak), `torch.cuda.max_memory_allocated`
   and the planner's estimate for the same step. Out-of-memory runs are recorded as such.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# Dense bf16 tensor-core peaks (FLOP/s) of the GPUs this check is sized for.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
BACKENDS = ("sdpa_mask", "flash_attn", "torch_varlen", "flex")
TECHNIQUES = {
    "tiled_loss": {"tiled_loss": True},
    "+checkpointing": {"tiled_loss": True, "gradient_checkpointing": True},
    "+tiled_mlp": {"tiled_loss": True, "gradient_checkpointing": True, "tiled_mlp": True},
    "+offload": {
        "tiled_loss": True,
        "gradient_checkpointing": True,
        "tiled_mlp": True,
        "offload_activations": True,
    },
}
# The weights dtypes compared with every technique on (the last of TECHNIQUES).
WEIGHT_ROWS = ("bf16", "fp8")
HOST_GIB = 125  # the measured H200 machine's host memory (issue 21)
DEVICE_GIB = 139
LORA_RANK = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _slice_config(layers: int):
    from longdata.trainer.planner import llama_8b_config

    config = llama_8b_config()
    config.num_hidden_layers = layers
    return config


def _lora_model(config, attention: str, techniques: dict, weights: str):
    import torch
    from peft import LoraConfig, get_peft_model

    from longdata.trainer.fp8 import quantize_frozen_linears
    from longdata.trainer.memory import (
        enable_activation_offload,
        enable_tiled_mlp,
        share_adapter_inputs,
    )
    from longdata.trainer.model import load_model

    dtype = torch.float32 if weights == "fp32" else torch.bfloat16
    # Built on the GPU in its dtype: no fp32 init on the host (that cost ~40 s a run).
    model = load_model(config, attention, seed=0, device="cuda", dtype=dtype)
    if techniques.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(
        model,
        LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=list(LORA_TARGETS)),
    )
    share_adapter_inputs(model)  # every step here runs under bf16 autocast, as the trainer's
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # nonzero, so every adapter's gradient is exercised
            torch.nn.init.normal_(parameter, std=0.02)
    if weights == "fp8":
        quantize_frozen_linears(model)
    if techniques.get("tiled_mlp"):
        enable_tiled_mlp(model)
    if techniques.get("offload_activations"):
        enable_activation_offload(model)
    model.train()
    return model


def _rows(lengths: list[list[int]], vocab: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    rows = []
    for seq_lens in lengths:
        total = sum(seq_lens)
        loss_mask = np.ones(total, dtype=np.uint8)
        loss_mask[np.cumsum([0, *seq_lens[:-1]])] = 0
        rows.append(
            {
                "input_ids": rng.integers(5, vocab, total).astype(np.uint32),
                "loss_mask": loss_mask,
                "seq_lens": np.asarray(seq_lens, dtype=np.uint32),
                "source_ids": np.zeros(len(seq_lens), dtype=np.uint16),
            }
        )
    return rows


def _to_cuda(batch: dict) -> dict:
    import torch

    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def packing_checks(layers: int) -> dict:
    """Every CUDA backend against sample-alone and against sdpa_mask, in bf16 autocast."""
    import torch

    from longdata.trainer import collate
    from longdata.trainer.attention import unavailable_reason
    from longdata.trainer.check import max_packing_error
    from longdata.trainer.loss import TargetScorer, step_denominator
    from longdata.trainer.model import set_attention
    from longdata.trainer.step import micro_step

    config = _slice_config(min(layers, 2))
    config.vocab_size = 32_000  # the check compares logits; a smaller vocabulary is enough
    batch = _to_cuda(collate(_rows([[700, 1500, 37, 1811], [2048, 1, 1999]], 32_000), 64))
    model = _lora_model(config, "sdpa_mask", {})
    results: dict = {}
    reference = None
    for backend in BACKENDS:
        reason = unavailable_reason(backend, "cuda", needs_grad=True)
        if reason:
            results[backend] = {"skipped": reason}
            continue
        set_attention(model, backend)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            error = max_packing_error(model, batch)
            model.zero_grad(set_to_none=True)
            done = micro_step(
                TargetScorer(model), batch, "token_mean", step_denominator("token_mean", [batch])
            )
        grads = {
            n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None
        }
        model.zero_grad(set_to_none=True)
        values = done.losses.values.float()
        entry = {"alone_logits": error.logits, "alone_grads": error.grads}
        if reference is None:
            reference = (values, grads)
        else:
            entry["vs_sdpa_mask_losses"] = float((values - reference[0]).abs().max())
            entry["vs_sdpa_mask_grads"] = max(
                float((grads[n] - reference[1][n]).abs().max()) for n in grads
            )
        results[backend] = entry
        print(f"packing {backend}: {entry}", file=sys.stderr, flush=True)
    del model
    torch.cuda.empty_cache()
    return results


def _model_flops(config, seq_lens: list[int]) -> float:
    """Forward + backward FLOPs of one row: 6 x weights x tokens, plus causal attention."""
    from longdata.trainer.planner import ModelDims

    dims = ModelDims.of(config)
    tokens = sum(seq_lens)
    dense = 6 * dims.parameters() * tokens
    # QK^T and PV: 2 matmuls x 2 FLOPs x q_width per (query, key) pair; causal halves; x3 fwd+bwd.
    attention = (
        3 * 2 * 2 * dims.q_width * dims.layers * sum(length * length / 2 for length in seq_lens)
    )
    return dense + attention


def _step(scorer, optimizer, batch: dict, denominator: int) -> None:
    import torch

    from longdata.trainer.step import micro_step

    precision = torch.autocast("cuda", dtype=torch.bfloat16)
    micro_step(scorer, batch, "token_mean", denominator, precision=precision)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _shape(tokens: int, techniques: dict, weights: str):
    from longdata.trainer.config import TrainConfig
    from longdata.trainer.planner import StepShape

    config = TrainConfig(
        lora=True,
        lora_rank=LORA_RANK,
        lora_targets=list(LORA_TARGETS),
        precision="bf16",
        weights=weights,
        **techniques,
    )
    return StepShape.from_config(config, tokens, tokens - 1)


def planned_runs(layers: int, lengths: list[int]) -> list[dict]:
    """Every memory run's planned entry: each technique (fp32 weights), then every technique
    on with each of WEIGHT_ROWS."""
    from longdata.trainer.planner import ModelDims, plan_memory, weight_bytes_of

    config = _slice_config(layers)
    everything = list(TECHNIQUES)[-1]
    runs = [(label, "fp32") for label in TECHNIQUES] + [(everything, w) for w in WEIGHT_ROWS]
    entries = []
    for tokens in lengths:
        for label, weights in runs:
            plan = plan_memory(config, _shape(tokens, TECHNIQUES[label], weights))
            entries.append(
                {
                    "tokens": tokens,
                    "techniques": label,
                    "weights": weights,
                    "weight_gib": weight_bytes_of(ModelDims.of(config), weights) / 2**30,
                    "planned_gib": plan.peak_bytes / 2**30,
                }
            )
    return entries


def longest_row_plan() -> dict:
    """The full-depth 8B shape's longest row on the issue's machine, by the planner."""
    from longdata.trainer.planner import fit_row, llama_8b_config

    shape = _shape(65_536, TECHNIQUES[list(TECHNIQUES)[-1]], "bf16")
    tokens, plan = fit_row(llama_8b_config(), shape, DEVICE_GIB * 2**30, HOST_GIB * 2**30)
    return {
        "longest_row": tokens,
        "device_gib": DEVICE_GIB,
        "host_gib": HOST_GIB,
        "offload_layers": plan.shape.offload_layers if plan else None,
        "planned_gib": plan.peak_bytes / 2**30 if plan else None,
    }


def _record(out: Path, kind: str, entry: dict) -> None:
    with out.open("a") as lines:
        lines.write(json.dumps({"kind": kind, **entry}) + "\n")
    print(f"{kind} {entry}", file=sys.stderr, flush=True)


def memory_runs(layers: int, lengths: list[int], attention: str, out: Path) -> list[dict]:
    import torch

    from longdata.trainer import collate
    from longdata.trainer.config import DEFAULT_LOSS_CHUNK_TOKENS
    from longdata.trainer.loss import TargetScorer, step_denominator

    config = _slice_config(layers)
    name = torch.cuda.get_device_name()
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    results = []
    batches = {}
    for entry in planned_runs(layers, lengths):
        tokens = entry["tokens"]
        if tokens not in batches:
            batches = {tokens: _to_cuda(collate(_rows([[tokens]], config.vocab_size)))}
        batch = batches[tokens]
        techniques = TECHNIQUES[entry["techniques"]]
        model = None
        try:
            model = _lora_model(config, attention, techniques, entry["weights"])
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=1e-5)
            chunk = DEFAULT_LOSS_CHUNK_TOKENS
            scorer = TargetScorer(model, chunk)
            denominator = step_denominator("token_mean", [batch])

            _step(scorer, optimizer, batch, denominator)  # warm-up: kernels, optimizer
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            _step(scorer, optimizer, batch, denominator)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            entry["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            entry["tokens_per_s"] = tokens / seconds
            if peak_flops:
                entry["mfu"] = _model_flops(config, [tokens]) / seconds / peak_flops
            entry["planned_over_measured"] = entry["planned_gib"] / entry["peak_gib"]
        except torch.cuda.OutOfMemoryError:
            entry["error"] = "out of memory"
        finally:
            del model
            torch.cuda.empty_cache()
        _record(out, "memory", entry)
        results.append(entry)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu.jsonl"))
    parser.add_argument("--dry-run", action="store_true", help="write the planned rows only")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lengths", default="32768,65536,131072")
    parser.add_argument("--attention", default="auto", help="backend for the memory runs")
    args = parser.parse_args()
    lengths = [int(t) for t in args.lengths.split(",")]
    if args.dry_run:
        for entry in planned_runs(args.layers, lengths):
            _record(args.out, "planned", entry)
        _record(args.out, "longest_row", longest_row_plan())
        return
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU; none here, nothing run.")
        return
    started = time.perf_counter()
    _record(
        args.out,
        "run",
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers},
    )
    _record(args.out, "packing", packing_checks(args.layers))
    _record(args.out, "longest_row", longest_row_plan())
    memory_runs(args.layers, lengths, args.attention, args.out)
    _record(args.out, "done", {"seconds": time.perf_counter() - started})


if __name__ == "__main__":
    main()
