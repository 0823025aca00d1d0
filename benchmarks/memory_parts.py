"""Bytes per token of a training step at the full width of Llama-3.1-8B, part by part, measured
vs planned.

    PYTHONPATH=. python benchmarks/memory_parts.py [--tokens 1024,2048] [--layers 1,2]
        [--weights bf16] [--techniques ckpt,loss,mlp] [--vocab 8192] [--stock-norms]
        [--peft-casts]

A micro-step (LoRA r16 on q/k/v/o, every token a target) of Llama layers 4096 wide (14,336 MLP,
32 heads / 8 KV heads) runs under `PeakTensorMemory`, which follows every storage an operator
allocates inside the step (the weights and optimizer state that exist before are not counted,
on the planner's side either). At the step's peak it lists what is alive, grouped into parts:
the module that made the tensor (layer numbers folded, so every layer's input checkpoint is one
part), forward or backward (`bwd` includes checkpoint recomputation), the operator and dtype.
Per-token slopes separate what grows with the row from fixed tiles (the loss and MLP chunks):

- each part's bytes per token: its bytes at the longer row minus the shorter, over the token
  difference, at the first layer count;
- `per layer per token`: the whole step's slope's growth from one layer count to the next.

Techniques: ckpt (gradient checkpointing), loss (tiled loss), mlp (tiled MLP), offload (the
checkpoints in host memory: on the CPU they stay where they are, so the planner's host bytes
are added back to its peak here). The planner's `plan_memory` on the same shapes stands beside
each (its peak minus weights, adapters and optimizer state, which the meter does not see).
"""

from __future__ import annotations

import argparse
import re
import weakref
from collections import Counter

import numpy as np
import torch
from transformers import LlamaConfig

from longdata.trainer import collate, load_model
from longdata.trainer.config import TrainConfig
from longdata.trainer.loss import TargetScorer, step_denominator
from longdata.trainer.memory import (
    PeakTensorMemory,
    ShapesOnly,
    enable_activation_offload,
    enable_tiled_mlp,
    share_adapter_inputs,
)
from longdata.trainer.planner import StepShape, plan_memory
from longdata.trainer.rms_norm import LEAN_NORM_CLASSES
from longdata.trainer.step import micro_step

KIB = 1024
CHUNK = 128  # loss and MLP chunks: fixed tiles far below the rows measured
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TECHNIQUES = ("ckpt", "loss", "mlp", "offload")
LAYER_NUMBER = re.compile(r"layers\.\d+")


def llama_8b_width(layers: int, vocab: int, divisor: int = 1) -> LlamaConfig:
    """Llama-3.1-8B's layer shape, its widths and heads divided by `divisor` (1: full width)."""
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=4096 // divisor,
        intermediate_size=14_336 // divisor,
        num_hidden_layers=layers,
        num_attention_heads=32 // divisor,
        num_key_value_heads=8 // divisor,
        tie_word_embeddings=False,
    )


def shape_for(tokens: int, weights: str, techniques: set[str]) -> StepShape:
    config = TrainConfig(
        lora=True,
        lora_rank=16,
        precision="bf16" if weights != "fp32" else "fp32",
        weights=weights,
        gradient_checkpointing="ckpt" in techniques,
        tiled_loss="loss" in techniques,
        loss_chunk_tokens=CHUNK,
        tiled_mlp="mlp" in techniques,
        mlp_chunk_tokens=CHUNK,
        offload_activations="offload" in techniques,
    )
    return StepShape.from_config(config, tokens, tokens - 1)


class AttributedPeak(PeakTensorMemory):
    """`PeakTensorMemory` that also keeps, at the peak, the live bytes per part (see the module
    docstring): which module made each storage, in forward or backward, by which operator."""

    def __init__(self, module_names: dict[int, str]) -> None:
        super().__init__()
        self.module_names = module_names
        self.modules: list[str] = []
        self._labels: dict[int, tuple[str, int]] = {}
        self.at_peak: Counter[str] = Counter()
        self.peak_moment = ""
        self._func = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self._func = func.__name__
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _follow(self, storage: torch.UntypedStorage) -> None:
        if storage in self._tracked:
            return
        phase = "bwd" if torch._C._current_autograd_node() is not None else "fwd"
        module = self.modules[-1] if self.modules else "(step)"
        label = f"{phase} {LAYER_NUMBER.sub('layers.*', module)} {self._func}"
        key = id(storage)
        self._labels[key] = (label, storage.nbytes())
        previous = self.peak_bytes
        super()._follow(storage)
        weakref.finalize(storage, self._labels.pop, key, None)
        if self.peak_bytes > previous:
            node = torch._C._current_autograd_node()
            self.peak_moment = f"{label} ({node.name() if node is not None else 'forward'})"
            self.at_peak = Counter()
            for part, size in self._labels.values():
                self.at_peak[part] += size


