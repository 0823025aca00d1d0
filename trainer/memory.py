"""Memory techniques that let long rows fit: tiled loss, tiled MLP, offloaded checkpoints.

Each one trades a little recomputation (or a host copy) for memory and leaves the values and
gradients unchanged (tests/test_memory.py holds them to fp32 rounding):

- Tiled loss (`tiled_target_losses`): the output layer and cross-entropy run over chunks of
  target positions, each chunk under `torch.utils.checkpoint`, so forward keeps only the
  per-token losses and backward recomputes one chunk's `[chunk x vocab]` logits at a time.
  Without it one 64K-token all-target row holds 64K x 16K fp32 logits (4 GiB) several times over
  (logits, log-softmax, their gradients).
- Tiled MLP (`enable_tiled_mlp`): each decoder layer's MLP runs over chunks of tokens, each
  under a checkpoint. An MLP is per-token, so chunking the flattened tokens is exact whatever
  the packing; the `[tokens x intermediate]` activations (3.5 x hidden, three of them, for
  Llama) exist for one chunk at a time, in forward and in backward.
- Offloaded checkpoints (`enable_activation_offload`): with activation checkpointing, what a
  layer keeps between forward and backward is its input hidden state. transformers'
  checkpointed layers hand that input to `torch.utils.checkpoint`, which saves it as an
  autograd saved tensor *outside* its own recompute hooks; a saved-tensor hook around that call
  therefore moves exactly those inputs to host memory (and brings each back when its layer is
  recomputed), while everything the layer computes inside stays under the checkpoint's control.

- Shared adapter inputs (`share_adapter_inputs`, LoRA under bf16 autocast): peft casts each
  adapter's input to the adapter's fp32 and autocast casts it back to bf16 for the matmul, so
  every adapter keeps its own bf16 copy of its input for backward (q, k and v three of the same
  norm output) and an fp32 copy lives while peft's forward runs. Without the round trip the
  adapters take the bf16 input as it is (the same values) and keep the one tensor.

The loss function lives here rather than in `trainer.loss` because `trainer.loss` defines what
is computed (which positions, how normalised) and this module how it is made to fit.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from longdata.trainer.config import DEFAULT_MLP_CHUNK_TOKENS
from longdata.trainer.model import decoder_layers


def _target_cross_entropy(
    output_layer: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    return F.cross_entropy(output_layer(hidden).float(), labels, reduction="none")


def tiled_target_losses(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    output_layer: torch.nn.Module,
    chunk_tokens: int = 0,
) -> torch.Tensor:
    """Per-target cross-entropy of `output_layer(hidden)` [N] for hidden [N, H], labels [N].

    With `chunk_tokens` > 0 at most that many targets' logits exist at once, in forward and in
    backward (each chunk is recomputed when its gradient is needed). 0: all at once.
    """
    if chunk_tokens <= 0 or len(labels) <= chunk_tokens:
        return _target_cross_entropy(output_layer, hidden, labels)
    score = partial(_target_cross_entropy, output_layer)
    pieces = [
        checkpoint(score, hidden_chunk, label_chunk, use_reentrant=False)
        if torch.is_grad_enabled()
        else score(hidden_chunk, label_chunk)
        for hidden_chunk, label_chunk in zip(
            hidden.split(chunk_tokens), labels.split(chunk_tokens), strict=True
        )
    ]
    return torch.cat(pieces)


# ---------------------------------------------------------------------------------------------
# Shared adapter inputs


def share_adapter_inputs(model: torch.nn.Module) -> None:
    """Let every peft adapter take its input in the dtype it comes in, for training under bf16
    autocast only (without autocast a bf16 input needs the cast to meet an fp32 adapter).

    A bf16 -> fp32 -> bf16 round trip is exact, so the adapters compute the same products; what
    goes is an fp32 copy of each input while peft's forward runs and a bf16 copy per adapter
    kept for backward: 40 KiB per token at the Llama-3.1-8B step's peak (docs/MEMORY.md). The
    switch is peft's own (`cast_input_dtype_enabled`, LoRA layers since peft 0.15).
    """
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False


# ---------------------------------------------------------------------------------------------
# Tiled MLP


class _TiledForward:
    """A module's forward run over chunks of its flattened tokens, each chunk checkpointed."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], chunk_tokens: int) -> None:
        self.forward = forward
        self.chunk_tokens = chunk_tokens

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        tokens = hidden.reshape(-1, hidden.shape[-1])
        if len(tokens) <= self.chunk_tokens:
            return self.forward(hidden)
        pieces = [
            checkpoint(self.forward, chunk, use_reentrant=False)
            if torch.is_grad_enabled()
            else self.forward(chunk)
            for chunk in tokens.split(self.chunk_tokens)
        ]
        return torch.cat(pieces).reshape(*hidden.shape[:-1], -1)


def enable_tiled_mlp(model: torch.nn.Module, chunk_tokens: int = DEFAULT_MLP_CHUNK_TOKENS) -> None:
    """Run every decoder layer's `mlp` over chunks of `chunk_tokens` tokens.

    The MLP's forward is replaced on the instance, so parameter names (checkpoints, LoRA target
    names, FSDP units) stay as they were. Calling it again changes the chunk size.
    """
    if chunk_tokens < 1:
        raise ValueError(f"mlp_chunk_tokens must be >= 1, not {chunk_tokens}")
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            raise ValueError(f"{type(layer).__name__} has no `mlp` to tile")
        if isinstance(mlp.forward, _TiledForward):
            mlp.forward.chunk_tokens = chunk_tokens
        else:
            mlp.forward = _TiledForward(mlp.forward, chunk_tokens)


