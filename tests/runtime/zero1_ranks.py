"""Rank bodies for tests/runtime/test_zero1.py (run_on_ranks imports them by module name)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh


class TwoLinears(nn.Module):
    """27 matrix elements over two weights (so one replica's range of 2 spans both) and 6 vector elements."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3, bias=False), nn.Linear(3, 5)
        self.scale = nn.Parameter(torch.ones(1))


class OneNumber(nn.Module):
    """Fewer elements than replicas: replica 1 of 2 owns nothing."""

    def __init__(self):
        super().__init__()
        self.only = nn.Parameter(torch.full((1,), 0.5))  # a name of its own: checkpoint keys are global FQNs


def _step(pairs, i: int) -> None:
    """Step `i` of each (optimizer, model): gradients that depend on the step and the parameter only, the same on
    every replica, as after DDP's all-reduce. TwoLinears.scale has one at odd steps only and OneNumber.only from
    step 3 on (none before a checkpoint after 3 steps): AdamW counts each parameter's own steps."""
    for opt, model in pairs:
        for name, p in model.named_parameters():
            if (name == "scale" and i % 2 == 0) or (name == "only" and i < 3):
                continue
            p.grad = torch.arange(p.numel(), dtype=torch.float32).view_as(p) / 10 + 0.1 * (i + 1) * len(name)
        opt.step()
        opt.zero_grad()


def step_chunks_against_adamw_with_a_checkpoint_between(steps: int, checkpoint_dir: str) -> dict:
    """ZeRO-1 over every rank, on TwoLinears and OneNumber, against plain AdamW: `steps` steps, a checkpoint, fresh
    models and optimizers resumed from it, and `steps` more."""
    from runtime import checkpoint
    from runtime.parallel.optimizer import build_optimizer, local_optimizer

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    kinds = (TwoLinears, OneNumber)
    sharded = [_seeded(k) for k in kinds]
    plain = [_seeded(k) for k in kinds]
    opts = [build_optimizer(m, 1e-2, zero=1, mesh=mesh) for m in sharded]
    refs = [build_optimizer(m, 1e-2) for m in plain]
    before = {"state_elements": [o.state_elements for o in opts], "optimizers": [len(local_optimizer(o)) for o in opts],
              "groups": [len(o.param_groups) for o in opts]}
    for i in range(steps):
        _step([*zip(opts, sharded), *zip(refs, plain)], i)
    checkpoint.save(checkpoint_dir, steps, dict(enumerate(sharded)), dict(enumerate(opts)))
    sharded = [kind() for kind in kinds]  # other initial values: the checkpoint must overwrite them
    opts = [build_optimizer(m, 1e-2, zero=1, mesh=mesh) for m in sharded]
    resumed = checkpoint.load(checkpoint_dir, steps, dict(enumerate(sharded)), dict(enumerate(opts)))
    for i in range(steps, 2 * steps):
        _step([*zip(opts, sharded), *zip(refs, plain)], i)
    return {**before, "resumed_at": resumed,
            "weights": [p.detach().clone() for m in sharded for p in m.parameters()],
            "reference": [p.detach().clone() for m in plain for p in m.parameters()]}


def save_after_steps(steps: int, checkpoint_dir: str) -> None:
    """ZeRO-1 over every rank on TwoLinears and OneNumber: `steps` steps, then a checkpoint."""
    from runtime import checkpoint
    from runtime.parallel.optimizer import build_optimizer

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    models = [_seeded(k) for k in (TwoLinears, OneNumber)]
    opts = [build_optimizer(m, 1e-2, zero=1, mesh=mesh) for m in models]
    for i in range(steps):
        _step(zip(opts, models), i)
    checkpoint.save(checkpoint_dir, steps, dict(enumerate(models)), dict(enumerate(opts)))


def resume_and_step(steps: int, checkpoint_dir: str) -> dict:
    """Fresh models and ZeRO-1 over every rank (however many saved the checkpoint), resumed from it and stepped
    `steps` more, beside plain AdamW stepped 2 x `steps` from the start."""
    from runtime import checkpoint
    from runtime.parallel.optimizer import build_optimizer

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    kinds = (TwoLinears, OneNumber)
    models, plain = [k() for k in kinds], [_seeded(k) for k in kinds]
    opts = [build_optimizer(m, 1e-2, zero=1, mesh=mesh) for m in models]
    refs = [build_optimizer(m, 1e-2) for m in plain]
    resumed = checkpoint.load(checkpoint_dir, steps, dict(enumerate(models)), dict(enumerate(opts)))
    for i in range(steps):  # the reference's first steps, which the checkpoint holds for the sharded side
        _step(zip(refs, plain), i)
    for i in range(steps, 2 * steps):
        _step([*zip(opts, models), *zip(refs, plain)], i)
    return {"resumed_at": resumed, "weights": [p.detach().clone() for m in models for p in m.parameters()],
            "reference": [p.detach().clone() for m in plain for p in m.parameters()]}


def resume_without_zero1(steps: int, checkpoint_dir: str) -> str:
    """Plain AdamW on every rank (zero 0) resuming a ZeRO-1 checkpoint: the refusal's message."""
    from planner.errors import SpecError
    from runtime import checkpoint
    from runtime.parallel.optimizer import build_optimizer

    dist.init_process_group("gloo")
    models = [k() for k in (TwoLinears, OneNumber)]
    opts = [build_optimizer(m, 1e-2) for m in models]
    before = [p.detach().clone() for m in models for p in m.parameters()]
    try:
        checkpoint.load(checkpoint_dir, steps, dict(enumerate(models)), dict(enumerate(opts)))
    except SpecError as e:
        untouched = all((p == q).all() for p, q in zip(before, (p for m in models for p in m.parameters())))
        return f"{e}" + ("" if untouched else " (and the weights were changed)")
    return "loaded"


def _seeded(kind):
    torch.manual_seed(0)
    return kind()


def adamw_groups_of_mixed_tensors() -> list[list[str]]:
    """runtime.parallel.optimizer.adamw over one group of a DTensor on a 2-D mesh, one on a 1-D mesh and a plain
    tensor (a GPT under FSDP2 with tp holds all three kinds): the kinds of each of its groups, after one step."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    from runtime.parallel.optimizer import adamw

    dist.init_process_group("gloo")
    flat, grid = init_device_mesh("cpu", (1,)), init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    params = [nn.Parameter(distribute_tensor(torch.ones(4, 2), grid, [Replicate(), Replicate()])),
              nn.Parameter(distribute_tensor(torch.ones(3), flat, [Replicate()])), nn.Parameter(torch.ones(2))]
    opt = adamw([{"params": params, "weight_decay": 0.1}], lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return [[f"{type(p).__name__}{p.device_mesh.ndim if hasattr(p, 'device_mesh') else ''}" for p in g["params"]]
            for g in opt.param_groups]
