"""Per-layer compute seconds on one device for a tensor-parallel shard, from a device profile.

A datasheet profile gives peak FLOP/s, memory bandwidth and an efficiency curve by GEMM size:
GEMMs run at peak * efficiency(size), elementwise kernels are memory-bound. A measured profile
(planner profile) gives timings of the runtime's own layers; see planner/measured.py."""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.specs import DeviceProfile, ModelSpec


@dataclass(frozen=True)
class LayerTimes:
    forward_s: float
    """One transformer block's forward, one microbatch, one device's shard (no communication)."""
    backward_s: float
    """Its backward (input and weight gradients), without recomputation."""
    selective_recompute_s: float
    """Re-running the attention core before the backward (selective recomputation)."""
    source: str = "datasheet"
    """'datasheet', 'measured' or 'measured (extrapolated)'."""

    @property
    def full_recompute_s(self) -> float:
        return self.forward_s


@dataclass(frozen=True)
class EndTimes:
    """Embedding (first stage) and final norm + LM head + cross-entropy (last stage)."""

    embedding_forward_s: float
    embedding_backward_s: float
    head_forward_s: float
    head_backward_s: float


def gemm_efficiency(device: DeviceProfile, gflop: float) -> float:
    """Log-linear interpolation of the device's efficiency curve, flat outside its points."""
    pts = device.gemm_efficiency
    if gflop <= pts[0].gflop:
        return pts[0].efficiency
    for a, b in zip(pts, pts[1:]):
        if gflop <= b.gflop:
            w = (math.log(gflop) - math.log(a.gflop)) / (math.log(b.gflop) - math.log(a.gflop))
            return a.efficiency + w * (b.efficiency - a.efficiency)
    return pts[-1].efficiency


def gemm_s(device: DeviceProfile, m: int, n: int, k: int, batch: int = 1) -> float:
    """Seconds for `batch` GEMMs of (m x k) @ (k x n): 2mnk FLOPs each, at the efficiency of one."""
    flops = 2.0 * m * n * k
    return batch * flops / (device.peak_tflops * 1e12 * gemm_efficiency(device, flops / 1e9))


def memory_s(device: DeviceProfile, elements: float) -> float:
    """A memory-bound kernel moving `elements` values (reads + writes) of the training dtype."""
    return elements * device.dtype_bytes / (device.memory_bandwidth_GBps * 1e9 * device.memory_efficiency)


def _attention_core_s(device: DeviceProfile, model: ModelSpec, tp: int, b: int) -> tuple[float, float]:
    """(forward, backward) of softmax(QK^T)V for this shard's heads."""
    s, d, heads = model.seq_len, model.hidden // model.heads, model.heads // tp
    # QK^T and AV: b*heads batched GEMMs of (s x d)@(d x s) and (s x s)@(s x d).
    gemms = gemm_s(device, s, s, d, batch=b * heads) + gemm_s(device, s, d, s, batch=b * heads)
    if device.fused_attention:
        # FlashAttention: the same FLOPs in one kernel; backward recomputes the scores (2.5x forward;
        # Dao et al. 2022, FlashAttention, section 3.1).
        return gemms, 2.5 * gemms
    # Megatron-LM 2021: fused scale-mask-softmax reads and writes the b*heads*s*s scores, dropout on
    # the probabilities reads them, writes them and a mask; the backward moves about twice as much.
    scores = b * heads * s * s
    fwd = gemms + memory_s(device, 4.5 * scores)
    return fwd, 2 * gemms + memory_s(device, 9 * scores)


