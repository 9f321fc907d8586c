"""Memory per pipeline device: weights, gradients, optimizer state and activations.

Activation formulas are Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (section 4, eqs. 1-2 and table 2), in bytes for a 2-byte training dtype."""

from __future__ import annotations

from dataclasses import dataclass

from planner.errors import SpecError
from planner.specs import ModelSpec

GIB = 1024**3
DEFAULT_MEMORY_HEADROOM_GIB = 2.0
"""Space every device keeps free beyond the predicted peak (allocator fragmentation, NCCL's buffers, a
spike the model does not see): a plan at 79.7 of 80 GiB is not a fit. `--memory-headroom` sets it."""


def check_headroom(headroom_gib: float, device, source: str) -> None:
    """A headroom that leaves nothing of a device's memory is refused (SpecError naming `source`: the flag or the
    picker it came from), not priced as negative GiB usable."""
    if headroom_gib >= device.memory_gib:
        raise SpecError(source, "memory_headroom_gib", f"{headroom_gib:g} GiB leaves nothing of the {device.memory_gib:g} GiB "
                                                       f"of one {device.name}; give less than {device.memory_gib:g} GiB")


@dataclass(frozen=True)
class MemoryBreakdown:
    weights_gib: float
    grads_gib: float
    """The gradients; beside the activations' peak only where grads_at_peak (else they exist in the step)."""
    optimizer_gib: float
    activations_gib: float
    overhead_gib: float
    sharding_gib: float = 0.0
    """ZeRO 2/3: the gathered weights and full gradients of the blocks in flight."""
    step_gib: float = 0.0
    """What exists only while the optimizer steps, when no activations are held (step_grad_bytes_per_param)."""
    grads_at_peak: bool = True
    weight_cache_gib: float = 0.0
    """FP8 copies of the GEMM weights kept all step long (fp8_weight_cache_bytes; Transformer Engine)."""

    @property
    def total_gib(self) -> float:
        """The peak: during the forward and backward (activations and gathered weights held), or during the step
        (the gradients and the step's copies held)."""
        g = self.grads_gib if self.grads_at_peak else 0.0
        return (self.weights_gib + self.optimizer_gib + self.overhead_gib + self.weight_cache_gib
                + max(self.activations_gib + self.sharding_gib + g, self.step_gib + self.grads_gib))


@dataclass(frozen=True)
class SavedTensors:
    """What the software that runs a block keeps for its backward, where frameworks differ."""

    dropout: bool
    """Dropout after attention and after the MLP (and on the attention probabilities): its masks are kept."""
    attention_output_copy: bool
    """The attention output is copied before the output projection (a transpose then reshape), so the fused
    attention kernel's output and the projection's input are two tensors."""
    fused_swiglu: bool
    """SwiGLU as one fused op keeping its two inputs (Megatron-LM's bias_swiglu_impl); otherwise silu and the
    product each keep theirs."""
    rmsnorm_keeps_normalized: bool = False
    """RMSNorm as plain ops (torch's nn.RMSNorm on CPU): x * rsqrt(mean(x^2)) is kept for the weight's gradient
    beside the input, 2 units per norm more (measured); a fused kernel keeps the input and the 1/rms only."""
    gqa_output_copy: bool = False
    """With fewer K/V heads than query heads, SDPA's output is laid out (batch, heads, seq, head_dim), so the
    transpose-reshape before the output projection copies it (measured on CPU with enable_gqa)."""
    loss_tensors: int = 2
    """fp32 tensors of the logits' size alive at once while the loss runs its backward: 2 for Megatron-LM's
    vocab-parallel cross entropy (the softmax it keeps and the gradient it computes in place; Korthikanti et al.
    2022, section 4.4); 3 for F.cross_entropy (log_softmax's output, which it keeps, the gradient of that output
    from nll_loss's backward and the logits' gradient: measured, bench/memory_vs_measured.py)."""
    pipeline_keeps_logits: bool = False
    """torch.distributed.pipelining computes the loss in each microbatch's forward and keeps the last stage's
    output, the logits, and log_softmax's output until that microbatch's backward: two logits-sized tensors per
    microbatch in flight on the last stage (GPipe holds all of them), and the loss's backward adds the other one
    or two of loss_tensors."""
    fp8_gemm_inputs: bool = False
    """With fp8, the linears keep their inputs for the weight-gradient GEMM as FP8 (1 byte) and not in bf16:
    Transformer Engine v1.8, transformer_engine/pytorch/module/linear.py (_Linear.forward saves the FP8 input or
    its FP8 transpose, not inputmat_no_fp8, when the wgrad runs in FP8, the default recipe) and
    layernorm_linear.py (saves ln_out allocated as uint8, the local shard under sequence parallelism, and the
    norm's bf16 input). False: the software keeps them as without fp8."""


