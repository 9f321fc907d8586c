"""Per-layer compute seconds on one device for a tensor-parallel shard, from a device profile.

A datasheet profile gives peak FLOP/s, memory bandwidth and an efficiency curve by GEMM size:
GEMMs run at peak * efficiency(size), elementwise kernels are memory-bound. A measured profile
(planner profile) gives timings of the runtime's own layers; see planner/measured.py."""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.kernels import flash_efficiency, log_linear
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
    cp_comm_included: bool = False
    """Under cp: the times hold the keys' and values' gather and its reduce-scatter (measured with the block)."""

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


def gemm_efficiency(device: DeviceProfile, gflop: float, fp8: bool = False) -> float:
    """The device's efficiency curve at this GEMM size (its FP8 curve for fp8, where it has one): log-linear
    between its points, flat outside them (kernels.log_linear)."""
    pts = device.fp8_gemm_efficiency if fp8 and device.fp8_gemm_efficiency else device.gemm_efficiency
    return log_linear(pts, gflop, "gflop", "efficiency")[0]


def gemm_s(device: DeviceProfile, m: float, n: float, k: float, batch: float = 1, fp8: bool = False) -> float:
    """Seconds for `batch` GEMMs of (m x k) @ (k x n): 2mnk FLOPs each, at the efficiency of one; at the FP8 peak
    for fp8 (Float8 linears)."""
    flops = 2.0 * m * n * k
    peak = device.fp8_peak_tflops if fp8 else device.peak_tflops
    return batch * flops / (peak * 1e12 * gemm_efficiency(device, flops / 1e9, fp8))


def memory_s(device: DeviceProfile, elements: float) -> float:
    """A memory-bound kernel moving `elements` values (reads + writes) of the training dtype."""
    return elements * device.dtype_bytes / (device.memory_bandwidth_GBps * 1e9 * device.memory_efficiency)


def masked_chunk_waste(cp: int) -> float:
    """Attention work under cp with masked chunk calls (Framework.cp_masked_chunks) over the causal work: a rank's
    two chunks j = r and 2cp-1-r against the (j+1)c keys before them, each as one masked call, run every tile of
    both rectangles, (2cp+1)c^2 where causal skipping would run 2cp c^2."""
    return (2 * cp + 1) / (2 * cp) if cp > 1 else 1.0


def _attention_core_s(device: DeviceProfile, model: ModelSpec, tp: int, b: float, cp: int, fused: bool,
                      flash: bool = False, masked_chunks: bool = False) -> tuple[float, float]:
    """(forward, backward) of softmax(QK^T)V for this shard's heads, b sequences' worth (b/cp under context
    parallelism, where each rank's queries meet every key); fused: as one kernel (Framework.fuses_attention);
    flash: that kernel is FlashAttention-2 (Framework.flash_attention), at the device's own rate for it;
    masked_chunks: under cp each chunk's call computes its whole masked rectangle (Framework.cp_masked_chunks)."""
    s, d, heads = model.seq_len, model.hidden // model.heads, model.heads // tp
    # QK^T and AV: b*heads batched GEMMs of (s x d)@(d x s) and (s x s)@(s x d). Under context parallelism the
    # work is done chunk against chunk (2cp chunks of s/2cp tokens, Liu et al. 2023 'Ring Attention'), at the
    # efficiency of a chunk's GEMM, not of a whole sequence's.
    c = s // (2 * cp) if cp > 1 else s
    waste = masked_chunk_waste(cp) if masked_chunks else 1.0
    if fused and flash and device.flash_attention_efficiency:
        # FlashAttention-2 at its measured share of peak for a call of c queries (planner/kernels.py), on the
        # causal FLOPs it runs: half of 4 s^2 d per head and sequence; the backward runs 2.5 times as many.
        # (No framework of planner/frameworks.py runs this branch: bench/held_out.py's torchtitan of Dec 2024 does,
        # whose context parallelism is torch's own, chunk against chunk.)
        flops = 2.0 * b * heads * s * s * d
        fwd_eff, bwd_eff = flash_efficiency(device.flash_attention_efficiency, c)
        peak = device.peak_tflops * 1e12
        return waste * flops / (peak * fwd_eff), waste * 2.5 * flops / (peak * bwd_eff)
    per = (s * s) / (c * c)
    gemms = gemm_s(device, c, c, d, batch=b * heads * per) + gemm_s(device, c, d, c, batch=b * heads * per)
    if fused:
        # FlashAttention: the same FLOPs in one kernel, and with a causal mask only the tiles on or below the
        # diagonal run: half of them for s much longer than a tile (Dao 2023, FlashAttention-2, section 3.1.1);
        # the backward recomputes the scores (2.5x forward; Dao et al. 2022, FlashAttention, section 3.1).
        return waste * gemms / 2, waste * 2.5 * gemms / 2
    # Megatron-LM 2021: fused scale-mask-softmax reads and writes the b*heads*s*s scores, dropout on
    # the probabilities reads them, writes them and a mask; the backward moves about twice as much.
    scores = b * heads * s * s
    fwd = gemms + memory_s(device, 4.5 * scores)
    return fwd, 2 * gemms + memory_s(device, 9 * scores)


