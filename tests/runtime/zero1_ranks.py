"""Rank bodies for tests/runtime/test_zero1.py (run_on_ranks imports them by module name)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh


def _step(opt, ref, sharded, plain, i: int) -> None:
    grad = torch.full((3, 4), 0.1 * (i + 1)) + torch.arange(12.0).view(3, 4) / 10  # the same on every replica
    sharded.weight.grad, plain.weight.grad = grad.clone(), grad.clone()
    opt.step()
    ref.step()
    opt.zero_grad(), ref.zero_grad()


def step_a_chunk_with_fewer_parameters_than_replicas(steps: int, checkpoint_dir: str) -> dict:
    """ZeRO-1 over 2 replicas of a chunk with one parameter (replica 1 owns none), against plain AdamW: `steps`
    steps, a checkpoint, a fresh model and optimizer resumed from it, and `steps` more."""
    from runtime import checkpoint
    from runtime.parallel.optimizer import build_optimizer, local_optimizer

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    sharded, plain = nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False)
    plain.load_state_dict(sharded.state_dict())
    opt, ref = build_optimizer(sharded, 1e-2, zero=1, mesh=mesh), build_optimizer(plain, 1e-2)
    owned, groups = len(local_optimizer(opt)), len(opt.param_groups)
    from runtime.parallel import optimizer

    quiet = optimizer.uneven_share(opt)  # 96 bytes of state on one replica: far below the threshold
    optimizer.UNEVEN_WARN_BYTES = 40  # 48 bytes above the even share (48 of 96)
    loud = optimizer.uneven_share(opt)
    for i in range(steps):
        _step(opt, ref, sharded, plain, i)
    checkpoint.save(checkpoint_dir, steps, {0: sharded}, {0: opt})
    sharded = nn.Linear(4, 3, bias=False)
    opt = build_optimizer(sharded, 1e-2, zero=1, mesh=mesh)
    resumed = checkpoint.load(checkpoint_dir, steps, {0: sharded}, {0: opt})
    for i in range(steps, 2 * steps):
        _step(opt, ref, sharded, plain, i)
    return {"weight": sharded.weight.detach().clone(), "reference": plain.weight.detach().clone(),
            "owned_optimizers": owned, "groups": groups, "resumed_at": resumed, "quiet": quiet, "loud": loud}