# Korthikanti et al. 2022's accounting (Megatron-LM: GPT-3 trained with dropout 0.1, fused kernels).
MEGATRON_SAVED = SavedTensors(dropout=True, attention_output_copy=False, fused_swiglu=True)
# Megatron-Core with Transformer Engine's linears (its TE layer spec; NeMo 24.07): the same, FP8 inputs with fp8.
MEGATRON_CORE_SAVED = SavedTensors(dropout=True, attention_output_copy=False, fused_swiglu=True, fp8_gemm_inputs=True)
# meshplan's runtime (runtime/model.py): no dropout, plain silu * up, F.cross_entropy. The attention output is not
# copied: torch's fused SDPA kernels (flash on CPU, flash or cuDNN on CUDA) return it laid out as (batch, seq, heads, head_dim), so
# y.transpose(1, 2).reshape(...) is a view (measured on CPU: bench/memory_vs_measured.py).
# On CPU (torch 2.13) nn.RMSNorm keeps x * rsqrt(mean x^2) and SDPA with enable_gqa returns a (batch, heads, ...)
# output that the reshape copies; on CUDA these are not measured here and are kept as on CPU (the larger).
RUNTIME_SAVED = SavedTensors(dropout=False, attention_output_copy=False, fused_swiglu=False, loss_tensors=3,
                             pipeline_keeps_logits=True, rmsnorm_keeps_normalized=True, gqa_output_copy=True)


def activation_bytes_per_layer(model: ModelSpec, tp: int, b: int, sequence_parallel: bool, recompute: str,
                               fused_attention: bool = False, saved: SavedTensors = MEGATRON_SAVED, fp8: bool = False) -> float:
    """Activations one transformer block keeps for one microbatch until its backward (2-byte dtype, 1-byte masks).

    Korthikanti et al. 2022, eq. 1: s*b*h*(34 + 5as/h) for GPT without parallelism. Per block, in units of
    s*b*h: the two norms' inputs 4 (RMSNorm keeps its input as LayerNorm does; as plain ops also its normalized
    x, 4 more: SavedTensors.rmsnorm_keeps_normalized); the q/k/v input 2; q 2 and k, v
    2 each at kv_heads/heads of the width (grouped-query attention, Ainslie et al. 2023); the output projection's
    input 2 (and the attention kernel's own output 2 where the software copies between them); the MLP's input 2
    and inside it, with f = ffn_hidden: GELU's input and the second matrix's input 4f/h (16 for f = 4h), SwiGLU's
    gate and up outputs and the product 6f/h (8f/h where silu and the product keep theirs apart); dropout masks 1
    each after attention and after the MLP. The attention scores add 5as/h (softmax output 2, dropout mask 1,
    dropout output 2; without dropout only the softmax output), which selective recomputation and a fused
    FlashAttention kernel do not keep. With tensor parallelism (Korthikanti eq. 2, table 2) the norms' inputs,
    the q/k/v and MLP inputs and the dropout masks (10 for GPT) are replicated unless sequence parallelism
    shards them; the rest (24 for GPT) and the scores are sharded over t. For GPT as Megatron-LM keeps it this
    is exactly eq. 1 and 2.

    fp8 where the software keeps FP8 GEMM inputs (SavedTensors.fp8_gemm_inputs, Transformer Engine): the q/k/v
    input, the MLP's input and the MLP's last matrix's input take 1 byte an element instead of 2; the output
    projection keeps an FP8 copy of the attention output (1) beside the bf16 one the attention kernel keeps for
    its own backward (TE v1.8 attention.py, FusedAttnFunc.forward saves q, k, v and out), and only the copy when
    selective recomputation checkpoints the attention core (Megatron-Core core_r0.8.0
    megatron/core/transformer/attention.py, checkpoint_core_attention: its output is not kept). The norms'
    inputs, q, k, v and the activation function's input stay bf16."""
    s, h, a, t = model.seq_len, model.hidden, model.heads, tp
    sbh = s * b * h
    if recompute == "full":
        # Korthikanti et al. 2022, section 4.3: full recomputation stores only the block input, 2sbh
        # (sharded over t with sequence parallelism).
        return 2 * sbh / (t if sequence_parallel else 1)
    d = 1.0 if saved.dropout else 0.0
    f = model.ffn_hidden / h
    mlp = (6 if saved.fused_swiglu else 8) * f if model.mlp == "swiglu" else 4 * f
    gemm_in = 2.0
    copied = (saved.attention_output_copy and fused_attention) or (saved.gqa_output_copy and model.kv_heads < model.heads)
    attn_out = 2 + (2 if copied else 0)
    if fp8 and saved.fp8_gemm_inputs:
        # Units of s*b*h at 2 bytes: an FP8 input is 1. The MLP's last matrix's input is f/h wide (2f/h -> f/h).
        gemm_in = 1.0
        mlp -= f
        attn_out = 1 + (0 if recompute == "selective" else 2)
    replicated = 4 + gemm_in + gemm_in + 2 * d + (4 if saved.rmsnorm_keeps_normalized and model.norm == "rmsnorm" else 0)
    sharded = 2 + 4 * model.kv_heads / model.heads + attn_out + mlp
    scores = 0.0 if (recompute == "selective" or fused_attention) else (2 + 3 * d) * a * s / h
    if sequence_parallel:
        return sbh * (replicated + sharded + scores) / t
    return sbh * (replicated + sharded / t + scores / t)