def elementwise_per_token(model: ModelSpec, tp: int, sequence_parallel: bool, compiled: bool) -> float:
    """Elements the block's memory-bound kernels read and write per token in its forward (the backward moves
    about twice as much). Eager: two norms (read + write h each; RMSNorm moves as much as LayerNorm), two
    residual adds as bias-dropout-adds where the linears have biases (GPT: ~3.5h each) or plain adds (3h), all
    replicated over tp unless sequence parallelism shards them; in the MLP bias-GeLU reads and writes f/tp,
    SwiGLU's silu (read, write) and product (two reads, a write) 5f/tp; RoPE rotates q and k, (h + kv)/tp wide,
    in about 6 passes. Compiled (torch.compile fuses each chain into one kernel): each add with the norm after
    it reads two inputs and writes two outputs (4h), SwiGLU reads two and writes one (3f/tp), RoPE reads and
    writes once (2(h + kv)/tp)."""
    h, f, kv = model.hidden, model.ffn_hidden, model.kv_dim
    rep = tp if sequence_parallel else 1
    rope = model.position == "rope"
    if compiled:
        return 2 * 4 * h / rep + (3 if model.mlp == "swiglu" else 2) * f / tp + (2 * (h + kv) / tp if rope else 0.0)
    add = 3.5 if model.bias else 3.0
    return (2 * 2 + 2 * add) * h / rep + (5 if model.mlp == "swiglu" else 2) * f / tp + (6 * (h + kv) / tp if rope else 0.0)


def float8_casts_per_token(model: ModelSpec, tp: int, sequence_parallel: bool = False) -> float:
    """Elements torchao's Float8 linears move per token to scale and cast their inputs in the forward (tensorwise
    dynamic scaling): each cast reads its input for the amax, reads it again to cast and writes one byte (half a
    bf16 element), 2.5 passes over its width. The inputs: the row-parallel output projection's h/tp and the MLP's
    last matrix's f/tp; the column-parallel q, k, v and the MLP's first matrices (one, or gate and up) read the
    block's h-wide input. Under TP they share one cast per sub-block (PrepareFloat8ModuleInput casts the module's
    input, as meshplan's runtime and torchtitan shard them), of the local s/tp shard with SP (Float8ColwiseParallel
    casts, then redistributes): h/tp per token. At tp 1 each Float8Linear casts it on its own."""
    h, f = model.hidden, model.ffn_hidden
    mlp_in = 2 if model.mlp == "swiglu" else 1
    width = h / tp if sequence_parallel else h
    column = 2 * width if tp > 1 else (3 + mlp_in) * width
    return 2.5 * (column + h / tp + f / tp)


def float8_grad_casts_per_token(model: ModelSpec, tp: int, sequence_parallel: bool = False) -> float:
    """Elements torchao's backward moves per token to cast, at 2.5 passes, each linear's output gradient, which no
    two linears share: the column-parallel linears' are their outputs' width, (h + 2 kv_dim)/tp for q, k and v and
    f/tp for each of the MLP's first matrices; the row-parallel ones' (the output projection's and the MLP's last)
    h, or the local h/tp shard with SP (Float8RowwiseParallel). The inputs the weight-gradient GEMMs need were cast
    in the forward and are kept."""
    h, f, kv = model.hidden, model.ffn_hidden, model.kv_dim
    mlp_in = 2 if model.mlp == "swiglu" else 1
    row = h / tp if sequence_parallel else h
    return 2.5 * ((h + 2 * kv + mlp_in * f) / tp + 2 * row)