# ---------------------------------------------------------------------------------------------
# Offloaded activation checkpoints


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors go to (pinned) host memory and come back to their device when unpacked.

    A tensor already on the CPU is kept as it is: on a CPU run there is nowhere to offload to,
    and a copy would only double it. `host_bytes` counts the saved tensors held in host memory
    now (offloaded copies and CPU tensors alike).
    """

    def __init__(self) -> None:
        self.host_bytes = 0
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> Any:
        if tensor.device.type == "cpu":
            self._count(tensor)
            return tensor
        host = torch.empty(
            tensor.size(),
            dtype=tensor.dtype,
            layout=tensor.layout,
            pin_memory=torch.cuda.is_available(),
        )
        # Safe without a sync: the copy back to the device is queued on the same stream.
        host.copy_(tensor, non_blocking=True)
        self._count(host)
        return tensor.device, host

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)

    def _count(self, host: torch.Tensor) -> None:
        size = host.numel() * host.element_size()
        self.host_bytes += size
        weakref.finalize(host, self._released, size)

    def _released(self, size: int) -> None:
        self.host_bytes -= size


class _OffloadingCheckpoint:
    """A layer's checkpoint function called under `HostOffload`: the inputs the checkpoint
    saves (the layer's input hidden state) are held on the host until its recomputation."""

    def __init__(self, checkpoint_function: Callable[..., Any], offload: HostOffload) -> None:
        self.checkpoint_function = checkpoint_function
        self.offload = offload

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.offload:
            return self.checkpoint_function(*args, **kwargs)


def enable_activation_offload(
    model: torch.nn.Module, offload_layers: int | None = None
) -> HostOffload:
    """Offload the hidden states that activation checkpointing keeps to host memory.

    Needs transformers' gradient checkpointing on (`model.gradient_checkpointing_enable()`):
    without it a layer keeps all its intermediate activations, not just its input. With
    `offload_layers` k, only the first k layers' checkpoints go to the host and the rest stay on
    the device: a split for when neither memory alone holds them all (None: every layer).
    Returns the hook, whose `host_bytes` tells how much it holds on the host.
    """
    layers = decoder_layers(model)
    if not all(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        raise ValueError(
            "offload_activations moves the checkpointed hidden states to the host: turn on "
            "gradient_checkpointing as well"
        )
    if offload_layers is None:
        offload_layers = len(layers)
    if not 0 <= offload_layers <= len(layers):
        raise ValueError(f"offload_layers must be 0..{len(layers)} (the model's layers)")
    offload = HostOffload()
    for layer in layers[:offload_layers]:
        current = layer._gradient_checkpointing_func
        if isinstance(current, _OffloadingCheckpoint):
            current = current.checkpoint_function
        layer._gradient_checkpointing_func = _OffloadingCheckpoint(current, offload)
    return offload


# ---------------------------------------------------------------------------------------------
# Measuring


class PeakTensorMemory(TorchDispatchMode):
    """The peak bytes of tensor storage allocated inside the block and alive at once.

    Works on any device, the CPU included (where torch keeps no allocator statistics): every
    operator's outputs are followed until their storage is freed. Tensors that existed before
    the block (weights, optimizer state) are not counted; add them. Slows every operator, so
    it is for measuring small shapes (the planner's test), not for training.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._tracked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        outputs = func(*args, **(kwargs or {}))
        # A view, an in-place or an out= result shares an input's storage: nothing new was
        # allocated (counting it would count, e.g., a weight's transpose as a weight-sized copy).
        inputs = {
            value.untyped_storage().data_ptr()
            for value in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(value, torch.Tensor) and value.device.type != "meta"
        }
        for value in torch.utils._pytree.tree_leaves(outputs):
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                storage = value.untyped_storage()
                if storage.data_ptr() not in inputs or storage.nbytes() == 0:
                    self._follow(storage)
        return outputs

    def _follow(self, storage: torch.UntypedStorage) -> None:
        if storage in self._tracked:
            return
        size = storage.nbytes()
        self._tracked[storage] = size
        weakref.finalize(storage, self._freed, size)
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _freed(self, size: int) -> None:
        self.live_bytes -= size


# What a step allocates depends on its tensors' shapes, not their values; these are the operators
# that take nearly all of a measured step's time (aten.mm alone 96% of a bf16 one, profiled).
_PRODUCTS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
}


class ShapesOnly(TorchDispatchMode):
    """Matrix products return zeros of the shape, dtype, layout and device they would have,
    without the arithmetic. Enter it before `PeakTensorMemory` to measure a step's peak in
    seconds: a CPU without bf16 instructions multiplies bf16 matrices ~50x slower than fp32,
    and the peak is the same byte for byte (tests/test_memory.py compares the two). The values
    it leaves are meaningless, so nothing computed under it is for anything but its bytes.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func not in _PRODUCTS:
            return func(*args, **kwargs)
        device = next(
            value.device
            for value in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(value, torch.Tensor)
        )
        on_meta = torch.utils._pytree.tree_map_only(
            torch.Tensor, lambda value: value.to("meta"), (args, kwargs)
        )
        shaped = func(*on_meta[0], **on_meta[1])
        result = torch.empty_strided(
            shaped.shape, shaped.stride(), dtype=shaped.dtype, device=device
        )
        return result.zero_()
