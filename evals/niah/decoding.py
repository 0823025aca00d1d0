"""Running a causal LM on one needle prompt: greedy decoding and answer log-probabilities.

Both run one prompt at a time, unpadded. The prompt is prefilled once with packing metadata for
a single sample, so the attention backend chosen with `load_model(attention=...)` runs it
(flash-attn's varlen kernel on a GPU, per-segment SDPA on a CPU); the few tokens after it reuse
the KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def prefill_inputs(prompt_ids: Sequence[int], device: torch.device) -> dict[str, Any]:
    """`model.forward` inputs for one unpadded prompt, with the packing metadata of a single
    sample (what `trainer.collate` gives a one-sample row), so every attention backend runs."""
    length = len(prompt_ids)
    return {
        "input_ids": torch.tensor([list(prompt_ids)], dtype=torch.int64, device=device),
        "position_ids": torch.arange(length, device=device)[None],
        "cu_seqlens": torch.tensor([0, length], dtype=torch.int32, device=device),
        "max_seqlen": length,
        "document_ids": torch.zeros(1, length, dtype=torch.int32, device=device),
    }


def _new_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


@torch.inference_mode()
def greedy_generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    stop_ids: Iterable[int] = (),
) -> list[int]:
    """Greedy decoding with a KV cache: the new tokens, without the stop token that ended it.

    The prompt is one forward pass with packing metadata; each new token is one forward of a
    single token over the cache. Only the last position's logits are computed.
    """
    stop = set(stop_ids)
    cache = _new_cache()
    device = _device(model)
    inputs = prefill_inputs(prompt_ids, device)
    logits = model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    generated: list[int] = []
    while len(generated) < max_new_tokens:
        token = int(logits[0, -1].argmax())
        if token in stop:
            break
        generated.append(token)
        if len(generated) == max_new_tokens:
            break
        step = torch.tensor([[token]], dtype=torch.int64, device=device)
        logits = model(
            input_ids=step, past_key_values=cache, use_cache=True, logits_to_keep=1
        ).logits
    return generated


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        if any(s[i] != sequences[0][i] for s in sequences[1:]):
            return i
    return shortest


@torch.inference_mode()
def continuation_logprobs(
    model: torch.nn.Module, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]]
) -> list[list[float]]:
    """log P(token | prompt, earlier tokens of the continuation) for every continuation token.

    The prompt and the continuations' shared first tokens are run once; then each
    continuation's remaining tokens run as one forward over that KV cache, which is cropped
    back before the next.
    """
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    device = _device(model)
    shared = _common_prefix_length(continuations)
    prefix = [*prompt_ids, *continuations[0][:shared]]
    cache = _new_cache()
    logits = model(
        **prefill_inputs(prefix, device),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=shared + 1,
    ).logits[0]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    shared_values = [float(log_probs[i, continuations[0][i]]) for i in range(shared)]
    after_prefix = log_probs[shared]
    results = []
    for continuation in continuations:
        rest = list(continuation[shared:])
        values = list(shared_values)
        if rest:
            values.append(float(after_prefix[rest[0]]))
        if len(rest) > 1:
            step = torch.tensor([rest[:-1]], dtype=torch.int64, device=device)
            more = model(input_ids=step, past_key_values=cache, use_cache=True).logits[0]
            more = torch.log_softmax(more.float(), dim=-1)
            values.extend(float(more[i, rest[i + 1]]) for i in range(len(rest) - 1))
            # A negative count removes that many tokens on transformers 4.57 and 5.x alike;
            # a positive one means "keep this many" on 4.x and raises from 5.23.
            cache.crop(-step.shape[1])
        results.append(values)
    return results