def transformer_engine_fp8_moves_per_token(model: ModelSpec, tp: int, sequence_parallel: bool) -> tuple[float, float]:
    """(forward, backward) elements, bf16-sized (2 bytes), that Transformer Engine 1.x's FP8 linears move per token
    besides their GEMMs, with delayed scaling (the amax comes from its history: no pass to find it), read from
    transformer_engine/pytorch/module/{layernorm_linear,linear,base}.py:
    - q/k/v and the MLP's first matrices are LayerNormLinears (Megatron-Core's linear_qkv, linear_fc1): the norm
      writes its output in FP8 (layernorm_fwd_fp8), no cast of its own; with SP that FP8 shard is gathered. The
      backward transposes the gathered FP8 input for the weight-gradient GEMM (tex.fp8_transpose(ln_out_total);
      Hopper's FP8 GEMMs take only the TN layout): a byte read and one written, h per token each, at any tp.
    - The row-parallel linears cast their inputs (h/tp, f/tp) with their transposes (fp8_cast_transpose_fused:
      2 bytes read, 2 written): 2 per element.
    - The output gradients of the column-parallel linears, (h + 2 kv_dim)/tp and f/tp for each first matrix, are
      cast with their transposes (fp8_cast_transpose_bgrad_fused): 2 per element. Those of the row-parallel ones
      (grad_output_preprocess): without SP the same fused cast of h, 2 each; with SP a cast of the local h/tp shard
      (1.5: 2 bytes read, 1 written), an all-gather in FP8 and a transpose of the whole h (1)."""
    h, f, kv = model.hidden, model.ffn_hidden, model.kv_dim
    mlp_in = 2 if model.mlp == "swiglu" else 1
    forward = 2 * (h + f) / tp
    row_grads = 2 * (1.5 * h / tp + h) if sequence_parallel else 2 * 2 * h
    backward = 2 * (h + 2 * kv + mlp_in * f) / tp + row_grads + 2 * h
    return forward, backward


def datasheet_layer_times(model: ModelSpec, device: DeviceProfile, tp: int, b: float, sequence_parallel: bool,
                          precision: str = "bf16", compiled: bool = False, fp8_casts: str = "torchao",
                          fp8_weight_casts: bool = True, cp: int = 1, fused_attention: bool | None = None,
                          flash: bool = False, masked_chunks: bool = False) -> LayerTimes:
    """One block on a tp shard for b sequences (a fraction with context parallelism: each cp rank holds s/cp of
    each sequence and attends to all s keys, which is b/cp sequences' GEMM and attention work); attention fused as
    fused_attention says (None: as the device profile does), as FlashAttention-2 where flash, over whole masked
    chunks where masked_chunks (_attention_core_s)."""
    h, f, s, kv = model.hidden, model.ffn_hidden, model.seq_len, model.kv_dim
    tokens = b * s
    fp8 = precision == "fp8"
    # Megatron-LM's block on a tp shard (Shoeybi et al. 2019, Fig. 3): q, k, v and the MLP's first matrices
    # column-parallel, the output projection and the MLP's last matrix row-parallel. k and v are kv_dim wide
    # (grouped-query attention, Ainslie et al. 2023); SwiGLU has two h x f matrices in (gate, up) and one out
    # (Shazeer 2020, eq. 6). With fp8 these run as Float8 GEMMs; the attention core stays bf16.
    mlp_in = 2 if model.mlp == "swiglu" else 1
    gemm_fwd = (gemm_s(device, tokens, (h + 2 * kv) / tp, h, fp8=fp8) + gemm_s(device, tokens, h, h / tp, fp8=fp8)
                + mlp_in * gemm_s(device, tokens, f / tp, h, fp8=fp8) + gemm_s(device, tokens, h, f / tp, fp8=fp8))
    fused = device.fused_attention if fused_attention is None else fused_attention
    attn_fwd, attn_bwd = _attention_core_s(device, model, tp, b, cp, fused, flash, masked_chunks)
    elem = elementwise_per_token(model, tp, sequence_parallel, compiled)
    if fp8 and fp8_casts == "transformer-engine":
        # Transformer Engine keeps each step's FP8 weights from its first microbatch on (is_first_microbatch):
        # their casts are spread over the step and left out (their memory is not: memory.fp8_weight_cache_bytes).
        cast_fwd, cast_bwd = transformer_engine_fp8_moves_per_token(model, tp, sequence_parallel)
    elif fp8:
        # torchao: the activations' and gradients' casts at 2.5 passes eager, 1.5 compiled (amax and cast fuse), and
        # the weights cast every microbatch, in the forward and again in the backward (force_recompute_fp8_weight_in_bwd,
        # as torchtitan recommends with FSDP), each matrix over tp (ModelSpec.block_matrix_params) unless
        # fp8_weight_casts is False.
        passes = 1.5 if compiled else 2.5
        weights = passes * model.block_matrix_params() / tp / tokens if fp8_weight_casts else 0.0
        cast_fwd = float8_casts_per_token(model, tp, sequence_parallel) * passes / 2.5 + weights
        cast_bwd = float8_grad_casts_per_token(model, tp, sequence_parallel) * passes / 2.5 + weights
    else:
        cast_fwd = cast_bwd = 0.0
    elem_fwd = memory_s(device, tokens * (elem + cast_fwd))
    fwd = gemm_fwd + attn_fwd + elem_fwd
    # Backward: a data-gradient and a weight-gradient GEMM per forward GEMM; elementwise ~2x; its own casts.
    bwd = 2 * gemm_fwd + attn_bwd + memory_s(device, tokens * (2 * elem + cast_bwd))
    return LayerTimes(forward_s=fwd, backward_s=bwd, selective_recompute_s=attn_fwd)


