"""Context parallelism written by hand: the sequence is cut over the cp ranks, keys and values are all-gathered
before attention (Llama 3, Dubey et al. 2024, section 3.3.2), and each rank attends with its own queries to every
key it may see.

torch.distributed.tensor.experimental.context_parallel is not used: on CPU it has no sharding strategy for SDPA's
CPU kernel (torch 2.13: "aten._scaled_dot_product_flash_attention_for_cpu has no sharding strategy"), and the
runtime must run, and be tested, on CPU ranks.

Load balance (Llama 3, section 3.3.2): the sequence is cut into 2*cp chunks of c = T/(2cp) tokens and cp rank r
holds chunks r and 2cp-1-r. Under the causal mask chunk j attends to (j+1)*c keys, so rank r's two chunks attend to
(r+1)*c + (2cp-r)*c = (2cp+1)*c keys: the same work on every rank.

What moves: one all-gather of (k, v) per attention layer in the forward, (2, B, kv_heads/tp, T/cp, hs) per rank,
and in the backward one reduce-scatter of their gradients back to the ranks that hold those tokens (GatherKV).
Written by hand rather than with torch.distributed.nn.functional.all_gather: on gloo its backward emulates the
reduce-scatter with scatters whose source is the group rank passed as a global rank (torch 2.13,
_AlltoAll.forward), which fails ("Global rank 0 is not part of group") for any cp group other than ranks
0..cp-1, i.e. whenever cp is combined with tp or pp. Under selective recomputation the gather sits inside the
recomputed attention core, so it runs again in the backward.

Everything else is per token and needs no communication: the loss is each rank's mean over its T/cp tokens, equal
counts everywhere, so averaging the gradients over dp * cp (runtime.mesh's replicas mesh) gives the gradient of
the global mean. The data loader hands each rank its chunks (runtime.data.get_batch), and the model is told the
tokens' global positions (for RoPE or the learned table) by a forward pre-hook on each model chunk."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from runtime.model import CausalAttention

# torch 2.13 renamed the single-tensor collectives (the old names warn); 2.11 has only the old ones.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def chunk_ids(cp: int, cp_rank: int) -> tuple[int, int]:
    """The two of the 2*cp sequence chunks that cp rank cp_rank holds, in its local order."""
    return cp_rank, 2 * cp - 1 - cp_rank


def token_positions(seq_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    """Global positions (seq_len/cp,) int64 of the tokens cp rank cp_rank holds: its two chunks, in order."""
    c = seq_len // (2 * cp)
    return torch.cat([torch.arange(j * c, (j + 1) * c) for j in chunk_ids(cp, cp_rank)])


class GatherKV(torch.autograd.Function):
    """All-gather over the cp group, stacked in rank order: (cp, *x.shape). Backward: the gradient of each rank's
    piece summed over every rank that used it (a reduce-scatter), so each rank gets its own tokens' gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group, n = group, dist.get_world_size(group)
        out = x.new_empty((n * x.shape[0], *x.shape[1:]))  # concatenated along dim 0, the form gloo takes
        _all_gather(out, x.contiguous(), group=group)
        return out.view(n, *x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mine = grad.new_empty(grad.shape[1:])
        _reduce_scatter(mine, grad.reshape(-1, *grad.shape[2:]).contiguous(), group=ctx.group)
        return mine, None


class ContextParallelAttention(nn.Module):
    """CausalAttention's drop-in for cp > 1: q, k, v hold this rank's two chunks, (B, heads, T/cp, hs)."""

    def __init__(self, cp_mesh: DeviceMesh):
        super().__init__()
        self.group, self.cp, self.rank = cp_mesh.get_group(), cp_mesh.size(), cp_mesh.get_local_rank()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = q.shape[2] // 2
        # One collective for both: (cp, 2, B, nkv, 2c, hs), the stacked (k, v) of every cp rank in rank order.
        gathered = GatherKV.apply(torch.stack((k, v)), self.group)
        chunks = [None] * (2 * self.cp)
        for r, kv in enumerate(gathered):
            first, second = chunk_ids(self.cp, r)
            chunks[first], chunks[second] = kv[:, :, :, :c], kv[:, :, :, c:]
        keys, values = torch.cat(chunks, dim=3)  # (B, nkv, T, hs) each, in sequence order
        gqa = q.shape[1] != k.shape[1]
        out = []
        for half, j in enumerate(chunk_ids(self.cp, self.rank)):
            visible = (j + 1) * c  # chunk j sees every key up to and including its own chunk
            # Causal within the chunk, aligned to the bottom right: query i of chunk j sees keys <= j*c + i.
            mask = torch.ones(c, visible, dtype=torch.bool, device=q.device).tril(visible - c)
            out.append(F.scaled_dot_product_attention(q[:, :, half * c:(half + 1) * c], keys[:, :, :visible],
                                                      values[:, :, :visible], attn_mask=mask, enable_gqa=gqa))
        return torch.cat(out, dim=2)  # (B, nh, T/cp, hs)


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh, *, seq_len: int) -> nn.Module:
    """Context parallelism on one model chunk (a pipeline stage, or the whole GPT), in place: every attention core
    becomes a ContextParallelAttention over the 1-D cp mesh, and a forward pre-hook on the chunk passes the global
    positions of this rank's tokens. Apply before recomputation, compile and data parallelism, like TP."""
    for name, module in list(model.named_modules()):
        if isinstance(module, CausalAttention):
            parent, leaf = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), leaf, ContextParallelAttention(cp_mesh))
    positions = token_positions(seq_len, cp_mesh.size(), cp_mesh.get_local_rank())

    def pass_positions(module, args, kwargs):
        device = args[0].device
        return args, {**kwargs, "positions": positions.to(device)}

    model.register_forward_pre_hook(pass_positions, with_kwargs=True)
    return model