def measure(
    config: LlamaConfig,
    tokens: int,
    weights: str,
    techniques: set[str],
    stock_norms: bool,
    peft_casts: bool = False,
) -> AttributedPeak:
    """The micro-step's peak (bytes on top of what existed before it), attributed; its matrix
    products skip their arithmetic (`ShapesOnly`: the same bytes, in seconds rather than minutes
    in bf16 on a CPU without bf16 instructions)."""
    from peft import LoraConfig, get_peft_model

    model = load_model(config, "sdpa_varlen", dtype=DTYPES[weights], seed=0)
    if stock_norms:  # transformers' own RMSNorm forward (the class's), for the "before" column
        for module in model.modules():
            if type(module).__name__ in LEAN_NORM_CLASSES:
                del module.forward
    if "ckpt" in techniques:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = get_peft_model(model, LoraConfig(r=16, target_modules=targets, lora_dropout=0.0))
    if weights != "fp32" and not peft_casts:  # under bf16 autocast, as the trainer runs it
        share_adapter_inputs(model)
    if "mlp" in techniques:
        enable_tiled_mlp(model, CHUNK)
    if "offload" in techniques:
        enable_activation_offload(model)
    rng = np.random.default_rng(0)
    row = {
        "input_ids": rng.integers(0, config.vocab_size, tokens).astype(np.uint32),
        "loss_mask": np.ones(tokens, dtype=np.uint8),
        "seq_lens": np.array([tokens], dtype=np.uint32),
        "source_ids": np.zeros(1, dtype=np.uint16),
    }
    batch = collate([row])
    scorer = TargetScorer(model, CHUNK if "loss" in techniques else 0)
    names = {id(module): name for name, module in model.named_modules()}
    meter = AttributedPeak(names)

    def enter(module: torch.nn.Module, args: object) -> None:
        meter.modules.append(names.get(id(module), "?"))

    def leave(module: torch.nn.Module, args: object, output: object) -> None:
        meter.modules.pop()

    hooks = [
        torch.nn.modules.module.register_module_forward_pre_hook(enter),
        torch.nn.modules.module.register_module_forward_hook(leave, always_call=True),
    ]
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if weights != "fp32" else None
    try:
        with ShapesOnly(), meter:
            micro_step(
                scorer,
                batch,
                "token_mean",
                step_denominator("token_mean", [batch]),
                precision=precision,
            )
    finally:
        for hook in hooks:
            hook.remove()
    return meter


def planned_step_bytes(config: LlamaConfig, tokens: int, weights: str, techniques: set) -> int:
    plan = plan_memory(config, shape_for(tokens, weights, techniques))
    fixed = plan.parts["weights"] + plan.parts["optimizer"] + plan.parts["gradients"]
    return plan.peak_bytes - fixed + plan.host_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1024,2048")
    parser.add_argument("--layers", default="1,2")
    parser.add_argument("--weights", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--techniques", default="ckpt,loss,mlp")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument(
        "--stock-norms", action="store_true", help="transformers' RMSNorm (before the lean one)"
    )
    parser.add_argument(
        "--peft-casts",
        action="store_true",
        help="peft's casts of adapter inputs kept (before share_adapter_inputs)",
    )
    args = parser.parse_args()
    techniques = {t for t in args.techniques.split(",") if t}
    unknown = techniques - set(TECHNIQUES)
    if unknown:
        parser.error(f"unknown techniques {sorted(unknown)}; choose from {TECHNIQUES}")
    short, long = (int(x) for x in args.tokens.split(","))
    depths = [int(x) for x in args.layers.split(",")]
    slopes: dict[str, dict[int, float]] = {"measured": {}, "planned": {}}
    parts: dict[int, Counter[str]] = {}
    for layers in depths:
        config = llama_8b_width(layers, args.vocab)
        low, high = (
            measure(config, n, args.weights, techniques, args.stock_norms, args.peft_casts)
            for n in (short, long)
        )
        parts[layers] = Counter(high.at_peak)
        parts[layers].subtract(low.at_peak)
        planned = [planned_step_bytes(config, n, args.weights, techniques) for n in (short, long)]
        slopes["measured"][layers] = (high.peak_bytes - low.peak_bytes) / (long - short)
        slopes["planned"][layers] = (planned[1] - planned[0]) / (long - short)
        print(
            f"{layers} layer(s): measured {low.peak_bytes / 2**20:,.1f} / "
            f"{high.peak_bytes / 2**20:,.1f} MiB, planned {planned[0] / 2**20:,.1f} / "
            f"{planned[1] / 2**20:,.1f} MiB at {short} / {long} tokens; peak at "
            f"{low.peak_moment} / {high.peak_moment}",
            flush=True,
        )
    first = depths[0]
    print(
        f"\n{args.weights} weights, techniques {sorted(techniques)}, {first} layer(s): "
        "live at the peak, KiB per token\n\n| part | KiB/token |\n|---|---:|"
    )
    for part, size in sorted(parts[first].items(), key=lambda item: -abs(item[1])):
        if abs(size) / (long - short) >= KIB / 10:
            print(f"| {part} | {size / (long - short) / KIB:.1f} |")
    print(
        f"| **step, measured** | **{slopes['measured'][first] / KIB:.1f}** |\n"
        f"| **step, planned** | **{slopes['planned'][first] / KIB:.1f}** |"
    )
    if len(depths) > 1:
        extra = depths[-1] - first
        per_layer = {k: (v[depths[-1]] - v[first]) / extra / KIB for k, v in slopes.items()}
        print(
            f"| per layer per token, measured / planned | {per_layer['measured']:.1f} / "
            f"{per_layer['planned']:.1f} |"
        )


if __name__ == "__main__":
    main()
