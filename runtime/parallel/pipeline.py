"""Pipeline parallelism with torch.distributed.pipelining: this rank's stages, each holding exactly the layer
range the plan gives it (uneven ranges are normal), and the plan's schedule.

Placement is looped, as ScheduleInterleaved1F1B expects: with pp ranks and v chunks per rank, plan.stages has
pp*v entries in model order and chunk c of pipeline rank i is entry c*pp + i."""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}


def stage_indices(num_stages: int, pp: int, pp_rank: int) -> list[int]:
    """The plan.stages entries that pipeline rank pp_rank holds, in its local order."""
    return list(range(pp_rank, num_stages, pp))


def split_model(model: nn.Module, stages: Sequence, pp: int, pp_rank: int) -> dict[int, nn.Module]:
    """{stage index: chunk} for this pipeline rank. A chunk is a copy of the (meta) GPT with the blocks outside
    stage.layers deleted, the embedding kept only where stage.embedding, and the final norm and head only
    where stage.head. With one stage the whole model is that stage."""
    if len(stages) == 1:
        return {0: model}
    chunks = {}
    for idx in stage_indices(len(stages), pp, pp_rank):
        stage = stages[idx]
        first, last = stage.layers
        chunk = copy.deepcopy(model)
        for name in list(chunk.layers.keys()):
            if not first <= int(name) < last:
                del chunk.layers[name]
        if not stage.embedding:
            chunk.embed = None
        if not stage.head:
            chunk.norm = None
            chunk.head = None
        chunks[idx] = chunk
    return chunks


class ShardedChunk(nn.Module):
    """A pipeline stage's FSDP2 chunk, behind a module that is not an FSDPModule.

    PipelineStage (torch 2.13) turns FSDP2's gradient sync and its resharding after backward off for every
    microbatch (backward_maybe_with_nosync) and reduce-scatters once, after the last one (perform_reduce_grad):
    unsharded gradients of the whole stage then accumulate over the step. Behind this wrapper the stage runs a
    plain backward, FSDP2's own hooks reduce-scatter after every microbatch and reshard as the chunk was told
    (runtime.parallel.data), and the schedule still scales the gradients by the number of microbatches."""

    def __init__(self, chunk: nn.Module):
        super().__init__()
        self.chunk = chunk

    def forward(self, *args, **kwargs):
        return self.chunk(*args, **kwargs)


def build_stages(chunks: dict[int, nn.Module], num_stages: int, pp_mesh: DeviceMesh,
                 device: torch.device) -> list[PipelineStage]:
    """One PipelineStage per local chunk, talking over the pp group (an FSDP2 chunk behind ShardedChunk). No
    example inputs are given: the stage infers shapes on the first step (which then costs an extra
    forward/backward, a warm-up step)."""
    group = pp_mesh.get_group()
    return [PipelineStage(ShardedChunk(chunk) if isinstance(chunk, FSDPModule) else chunk, idx, num_stages, device,
                          group=group) for idx, chunk in chunks.items()]


def build_schedule(stages: list[PipelineStage], schedule: str, num_microbatches: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """The plan's schedule over this rank's stages. loss_fn returns a microbatch's mean loss; the schedule
    divides the gradients by num_microbatches (scale_grads), so they are those of the batch mean, except for FSDP2
    chunks, whose reduce-scatter divides them instead (runtime.parallel.data.apply_fsdp says why)."""
    cls = SCHEDULES[schedule]
    scale = not any(isinstance(s.submod, ShardedChunk) for s in stages)
    if cls is ScheduleInterleaved1F1B:
        return cls(stages, n_microbatches=num_microbatches, loss_fn=loss_fn, scale_grads=scale)
    return cls(stages[0], n_microbatches=num_microbatches, loss_fn=loss_fn, scale_grads=scale)