def datasheet_layer_times(model: ModelSpec, device: DeviceProfile, tp: int, b: int, sequence_parallel: bool) -> LayerTimes:
    h, f, s, kv = model.hidden, model.ffn_hidden, model.seq_len, model.kv_dim
    tokens = b * s
    # Megatron-LM's block on a tp shard (Shoeybi et al. 2019, Fig. 3): q, k, v and the MLP's first matrices
    # column-parallel, the output projection and the MLP's last matrix row-parallel. k and v are kv_dim wide
    # (grouped-query attention, Ainslie et al. 2023); SwiGLU has two h x f matrices in (gate, up) and one out
    # (Shazeer 2020, eq. 6).
    mlp_in = 2 if model.mlp == "swiglu" else 1
    gemm_fwd = (gemm_s(device, tokens, (h + 2 * kv) // tp, h) + gemm_s(device, tokens, h, h // tp)
                + mlp_in * gemm_s(device, tokens, f // tp, h) + gemm_s(device, tokens, h, f // tp))
    attn_fwd, attn_bwd = _attention_core_s(device, model, tp, b)
    # Elementwise per token: two norms (read + write h each; RMSNorm moves as much as LayerNorm) and two
    # residual adds, bias-dropout-adds where the linears have biases (GPT: ~3.5h each) or plain adds (3h), replicated over tp
    # unless sequence parallelism shards them. In the MLP: bias-GeLU reads and writes f/tp; SwiGLU's silu
    # (read, write) and product (two reads, a write) move 5f/tp. RoPE rotates q and k, (h + kv)/tp wide, in
    # about 6 passes (two products, a sum, a difference, the halves swapped and joined).
    add = 3.5 if model.bias else 3.0
    norm_like = (2 * 2 + 2 * add) * h / (tp if sequence_parallel else 1)
    mlp_elem = (5 if model.mlp == "swiglu" else 2) * f / tp
    rope = 6 * (h + kv) / tp if model.position == "rope" else 0.0
    elem_fwd = memory_s(device, tokens * (norm_like + mlp_elem + rope))
    fwd = gemm_fwd + attn_fwd + elem_fwd
    # Backward: a data-gradient and a weight-gradient GEMM per forward GEMM; elementwise ~2x.
    bwd = 2 * gemm_fwd + attn_bwd + 2 * elem_fwd
    return LayerTimes(forward_s=fwd, backward_s=bwd, selective_recompute_s=attn_fwd)


def layer_times(model: ModelSpec, device: DeviceProfile, tp: int, b: int, sequence_parallel: bool) -> LayerTimes:
    """A measured profile wins where it has this layer; the datasheet model otherwise."""
    if device.measured:
        from planner.measured import measured_layer_times  # only when a measured profile is in use

        got = measured_layer_times(device, model, tp, b, sequence_parallel)
        if got is not None:
            return got
    return datasheet_layer_times(model, device, tp, b, sequence_parallel)


def datasheet_end_times(model: ModelSpec, device: DeviceProfile, tp: int, b: int) -> EndTimes:
    h, s, v = model.hidden, model.seq_len, model.padded_vocab(tp)
    tokens = b * s
    # Embedding: gather rows, add learned positions (read 2, write 1 per element; with RoPE only the gather,
    # read 1 write 1); backward scatter-adds.
    moves = 3 if model.position == "learned" else 2
    emb_f = memory_s(device, moves * tokens * h)
    emb_b = memory_s(device, moves * tokens * h)
    # Head: final LayerNorm, logits GEMM over the vocab shard, cross-entropy in fp32 over the logits
    # (softmax reads and writes them twice: 4 passes; fp32 = 2 elements of a 2-byte dtype).
    logits = tokens * v / tp
    ce_elems = 4 * logits * (4 / device.dtype_bytes)
    head_f = memory_s(device, 2 * tokens * h) + gemm_s(device, tokens, v // tp, h) + memory_s(device, ce_elems)
    head_b = memory_s(device, 4 * tokens * h) + 2 * gemm_s(device, tokens, v // tp, h) + memory_s(device, ce_elems)
    return EndTimes(emb_f, emb_b, head_f, head_b)


def end_times(model: ModelSpec, device: DeviceProfile, tp: int, b: int) -> EndTimes:
    if device.measured:
        from planner.measured import measured_end_times

        got = measured_end_times(device, model, tp, b)
        if got is not None:
            return got
    return datasheet_end_times(model, device, tp, b)


# Adam with mixed precision reads fp32 master weight, grad, m, v (16 B) and writes master, m, v and
# the bf16 copy (14 B): memory-bound at 30 bytes per parameter.
OPTIMIZER_BYTES_PER_PARAM = 30


def optimizer_step_s(device: DeviceProfile, params: float) -> float:
    if device.measured and "optimizer_s_per_param" in device.measured:
        return params * float(device.measured["optimizer_s_per_param"])
    return params * OPTIMIZER_BYTES_PER_PARAM / (device.memory_bandwidth_GBps * 1e9 * device.memory_efficiency)
