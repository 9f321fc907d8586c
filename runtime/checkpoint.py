"""Checkpoints with torch.distributed.checkpoint (DCP), through get_state_dict/set_state_dict, and the seeded
initial weights that make every layout start from the same model.

Layout of a checkpoint directory D: D/step_000012/ is one DCP checkpoint, complete once its .metadata file
exists (DCP's coordinator writes it last), so a run killed while saving leaves an incomplete directory that
resuming skips. The model's keys are its global FQNs (the same in every layout: DCP reshards DTensors on
load); each stage's optimizer sits under optim/stage<k>, so resuming needs the same pipeline layout (and tp); under
ZeRO-1 each bucket's optimizer state is a DTensor sharded over the replicas, so dp may change
(runtime.parallel.optimizer.ShardedOptimizer.state_dict)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor

from planner.errors import SpecError
from runtime.model import GPTConfig, init_full_tensor
from runtime.parallel.optimizer import IMPLEMENTATION, ShardedOptimizer, local_optimizer
from runtime.parallel.recompute import clean_fqn

# Optimizer state keyed by parameter FQN ("state.<fqn>.exp_avg"), not by position in a param group, so that a key
# names the same weight in every layout's checkpoint.
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


def _flat(state: dict, prefix: str = ""):
    """(key, value) as DCP names a nested state dict's leaves: dict keys joined by dots."""
    for k, v in state.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _mismatch(path: Path, state: dict) -> str | None:
    """What of this rank's state the checkpoint at `path` lacks or holds at another size, or None."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = [k for k, _ in _flat(state) if k not in saved]
    if missing:
        return f"it has no {missing[0]}" + (f" (nor {len(missing) - 1} more this rank loads)" if len(missing) > 1 else "")
    for k, v in _flat(state):
        if isinstance(v, torch.Tensor) and tuple(getattr(saved[k], "size", v.shape)) != tuple(v.shape):
            return f"it holds {k} as {tuple(saved[k].size)}, where this plan has {tuple(v.shape)}"
    return None


def _keep_kernel(opt: torch.optim.Optimizer, settings: list[dict]) -> None:
    """Give a loaded optimizer back this run's kernel settings (fused or not), which loading set to the checkpoint's
    (one saved before runtime.parallel.optimizer.adamw stepped fused would turn it off), and, where fused, its step
    counts where the fused kernel reads them: float32 on the weight's device."""
    for group, kept in zip(opt.param_groups, settings):
        group.update(kept)
        if group.get("fused"):
            for p in group["params"]:
                if "step" in opt.state.get(p, {}):
                    opt.state[p]["step"] = opt.state[p]["step"].to(device=p.device, dtype=torch.float32)


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
        opt = optimizers[idx]
        if isinstance(opt, ShardedOptimizer):  # its AdamW steps views, which get_state_dict cannot name
            m, o = get_model_state_dict(chunk, options=OPTIONS), opt.state_dict()
        else:
            m, o = get_state_dict(chunk, local_optimizer(opt), options=OPTIONS)
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
    """Load D/step_<step> into the chunks and their optimizers; returns the step to continue from. A checkpoint
    this run's layout cannot read (another pipeline layout, zero 1 against not, another tp under zero 1) is
    refused on every rank, naming what differs, before anything is loaded."""
    state = _state(chunks, optimizers, 0)
    path = Path(directory) / f"step_{step:06d}"
    mine = _mismatch(path, state)
    problems = [mine]
    if dist.is_initialized():  # every rank refuses, or none: a rank loading alone would wait for the others
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, mine)
    if (problem := next((p for p in problems if p), None)) is not None:
        raise SpecError("--checkpoint-dir", "checkpoint_dir",
                        f"{path} was written by another layout than this plan's: {problem}; resume with the plan "
                        "that wrote it (the same pipeline stages, tp and zero 1 or not; dp may differ), or start "
                        "in an empty --checkpoint-dir")
    dcp.load(state, checkpoint_id=str(path))
    for idx, chunk in chunks.items():
        own = {k: state["model"][k] for k in get_model_state_dict(chunk, options=OPTIONS)}
        if isinstance(optimizers[idx], ShardedOptimizer):
            set_model_state_dict(chunk, own, options=OPTIONS)
            optimizers[idx].load_state_dict(state["optim"][f"stage{idx}"])
        else:
            opts = local_optimizer(optimizers[idx])
            kernels = [[{k: g.get(k) for k in IMPLEMENTATION} for g in o.param_groups] for o in opts]
            set_state_dict(chunk, opts, model_state_dict=own, optim_state_dict=state["optim"][f"stage{idx}"], options=OPTIONS)
            for o, settings in zip(opts, kernels):
                _keep_kernel(o, settings)
    return int(state["step"])
