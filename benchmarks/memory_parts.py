"""Bytes per token of a training step at the full width of Llama-3.1-8B, measured vs planned.

    PYTHONPATH=. python benchmarks/memory_parts.py [--tokens 256,512] [--layers 1,2]
        [--weights bf16] [--vocab 128256]

A micro-step (LoRA r16 on q/k/v/o, gradient checkpointing, tiled loss and MLP, all tokens
targets) of a Llama layer 4096 wide (14,336 MLP, 32 heads / 8 KV heads) runs under
`PeakTensorMemory`, which follows every storage an operator allocates inside the step (the
weights and optimizer state that exist before are not counted, on the planner's side either).
Per-token slopes separate what grows with the row from fixed tiles (the loss chunk):

- `per token`: (peak at the longer row - peak at the shorter) / the token difference, at the
  first layer count: what every token costs (one layer's working set, kept activations);
- `per layer per token`: the same slope's growth from one layer count to the next: what each
  extra layer keeps per token (its checkpointed input).

The planner's `plan_memory` on the same shapes stands beside each (its peak minus weights,
adapters and optimizer state, which the meter does not see).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from transformers import LlamaConfig

from longdata.trainer import collate, load_model
from longdata.trainer.loss import TargetScorer, step_denominator
from longdata.trainer.memory import PeakTensorMemory, enable_tiled_mlp
from longdata.trainer.planner import StepShape, plan_memory
from longdata.trainer.step import micro_step

KIB = 1024
LOSS_CHUNK = 128
MLP_CHUNK = 128
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def full_width(layers: int, vocab: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=4096,
        intermediate_size=14_336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )


def shape_for(tokens: int, weights: str) -> StepShape:
    return StepShape(
        row_tokens=tokens,
        target_tokens=tokens - 1,
        lora=True,
        lora_rank=16,
        precision="bf16" if weights != "fp32" else "fp32",
        weights=weights,
        gradient_checkpointing=True,
        tiled_loss=True,
        loss_chunk_tokens=LOSS_CHUNK,
        tiled_mlp=True,
        mlp_chunk_tokens=MLP_CHUNK,
    )


def measured_step_bytes(config: LlamaConfig, tokens: int, weights: str) -> int:
    """Peak bytes the micro-step allocates on top of what existed before it."""
    from peft import LoraConfig, get_peft_model

    model = load_model(config, "sdpa_varlen", dtype=DTYPES[weights], seed=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = get_peft_model(model, LoraConfig(r=16, target_modules=targets, lora_dropout=0.0))
    enable_tiled_mlp(model, MLP_CHUNK)
    rng = np.random.default_rng(0)
    row = {
        "input_ids": rng.integers(0, config.vocab_size, tokens).astype(np.uint32),
        "loss_mask": np.ones(tokens, dtype=np.uint8),
        "seq_lens": np.array([tokens], dtype=np.uint32),
        "source_ids": np.zeros(1, dtype=np.uint16),
    }
    batch = collate([row])
    scorer = TargetScorer(model, LOSS_CHUNK)
    meter = PeakTensorMemory()
    with meter:
        micro_step(scorer, batch, "token_mean", step_denominator("token_mean", [batch]))
    return meter.peak_bytes


def planned_step_bytes(config: LlamaConfig, tokens: int, weights: str) -> int:
    plan = plan_memory(config, shape_for(tokens, weights))
    fixed = plan.parts["weights"] + plan.parts["optimizer"]
    return plan.peak_bytes - fixed - plan.parts["gradients"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="256,512")
    parser.add_argument("--layers", default="1,2")
    parser.add_argument("--weights", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--vocab", type=int, default=128_256)
    args = parser.parse_args()
    lengths = [int(x) for x in args.tokens.split(",")]
    depths = [int(x) for x in args.layers.split(",")]
    short, long = lengths[0], lengths[-1]
    slopes: dict[str, dict[int, float]] = {"measured": {}, "planned": {}}
    for layers in depths:
        config = full_width(layers, args.vocab)
        for name, of in (("measured", measured_step_bytes), ("planned", planned_step_bytes)):
            low, high = of(config, short, args.weights), of(config, long, args.weights)
            slopes[name][layers] = (high - low) / (long - short)
            print(
                f"{layers} layer(s) {name:>8}: {low / 2**20:9.1f} MiB at {short}, "
                f"{high / 2**20:9.1f} MiB at {long}: {slopes[name][layers] / KIB:7.1f} KiB/token",
                flush=True,
            )
    print("\n| part | measured KiB/token | planned KiB/token |\n|---|---:|---:|")
    first = depths[0]
    print(
        f"| per token ({first} layer) | {slopes['measured'][first] / KIB:.1f} | "
        f"{slopes['planned'][first] / KIB:.1f} |"
    )
    if len(depths) > 1:
        extra = depths[-1] - first
        per_layer = {k: (v[depths[-1]] - v[first]) / extra / KIB for k, v in slopes.items()}
        print(f"| per layer per token | {per_layer['measured']:.1f} | {per_layer['planned']:.1f} |")


if __name__ == "__main__":
    main()
