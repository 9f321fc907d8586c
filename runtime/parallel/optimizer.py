"""The optimizer of one model chunk: AdamW as GPT-3 and Megatron-LM train it, and for zero 1 its state sharded
over the replicas mesh (ZeRO stage 1, Rajbhandari et al. 2020, section 5.1: P_os).

zero 1 is ShardedOptimizer, a flat partition as Megatron's distributed optimizer cuts its buffer: the chunk's
parameters of each param group (and dtype), flattened in order, are cut into one range of ceil(N/dp) elements per
replica, whatever the parameters' sizes. A replica's AdamW steps views of its range (a range may start or end inside
a parameter), so its state is 1/dp of the chunk's, as the planner prices it, and the update is written straight
into the weights. Then each owner broadcasts its range, in turn, and the others copy it into their weights.
- Why not torch.distributed.optim.ZeroRedundancyOptimizer (torch 2.13): under tensor parallelism the parameters are
  DTensors, which it cannot broadcast ("Operator c10d.broadcast_.default does not have a sharding strategy
  registered"); a rank owning no parameter of a param group keeps an empty group, which DCP's flattened optimizer
  state cannot load (IndexError in _unflatten_optim_state_dict); and it gives each replica whole parameters, so
  where a chunk has about as many parameters as replicas (405B's 72-parameter chunks at dp 128) one replica holds
  several times the 1/dp share the plan's memory prices.
- Why per-owner broadcasts and not one all-gather: the all-gather's output is the whole chunk, a transient of the
  weights' size; a broadcast holds one range (about params / dp) at a time, and where the range lies inside one
  parameter it lands in place. The bytes are an all-gather's (planner.terms prices the step's gather).
- AdamW is elementwise, so stepping views computes what AdamW over whole parameters computes, to the last bit but
  one: fused AdamW (adamw) takes a tensor's elements through a vector path and its tail through a scalar one, which
  may round an element differently once a range is cut inside a parameter.
zero 2 and 3 shard the parameters themselves (FSDP2), so a plain AdamW over the shards is sharded too.

Checkpoints save each rank's own optimizer: under zero 1 ShardedOptimizer.state_dict(), each bucket's state as one
DTensor sharded over the replicas, which DCP reshards when a run resumes at another dp (its AdamW's views are not
the model's parameters, so torch's get_state_dict cannot name them); local_optimizer's AdamW otherwise."""

from __future__ import annotations

import itertools
import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
STATE_NAMES = ("exp_avg", "exp_avg_sq")  # AdamW's (amsgrad off), besides its step count


