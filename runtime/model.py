"""The GPT that meshplan trains: nanoGPT's shape (token + learned position embedding, pre-LayerNorm blocks,
causal self-attention through scaled_dot_product_attention, GELU MLP, final LayerNorm, LM head).

Parallelism never appears here. A pipeline stage is this same class with modules removed: forward skips a
missing embedding, norm or head, and the blocks sit in a ModuleDict keyed by their global layer index, so every
parameter keeps one fully qualified name (FQN) in every layout. Tensor parallelism works on this file because
attention reads the number of local heads from the projection's width (`-1` in the views) rather than from a
stored head count, and q, k and v are separate Linears so that a column shard holds whole heads.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    layers: int
    """Transformer blocks."""
    hidden: int
    """Model width h."""
    heads: int
    """Attention heads (hidden must divide by it)."""
    ffn_hidden: int
    """MLP inner width."""
    seq_len: int
    """Tokens per sequence; also the number of learned positions."""
    vocab: int
    """Rows of the embedding and columns of the head: the *padded* vocabulary."""

    @classmethod
    def from_spec(cls, spec, tp: int) -> "GPTConfig":
        """From a planner ModelSpec; the vocabulary is padded as Megatron-LM pads it (to 128*tp)."""
        return cls(spec.layers, spec.hidden, spec.heads, spec.ffn_hidden, spec.seq_len, spec.padded_vocab(tp))


class CausalAttention(nn.Module):
    """The attention core, softmax(q k^T / sqrt(d)) v with a causal mask and no parameters.

    A module of its own so that selective recomputation (Korthikanti et al. 2022, section 4.2) can checkpoint
    exactly this part: it holds the s^2 activations and costs few FLOPs to redo."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.head_dim = cfg.hidden // cfg.heads
        self.wq = nn.Linear(cfg.hidden, cfg.hidden)
        self.wk = nn.Linear(cfg.hidden, cfg.hidden)
        self.wv = nn.Linear(cfg.hidden, cfg.hidden)
        self.core = CausalAttention()
        self.wo = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[0], x.shape[1]
        # -1 is the number of heads this rank holds: all of them, or heads/tp under tensor parallelism.
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        y = self.core(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh*hs)
        return self.wo(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.hidden, cfg.ffn_hidden)
        self.proj = nn.Linear(cfg.ffn_hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Embedding(nn.Module):
    """Token embedding plus learned absolute positions, summed in one module so that sequence parallelism
    can shard the sum (and not each term) along the sequence."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos = nn.Embedding(cfg.seq_len, cfg.hidden)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        return self.tok(idx) + self.pos(pos)  # (B, T, h)


class GPT(nn.Module):
    """The whole model, or one pipeline stage of it (embed/norm/head set to None, blocks deleted).

    The embedding and the head are untied. With pipelining they sit on different stages, and tying them
    would need a gradient all-reduce between the first and the last stage every step; untied costs V*h
    more parameters and is the simple honest choice (Megatron-LM also unties them under pipelining)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed: Embedding | None = Embedding(cfg)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.layers)})
        self.norm: nn.LayerNorm | None = nn.LayerNorm(cfg.hidden)
        self.head: nn.Linear | None = nn.Linear(cfg.hidden, cfg.vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) on the first stage, hidden states (B, T, h) elsewhere; logits (B, T, V) from the last."""
        h = self.embed(x) if self.embed is not None else x  # (B, T, h)
        for block in self.layers.values():
            h = block(h)
        if self.norm is not None:
            h = self.norm(h)
        return self.head(h) if self.head is not None else h  # (B, T, V) or (B, T, h)


def init_std(fqn: str, cfg: GPTConfig) -> float | None:
    """Standard deviation of a weight's normal init, or None for 'constant' (LayerNorm 1, bias 0).

    GPT-2 (Radford et al. 2019, section 2.3) scales the residual projections by 1/sqrt(number of residual
    layers); nanoGPT's model.py uses 0.02/sqrt(2*layers) for them and 0.02 elsewhere."""
    if fqn.endswith(".bias") or ".ln_" in fqn or fqn.startswith("norm."):
        return None
    if fqn.endswith(("attn.wo.weight", "mlp.proj.weight")):
        return 0.02 / math.sqrt(2 * cfg.layers)
    return 0.02


def init_full_tensor(fqn: str, shape: tuple[int, ...], cfg: GPTConfig, seed: int) -> torch.Tensor:
    """The full (unsharded) initial value of parameter `fqn`, the same in every layout and on every rank.

    Each parameter draws from its own generator seeded by (seed, fqn), so a rank that holds only some
    stages, or only a shard, computes exactly the values the single-process model has."""
    std = init_std(fqn, cfg)
    if std is None:
        return torch.ones(shape) if fqn.endswith(".weight") else torch.zeros(shape)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(fqn.encode()))
    return torch.randn(shape, generator=g) * std
