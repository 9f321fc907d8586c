"""A device's kernel efficiency curves: GEMMs by size, and FlashAttention-2 by sequence length.

A device datasheet's GEMM curve prices a GEMM. FlashAttention is one kernel with its own ceiling, and on Hopper
that ceiling is far below a GEMM's: FlashAttention-2 does not use Hopper's warpgroup MMA or TMA. Shah et al. 2024,
"FlashAttention-3" (arXiv:2407.08608), figures 5 and 6, measured it on an H100 80GB SXM5 at head dim 128, with
batch x sequence = 16k tokens. Forward, causal: 191, 260, 298, 319, 333 and 335 TFLOP/s at 512 to 16k tokens.
Backward: 214, 260, 291, 310, 318 and 322 TFLOP/s. Causal FLOPs are counted as the kernel runs them (half). That
is 34% of the 989 TFLOP/s peak, where cuDNN's kernel (Transformer Engine, Megatron-Core) reaches about 55%.

Which kernel runs depends on the torch release, its bundled cuDNN and the GPU: torch's scaled_dot_product_attention
takes the first backend in its priority order that accepts the call. cuDNN attention was made opt-in after the 2.5
bugs (pytorch/pytorch#138522, 2.5.1), so flash (FlashAttention-2) came first on every GPU; 2.9 put cuDNN first again
on sm90 and sm100 (pytorch/pytorch#162073), and 2.10 gated that on a cuDNN newer than 9.15
(check_prefer_cudnn_attention in sdp_utils.cpp), which the 2.11 wheels bundle (huggingface/transformers#48163;
KempnerForge's profile of torch 2.11 on an H200 runs aten::_cudnn_attention_backward,
benchmarks/profiling/13b_24gpu_profiling.md). So on the torch meshplan's runtime runs (2.11 and 2.13), attention on
H100, H200 and B200 is cuDNN's, at about the GEMM curve's rate, as Megatron-Core's is, and no framework in
planner/frameworks.py reads this curve (Framework.flash_attention). torchtitan's Dec 2024 benchmarks ran flash,
and bench/held_out.py prices them with it. The A100 (sm80) runs flash; FlashAttention-2 reaches 50-73% of its peak
(Dao 2023's abstract), near its GEMM curve, so its datasheet carries no curve, nor do B200, L40S and RTX 4090's (no
source at hand)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GemmPoint:
    gflop: float
    """Size of one GEMM in GFLOP (2*m*n*k / 1e9)."""
    efficiency: float
    """Achieved fraction of peak_tflops at that size."""


@dataclass(frozen=True)
class AttentionPoint:
    tokens: int
    """Query length of one kernel call (a whole sequence; a chunk of one under context parallelism)."""
    forward: float
    """Achieved fraction of the device's peak_tflops in the forward, causal FLOPs counted as run."""
    backward: float
    """The same for the backward (2.5 times the forward's FLOPs: it recomputes the scores)."""


def log_linear(points: tuple, x: float, at: str, *values: str) -> tuple[float, ...]:
    """The curve's `values` fields at x along its `at` field: log-linear between neighbouring points (sorted by
    `at`), flat outside them. One rule for the GEMM and the FlashAttention-2 curves."""
    first, last = points[0], points[-1]
    if x <= getattr(first, at):
        return tuple(getattr(first, v) for v in values)
    for a, b in zip(points, points[1:]):
        xa, xb = getattr(a, at), getattr(b, at)
        if x <= xb:
            w = (math.log(x) - math.log(xa)) / (math.log(xb) - math.log(xa))
            return tuple(getattr(a, v) + w * (getattr(b, v) - getattr(a, v)) for v in values)
    return tuple(getattr(last, v) for v in values)


def flash_efficiency(points: tuple[AttentionPoint, ...], tokens: float) -> tuple[float, float]:
    """(forward, backward) fraction of peak at this query length (log_linear)."""
    return log_linear(points, tokens, "tokens", "forward", "backward")
