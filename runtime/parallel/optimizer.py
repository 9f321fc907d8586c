"""The optimizer of one model chunk: AdamW as GPT-3 and Megatron-LM train it, and for zero 1 its state sharded
over the replicas mesh (ZeRO stage 1, Rajbhandari et al. 2020, section 5.1: P_os).

zero 1 is ShardedOptimizer, ZeroRedundancyOptimizer's arithmetic written out: each replica owns whole parameters
(greedily, largest first, to the rank owning the fewest elements so far), keeps AdamW's state for those only,
updates them from the all-reduced gradient and broadcasts the updated values to the other replicas, one flat
buffer per owner. torch.distributed.optim.ZeroRedundancyOptimizer itself fails here twice (torch 2.13):
- under tensor parallelism the parameters are DTensors, which it cannot broadcast ("Operator c10d.broadcast_.default
  does not have a sharding strategy registered");
- a rank that owns no parameter of a param group (gpt-tiny's 1-D group all went to one of 2 ranks) keeps an empty
  group, and DCP's flattened optimizer state dict cannot load it (IndexError in _unflatten_optim_state_dict, which
  names a group by its first parameter): resuming such a run crashed.
Broadcast one parameter at a time, as ZeroRedundancyOptimizer does by default, gpt-tiny's 101 parameters took
47 ms a step over gloo on 2 CPU ranks, against 10 ms in one buffer per owner (2026-12-03, a step of 1.0 s).
Whole parameters make the shares only as even as the parameters' sizes allow: a replica may own none (a chunk
with fewer parameters than replicas; it holds no state and only receives), and where the replicas are about as
many as a chunk's parameters, the largest share exceeds the 1/dp of the state the planner prices. A flat
partition, as Megatron's distributed optimizer cuts the flattened buffer, is not written.
zero 2 and 3 shard the parameters themselves (FSDP2), so a plain AdamW over the shards is sharded too.

Checkpoints save each rank's own optimizer (local_optimizer): ShardedOptimizer's inner AdamW under zero 1."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
UNEVEN_WARN_BYTES = 256 * 2**20
"""ShardedOptimizer's largest share of the state above the even one that launch warns about (uneven_share)."""


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
    return ShardedOptimizer(groups, mesh, lr=lr, betas=BETAS)


def local_optimizer(opt) -> tuple[torch.optim.Optimizer, ...]:
    """The optimizers whose state this rank holds, as get_state_dict takes them: ZeRO-1's inner AdamW over the
    parameters it owns (none where it owns none), else opt."""
    if isinstance(opt, ShardedOptimizer):
        return (opt.optim,) if opt.optim is not None else ()
    return (opt,)


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


def uneven_share(opt) -> str | None:
    """A warning where ZeRO-1's whole-parameter shares leave one replica more than UNEVEN_WARN_BYTES of optimizer
    state above the even share (1/dp) that the plan's memory prices; None otherwise (and for any other optimizer)."""
    if not isinstance(opt, ShardedOptimizer) or opt.most_state_bytes - opt.even_state_bytes <= UNEVEN_WARN_BYTES:
        return None
    gib = 2**30
    return (f"ZeRO-1 gives each replica whole parameters, and here one replica holds {opt.most_state_bytes / gib:.2f} GiB of "
            f"optimizer state, {(opt.most_state_bytes - opt.even_state_bytes) / gib:.2f} GiB above the even share the plan's "
            "memory prices: its peak may exceed the prediction by as much (zero 2 shards every parameter evenly)")


class ShardedOptimizer:
    """ZeRO-1 over `mesh` (see the module docstring), for plain and DTensor parameters. param_groups are this
    rank's (its owned parameters only, groups it owns nothing of left out): the learning-rate schedule sets them,
    as on any optimizer."""

    def __init__(self, groups: list[dict], mesh: DeviceMesh, **defaults):
        self.group, me = mesh.get_group(), mesh.get_local_rank()
        owner = partition(groups, mesh.size())
        self.params = [p for g in groups for p in g["params"]]
        self.rank = dist.get_rank()
        # What step broadcasts, worked out once: per owner (global rank) and dtype, that owner's parameters.
        self.buckets: dict[tuple[int, torch.dtype], list[nn.Parameter]] = {}
        for p in self.params:
            self.buckets.setdefault((dist.get_global_rank(self.group, owner[id(p)]), p.dtype), []).append(p)
        # Each replica's share of the state (AdamW's two moments), against the even share the planner prices.
        owned = [0] * mesh.size()
        for p in self.params:
            owned[owner[id(p)]] += (p.to_local() if isinstance(p, DTensor) else p).numel() * 2 * p.element_size()
        self.most_state_bytes, self.even_state_bytes = max(owned), sum(owned) / len(owned)
        mine = [g for g in ({**g, "params": [p for p in g["params"] if owner[id(p)] == me]} for g in groups) if g["params"]]
        # A replica that owns no parameter (a chunk with fewer parameters than replicas) holds no state and steps
        # nothing; it still receives every owner's broadcast. torch refuses an optimizer over no parameters.
        self.optim = torch.optim.AdamW(mine, **defaults) if mine else None

    @property
    def param_groups(self) -> list[dict]:
        # Looked up each time: loading a checkpoint gives the inner optimizer a new list of groups.
        return self.optim.param_groups if self.optim is not None else []

    @torch.no_grad()
    def step(self) -> None:
        """The owners' AdamW step, then one broadcast per owner (and dtype) of its parameters' local shards,
        flattened into one buffer, as ZeroRedundancyOptimizer's parameters_as_bucket_view sends them. One buffer
        at a time: the step holds at most one owner's share (about params / dp) more."""
        if self.optim is not None:
            self.optim.step()
        for (src, dtype), params in self.buckets.items():
            same = [p.to_local() if isinstance(p, DTensor) else p for p in params]
            mine = src == self.rank
            flat = (torch.cat([t.reshape(-1) for t in same]) if mine
                    else torch.empty(sum(t.numel() for t in same), dtype=dtype, device=same[0].device))
            dist.broadcast(flat, src=src, group=self.group)
            if not mine:
                for t, piece in zip(same, flat.split([t.numel() for t in same])):
                    t.copy_(piece.view_as(t))
            del flat  # before the next owner's buffer is made

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
