"""RMSNorm with a lean forward and backward: the same outputs, bit for bit, without an fp32
working set the size of the row.

transformers' Llama / Qwen2 / Mistral RMSNorm upcasts its input to fp32 and leaves the rest to
autograd, which keeps that fp32 copy (twice the bytes of a bf16 input) for backward and, in
backward, allocates about five hidden-sized fp32 temporaries at once (the decomposed pow, mean,
rsqrt and products). Measured at the full 8B width under bf16 (benchmarks/memory_parts.py,
docs/MEMORY.md), the two norms of the layer running backward were the step's peak: 32 KiB per
token of fp32 copies plus 88 KiB per token of backward temporaries.

`LeanRMSNorm` computes the forward with the same operators in the same order (so outputs are
identical) over chunks of tokens, saves the input as it is and the per-token reciprocal RMS, and
computes the gradient in closed form, dx = rstd * (g - x_hat * mean(g * x_hat)), over chunks of
tokens, so its fp32 temporaries, forward and backward, are a chunk's, not the row's (the
forward's were the peak of the recomputed layer once the LoRA adapters shared their inputs).
Gradients differ from autograd's only by fp32 rounding (tests/test_memory.py).
"""

from __future__ import annotations

import itertools
import types
from typing import Any

import torch

# Norm classes whose forward is exactly `LeanRMSNorm.forward` (checked by tests/test_memory.py).
LEAN_NORM_CLASSES = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")
# Tokens per chunk of the forward and the backward: 4 MiB of fp32 temporaries per chunk at a
# 4096 hidden size.
CHUNK_TOKENS = 256


def _normalise(hidden: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """x * rstd in fp32, back in the input's dtype (transformers' order of operations)."""
    return (hidden.to(torch.float32) * rstd).to(hidden.dtype)


class LeanRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        # Per token, so the same values over chunks of tokens: the fp32 temporaries (the
        # upcast input, its square, the normalised product) are one chunk's, not the row's.
        rows = hidden.reshape(-1, hidden.shape[-1])
        rstd = torch.empty(len(rows), 1, dtype=torch.float32, device=hidden.device)
        output_dtype = torch.promote_types(weight.dtype, hidden.dtype)
        output = torch.empty(rows.shape, dtype=output_dtype, device=hidden.device)
        for x, x_rstd, out in _token_chunks(rows, rstd, output):
            variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
            x_rstd.copy_(torch.rsqrt(variance + eps))
            out.copy_(weight * _normalise(x, x_rstd))
        rstd = rstd.reshape(*hidden.shape[:-1], 1)
        ctx.save_for_backward(hidden, weight, rstd)
        return output.reshape(hidden.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        hidden, weight, rstd = ctx.saved_tensors
        wants_hidden, wants_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        # Summed over tokens in fp32 at least (fp64 for an fp64 model, whose packed == alone
        # checks need sums that do not depend on how the tokens are chunked into rows).
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = (
            torch.zeros(weight.shape, dtype=accumulate, device=weight.device)
            if wants_weight
            else None
        )
        # Per token, so exact over chunks of tokens: the fp32 temporaries are one chunk's.
        outputs = _token_chunks(grad_hidden) if wants_hidden else itertools.repeat((None,))
        for (rows, grads, rstds), (out,) in zip(_token_chunks(hidden, grad, rstd), outputs):
            if wants_weight:
                product = grads * _normalise(rows, rstds)
                grad_weight += product.sum(0, dtype=accumulate)
            if wants_hidden:
                out.copy_(_input_gradient(rows, grads, rstds, weight))
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None


def _token_chunks(*tensors: torch.Tensor) -> zip:
    """The tensors ([..., hidden] or [..., 1]) as matching chunks of CHUNK_TOKENS rows."""
    return zip(*(t.reshape(-1, t.shape[-1]).split(CHUNK_TOKENS) for t in tensors), strict=True)


def _input_gradient(
    hidden: torch.Tensor, grad: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """dx = rstd * (g - x_hat * mean(g * x_hat)) for rows of tokens, g being the upstream gradient
    of the fp32 normalised input (through the weight and the cast, as autograd would)."""
    normed = torch.mul(hidden, rstd)  # bf16 x fp32 promotes: no fp32 copy of the input first
    # fp32, or fp64 for an fp64 model (check-packing's reference): the promoted type of the two.
    upstream = (grad * weight).to(hidden.dtype).to(normed.dtype)
    dot = torch.matmul(upstream.unsqueeze(-2), normed.unsqueeze(-1)).squeeze(-1)
    dot.div_(hidden.shape[-1])
    return upstream.sub_(normed.mul_(dot)).mul_(rstd)


def _lean_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return LeanRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def use_lean_rms_norms(model: torch.nn.Module) -> int:
    """Give every RMSNorm of the known classes the lean backward; returns how many. The forward
    is set on the instance, so names, state dicts and peft's copies (bound to their own copy)
    stay as they were."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in LEAN_NORM_CLASSES:
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count