def cp_gathered_kv_bytes(model: ModelSpec, tp: int, b: int, cp: int) -> float:
    """Context parallelism: the keys and values all-gathered over cp, kept by attention for the backward, beyond
    the rank's own s/cp of them (which activation_bytes_per_layer counts): 2 x 2 bytes x b x s(1 - 1/cp) x kv_dim/t."""
    if cp <= 1:
        return 0.0
    return 2 * 2 * b * model.seq_len * (1 - 1 / cp) * model.kv_dim / tp


def full_layer_activation_bytes(model: ModelSpec, tp: int, b: int, sequence_parallel: bool, fused_attention: bool,
                                saved: SavedTensors = MEGATRON_SAVED, fp8: bool = False) -> float:
    """What one block holds while it is recomputed for its backward (full recomputation's working set)."""
    return activation_bytes_per_layer(model, tp, b, sequence_parallel, "none", fused_attention, saved, fp8)


def layer_param_count(model: ModelSpec, tp: int) -> float:
    """Parameters of one block on one tp rank: the matrices and the column-parallel biases sharded, the norms
    and the row-parallel layers' biases (output projection, MLP's last matrix: added after the all-reduce)
    replicated (Shoeybi et al. 2019, section 3)."""
    replicated = 2 * model.norm_params() + (2 * model.hidden if model.bias else 0)
    return (model.layer_params() - replicated) / tp + replicated


def fp8_weight_cache_bytes(model: ModelSpec, tp: int, primary: bool) -> float:
    """What one block's FP8 weights on a tp rank hold beyond the 2-byte weights state_bytes_per_param counts,
    where Transformer Engine keeps them from a step's first microbatch on (Framework.fp8_weight_casts False):
    1 byte for the FP8 weight and 1 for its FP8 transpose, which the backward's input-gradient GEMM reads
    (Hopper's FP8 GEMMs take only one layout, so the transpose is stored, not strided). With FP8 primary
    weights (`primary`: no bf16 copy of the matrices exists) those 2 bytes are the weights state counted: 0
    beyond it; otherwise the cache is 2 bytes more per matrix weight. Megatron-Core's TE linears pass
    is_first_microbatch to Transformer Engine (megatron/core/extensions/transformer_engine.py, TELinear.forward;
    None, no cache, only with disable_parameter_transpose_cache, default False); Transformer Engine then builds
    the FP8 weight with its transpose once (cast_transpose_) into the module's _fp8_workspaces (transformer_engine/pytorch/module/base.py,
    get_fp8_workspace) and keeps it there: across the step's microbatches, the optimizer step and the next
    step. The norms and biases stay bf16; the embedding and the output layer (tensor_parallel's own linear, not
    Transformer Engine's) are not cast."""
    return 0.0 if primary else 2.0 * model.block_matrix_params() / tp


