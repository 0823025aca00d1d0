"""Multi-rank training: process groups, DDP / FSDP2 wrapping, and Ulysses sequence parallelism.

Launched by torchrun, every process calls `init_parallel`, which joins the env:// process group
(gloo on CPU, nccl on CUDA) and arranges the world as a DP x SP mesh:

    rank = dp_rank * sp_size + sp_rank

so the `sp_size` ranks of one sequence-parallel (SP) group are consecutive. That is the layout
the data loader's `replication=sp_size` assumes: consecutive ranks receive the same rows, so
every SP group trains on one row stream and the DP groups on disjoint ones.

Gradients. Every rank computes a *share* of one global step loss: its rows (DP) and, within a
row, the targets predicted by its sequence shard (SP), all divided by the step's global
normaliser (target tokens or samples over every DP rank). The gradient of the global loss is
the *sum* of the ranks' gradients, but DDP and FSDP *average* over the world, so each rank
back-propagates its share times the world size (`ParallelContext.gradient_scale`).

Sequence parallelism (DeepSpeed-Ulysses). A padded row of T tokens is cut into `sp_size`
contiguous shards of T / sp_size tokens (`shard_batch`). Embeddings, MLPs, norms and rotary
embeddings are per-token, so each rank runs them on its shard alone, with the shard's slice of
the row's position ids. Attention is not: before it, an all-to-all turns "all heads, my
sequence shard" into "my heads, the whole row"; the packing-aware backend then runs on whole
rows with the whole row's cu_seqlens / document_ids (samples may straddle shard boundaries),
and a second all-to-all turns the output back into sequence shards. Communication per layer is
O(T * hidden / sp_size) per rank, and activation memory per rank drops to about 1 / sp_size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from longdata.trainer.attention import (
    BACKEND_FUNCTIONS,
    IMPLEMENTATION_PREFIX,
    auto_attention,
    registered_suffix,
)
from longdata.trainer.config import PARALLEL_MODES
from longdata.trainer.loss import next_token_targets
from longdata.trainer.model import decoder_layers

# Collectives that do not complete in this time raise instead of hanging the job forever.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)

# Batch entries laid out along the sequence: each SP rank keeps its slice. Everything else
# (cu_seqlens, max_seqlen, document_ids, per-sample counts) describes the whole row and is kept
# whole: attention runs on whole rows and the loss normalisers are per sample.
SEQUENCE_KEYS = ("input_ids", "position_ids", "labels", "source_ids", "sample_ids")
NEXT_TOKEN_KEYS = ("next_labels", "next_sample_ids", "next_source_ids")


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in the DP x SP mesh (all sizes 1 in a single process)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    sp_size: int = 1
    dp_group: dist.ProcessGroup | None = None
    sp_group: dist.ProcessGroup | None = None
    owns_process_group: bool = False  # init_parallel started it, so shutdown_parallel ends it

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, writes metrics and saves checkpoints."""
        return self.rank == 0

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def gradient_scale(self) -> int:
        """Turns DDP's / FSDP's gradient average over ranks into the sum a shared loss needs."""
        return self.world_size

    def all_reduce_sum(self, tensor: torch.Tensor, over: str = "world") -> torch.Tensor:
        """Sum `tensor` in place over the whole world or over the DP group (`over="dp"`)."""
        if self.distributed:
            group = self.dp_group if over == "dp" else None
            device_tensor = tensor.to(self.device)
            dist.all_reduce(device_tensor, group=group)
            tensor.copy_(device_tensor)
        return tensor


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_parallel(sp_size: int = 1, device: str = "auto") -> ParallelContext:
    """Join torchrun's process group (if launched by torchrun) and build the DP x SP mesh.

    Outside torchrun this returns the single-process context, and `sp_size` must be 1.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not launched_by_torchrun():
        if sp_size != 1:
            raise ValueError(f"sp={sp_size} needs several processes: launch with torchrun")
        return ParallelContext(device=torch.device(device))
    if device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device(device)
    owns_process_group = not dist.is_initialized()
    if owns_process_group:
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://", timeout=COLLECTIVE_TIMEOUT)
    world_size = dist.get_world_size()
    if world_size % sp_size:
        raise ValueError(f"world size {world_size} is not divisible by sp={sp_size}")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(
        torch_device.type, (world_size // sp_size, sp_size), mesh_dim_names=("dp", "sp")
    )
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=world_size,
        sp_size=sp_size,
        device=torch_device,
        dp_group=mesh.get_group("dp"),
        sp_group=mesh.get_group("sp"),
        owns_process_group=owns_process_group,
    )


def shutdown_parallel(context: ParallelContext) -> None:
    """Leave the process group if `init_parallel` joined it (a caller's own group stays)."""
    if context.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(module: nn.Module, parallel: str, context: ParallelContext) -> nn.Module:
    """Wrap the module whose forward computes the loss in DDP, or shard it with FSDP2.

    Wrap before building the optimizer: FSDP2 replaces parameters by sharded DTensors. With
    FSDP2 every decoder layer is its own unit (its weights are gathered just for its forward
    and backward); the root unit holds the embeddings, final norm and output layer.
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, not {parallel!r}")
    if not context.distributed:
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.device.index] if context.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(module):
        fully_shard(layer)
    fully_shard(module)
    return module


# ---------------------------------------------------------------------------------------------
# Ulysses sequence parallelism


def kv_replication(num_heads: int, num_kv_heads: int, sp_size: int) -> int:
    """How many times each key/value head is repeated so the SP ranks can split them evenly.

    Every SP rank takes num_heads / sp_size query heads, so num_heads must divide by sp_size.
    Key/value heads (GQA) that do not divide by sp_size (e.g. one kv head on 2 ranks) are
    repeated r = sp_size / gcd(num_kv_heads, sp_size) times, each copy next to its original:
    query head h still meets a copy of its own kv head, at the cost of r times the kv traffic.
    """
    if num_heads % sp_size:
        raise ValueError(
            f"sequence parallelism splits attention heads across ranks: the model's "
            f"{num_heads} query heads do not divide by sp={sp_size}; choose an sp that "
            f"divides {num_heads}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    return sp_size // math.gcd(num_kv_heads, sp_size)


class _AllToAll(torch.autograd.Function):
    """Split a tensor along `scatter_dim` across the group, concatenate what arrives along
    `gather_dim`; the backward pass is the same exchange with the two dimensions swapped."""

    @staticmethod
    def forward(
        ctx: Any, tensor: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any
    ) -> torch.Tensor:
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _exchange(tensor, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        scatter_dim, gather_dim = ctx.dims
        return _exchange(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def _exchange(tensor: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any) -> torch.Tensor:
    size = dist.get_world_size(group)
    # Chunk i goes to rank i; all_to_all_single exchanges equal blocks of dim 0.
    outgoing = torch.stack(tensor.chunk(size, dim=scatter_dim)).contiguous()
    incoming = torch.empty_like(outgoing)
    dist.all_to_all_single(incoming, outgoing, group=group)
    # Block i came from rank i: concatenated in rank order it is the whole gathered dimension.
    return torch.cat(incoming.unbind(0), dim=gather_dim)


def all_to_all(tensor: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any) -> torch.Tensor:
    """Differentiable all-to-all over `group` (gloo supports all_to_all_single in torch 2.14)."""
    return _AllToAll.apply(tensor, scatter_dim, gather_dim, group)


def ulysses_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    inner: Callable[..., tuple[torch.Tensor, None]],
    group: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over a sequence shard: heads <-> sequence all-to-all around `inner`.

    query [B, H, T/N, D] and key/value [B, H_kv, T/N, D] hold this rank's shard of the row;
    `inner` sees [B, H/N, T, D] (whole rows, this rank's heads) together with the packing
    metadata of the whole row, and the result goes back as [B, T/N, H, D].
    """
    sp_size = dist.get_world_size(group)
    repeats = kv_replication(query.shape[1], key.shape[1], sp_size)
    if repeats > 1:
        key = key.repeat_interleave(repeats, dim=1)
        value = value.repeat_interleave(repeats, dim=1)
    # Scatter heads (dim 1), gather the sequence (dim 2).
    query, key, value = (all_to_all(t, 1, 2, group) for t in (query, key, value))
    output, _ = inner(module, query, key, value, attention_mask, **kwargs)
    # output is [B, T, H/N, D]: scatter the sequence (dim 1), gather heads (dim 2).
    return all_to_all(output, 1, 2, group), None


def enable_sequence_parallel(model: nn.Module, backend: str, group: Any) -> None:
    """Make `model`'s attention run `backend` Ulysses-style over the SP `group`.

    Registers `longdata_ulysses_<backend>` (flash_attn as `dao_varlen`, see attention.py) with
    transformers' AttentionInterface (one SP group per process, so the registration is this
    process's) and switches the model to it.
    """
    from transformers import AttentionInterface

    config = model.config
    kv_replication(
        config.num_attention_heads, config.num_key_value_heads, dist.get_world_size(group)
    )
    suffix = registered_suffix(backend)  # rejects an unknown backend
    inner = auto_attention if backend == "auto" else BACKEND_FUNCTIONS[backend]
    name = f"{IMPLEMENTATION_PREFIX}ulysses_{suffix}"
    AttentionInterface.register(name, partial(ulysses_attention, inner=inner, group=group))
    model.set_attn_implementation(name)


def shard_batch(batch: Mapping[str, Any], sp_rank: int, sp_size: int) -> dict[str, Any]:
    """This SP rank's contiguous slice of a collated batch (row length divisible by sp_size).

    The shard's last position predicts the first token of the next shard, so the next-token
    targets are computed on the whole row first and then sliced with the positions that
    predict them: every target is scored by exactly one rank.
    """
    length = batch["input_ids"].shape[1]
    if length % sp_size:
        raise ValueError(
            f"row length {length} is not divisible by sp={sp_size}; collate with "
            "pad_to_multiple_of a multiple of sp"
        )
    shard_length = length // sp_size
    positions = slice(sp_rank * shard_length, (sp_rank + 1) * shard_length)
    shard = dict(batch)
    shard.update(zip(NEXT_TOKEN_KEYS, next_token_targets(batch), strict=True))
    for key in (*SEQUENCE_KEYS, *NEXT_TOKEN_KEYS):
        shard[key] = shard[key][:, positions]
    return shard
