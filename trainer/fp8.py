"""Frozen base weights in FP8 (Snowflake's memory-optimised LoRA stack): `weights: fp8`.

`quantize_frozen_linears(model)` runs after PEFT has wrapped the model. Every `nn.Linear` inside
the decoder layers whose weight does not learn (the base layer of each LoRA-wrapped projection,
and the projections LoRA leaves alone) becomes a `Float8Linear`: the weight stored as
float8_e4m3fn with one fp32 scale per output channel (amax / 448, e4m3's largest finite value),
half of bf16's bytes plus 4 bytes per output channel. What stays as loaded (bf16): the LoRA
adapters (peft keeps them fp32), embeddings, norms and lm_head (the tiled loss reads its weight
directly, and the logits are where rounding shows most).

The forward runs `torch._scaled_mm` on GPUs with FP8 tensor cores (compute capability >= 8.9),
with the input quantised per token (one scale per row of the input): a long row's activation
outliers sit on a few tokens, and one per-tensor scale would let them flatten every other
token's resolution, while a per-token amax costs one reduction. Elsewhere (CPU, older GPUs) the
weight is dequantised to the input's dtype for an ordinary matmul: correct, slow, for tests.
`torch._scaled_mm` rather than torchao: it is already in torch, where torchao is a second
compiled package whose versions are tied to torch's, for one matmul this module needs.

The backward never needs the weight's gradient; the input's gradient is `grad @ dequantised
weight`, computed in backward so no bf16 copy of the weight outlives the forward.
"""

from __future__ import annotations

import torch
from torch import nn

from longdata.trainer.model import decoder_layers

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# The smallest amax a scale is computed from: an all-zero channel must not divide by zero.
MIN_AMAX = 1e-12
SCALED_MM_CAPABILITY = (8, 9)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, fp32 scale per output channel) with weight ~= fp8 * scale[:, None]."""
    amax = weight.detach().abs().amax(dim=1, keepdim=True).float().clamp(min=MIN_AMAX)
    scale = amax / FP8_MAX
    return (weight.detach().float() / scale).to(FP8), scale.squeeze(1)


def _dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.to(torch.float32) * scale[:, None]).to(dtype)


def _has_scaled_mm(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and hasattr(torch, "_scaled_mm")
        and torch.cuda.get_device_capability(device) >= SCALED_MM_CAPABILITY
    )


def _scaled_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, in] (bf16) @ weight.T through FP8 tensor cores, x quantised per token."""
    x_amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=MIN_AMAX)
    x_scale = x_amax / FP8_MAX
    x_fp8 = (x.float() / x_scale).to(FP8)
    return torch._scaled_mm(
        x_fp8,
        weight.t(),  # column-major [in, out], as _scaled_mm wants its second operand
        scale_a=x_scale,
        scale_b=scale[None, :].contiguous(),
        out_dtype=x.dtype,
    )


class _Float8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale):  # noqa: ANN001, ANN205 (autograd's signature)
        ctx.save_for_backward(weight, scale)
        flat = x.reshape(-1, x.shape[-1])
        if _has_scaled_mm(x.device) and x.dtype == torch.bfloat16:
            out = _scaled_matmul(flat.contiguous(), weight, scale)
        else:
            out = flat @ _dequantize(weight, scale, x.dtype).t()
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        weight, scale = ctx.saved_tensors
        return grad @ _dequantize(weight, scale, grad.dtype), None, None


class Float8Linear(nn.Module):
    """A frozen `nn.Linear` whose weight is float8_e4m3fn with per-output-channel scales."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight, scale = quantize_weight(linear.weight)
        # Parameters (frozen), not buffers, so that sharding and `.to()` treat them as weights.
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Float8Matmul.apply(x, self.weight, self.weight_scale)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3"


def quantize_frozen_linears(model: nn.Module) -> int:
    """Replace every frozen `nn.Linear` of the decoder layers by a `Float8Linear`; return how
    many were replaced. Run after PEFT wraps the model, so adapters are not touched."""
    replaced = 0
    for layer in decoder_layers(model):
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and not child.weight.requires_grad:
                    setattr(parent, name, Float8Linear(child))
                    replaced += 1
    return replaced


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (what the weights occupy on the device)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
