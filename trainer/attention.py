"""Attention functions that keep packed samples apart, registered with transformers.

Each backend is a function with transformers' attention-interface signature
`fn(module, query, key, value, attention_mask, dropout, scaling, **kwargs)`; query is
[B, H, T, D], key and value [B, H_kv, T, D] (GQA when H_kv < H), and it returns the output as
[B, T, H, D]. transformers forwards every extra keyword given to `model.forward` down to this
function, which is how the packing metadata from `trainer.collate()` (`cu_seqlens`, `max_seqlen`,
`document_ids`) reaches it. Because the names we register are unknown to transformers' mask
builder, the model builds no causal mask of its own: the backend alone decides who attends to
whom.

Backends (all exact: a sample's outputs equal those of running it alone):

- `flash_attn`: flash-attn's varlen kernel (CUDA, flash-attn package; computes in bf16/fp16).
- `torch_varlen`: `torch.nn.attention.varlen` (CUDA only; computes in bf16/fp16).
- `flex`: FlexAttention with a document-causal block mask. Compiled on CUDA; on CPU torch has
  no backward for it, so it is forward-only there.
- `sdpa_varlen`: one causal SDPA call per segment. Trainable anywhere; costs sum(L_i^2).
- `sdpa_mask`: one SDPA call with a dense additive block-diagonal causal mask built from
  `document_ids`. The simple reference; costs B * T^2 whatever the sample lengths.
- `auto`: picks, at every call, the fastest exact backend available for the tensors' device
  and for whether gradients are needed.

Shifted sparse attention (LongLoRA's S2-Attn) is a training-time pattern on top of any backend:
`shifted_sparse_inputs()` turns a collated batch into `s2_group_ids` [2, B, T], which the
training step (and only it) adds to the forward's keywords. Within each segment of length L with
group size G, head half 0 (heads [0, H // 2)) puts position p in group p // G; head half 1 (heads
[H // 2, H)) in group (p + G // 2) // G, so its first and last groups are partial (G - G // 2
tokens, and the remainder) and stay inside the segment: unlike LongLoRA's roll, nothing wraps
around to the other end, and no group ever crosses a segment boundary. A segment no longer than
G is one group in both halves. A query attends causally
within its group. Ids are unique within a row, so "same id" alone says who may attend to whom.

Without packing metadata (e.g. `model.generate` on one prompt) every backend falls back to
plain causal attention over each row; in training mode that is refused, because it would mean
the metadata was lost on the way and samples would silently attend to each other.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("flash_attn", "torch_varlen", "flex", "sdpa_varlen", "sdpa_mask")
# Fastest first; `auto` takes the first one available.
PREFERENCE_ORDER = ("flash_attn", "torch_varlen", "flex", "sdpa_varlen")
IMPLEMENTATION_PREFIX = "longdata_"
# transformers 5 treats any attn_implementation name containing "flash" as a hub kernel to
# download and refuses it, so the flash_attn backend registers under a name without that word.
REGISTERED_SUFFIXES = {"flash_attn": "dao_varlen"}

AttentionOutput = tuple[torch.Tensor, None]


def registered_suffix(backend: str) -> str:
    """`backend` as spelled in registered names: the setting name, minus any "flash"."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from auto, {BACKENDS}")
    return REGISTERED_SUFFIXES.get(backend, backend)


def implementation_name(backend: str) -> str:
    """The name under which `backend` is registered with transformers' AttentionInterface."""
    return IMPLEMENTATION_PREFIX + registered_suffix(backend)


def unavailable_reason(backend: str, device: torch.device | str, needs_grad: bool) -> str | None:
    """Why `backend` cannot run on `device` (with a backward pass if `needs_grad`), or None."""
    device = torch.device(device)
    on_cuda = device.type == "cuda" and torch.cuda.is_available()
    if backend == "flash_attn":
        missing = []
        if importlib.util.find_spec("flash_attn") is None:
            missing.append("the flash-attn package (pip install 'longdata[gpu]')")
        if not on_cuda:
            missing.append("a CUDA device")
        return f"flash_attn backend needs {' and '.join(missing)}" if missing else None
    if backend == "torch_varlen":
        missing = []
        if importlib.util.find_spec("torch.nn.attention.varlen") is None:
            missing.append(f"torch.nn.attention.varlen (torch {torch.__version__} lacks it)")
        else:
            from torch.nn.attention.varlen import varlen_attn

            if _causal_argument(varlen_attn) is None:
                missing.append(
                    f"a varlen_attn taking window_size or is_causal (torch {torch.__version__}'s "
                    "takes neither, so it cannot be made causal)"
                )
        if not on_cuda:
            missing.append("a CUDA device (torch's varlen attention is CUDA-only)")
        return f"torch_varlen backend needs {' and '.join(missing)}" if missing else None
    if backend == "flex":
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return (
                f"flex backend needs torch.nn.attention.flex_attention (torch {torch.__version__})"
            )
        if needs_grad and not on_cuda:
            return (
                "flex backend has no backward pass on CPU (FlexAttention is forward-only there); "
                "train on CPU with attention='sdpa_varlen' or 'auto'"
            )
        return None
    if backend in ("sdpa_varlen", "sdpa_mask"):
        return None
    raise ValueError(f"unknown attention backend {backend!r}; choose from auto, {BACKENDS}")


