"""Data parallelism on the dp submesh: DDP, or FSDP2 `fully_shard` when the plan shards the optimizer
(plan.distributed_optimizer). Applied last, after the pipeline split, TP and recomputation.

Written by hand: the gradient all-reduce of unsharded data parallelism combined with tensor or pipeline
parallelism (all_reduce_gradients: bucketed, once all microbatches are done; the same arithmetic as DDP).
DDP falls short in both on torch 2.13 (gloo, checked):
- with TP: DDP does not hold DTensor parameters; its 2-D workaround (torch.distributed.tensor.parallel.ddp,
  applied by DDP itself given a sliced mesh) swaps the module's parameter objects around every forward, after
  which torch.distributed.checkpoint's get_state_dict cannot map the optimizer's parameters to FQNs
  (KeyError); torchtitan refuses DDP with TP for the same reason.
- with pipelining: PipelineStage's runtime shape inference runs an extra forward/backward through the DDP
  module in the first step, so DDP marks every parameter ready twice and its bucket rebuild fails an internal
  assert ("rebuilt parameter indices size is not same as original model parameters size") in step two.
The cost is DDP's overlap of the reduction with backward; under pipelining DDP reduces only during the last
microbatch's backward anyway, and Megatron-LM reduces after the pipeline flush by default too."""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

BUCKET_BYTES = 25 * 2**20
"""Gradients per all-reduce in all_reduce_gradients (DDP's default bucket_cap_mb is 25)."""


def apply_ddp(chunk: nn.Module, dp_mesh: DeviceMesh) -> nn.Module:
    """Gradient all-reduce over dp with DDP's buckets, overlapped with backward (pure data parallelism only;
    see the module docstring)."""
    return DistributedDataParallel(chunk, process_group=dp_mesh.get_group())


def apply_fsdp(chunk: nn.Module, dp_mesh: DeviceMesh, *, pipelined: bool) -> nn.Module:
    """FSDP2: weights, gradients and optimizer state sharded over dp, one all-gather group per block.

    Under pipelining the weights stay gathered between a stage's microbatches (reshard_after_forward=False),
    as torchtitan does, instead of an all-gather per microbatch."""
    # With TP the head returns its local logit shard, a view of a DTensor's local tensor; FSDP2 warns that an
    # in-place op on it would skip its hook. The loss (tensor.cross_entropy) only reads it.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    reshard = not pipelined
    for block in chunk.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard)
    fully_shard(chunk, mesh=dp_mesh, reshard_after_forward=reshard)
    return chunk


def needs_manual_all_reduce(*, dp: int, tp: int, pipelined: bool, shard_optimizer: bool) -> bool:
    """True where neither DDP nor FSDP2 reduces the gradients: dp > 1 without a sharded optimizer, together
    with tp > 1 or pipelining."""
    return dp > 1 and not shard_optimizer and (tp > 1 or pipelined)


def apply_data_parallel(chunk: nn.Module, dp_mesh: DeviceMesh, *, shard_optimizer: bool, tp: int,
                        pipelined: bool) -> nn.Module:
    """FSDP2 when the plan shards the optimizer, else DDP; nothing when dp is 1, nor where DDP falls short
    (TP or pipelining: call all_reduce_gradients after the step's backward instead)."""
    if dp_mesh.size() == 1:
        return chunk
    if shard_optimizer:
        return apply_fsdp(chunk, dp_mesh, pipelined=pipelined)
    if needs_manual_all_reduce(dp=dp_mesh.size(), tp=tp, pipelined=pipelined, shard_optimizer=shard_optimizer):
        return chunk
    return apply_ddp(chunk, dp_mesh)


def all_reduce_gradients(chunks: Iterable[nn.Module], dp_mesh: DeviceMesh) -> None:
    """Average every gradient over dp, in buckets of BUCKET_BYTES (a DTensor gradient: its local shard)."""
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
             for chunk in chunks for p in chunk.parameters() if p.grad is not None]
    group, n = dp_mesh.get_group(), dp_mesh.size()
    bucket: list[torch.Tensor] = []
    size = 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= BUCKET_BYTES or i == len(grads) - 1:
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)  # SUM: gloo has no AVG
            flat.div_(n)
            for t, r in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                t.copy_(r)
            bucket, size = [], 0
