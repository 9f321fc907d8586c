"""Rank side of test_data_parallel: what apply_data_parallel wraps a chunk in, for each zero stage, tp and pipelining."""

from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from runtime.parallel.data import apply_data_parallel


class Chunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict({"0": nn.Linear(4, 4)})

    def forward(self, x):
        return self.layers["0"](x)


def wrappers() -> dict:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    got = {}
    for zero in range(4):
        for tp in (1, 2):
            for pipelined_microbatches in (0, 4):
                chunk = apply_data_parallel(Chunk(), mesh, zero=zero, tp=tp, pipelined_microbatches=pipelined_microbatches)
                kind = ("ddp" if isinstance(chunk, DistributedDataParallel) else
                        "fsdp2" if isinstance(chunk, FSDPModule) else "unwrapped")
                got[f"{zero} {tp} {pipelined_microbatches > 0}"] = kind
    dist.destroy_process_group()
    return got
