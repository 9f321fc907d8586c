"""Run under torchrun with 2 CPU ranks: one block of each tiny model, tensor-parallel with and without sequence
parallelism, its forward and backward collectives counted with DTensor's CommDebugMode; rank 0 prints them as JSON
(tests/runtime/test_tp_comm.py reads it)."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode

from planner.specs import load_model
from runtime.model import GPT, GPTConfig
from runtime.parallel.tensor import apply_tp


def block_counts(name: str, sp: bool, mesh) -> dict:
    spec = load_model(name)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_spec(spec, mesh.size()))
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
    counts = {f"{name} sp={sp}": block_counts(name, sp, mesh) for name in ("gpt-tiny", "llama-tiny") for sp in (False, True)}
    if dist.get_rank() == 0:
        print(json.dumps(counts))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
