"""Checkpoints with torch.distributed.checkpoint (DCP), through get_state_dict/set_state_dict, and the seeded
initial weights that make every layout start from the same model.

Layout of a checkpoint directory D: D/step_000012/ is one DCP checkpoint, complete once its .metadata file
exists (DCP's coordinator writes it last), so a run killed while saving leaves an incomplete directory that
resuming skips. The model's keys are its global FQNs (the same in every layout: DCP reshards DTensors on
load); each stage's optimizer sits under optim/stage<k>, so resuming needs the same plan. Under ZeRO-1 each rank
saves the optimizer state of the parameters it owns (runtime.parallel.optimizer.local_optimizer)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from runtime.model import GPTConfig, init_full_tensor
from runtime.parallel.optimizer import local_optimizer
from runtime.parallel.recompute import clean_fqn

# Optimizer state keyed by parameter FQN ("state.<fqn>.exp_avg"), not by position in a param group: under ZeRO-1 each
# rank's optimizer holds the parameters it owns only, so only FQN keys mean the same thing on every rank.
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

_STEP_DIR = re.compile(r"^step_(\d+)$")


def init_weights(chunk: nn.Module, cfg: GPTConfig, seed: int, device: torch.device) -> None:
    """Materialise a meta chunk on `device` and fill each parameter with its slice of the full, seeded
    initial value (runtime.model.init_full_tensor), so tp/pp/dp layouts all start from the weights the
    single-process model has. Call after TP and recompute, before DDP/FSDP2 (DDP cannot wrap meta
    tensors; FSDP2 then shards the values it is given)."""
    chunk.to_empty(device=device)
    chunk.tie_weights()  # to_empty gives the tied head a Parameter of its own
    with torch.no_grad():
        for name, param in chunk.named_parameters():
            full = init_full_tensor(clean_fqn(name), tuple(param.shape), cfg, seed).to(device)
            if isinstance(param, DTensor):
                # Every rank holds the same full tensor, so each keeps its own shard with no communication.
                full = _local_shard(full, param)
                param.to_local().copy_(full)
            else:
                param.copy_(full)


def _local_shard(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    try:
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    except TypeError:  # a torch without src_data_rank: the default scatters from rank 0, the same values
        return distribute_tensor(full, like.device_mesh, like.placements).to_local()


def latest_step(directory: str | Path) -> int | None:
    """The step of the newest complete checkpoint under `directory`, or None."""
    d = Path(directory)
    if not d.is_dir():
        return None
    steps = [int(m.group(1)) for p in d.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / ".metadata").is_file()]
    return max(steps, default=None)


def _state(chunks: dict[int, nn.Module], optimizers: dict[int, torch.optim.Optimizer], step: int) -> dict:
    model_sd, optim_sd = {}, {}
    for idx, chunk in chunks.items():
        m, o = get_state_dict(chunk, local_optimizer(optimizers[idx]), options=OPTIONS)
        model_sd.update(m)
        optim_sd[f"stage{idx}"] = o
    return {"step": torch.tensor(step), "model": model_sd, "optim": optim_sd}


def save(directory: str | Path, step: int, chunks: dict[int, nn.Module],
         optimizers: dict[int, torch.optim.Optimizer]) -> Path:
    """Save model, optimizer and step (after `step` steps) as D/step_<step>; every rank calls it."""
    path = Path(directory) / f"step_{step:06d}"
    dcp.save(_state(chunks, optimizers, step), checkpoint_id=str(path))
    return path


def load(directory: str | Path, step: int, chunks: dict[int, nn.Module],
         optimizers: dict[int, torch.optim.Optimizer]) -> int:
    """Load D/step_<step> into the chunks and their optimizers; returns the step to continue from."""
    state = _state(chunks, optimizers, 0)
    dcp.load(state, checkpoint_id=str(Path(directory) / f"step_{step:06d}"))
    for idx, chunk in chunks.items():
        opt = local_optimizer(optimizers[idx])
        own = get_state_dict(chunk, opt, options=OPTIONS)[0].keys()
        set_state_dict(chunk, opt, model_state_dict={k: state["model"][k] for k in own},
                       optim_state_dict=state["optim"][f"stage{idx}"], options=OPTIONS)
    return int(state["step"])
