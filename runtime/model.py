"""The decoder that meshplan trains, in two families from one config: GPT (nanoGPT's shape: token + learned position
embedding, pre-LayerNorm blocks, GELU MLP) and Llama (RMSNorm, rotary positions, grouped-query attention, SwiGLU,
no biases). Causal attention runs through scaled_dot_product_attention in both.

Parallelism never appears here. A pipeline stage is this same class with modules removed: forward skips a
missing embedding, norm or head, and the blocks sit in a ModuleDict keyed by their global layer index, so every
parameter keeps one fully qualified name (FQN) in every layout. Tensor parallelism works on this file because
attention reads the number of local heads from the projection's width (`-1` in the views) rather than from a
stored head count, and q, k and v are separate Linears so that a column shard holds whole (query or K/V) heads.
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
    """Attention (query) heads (hidden must divide by it)."""
    ffn_hidden: int
    """MLP inner width."""
    seq_len: int
    """Tokens per sequence; also the number of learned positions."""
    vocab: int
    """Rows of the embedding and columns of the head: the *padded* vocabulary."""
    kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None means heads."""
    mlp: str = "gelu"
    """'gelu' (fc, proj) or 'swiglu' (gate, up, down)."""
    norm: str = "layernorm"
    """'layernorm' or 'rmsnorm'."""
    position: str = "learned"
    """'learned' (a position table) or 'rope' (rotary, applied to q and k)."""
    bias: bool = True
    """Biases in the linear layers (and LayerNorms)."""
    qkv_bias: bool | None = None
    """Biases on q, k and v; None means bias."""
    tie_embeddings: bool = False
    """The head's weight is the token embedding's."""
    rope_theta: float = 10000.0
    """RoPE base."""

    @classmethod
    def from_spec(cls, spec, tp: int) -> "GPTConfig":
        """From a planner ModelSpec; the vocabulary is padded as Megatron-LM pads it (to 128*tp)."""
        return cls(spec.layers, spec.hidden, spec.heads, spec.ffn_hidden, spec.seq_len, spec.padded_vocab(tp),
                   kv_heads=spec.kv_heads, mlp=spec.mlp, norm=spec.norm, position=spec.position, bias=spec.bias,
                   qkv_bias=spec.qkv_bias, tie_embeddings=spec.tie_embeddings, rope_theta=spec.rope_theta)


def make_norm(cfg: GPTConfig) -> nn.Module:
    # Llama's RMSNorm epsilon (1e-5, as its Hugging Face configs give rms_norm_eps); LayerNorm's default is 1e-5 too.
    return nn.RMSNorm(cfg.hidden, eps=1e-5) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.hidden, bias=cfg.bias)


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021, eq. 34) in the half-split layout of Hugging Face's Llama:
    channel i pairs with channel i + hs/2, rotated by angle position * theta^(-2i/hs).
    x: (B, nh, T, hs); positions: (T,) or (B, T) token positions, which need not start at 0 (a context-parallel chunk)."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)  # (hs/2,)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (T, hs/2) or (B, T, hs/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, hs/2): the same rotation for every head
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]  # (B, nh, T, hs/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, nh, T, hs)


