"""Run under torchrun with 2 CPU ranks: one block of each tiny model, tensor-parallel with and without sequence
parallelism, and as KempnerForge shards it (each column-parallel linear gathering its own sequence-sharded input:
what planner Framework.tp_gathers_per_linear prices), its forward and backward collectives counted with DTensor's
CommDebugMode; rank 0 prints them as JSON (tests/runtime/test_tp_comm.py reads it)."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

from planner.specs import load_model
from runtime.machine import leave
from runtime.model import GPT, GPTConfig
from runtime.parallel.tensor import apply_tp


def per_linear(model: GPT, mesh, swiglu: bool) -> None:
    """KempnerForge's block plan (kempnerforge/distributed/tensor_parallel.py at 01b461a) on runtime.model's names."""
    col, row = ColwiseParallel(input_layouts=Shard(1)), RowwiseParallel(output_layouts=Shard(1))
    mlp = {"mlp.gate": col, "mlp.up": col, "mlp.down": row} if swiglu else {"mlp.fc": col, "mlp.proj": row}
    plan = {"ln_1": SequenceParallel(), "ln_2": SequenceParallel(), "attn.wq": col, "attn.wk": col, "attn.wv": col, "attn.wo": row, **mlp}
    parallelize_module(model.layers["0"], mesh, plan)


def block_counts(name: str, sp: bool | str, mesh) -> dict:
    spec = load_model(name)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_spec(spec, mesh.size()))
    if sp == "per linear":
        per_linear(model, mesh, spec.mlp == "swiglu")
    else:
        apply_tp(model, mesh, sequence_parallel=sp, mlp=spec.mlp)
    x = torch.randn(2, spec.seq_len // (mesh.size() if sp else 1), spec.hidden, requires_grad=True)
    forward, backward = CommDebugMode(), CommDebugMode()
    with forward:
        out = model.layers["0"](x, positions=None)
    with backward:
        out.sum().backward()
    short = lambda mode: {str(k).split(".")[-1]: v for k, v in mode.get_comm_counts().items()}  # noqa: E731
    return {"forward": short(forward), "backward": short(backward)}


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    counts = {f"{name} sp={sp}": block_counts(name, sp, mesh) for name in ("gpt-tiny", "llama-tiny")
              for sp in (False, True, "per linear")}
    if dist.get_rank() == 0:
        print(json.dumps(counts))
    dist.destroy_process_group()
    # The device mesh still holds the gloo group, whose worker threads can abort the interpreter's finalization
    # ("terminate called without an active exception", exit -6: once in a full test run here): leave as the
    # runtime's ranks do (runtime.machine.leave).
    leave(0)


if __name__ == "__main__":
    main()