def param_groups(chunk: nn.Module) -> list[dict]:
    """Weight decay 0.1 on matrices only (GPT-3, Brown et al. 2020, appendix B; Megatron-LM)."""
    params = [p for p in chunk.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_optimizer(chunk: nn.Module, lr: float, *, zero: int = 0, mesh: DeviceMesh | None = None):
    """AdamW over the chunk's parameters; for zero 1 its state sharded over `mesh` (at one replica too, so that a
    zero-1 checkpoint has one form at every dp)."""
    groups = param_groups(chunk)
    if zero != 1 or mesh is None:
        return adamw(groups, lr=lr, betas=BETAS)
    return ShardedOptimizer(groups, mesh, lr=lr, betas=BETAS)


def adamw(groups: list[dict], **defaults) -> torch.optim.AdamW:
    """torch's fused AdamW (one kernel over all of a group's tensors, as torchtitan's default and Megatron's
    FusedAdam step): on CPU ranks it stepped 7.6M parameters in 9 ms where torch's default there (a loop over the
    tensors) took 28 ms, and 11 ms against 41 ms over DTensors (torch 2.13, one thread; bench/optimizer_step.py). A
    torch without it for these parameters' device (CPU before 2.4) refuses fused=True when the optimizer is made, and
    gets its default. The kernel takes one kind of tensor per list: each group is split by mesh, plain tensors apart
    (under tp the weights tp leaves whole are plain; under FSDP2 with tp a GPT's position table and norms sit on the
    dp mesh, its other weights on the dp x tp mesh, which torch before 2.9 refuses to mix in one fused step), the
    same settings on every part."""
    split = []
    for g in groups:
        parts: dict[object, list] = {}
        for p in g["params"]:
            parts.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
        split += [{**g, "params": params} for params in parts.values()]
    try:
        return torch.optim.AdamW(split, fused=True, **defaults)
    except RuntimeError:
        return torch.optim.AdamW(split, **defaults)


IMPLEMENTATION = ("fused", "foreach")
"""AdamW's param-group settings that choose its kernel: checkpoint.load keeps this run's (a checkpoint's groups
carry the ones it was saved with)."""


def local_optimizer(opt) -> tuple[torch.optim.Optimizer, ...]:
    """The optimizers whose state this rank holds: ZeRO-1's inner AdamW over the views it owns (none where it owns
    none), else opt."""
    if isinstance(opt, ShardedOptimizer):
        return (opt.optim,) if opt.optim is not None else ()
    return (opt,)


def ranges(total: int, ranks: int) -> list[tuple[int, int]]:
    """Each rank's [start, end) of `total` flattened elements: ceil(total / ranks) each, the last ones shorter or
    empty."""
    c = math.ceil(total / ranks)
    return [(min(r * c, total), min((r + 1) * c, total)) for r in range(ranks)]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _bucket_key(group: int, params: list[nn.Parameter]) -> str:
    """"group<i>.<dtype>", and under tensor parallelism "@<tp coordinate>": the ranks of one tp coordinate share
    the bucket's DTensor; another coordinate's local shards are other values."""
    coord = next((p.device_mesh.get_coordinate() for p in params if isinstance(p, DTensor)), None)
    at = "" if coord is None else "@" + ".".join(map(str, coord))
    return f"group{group}.{str(params[0].dtype).removeprefix('torch.')}{at}"


class _Piece:
    """The part [a, b) of one parameter's local (flattened) tensor that lies in one replica's range; `index` is
    the parameter's place in its bucket."""

    def __init__(self, param: nn.Parameter, index: int, a: int, b: int):
        self.param, self.index, self.a, self.b = param, index, a, b
        flat = _local(param).detach().view(-1)  # a view: refuses a non-contiguous parameter rather than copy it
        self.view = flat[a:b]

    def take_grad(self) -> None:
        grad = self.param.grad
        self.view.grad = None if grad is None else _local(grad).reshape(-1)[self.a:self.b]


class ShardedOptimizer:
    """ZeRO-1 over `mesh` (see the module docstring), for plain and DTensor parameters. param_groups are this
    rank's (over the views it owns, groups it owns nothing of left out): the learning-rate schedule sets them, as
    on any optimizer."""

    def __init__(self, groups: list[dict], mesh: DeviceMesh, **defaults):
        self.group, me, n = mesh.get_group(), mesh.get_local_rank(), mesh.size()
        self.params = [p for g in groups for p in g["params"]]
        # What step broadcasts: per owner (global rank) and dtype, its pieces of every bucket (one param group's
        # parameters of one dtype), in the order the buckets' flattened elements run: one broadcast each.
        self.sends: dict[tuple[int, torch.dtype], list[_Piece]] = {}
        # Per bucket, for checkpoints: its key, flattened length, dtype and parameter count, and this replica's
        # pieces of it.
        self.bucket_states: list[tuple[str, int, torch.dtype, int, list[_Piece]]] = []
        self.mine: list[_Piece] = []  # this replica's pieces, in its AdamW's order
        mine = []
        for i, g in enumerate(groups):
            by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
            for p in g["params"]:
                by_dtype.setdefault(p.dtype, []).append(p)
            own: list[_Piece] = []
            for params in by_dtype.values():
                sizes = [_local(p).numel() for p in params]
                starts = [0, *itertools.accumulate(sizes)][:-1]
                mine_here = []
                for r, (lo, hi) in enumerate(ranges(sum(sizes), n)):
                    pieces = [_Piece(p, j, max(lo, s) - s, min(hi, s + k) - s)
                              for j, (p, s, k) in enumerate(zip(params, starts, sizes)) if max(lo, s) < min(hi, s + k)]
                    if pieces:
                        self.sends.setdefault((dist.get_global_rank(self.group, r), params[0].dtype), []).extend(pieces)
                    if r == me:
                        mine_here = pieces
                own += mine_here
                self.bucket_states.append((_bucket_key(i, params), sum(sizes), params[0].dtype, len(params), mine_here))
            if own:
                mine.append({**g, "params": [piece.view for piece in own]})
            self.mine += own
        self.rank = dist.get_rank()
        # A replica that owns nothing (a chunk with fewer elements than replicas) holds no state and steps nothing;
        # it still receives every owner's broadcast. torch refuses an optimizer over no parameters.
        self.optim = adamw(mine, **defaults) if mine else None
        # The elements of AdamW state this replica holds: 1/dp of the chunk's, to within one per bucket.
        self.state_elements = sum(piece.view.numel() for piece in self.mine)
        self.mesh = mesh
        self.device = self.params[0].device

    @property
    def param_groups(self) -> list[dict]:
        return self.optim.param_groups if self.optim is not None else []

    @torch.no_grad()
    def step(self) -> None:
        """The owner's AdamW step on its views, then each owner's broadcast of its ranges (one buffer per dtype), one
        owner at a time."""
        if self.optim is not None:
            for piece in self.mine:
                piece.take_grad()
            self.optim.step()
            for piece in self.mine:
                piece.view.grad = None
        for (src, dtype), pieces in self.sends.items() if self.mesh.size() > 1 else ():  # one replica: nothing to send
            if len(pieces) == 1:  # the owner's range lies inside one parameter: send and receive in place
                dist.broadcast(pieces[0].view, src=src, group=self.group)
                continue
            flat = (torch.cat([p.view for p in pieces]) if src == self.rank else
                    torch.empty(sum(p.view.numel() for p in pieces), dtype=dtype, device=pieces[0].view.device))
            dist.broadcast(flat, src=src, group=self.group)
            if src != self.rank:
                for p, part in zip(pieces, flat.split([p.view.numel() for p in pieces])):
                    p.view.copy_(part)
            del flat  # before the next owner's buffer is made

    def state_dict(self) -> dict[str, torch.Tensor]:
        """AdamW's state of each bucket, for DCP: per state name (exp_avg, exp_avg_sq) a 1-D DTensor of the bucket's
        flattened elements, Shard(0) over the replicas mesh (whose chunks are exactly this partition's ranges), so
        DCP can load it at another dp, and each parameter's step count (AdamW counts the steps a parameter had a
        gradient in). Keys "zero1.<bucket>.<name>" and "zero1.<bucket>.step". The tensors are copies, made for
        saving; load_state_dict takes them back after dcp.load has filled them. Every replica calls it (the step
        counts are gathered)."""
        self._make_state()
        out: dict[str, torch.Tensor] = {}
        for key, total, dtype, count, pieces in self.bucket_states:
            steps = torch.zeros(count, device=self.device)
            for p in pieces:
                steps[p.index] = float(self.optim.state[p.view]["step"])
            if self.mesh.size() > 1:  # the replicas holding none of a parameter count 0
                dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=self.group)
            out[f"zero1.{key}.step"] = steps
            for name in STATE_NAMES:
                local = (torch.cat([self.optim.state[p.view][name] for p in pieces]) if pieces
                         else torch.empty(0, dtype=dtype, device=self.device))
                out[f"zero1.{key}.{name}"] = DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False,
                                                                  shape=torch.Size([total]), stride=(1,))
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy what dcp.load put into state_dict()'s tensors into AdamW's state."""
        for key, _, _, _, pieces in self.bucket_states:
            for name in STATE_NAMES:
                local = state[f"zero1.{key}.{name}"].to_local()
                for p, part in zip(pieces, local.split([p.view.numel() for p in pieces])):
                    self.optim.state[p.view][name].copy_(part)
            for p in pieces:
                self.optim.state[p.view]["step"].fill_(float(state[f"zero1.{key}.step"][p.index]))

    def _make_state(self) -> None:
        # AdamW makes a view's state at its first step with a gradient; a checkpoint needs it before. A state at
        # step 0 with zero moments is what that first step would start from, so AdamW steps on from it the same.
        if self.optim is None:
            return
        fused = bool(self.optim.defaults.get("fused"))
        # AdamW's step count: a float32 on the weight's device when fused, else a CPU scalar of the default dtype.
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 and not fused else torch.float32
        for piece in self.mine:
            if piece.view not in self.optim.state:
                self.optim.state[piece.view] = {
                    "step": torch.zeros((), dtype=scalar, device=piece.view.device if fused else "cpu"),
                    **{name: torch.zeros_like(piece.view, memory_format=torch.preserve_format) for name in STATE_NAMES}}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
