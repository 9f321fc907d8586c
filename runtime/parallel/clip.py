"""Gradient-norm clipping over the whole model, whatever the layout: torch.nn.utils.clip_grad_norm_'s semantics
(the 2-norm of every gradient; scale all of them by max_norm / (norm + 1e-6) when that is below 1) with the
norm taken over every pipeline stage, tensor-parallel shard and FSDP2 shard, as one process would take it.

torchtitan's dist_utils.clip_grad_norm_ (torch.nn.utils.get_total_norm over DTensors, full_tensor, then an
all-reduce of norm^2 over the pp mesh) is the model. Here the parameters of one chunk are not all DTensors on
one mesh (with TP but no SP the norms stay plain tensors; FSDP2 gives 1-D or 2-D DTensors), so each rank sums
the squares of its local shards, each weighted by the share of the world's copies of that shard it is, and one
all-reduce over all ranks adds them: every element of the model counts exactly once."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate


def _reduced(param: nn.Parameter) -> torch.Tensor:
    """param.grad with any pending sum done: the norm weights under sequence parallelism get Partial(sum)
    gradients (each tp rank's part of the sequence); they are all-reduced here, once, instead of inside the
    optimizer's step, which would otherwise do the same to apply them to their Replicate parameter."""
    g = param.grad
    if isinstance(g, DTensor) and any(p.is_partial() for p in g.placements):
        param.grad = g = g.redistribute(g.device_mesh, [Replicate() if p.is_partial() else p for p in g.placements])
    return g


def _local_and_shards(grad: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rank's part of a gradient and into how many distinct parts the gradient is cut: over every mesh dim that
    does not replicate it (Partial sums are reduced first, _reduced). Not `is_shard()`: FSDP2's dim of a TP-sharded
    weight is a _StridedShard, which is no Shard (torch 2.13), and counting it as a copy halved those weights'
    share of the norm under tp x dp with zero 2/3."""
    if isinstance(grad, DTensor):
        shards = math.prod(grad.device_mesh.size(i) for i, p in enumerate(grad.placements) if not p.is_replicate())
        return grad.to_local(), shards
    return grad, 1


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all of `tensors` together, in their dtype, as torch.nn.utils.clip_grad_norm_ takes it (one
    fused pass per dtype and device). Upcasting each gradient to float64 first, as this did before, made a copy
    of every gradient: 20-35 ms a step for gpt-tiny's 10.5M gradients on one CPU thread, against about 2 ms."""
    total = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if total is not None:
        return total(tensors, 2.0, foreach=None)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def clip_grad_norm_(chunks: Iterable[nn.Module], max_norm: float, mesh: DeviceMesh) -> float:
    """Clip this rank's gradients in place so the whole model's gradient has norm at most max_norm (0: no
    clipping, the norm is still computed); returns the norm before clipping. Call after the data-parallel
    reduction (DDP, FSDP2 or all_reduce_gradients), on every rank. mesh: the (pp, dp, cp, tp) world mesh."""
    params = {id(p): p for chunk in chunks for p in chunk.parameters() if p.grad is not None}
    # A pipeline stage's parameters live on its dp * cp * tp ranks: a plain (replicated) gradient is on all of them,
    # a gradient cut into k shards has each shard on (dp * cp * tp) / k of them.
    replicas = mesh.size() // mesh["pp"].size()
    device = next((p.grad.device for p in params.values()), torch.device("cpu"))
    by_weight: dict[float, list[torch.Tensor]] = {}
    for p in params.values():
        local, shards = _local_and_shards(_reduced(p))
        by_weight.setdefault(shards / replicas, []).append(local)
    sum_sq = torch.zeros((), dtype=torch.float64, device=device)
    for weight, tensors in by_weight.items():
        sum_sq += _norm(tensors).double().square() * weight
    dist.all_reduce(sum_sq)  # SUM over every rank of the world
    norm = float(sum_sq.sqrt())
    coef = max_norm / (norm + 1e-6)
    if max_norm > 0 and coef < 1.0:
        for tensors in by_weight.values():
            for g in tensors:
                g.mul_(coef)
    return norm