class CausalAttention(nn.Module):
    """The attention core, softmax(q k^T / sqrt(d)) v with a causal mask and no parameters; with fewer K/V heads
    than query heads each K/V head serves a group of query heads (GQA, Ainslie et al. 2023).

    A module of its own so that selective recomputation (Korthikanti et al. 2022, section 4.2) can checkpoint
    exactly this part: it holds the s^2 activations and costs few FLOPs to redo."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[1] == k.shape[1]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg, self.head_dim = cfg, cfg.hidden // cfg.heads
        kv = (cfg.kv_heads or cfg.heads) * self.head_dim
        qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
        self.wq = nn.Linear(cfg.hidden, cfg.hidden, bias=qkv_bias)
        self.wk = nn.Linear(cfg.hidden, kv, bias=qkv_bias)
        self.wv = nn.Linear(cfg.hidden, kv, bias=qkv_bias)
        self.core = CausalAttention()
        self.wo = nn.Linear(cfg.hidden, cfg.hidden, bias=cfg.bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        B, T = x.shape[0], x.shape[1]
        # -1 is the number of heads this rank holds: all of them, or heads/tp (kv_heads/tp) under tensor parallelism.
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.cfg.position == "rope":
            pos = torch.arange(T, device=x.device) if positions is None else positions
            q, k = rotate(q, pos, self.cfg.rope_theta), rotate(k, pos, self.cfg.rope_theta)
        y = self.core(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh*hs)
        return self.wo(y)


class MLP(nn.Module):
    """GPT's MLP: proj(gelu(fc(x)))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=cfg.bias)
        self.proj = nn.Linear(cfg.ffn_hidden, cfg.hidden, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class SwiGLU(nn.Module):
    """Llama's MLP (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=cfg.bias)
        self.up = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=cfg.bias)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.hidden, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else MLP(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        # positions travels as a keyword, past the TP plan's PrepareModuleInput (which lays out positional inputs only).
        x = x + self.attn(self.ln_1(x), positions=positions)
        return x + self.mlp(self.ln_2(x))


class Embedding(nn.Module):
    """Token embedding, plus learned absolute positions in the GPT family, summed in one module so that
    sequence parallelism can shard the sum (and not each term) along the sequence."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos = nn.Embedding(cfg.seq_len, cfg.hidden) if cfg.position == "learned" else None

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if self.pos is None:
            return self.tok(idx)  # (B, T, h)
        pos = torch.arange(idx.shape[1], device=idx.device) if positions is None else positions
        return self.tok(idx) + self.pos(pos)  # (B, T, h)


class GPT(nn.Module):
    """The whole model, or one pipeline stage of it (embed/norm/head set to None, blocks deleted).

    The embedding and the head are untied unless cfg.tie_embeddings. With pipelining they sit on different
    stages, and tying them would need a gradient all-reduce between the first and the last stage every step,
    so a plan refuses tie_embeddings across stages (planner.plan.check_plan); untied costs V*h more parameters
    (Megatron-LM also unties them under pipelining)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed: Embedding | None = Embedding(cfg)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.layers)})
        self.norm: nn.Module | None = make_norm(cfg)
        self.head: nn.Linear | None = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make the head's weight the embedding's one Parameter again (after anything that replaced either,
        such as tensor parallelism's sharding); nothing unless tied and both are on this chunk."""
        if self.cfg.tie_embeddings and self.embed is not None and self.head is not None:
            self.head.weight = self.embed.tok.weight

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) on the first stage, hidden states (B, T, h) elsewhere; logits (B, T, V) from the last.
        positions: the tokens' positions, (T,) or (B, T), for RoPE or the learned table (default 0..T-1); a
        context-parallel rank holds tokens from two places in the sequence (runtime.parallel.context)."""
        h = self.embed(x, positions) if self.embed is not None else x  # (B, T, h)
        for block in self.layers.values():
            h = block(h, positions=positions)
        if self.norm is not None:
            h = self.norm(h)
        return self.head(h) if self.head is not None else h  # (B, T, V) or (B, T, h)


def init_std(fqn: str, cfg: GPTConfig) -> float | None:
    """Standard deviation of a weight's normal init, or None for 'constant' (norm weights 1, biases 0).

    GPT-2 (Radford et al. 2019, section 2.3) scales the residual projections by 1/sqrt(number of residual
    layers); nanoGPT's model.py uses 0.02/sqrt(2*layers) for them and 0.02 elsewhere."""
    if fqn.endswith(".bias") or ".ln_" in fqn or fqn.startswith("norm."):
        return None
    if fqn.endswith(("attn.wo.weight", "mlp.proj.weight", "mlp.down.weight")):
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