def layer_times(model: ModelSpec, device: DeviceProfile, tp: int, b: float, sequence_parallel: bool,
                precision: str = "bf16", compiled: bool = False, fp8_casts: str = "torchao",
                fp8_weight_casts: bool = True, cp: int = 1, fused_attention: bool | None = None,
                flash: bool = False, masked_chunks: bool = False) -> LayerTimes:
    """A measured profile wins where it has this layer; the datasheet model otherwise. A measured profile times
    eager blocks: compiled, they save what elementwise_per_token says fusion saves, at the profile's own memory
    bandwidth (never below half the measurement)."""
    if device.measured and precision == "bf16":
        from planner.measured import measured_layer_times  # only when a measured profile is in use

        got = measured_layer_times(device, model, tp, b, sequence_parallel, cp, runtime_cp=masked_chunks)
        if got is not None:
            if masked_chunks:
                # The profile times the attention core alone without cp, causal; the runtime's cp core, which
                # selective recomputation re-runs, computes its chunks' whole masked rectangles.
                got = replace(got, selective_recompute_s=got.selective_recompute_s * masked_chunk_waste(cp))
            if not compiled:
                return got
            saved = memory_s(device, b * model.seq_len * (elementwise_per_token(model, tp, sequence_parallel, False)
                                                         - elementwise_per_token(model, tp, sequence_parallel, True)))
            return LayerTimes(max(got.forward_s / 2, got.forward_s - saved), max(got.backward_s / 2, got.backward_s - 2 * saved),
                              got.selective_recompute_s, got.source, got.cp_comm_included)
    return datasheet_layer_times(model, device, tp, b, sequence_parallel, precision, compiled, fp8_casts, fp8_weight_casts, cp,
                                 fused_attention, flash, masked_chunks)


def datasheet_end_times(model: ModelSpec, device: DeviceProfile, tp: int, b: float) -> EndTimes:
    h, s, v = model.hidden, model.seq_len, model.padded_vocab(tp)
    tokens = b * s
    # Embedding: gather rows, add learned positions (read 2, write 1 per element; with RoPE only the gather,
    # read 1 write 1); backward scatter-adds.
    moves = 3 if model.position == "learned" else 2
    emb_f = memory_s(device, moves * tokens * h)
    emb_b = memory_s(device, moves * tokens * h)
    # Head: final LayerNorm, logits GEMM over the vocab shard, cross-entropy in fp32 over the logits.
    ce = cross_entropy_s(device, tokens * v / tp)
    head_f = memory_s(device, 2 * tokens * h) + gemm_s(device, tokens, v // tp, h) + ce
    head_b = memory_s(device, 4 * tokens * h) + 2 * gemm_s(device, tokens, v // tp, h) + ce
    return EndTimes(emb_f, emb_b, head_f, head_b)


def cross_entropy_s(device: DeviceProfile, logits: float, logit_bytes: int = 4) -> float:
    """The cross-entropy over `logits` elements, one way (forward, or backward): the softmax reads and writes them
    twice, 4 passes, in fp32 (meshplan's runtime and Megatron-LM upcast them) unless logit_bytes says otherwise."""
    return memory_s(device, 4 * logits * logit_bytes / device.dtype_bytes)


def gathered_loss_extra_s(device: DeviceProfile, model: ModelSpec, tp: int, b: float, logit_bytes: int) -> float:
    """Each way, what a loss over logits gathered to every tp rank (Framework.loss_parallel False) costs beyond the
    vocab-parallel one datasheet_end_times prices: the cross-entropy over the whole vocabulary, at logit_bytes."""
    logits = b * model.seq_len * model.padded_vocab(tp)
    return cross_entropy_s(device, logits, logit_bytes) - cross_entropy_s(device, logits / tp)


def end_times(model: ModelSpec, device: DeviceProfile, tp: int, b: float) -> EndTimes:
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