def end_param_count(model: ModelSpec, tp: int, embedding: bool, head: bool) -> float:
    """Vocab-parallel embedding (padded vocab sharded over tp) and learned positions (replicated) on the first
    stage; final norm and the column-parallel head on the last (none when tied: the embedding serves)."""
    n = 0.0
    if embedding:
        table = model.padded_vocab(tp) * model.hidden
        n += table / tp + (model.embedding_params(tp) - table)
    if head:
        n += model.head_params(tp) / tp + model.norm_params()
    return n


def state_bytes_per_param(dtype_bytes: int, zero: int, shards: int, fp32_params: bool, grad_bytes: int = 4) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes per parameter on one rank, at a ZeRO stage (planner/zero.py)
    over `shards` ranks (dp x cp). Rajbhandari et al. 2020 (ZeRO), section 3.1 and figure 1, per software:

    fp32_params False, mixed precision as Megatron-LM and DeepSpeed keep it: 2-byte weights, 4-byte fp32 main
    gradients, 12 bytes of fp32 master weights, momentum and variance: 18, then 2 + 4 + 12/n (stage 1, the
    distributed optimizer), 2 + (4 + 12)/n (stage 2), 18/n (stage 3). With grad_bytes 2 (Megatron-Core's
    default gradient buffer in bf16, DistributedDataParallelConfig.grad_reduce_in_fp32 False) the gradients take
    2; the fp32 copy of its shard that the optimizer makes is alive only during the step
    (step_grad_bytes_per_param).
    fp32_params True, meshplan's runtime: fp32 weights and gradients and Adam's two fp32 moments (16 bytes).
    On a GPU (2-byte dtype) it computes in bf16: with DDP (stages 0, 1) autocast keeps a bf16 copy of every
    weight for the step (+2); FSDP2 with MixedPrecisionPolicy keeps fp32 shards (4/n each of weights,
    gradients, 8/n moments) and, at stage 2 (no resharding), the gathered bf16 weights for the step (+2).
    On a CPU (fp32 throughout) stage 2 keeps the gathered fp32 weights (+4). Stage 3 gathers each block's
    weights only while it runs: fsdp_transient_bytes."""
    n = max(1, shards) if zero >= 1 else 1
    if not fp32_params:
        return (2.0 / (n if zero >= 3 else 1), grad_bytes / (n if zero >= 2 else 1), 12.0 / n)
    gathered = 2.0 if dtype_bytes == 2 else 4.0  # the compute copy of a weight: bf16 on GPUs, fp32 on CPU
    if zero <= 1:
        return (4.0 + (2.0 if dtype_bytes == 2 else 0.0), 4.0, 8.0 / n)
    return (4.0 / n + (gathered if zero == 2 else 0.0), 4.0 / n, 8.0 / n)


def step_grad_bytes_per_param(zero: int, shards: int, fp32_params: bool, grad_bytes: int = 4) -> float:
    """Bytes per parameter that exist only while the optimizer steps: with 16-bit gradients (grad_bytes 2) and
    fp32 master weights, the fp32 copy of the rank's gradient shard, 4/n (4 without sharding). Megatron-Core
    core_r0.8.0 megatron/core/optimizer/distrib_optimizer.py: _copy_model_grads_to_main_grads sets
    shard_main_param.grad = shard_model_grad.float() inside step(), and optimizer.zero_grad() (set_to_none=True)
    frees it at the start of the next train_step (megatron/training/training.py, train_step) before any forward:
    it never coincides with the activations (MemoryBreakdown.total_gib takes the larger)."""
    if fp32_params or grad_bytes >= 4:
        return 0.0
    return 4.0 / (max(1, shards) if zero >= 1 else 1)


def fsdp_transient_bytes(dtype_bytes: int, zero: int, layer_params: float, fp32_params: bool) -> float:
    """What FSDP-style sharding holds besides the sharded state while a block runs: at stage 3 the gathered
    weights of the block computing and of the next one (FSDP2 prefetches it), at stages 2 and 3 the block's
    full gradients until they are reduce-scattered. In the compute dtype (bf16 on GPUs, fp32 on CPU)."""
    if zero < 2:
        return 0.0
    compute = 2.0 if (dtype_bytes == 2 or not fp32_params) else 4.0
    return layer_params * compute * ((2 if zero == 3 else 0) + 1)


def fsdp_root_bytes(dtype_bytes: int, zero: int, fp32_params: bool) -> float:
    """Bytes per embedding/head parameter that meshplan's runtime holds at ZeRO-3 while the loss's gradient
    reaches the head: FSDP2's root unit (embedding, final norm, head) resharded after the forward is gathered
    again, its all-gather output beside the unsharded weights it is copied into (measured:
    bench/memory_vs_measured.py). Other frameworks: not modelled (0)."""
    if zero < 3 or not fp32_params:
        return 0.0
    return 2 * (2.0 if dtype_bytes == 2 else 4.0)


def embedding_activation_bytes(model: ModelSpec, tp: int, b: int, sequence_parallel: bool, saved: SavedTensors = MEGATRON_SAVED) -> float:
    # Korthikanti et al. 2022, section 4.4: the embedding's dropout keeps s*b*h (with its mask), /t with sp.
    # Without dropout the embedding keeps nothing of size s*b*h: its output is the first block's input.
    if not saved.dropout:
        return 0.0
    return 3 * model.seq_len * b * model.hidden / (tp if sequence_parallel else 1)


def logit_bytes(model: ModelSpec, tp: int, b: float, gathered: int = 0) -> float:
    """One fp32 tensor of one microbatch's logits on a tp rank: 4sbv/t (Korthikanti et al. 2022, section 4.4). With
    `gathered` (Framework.loss_parallel False: the logits all-gathered to every tp rank, `gathered` bytes each), one
    tensor of the whole vocabulary's."""
    whole = model.seq_len * b * model.padded_vocab(tp)
    return gathered * whole if gathered else 4 * whole / tp


