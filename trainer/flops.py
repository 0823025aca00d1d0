"""Model FLOPs of a training step and model FLOPs utilisation (MFU).

A step's model FLOPs are 3x its forward pass (backward costs twice the forward), counting only
the model's own arithmetic: no recomputation (activation checkpointing), no padding. Forward:

- 2 FLOPs per weight of every linear layer per token it sees: the decoder's at every real token,
  the output layer's only at the positions that predict a target (the trainer scores only
  those: `trainer.loss.token_losses`);
- attention: QK^T and AV cost 2 * L^2 * width each per layer for a sample of L tokens, width =
  query heads x head dim. Packed samples never attend to each other, so a row contributes
  sum(L_i^2) over its samples, not T^2 for its T tokens. The causal mask's half is counted,
  as PaLM's and most MFU figures do.

MFU = model FLOPs / (step seconds x devices x one device's peak dense FLOP/s).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; the first match in a
# device name wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("B200", 2250.0),
)


@dataclass(frozen=True)
class FlopShape:
    body_params: int  # weights of the linear layers applied at every token
    head_params: int  # the output layer's weights, applied where a target is predicted
    layers: int
    attention_width: int  # query heads x head dim

    @classmethod
    def of(cls, model: torch.nn.Module) -> FlopShape:
        head = model.get_output_embeddings()
        linear_weights = [
            module.weight.numel()
            for module in model.modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        ]
        config = model.config
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        return cls(
            body_params=sum(linear_weights),
            head_params=head.weight.numel(),
            layers=config.num_hidden_layers,
            attention_width=config.num_attention_heads * head_dim,
        )


def training_flops(
    shape: FlopShape, tokens: int, target_tokens: int, squared_sample_lengths: int
) -> float:
    """Model FLOPs of forward + backward over `tokens` real tokens with `target_tokens` targets,
    whose samples' squared lengths sum to `squared_sample_lengths`."""
    forward = (
        2 * shape.body_params * tokens
        + 2 * shape.head_params * target_tokens
        + 4 * shape.layers * shape.attention_width * squared_sample_lengths
    )
    return 3.0 * forward


def squared_sample_lengths(batch: dict[str, torch.Tensor]) -> int:
    """sum(L_i^2) over a collated batch's samples (padding is not a sample)."""
    sample_ids = batch["sample_ids"]
    lengths = torch.bincount(sample_ids[sample_ids >= 0].flatten().cpu())
    return int((lengths.long() ** 2).sum())


def squared_group_lengths(batch: dict[str, torch.Tensor], s2_group_ids: torch.Tensor) -> int:
    """What `squared_sample_lengths` becomes under shifted sparse attention: sum(g^2) over the
    attention groups, averaged over the two head halves (padding is not a sample)."""
    real = batch["sample_ids"].cpu() >= 0
    total = 0
    for half in s2_group_ids.cpu():
        for ids, keep in zip(half, real, strict=True):
            total += int((torch.bincount(ids[keep]).long() ** 2).sum())
    return total // len(s2_group_ids)


def device_peak_tflops(device: torch.device, bf16: bool) -> float | None:
    """One device's peak dense TFLOP/s when known: bf16 on the GPUs above; None otherwise."""
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for model, peak in PEAK_BF16_TFLOPS if model in name), None)
