"""Data parallelism on the dp submesh: DDP, or FSDP2 `fully_shard` when the plan shards the optimizer
(plan.distributed_optimizer). Applied last, after the pipeline split, TP and recomputation."""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(chunk: nn.Module, dp_mesh: DeviceMesh) -> nn.Module:
    """Gradient all-reduce over dp with DDP's buckets, overlapped with backward.

    Given a dp mesh sliced from the (pp, dp, tp) mesh, DDP itself turns TP's DTensor parameters into local
    tensors for its buckets and back into DTensors around each forward (torch.distributed.tensor.parallel.ddp)."""
    return DistributedDataParallel(chunk, device_mesh=dp_mesh)


def apply_fsdp(chunk: nn.Module, dp_mesh: DeviceMesh, *, pipelined: bool) -> nn.Module:
    """FSDP2: weights, gradients and optimizer state sharded over dp, one all-gather group per block.

    Under pipelining the weights stay gathered between a stage's microbatches (reshard_after_forward=False),
    as torchtitan does, instead of an all-gather per microbatch."""
    reshard = not pipelined
    for block in chunk.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard)
    fully_shard(chunk, mesh=dp_mesh, reshard_after_forward=reshard)
    return chunk


def apply_data_parallel(chunk: nn.Module, dp_mesh: DeviceMesh, *, shard_optimizer: bool, pipelined: bool) -> nn.Module:
    """FSDP2 when the plan shards the optimizer, DDP otherwise; nothing when dp is 1."""
    if dp_mesh.size() == 1:
        return chunk
    if shard_optimizer:
        return apply_fsdp(chunk, dp_mesh, pipelined=pipelined)
    return apply_ddp(chunk, dp_mesh)
