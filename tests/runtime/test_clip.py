"""runtime.parallel.clip: under tensor parallelism with sequence parallelism (sharded DTensors, and Replicate norm
weights whose gradients come back Partial) the norm and the clipped gradients are those one process gets from
torch.nn.utils.clip_grad_norm_."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.model import GPT, GPTConfig, init_full_tensor
from tests.conftest import run_on_ranks
from tests.runtime.clipping import CFG, batch, clipped_under_tp


def test_tp2_clip_gives_the_single_process_norm_and_clipped_gradients():
    cfg = GPTConfig(**CFG)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_full_tensor(name, tuple(p.shape), cfg, 0))
    x = batch()
    F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    expected = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
    for norm, grads in run_on_ranks(clipped_under_tp, 2, 0.05):
        assert abs(norm - expected) / expected < 1e-5, (norm, expected)
        assert expected > 0.05  # so the gradients were clipped
        for name, p in model.named_parameters():
            assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=1e-7), name