def available_backends(device: torch.device | str, needs_grad: bool) -> list[str]:
    """The backends that can run on `device`, fastest first, then the sdpa_mask reference."""
    names = [*PREFERENCE_ORDER, "sdpa_mask"]
    return [name for name in names if unavailable_reason(name, device, needs_grad) is None]


def best_backend(device: torch.device | str, needs_grad: bool) -> str:
    """What `auto` runs: the fastest exact backend for this device and mode.

    On CPU that is sdpa_varlen for training and for inference alike: uncompiled FlexAttention
    is slower than per-segment SDPA there.
    """
    device = torch.device(device)
    for name in PREFERENCE_ORDER:
        if name == "flex" and device.type != "cuda":
            continue
        if unavailable_reason(name, device, needs_grad) is None:
            return name
    return "sdpa_varlen"


def _needs_grad(query: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and query.requires_grad


def _is_gqa(query: torch.Tensor, key: torch.Tensor) -> bool:
    return query.shape[1] != key.shape[1]


def _unpacked_causal(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float,
    scaling: float | None,
) -> AttentionOutput:
    """Plain causal attention over whole rows, for inference without packing metadata.

    With a KV cache the keys may be longer than the queries (the queries are the last tokens):
    query i then sees every cached key and the new keys up to its own. SDPA's `is_causal` aligns
    the triangle to the top-left corner instead, which would hide cached keys from a multi-token
    continuation, so that case gets an explicit bottom-right-aligned mask. A padded batch is not
    supported here (the model builds no padding mask for these backends): one prompt per row,
    unpadded, as in `model.generate` on a single prompt.
    """
    if module.training:
        raise RuntimeError(
            "packing metadata (cu_seqlens / document_ids from trainer.collate()) did not reach the "
            "attention function; pass the whole collate() batch to model.forward. Refusing to "
            "train with attention that would cross sample boundaries."
        )
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query_length, key_length = query.shape[2], key.shape[2]
    mask = None
    if 1 < query_length < key_length:
        allowed = torch.ones(query_length, key_length, dtype=torch.bool, device=query.device)
        allowed = allowed.tril(diagonal=key_length - query_length)
        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill_(~allowed, torch.finfo(query.dtype).min)[None, None]
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling)


def segment_group_size(length: int, s2_group: float) -> int:
    """The group size G for a segment of `length` tokens: a fraction of it (below 1) or a token
    count, at least 2 tokens and at most the whole segment."""
    size = int(length * s2_group) if s2_group < 1 else int(s2_group)
    return min(length, max(2, size))


