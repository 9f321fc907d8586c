"""The optimizer of one model chunk: AdamW as GPT-3 and Megatron-LM train it, and for zero 1 its state sharded
over the replicas mesh (ZeRO stage 1, Rajbhandari et al. 2020, section 5.1: P_os).

zero 1 is torch.distributed.optim.ZeroRedundancyOptimizer: each replica owns whole parameters (greedily, largest
first, to the rank owning the fewest elements so far), keeps AdamW's state for those only, updates them from the
all-reduced gradient and broadcasts the updated values to the other replicas. Under tensor parallelism the
parameters are DTensors, which ZeroRedundancyOptimizer cannot broadcast (torch 2.13: "Operator
c10d.broadcast_.default does not have a sharding strategy registered"), so ShardedOptimizer does the same
arithmetic by hand on each parameter's local shard: the same partition, the same AdamW update on the owner, the
same broadcast. zero 2 and 3 shard the parameters themselves (FSDP2), so a plain AdamW over the shards is sharded too.

Checkpoints save each rank's own optimizer (local_optimizer): the inner AdamW of either ZeRO-1 optimizer."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor

BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1


def param_groups(chunk: nn.Module) -> list[dict]:
    """Weight decay 0.1 on matrices only (GPT-3, Brown et al. 2020, appendix B; Megatron-LM)."""
    params = [p for p in chunk.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_optimizer(chunk: nn.Module, lr: float, *, zero: int = 0, mesh: DeviceMesh | None = None):
    """AdamW over the chunk's parameters; for zero 1 over more than one replica, its state sharded over `mesh`."""
    groups = param_groups(chunk)
    if zero != 1 or mesh is None or mesh.size() == 1:
        return torch.optim.AdamW(groups, lr=lr, betas=BETAS)
    if any(isinstance(p, DTensor) for g in groups for p in g["params"]):
        return ShardedOptimizer(groups, mesh, lr=lr, betas=BETAS)
    return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, process_group=mesh.get_group(),
                                   lr=lr, betas=BETAS)


def local_optimizer(opt) -> torch.optim.Optimizer:
    """The optimizer whose state this rank holds: ZeRO-1's inner AdamW over the parameters it owns, else opt."""
    return opt.optim if isinstance(opt, (ZeroRedundancyOptimizer, ShardedOptimizer)) else opt


def partition(groups: list[dict], ranks: int) -> dict[int, int]:
    """{id(parameter): owning rank}: group by group, largest parameter first, each to the rank that owns the
    fewest elements so far, counted over all groups (ZeroRedundancyOptimizer's partition)."""
    owned, owner = [0] * ranks, {}
    for g in groups:
        for p in sorted(g["params"], key=lambda t: t.numel(), reverse=True):  # stable: ties keep their order
            rank = owned.index(min(owned))
            owner[id(p)] = rank
            owned[rank] += p.numel()
    return owner


class ShardedOptimizer:
    """ZeroRedundancyOptimizer's arithmetic for DTensor parameters (see the module docstring). param_groups are
    this rank's (its owned parameters only): the learning-rate schedule sets them, as on any optimizer."""

    def __init__(self, groups: list[dict], mesh: DeviceMesh, **defaults):
        self.group, me = mesh.get_group(), mesh.get_local_rank()
        owner = partition(groups, mesh.size())
        self.params = [p for g in groups for p in g["params"]]
        self.sources = [dist.get_global_rank(self.group, owner[id(p)]) for p in self.params]
        self.optim = torch.optim.AdamW([{**g, "params": [p for p in g["params"] if owner[id(p)] == me]} for g in groups],
                                       **defaults)

    @property
    def param_groups(self) -> list[dict]:
        # Looked up each time: loading a checkpoint gives the inner optimizer a new list of groups.
        return self.optim.param_groups

    @torch.no_grad()
    def step(self) -> None:
        self.optim.step()
        for p, src in zip(self.params, self.sources):
            dist.broadcast(p.to_local() if isinstance(p, DTensor) else p, src=src, group=self.group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
