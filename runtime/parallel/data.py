"""Data parallelism by ZeRO stage (Rajbhandari et al. 2020), as planner/zero.py's ZERO_MODES says, over the
replicas mesh: dp and cp flattened (runtime.mesh), since context parallelism replicates the weights too. Applied
last, after the pipeline split, TP, CP, recomputation and compile.

- zero 0: DDP, gradients all-reduced once per step, after the last microbatch's backward (no_sync before it).
- zero 1: the same reduction, and the optimizer state sharded (runtime.parallel.optimizer).
- zero 2: FSDP2 fully_shard(reshard_after_forward=False): gradients reduce-scattered after every microbatch's
  backward and kept as this rank's shard; the weights all-gathered by the step's first forward and kept whole
  through every microbatch, resharded once all are done (finish_step), before the optimizer step.
- zero 3: FSDP2 fully_shard(reshard_after_forward=True): as zero 2, but the weights are all-gathered for every
  microbatch's forward and again for its backward, and freed after each.

The same holds under pipelining: PipelineStage (torch 2.13) would otherwise turn FSDP2's gradient sync off for every
microbatch and reduce once after the last (accumulating whole, unsharded gradients: the memory that ZeRO-2
exists to save), so the stages are given a plain wrapper around the FSDP2 chunk (runtime.parallel.pipeline), and
FSDP2 runs with its own autograd hooks as it does without pipelining.

Written by hand: the gradient all-reduce of zero 0/1 combined with tensor or pipeline parallelism
(all_reduce_gradients: bucketed, once all microbatches are done; the same arithmetic as DDP).
DDP falls short in both on torch 2.13 (gloo, checked):
- with TP: DDP does not hold DTensor parameters; its 2-D workaround (torch.distributed.tensor.parallel.ddp,
  applied by DDP itself given a sliced mesh) swaps the module's parameter objects around every forward, after
  which torch.distributed.checkpoint's get_state_dict cannot map the optimizer's parameters to FQNs
  (KeyError); torchtitan refuses DDP with TP for the same reason.
- with pipelining: PipelineStage's runtime shape inference runs an extra forward/backward through the DDP
  module in the first step, so DDP marks every parameter ready twice and its bucket rebuild fails an internal
  assert ("rebuilt parameter indices size is not same as original model parameters size") in step two.
The cost is DDP's overlap of the reduction with backward; under pipelining DDP reduces only during the last
microbatch's backward anyway, and Megatron-LM reduces after the pipeline flush by default too. Context
parallelism alone does not stop DDP (its all-gather's backward runs inside autograd, on the cp group)."""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from planner.zero import ZERO_MODES, gradient_reducer

BUCKET_BYTES = 25 * 2**20
"""Gradients per all-reduce in all_reduce_gradients (DDP's default bucket_cap_mb is 25)."""


def apply_ddp(chunk: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Gradient all-reduce over the replicas with DDP's buckets, overlapped with backward (no tp, no pipelining:
    see the module docstring). The gradients are views into DDP's buckets (gradient_as_bucket_view), so they
    take no memory besides the buckets, and the optimizer zeroes them in place (zero_grad_to_none)."""
    return DistributedDataParallel(chunk, process_group=mesh.get_group(), gradient_as_bucket_view=True)


def apply_fsdp(chunk: nn.Module, mesh: DeviceMesh, *, zero: int, bf16: bool = False, pipelined_microbatches: int = 0) -> nn.Module:
    """FSDP2 over the replicas mesh, one all-gather group per block plus one for the rest of the chunk (embedding,
    final norm, head); zero 2 or 3 as the module docstring says. bf16 (CUDA): torchtitan's mixed precision, the
    weights all-gathered in bf16 and the gradients reduced in fp32 into fp32 master shards (no autocast).

    pipelined_microbatches (pp > 1): the reduce-scatter divides by replicas * microbatches, and the pipeline schedule
    must not scale the gradients itself (build_schedule's scale_grads=False): its scaling, after the last backward,
    walks the chunk's registered parameters, which under zero 2 are still the gathered weights, whose gradients
    FSDP2 has already moved to the shards, so it would scale nothing."""
    # With TP the head returns its local logit shard, a view of a DTensor's local tensor; FSDP2 warns that an
    # in-place op on it would skip its hook. The loss (tensor.cross_entropy) only reads it.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mode = ZERO_MODES[zero]
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in chunk.layers.values():
        fully_shard(block, mesh=mesh, reshard_after_forward=mode.reshard_after_forward, mp_policy=mp)
    fully_shard(chunk, mesh=mesh, reshard_after_forward=mode.reshard_after_forward, mp_policy=mp)
    # zero 2 keeps the weights gathered from the step's first forward to its last backward (finish_step reshards
    # them); zero 3 frees them after every forward and every backward.
    chunk.set_reshard_after_backward(mode.reshard_after_forward)
    if pipelined_microbatches:
        for module in chunk.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(float(mesh.size() * pipelined_microbatches))
                if mesh.device_type == "cpu":  # gloo has no PREMUL_SUM: sum, divided before and after
                    module.set_force_sum_reduction_for_comms(True)
    return chunk


def apply_data_parallel(chunk: nn.Module, mesh: DeviceMesh, *, zero: int, tp: int, pipelined_microbatches: int = 0,
                        bf16: bool = False) -> nn.Module:
    """The plan's ZeRO stage on one model chunk over the replicas mesh (dp * cp ranks): DDP for zero 0/1 where it
    can (planner.zero.gradient_reducer), FSDP2 for zero 2/3; nothing over one replica, where every stage is the same.
    pipelined_microbatches: the plan's microbatches under pipelining (pp > 1), 0 without."""
    reducer = gradient_reducer(zero=zero, replicas=mesh.size(), tp=tp, pipelined=pipelined_microbatches > 0)
    if reducer == "fsdp2":
        return apply_fsdp(chunk, mesh, zero=zero, bf16=bf16, pipelined_microbatches=pipelined_microbatches)
    if reducer == "ddp":
        return apply_ddp(chunk, mesh)
    return chunk  # one replica, or reduced by hand (all_reduce_gradients)


def finish_step(chunks: Iterable[nn.Module]) -> None:
    """After the step's last backward: free the whole weights that zero 2 kept gathered through the microbatches,
    so the optimizer updates the shards (nothing for zero 3, already resharded, nor for DDP)."""
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def zero_grad_to_none(chunk: nn.Module) -> bool:
    """Whether the optimizer should drop this chunk's gradients after the step (set_to_none): not under DDP, whose
    gradients are views into its persistent buckets and are zeroed in place instead."""
    return not isinstance(chunk, DistributedDataParallel)


def all_reduce_gradients(chunks: Iterable[nn.Module], mesh: DeviceMesh) -> None:
    """Average every gradient over the replicas, in buckets of BUCKET_BYTES (a DTensor gradient: its local shard)."""
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
             for chunk in chunks for p in chunk.parameters() if p.grad is not None]
    group, n = mesh.get_group(), mesh.size()
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
