"""Rank body for tests/runtime/test_clip.py: one backward of a small Llama under TP with sequence parallelism, then
runtime.parallel.clip.clip_grad_norm_; returns the norm and every clipped gradient in full."""

from __future__ import annotations

import torch

CFG = dict(layers=2, hidden=64, heads=4, ffn_hidden=172, seq_len=32, vocab=256, kv_heads=2, mlp="swiglu", norm="rmsnorm",
           position="rope", bias=False)


def batch() -> torch.Tensor:
    return torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))


def clipped_under_tp(max_norm: float) -> tuple[float, dict]:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    from runtime.checkpoint import init_weights
    from runtime.mesh import build_mesh
    from runtime.model import GPT, GPTConfig
    from runtime.parallel.clip import clip_grad_norm_
    from runtime.parallel.tensor import apply_tp, cross_entropy

    dist.init_process_group("gloo")
    mesh = build_mesh(pp=1, dp=1, tp=dist.get_world_size(), device_type="cpu")
    cfg = GPTConfig(**CFG)
    with torch.device("meta"):
        model = GPT(cfg)
    apply_tp(model, mesh.tp, sequence_parallel=True, mlp=cfg.mlp)
    init_weights(model, cfg, 0, torch.device("cpu"))
    x = batch()
    with loss_parallel():
        cross_entropy(model(x), x, mesh.tp).backward()
    norm = clip_grad_norm_([model], max_norm, mesh.world)
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for n, p in model.named_parameters()}
    return norm, grads