def head_kept_bytes(model: ModelSpec, tp: int, b: float, saved: SavedTensors = MEGATRON_SAVED, pipelined: bool = False,
                    gathered: int = 0) -> float:
    """What the last stage keeps of the logits' size per microbatch in flight (SavedTensors.pipeline_keeps_logits)."""
    return 2 * logit_bytes(model, tp, b, gathered) if pipelined and saved.pipeline_keeps_logits else 0.0


def head_transient_bytes(model: ModelSpec, tp: int, b: float, saved: SavedTensors = MEGATRON_SAVED, pipelined: bool = False,
                         gathered: int = 0) -> float:
    """What the loss's backward holds of the logits' size on the last stage beyond head_kept_bytes: loss_tensors of
    them, less the log_softmax output that head_kept_bytes already counts."""
    kept = 1 if pipelined and saved.pipeline_keeps_logits else 0
    return (saved.loss_tensors - kept) * logit_bytes(model, tp, b, gathered)


def device_memory(terms, params: float, end_params: float, blocks: int, activation_bytes: float, has_head: bool,
                  full_recompute: bool, m: int, knobs) -> MemoryBreakdown:
    """One pipeline device from its cost terms (planner.per_microbatch.Terms): `params` on it (`end_params` of them the
    embedding's and head's) in its `blocks` blocks, `activation_bytes` its peak in-flight activations (from the
    schedule's op order), plus the largest transient working set (Terms.peak_transient), over m microbatches of
    `knobs`."""
    transient, gathered = terms.peak_transient(has_head, end_params, full_recompute)
    return MemoryBreakdown(
        weights_gib=params * terms.weight_bytes / GIB,
        grads_gib=params * terms.grad_bytes / GIB,
        optimizer_gib=params * terms.optimizer_bytes / GIB,
        activations_gib=(activation_bytes + transient) / GIB,
        overhead_gib=terms.overhead_bytes / GIB,
        sharding_gib=gathered / GIB,
        step_gib=params * terms.step_bytes / GIB,
        grads_at_peak=terms.grads_at_peak(m, knobs),
        weight_cache_gib=blocks * terms.layer_cache_bytes / GIB,
    )