def shifted_sparse_inputs(batch: dict, s2_group: float) -> dict[str, torch.Tensor]:
    """The forward keywords that switch a training step to shifted sparse attention.

    `s2_group_ids` [2, B, T] int64: per head half, a group id per token, unique within the row
    (see the module docstring for the exact grouping).
    """
    document_ids = batch["document_ids"]
    batch_size, length = document_ids.shape
    group_ids = torch.zeros(2, batch_size, length, dtype=torch.int64)
    for row in range(batch_size):
        ids = document_ids[row].cpu()
        starts = [0, *(torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist(), length]
        next_id = [0, 0]
        for start, end in itertools.pairwise(starts):
            size = segment_group_size(end - start, s2_group)
            positions = torch.arange(end - start)
            # A segment of one group stays whole in both halves: shifting it would split it.
            shifts = (0, size // 2 if size < end - start else 0)
            for half, shift in enumerate(shifts):
                local = (positions + shift) // size
                group_ids[half, row, start:end] = local + next_id[half]
                next_id[half] += int(local[-1]) + 1
    return {"s2_group_ids": group_ids.to(document_ids.device)}


def group_cu_seqlens(s2_group_ids: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """Per head half, the groups as varlen segments: (cu_seqlens over the flattened B*T tokens,
    the longest group). Rows are separated too, as a group never spans two rows."""
    halves = []
    for ids in s2_group_ids:
        batch_size, length = ids.shape
        change = torch.ones(batch_size, length, dtype=torch.bool, device=ids.device)
        change[:, 1:] = ids[:, 1:] != ids[:, :-1]
        starts = torch.nonzero(change.flatten()).flatten()
        total = torch.tensor([batch_size * length], device=ids.device)
        cu_seqlens = torch.cat([starts, total]).to(torch.int32)
        halves.append((cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())))
    return halves


def shifted_sparse_allowed(s2_group_ids: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, heads, T, T] boolean: True where a query may see a key (same group, not later)."""
    length = s2_group_ids.shape[-1]
    same_group = s2_group_ids[:, :, :, None] == s2_group_ids[:, :, None, :]
    not_later = torch.ones(length, length, dtype=torch.bool, device=s2_group_ids.device).tril()
    half_of_head = (torch.arange(heads, device=s2_group_ids.device) >= heads // 2).long()
    return (same_group & not_later).index_select(0, half_of_head).transpose(0, 1)


def _head_halves(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(query, key, value) for heads [0, H // 2) and [H // 2, H), keys repeated to H heads
    (GQA groups need not align with the split)."""
    heads = query.shape[1]
    repeat = heads // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    split = heads // 2
    return [
        (query[:, part], key[:, part], value[:, part])
        for part in (slice(0, split), slice(split, heads))
    ]


def _per_half(
    attend: Callable[..., torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    s2_group_ids: torch.Tensor,
) -> AttentionOutput:
    """Run `attend(query, key, value, cu_seqlens, max_seqlen)` -> [B, T, h, D] on each head half
    over its groups, and join the halves back to [B, T, H, D]."""
    outputs = [
        attend(q, k, v, cu_seqlens, max_seqlen)
        for (q, k, v), (cu_seqlens, max_seqlen) in zip(
            _head_halves(query, key, value), group_cu_seqlens(s2_group_ids), strict=True
        )
    ]
    return torch.cat(outputs, dim=2), None


def _flatten_heads(tensor: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B*T, H, D], the layout of the varlen kernels."""
    batch, heads, length, head_dim = tensor.shape
    return tensor.transpose(1, 2).reshape(batch * length, heads, head_dim)


def sdpa_varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    s2_group_ids: torch.Tensor | None = None,
    **kwargs: object,
) -> AttentionOutput:
    """Causal SDPA on every segment (or, shifted sparse, every group) separately: exact and
    trainable on any device."""
    if cu_seqlens is None:
        return _unpacked_causal(module, query, key, value, dropout, scaling)

    def attend(q, k, v, bounds, _max_seqlen):
        return _sdpa_per_segment(q, k, v, bounds, dropout, scaling)

    if s2_group_ids is not None:
        return _per_half(attend, query, key, value, s2_group_ids)
    return attend(query, key, value, cu_seqlens, None), None


def _sdpa_per_segment(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Causal SDPA over each segment of `cu_seqlens`, as [B, T, H, D]."""
    batch, heads, length, head_dim = query.shape
    bounds = cu_seqlens.tolist()
    segments = []
    for start, end in itertools.pairwise(bounds):
        # Segments never straddle rows: each row's segments (samples + padding) fill it exactly.
        row, offset = divmod(start, length)
        window = slice(offset, offset + end - start)
        segments.append(
            F.scaled_dot_product_attention(
                query[row : row + 1, :, window],
                key[row : row + 1, :, window],
                value[row : row + 1, :, window],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=_is_gqa(query, key),
            )
        )
    # Segments are in flattened (row, position) order: [1, H, B*T, D] -> [B, T, H, D].
    output = torch.cat(segments, dim=2).reshape(heads, batch, length, head_dim)
    return output.permute(1, 2, 0, 3)


class _PerForwardCache:
    """Remembers the mask built for the last `document_ids` tensor seen.

    Every layer of one forward pass (and its activation-checkpointing recomputation) receives
    the same `document_ids` tensor object, so the mask is built once per forward instead of once
    per layer. Keyed on the tensor's identity and version, so a new or mutated batch rebuilds.
    """

    def __init__(self, build: Callable[..., object]) -> None:
        self._build = build
        self._key: tuple | None = None
        self._source: weakref.ref | None = None
        self._value: object = None

    def __call__(self, document_ids: torch.Tensor, *args: object) -> object:
        key = (document_ids._version, *args)
        if self._source is None or self._source() is not document_ids or self._key != key:
            self._value = self._build(document_ids, *args)
            self._source = weakref.ref(document_ids)
            self._key = key
        return self._value


def document_causal_additive_mask(document_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] additive mask: 0 where a query may see a key (same segment, not later)."""
    length = document_ids.shape[1]
    same_segment = document_ids[:, :, None] == document_ids[:, None, :]
    not_later = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    allowed = (same_segment & not_later)[:, None]
    # Additive float, not boolean: the fact sheet found boolean masks wrong under some kernels.
    mask = torch.zeros(allowed.shape, dtype=dtype, device=document_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


_dense_mask = _PerForwardCache(document_causal_additive_mask)
_s2_dense_mask = _PerForwardCache(shifted_sparse_allowed)


def sdpa_mask_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    document_ids: torch.Tensor | None = None,
    s2_group_ids: torch.Tensor | None = None,
    **kwargs: object,
) -> AttentionOutput:
    """One SDPA call with a dense block-diagonal causal mask: the simple reference. Shifted
    sparse uses a 4-D boolean mask per head, still computing every score of the row."""
    if document_ids is None:
        return _unpacked_causal(module, query, key, value, dropout, scaling)
    if s2_group_ids is not None:
        mask = _s2_dense_mask(s2_group_ids, query.shape[1])
    else:
        mask = _dense_mask(document_ids, query.dtype)
    output = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=_is_gqa(query, key),
    )
    return output.transpose(1, 2), None


def _document_block_mask(document_ids: torch.Tensor) -> object:
    from torch.nn.attention.flex_attention import create_block_mask

    def document_causal(batch, head, query_index, key_index):
        # Index as t[b, q], not t[b][q]: chained indexing of a captured tensor crashes torch's
        # CPU compile of the mask.
        same_segment = document_ids[batch, query_index] == document_ids[batch, key_index]
        return same_segment & (query_index >= key_index)

    batch, length = document_ids.shape
    return create_block_mask(
        document_causal, batch, None, length, length, device=document_ids.device
    )


def _shifted_sparse_block_mask(s2_group_ids: torch.Tensor, heads: int) -> object:
    from torch.nn.attention.flex_attention import create_block_mask

    split = heads // 2

    def group_causal(batch, head, query_index, key_index):
        half = (head >= split).long()
        same_group = s2_group_ids[half, batch, query_index] == s2_group_ids[half, batch, key_index]
        return same_group & (query_index >= key_index)

    _, batch, length = s2_group_ids.shape
    return create_block_mask(group_causal, batch, heads, length, length, device=s2_group_ids.device)


_block_mask = _PerForwardCache(_document_block_mask)
_s2_block_mask = _PerForwardCache(_shifted_sparse_block_mask)
_compiled_flex_attention: Callable | None = None


def _flex_attention_kernel(device: torch.device) -> Callable:
    """flex_attention, compiled on CUDA (where eager flex is a slow reference)."""
    global _compiled_flex_attention
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


def flex_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    document_ids: torch.Tensor | None = None,
    s2_group_ids: torch.Tensor | None = None,
    **kwargs: object,
) -> AttentionOutput:
    """FlexAttention with a document-causal (or shifted sparse group-causal) block mask
    (forward-only on CPU)."""
    if document_ids is None:
        return _unpacked_causal(module, query, key, value, dropout, scaling)
    reason = unavailable_reason("flex", query.device, _needs_grad(query))
    if reason:
        raise RuntimeError(reason)
    if dropout:
        raise ValueError("flex backend does not support attention dropout; set it to 0")
    output = _flex_attention_kernel(query.device)(
        query,
        key,
        value,
        block_mask=(
            _block_mask(document_ids)
            if s2_group_ids is None
            else _s2_block_mask(s2_group_ids, query.shape[1])
        ),
        scale=scaling,
        enable_gqa=_is_gqa(query, key),
    )
    return output.transpose(1, 2), None


def _half_precision(tensor: torch.Tensor) -> torch.Tensor:
    """The varlen kernels compute in bf16/fp16 only; fp32 inputs are run in bf16."""
    return tensor if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.bfloat16()


def flash_attn_varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    s2_group_ids: torch.Tensor | None = None,
    **kwargs: object,
) -> AttentionOutput:
    """flash-attn's varlen kernel over the flattened batch (CUDA)."""
    if cu_seqlens is None:
        return _unpacked_causal(module, query, key, value, dropout, scaling)
    reason = unavailable_reason("flash_attn", query.device, _needs_grad(query))
    if reason:
        raise RuntimeError(reason)
    from flash_attn import flash_attn_varlen_func

    def attend(q, k, v, bounds, longest):
        batch, heads, length, head_dim = q.shape
        bounds = bounds.to(device=q.device, dtype=torch.int32)
        output = flash_attn_varlen_func(
            _half_precision(_flatten_heads(q)),
            _half_precision(_flatten_heads(k)),
            _half_precision(_flatten_heads(v)),
            bounds,
            bounds,
            int(longest),
            int(longest),
            dropout_p=dropout,
            softmax_scale=scaling,
            causal=True,
        )
        return output.to(q.dtype).reshape(batch, length, heads, head_dim)

    if s2_group_ids is not None:
        return _per_half(attend, query, key, value, s2_group_ids)
    return attend(query, key, value, cu_seqlens, max_seqlen), None


def torch_varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    s2_group_ids: torch.Tensor | None = None,
    **kwargs: object,
) -> AttentionOutput:
    """`torch.nn.attention.varlen.varlen_attn` over the flattened batch (CUDA)."""
    if cu_seqlens is None:
        return _unpacked_causal(module, query, key, value, dropout, scaling)
    reason = unavailable_reason("torch_varlen", query.device, _needs_grad(query))
    if reason:
        raise RuntimeError(reason)
    if dropout:
        raise ValueError("torch_varlen backend does not support attention dropout; set it to 0")
    from torch.nn.attention.varlen import varlen_attn

    def attend(q, k, v, bounds, longest):
        return call_varlen_attn(varlen_attn, q, k, v, bounds, int(longest), scaling)

    if s2_group_ids is not None:
        return _per_half(attend, query, key, value, s2_group_ids)
    return attend(query, key, value, cu_seqlens, max_seqlen), None


def _causal_argument(varlen_attn: Callable[..., torch.Tensor]) -> str | None:
    """Which keyword makes this torch's `varlen_attn` causal: `window_size` (newer torch),
    `is_causal` (older), or None when it offers neither. Read from the signature, because the
    argument names changed between releases that share a version prefix."""
    parameters = inspect.signature(varlen_attn).parameters
    return next((name for name in ("window_size", "is_causal") if name in parameters), None)


def call_varlen_attn(
    varlen_attn: Callable[..., torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scaling: float | None,
) -> torch.Tensor:
    """Causal `varlen_attn` over [B, H, T, D] inputs, in whatever signature this torch has;
    returns [B, T, H, D]. A `varlen_attn` without `enable_gqa` gets the KV heads repeated, which
    is what grouped-query attention computes."""
    causal = _causal_argument(varlen_attn)
    if causal is None:
        raise RuntimeError(unavailable_reason("torch_varlen", query.device, needs_grad=False))
    options = {"window_size": (-1, 0)} if causal == "window_size" else {"is_causal": True}
    if _is_gqa(query, key):
        if "enable_gqa" in inspect.signature(varlen_attn).parameters:
            options["enable_gqa"] = True
        else:
            groups = query.shape[1] // key.shape[1]
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
    batch, heads, length, head_dim = query.shape
    cu_seqlens = cu_seqlens.to(device=query.device, dtype=torch.int32)
    output = varlen_attn(
        _half_precision(_flatten_heads(query)),
        _half_precision(_flatten_heads(key)),
        _half_precision(_flatten_heads(value)),
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        scale=scaling,
        **options,
    )
    return output.to(query.dtype).reshape(batch, length, heads, head_dim)


BACKEND_FUNCTIONS: dict[str, Callable[..., AttentionOutput]] = {
    "flash_attn": flash_attn_varlen_attention,
    "torch_varlen": torch_varlen_attention,
    "flex": flex_attention_forward,
    "sdpa_varlen": sdpa_varlen_attention,
    "sdpa_mask": sdpa_mask_attention,
}


def auto_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> AttentionOutput:
    """Dispatch to the best backend for this call's device and need for gradients."""
    backend = best_backend(query.device, _needs_grad(query))
    return BACKEND_FUNCTIONS[backend](module, query, key, value, attention_mask, **kwargs)


def register_attention_functions() -> None:
    """Register every backend (and `auto`) with transformers. Safe to call repeatedly."""
    from transformers import AttentionInterface

    for backend, function in {**BACKEND_FUNCTIONS, "auto": auto_attention}.items():
        AttentionInterface.register(implementation_name(backend), function)
