"""Memory per pipeline device: weights, gradients, optimizer state and activations.

Activation formulas are Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (section 4, eqs. 1-2 and table 2), in bytes for a 2-byte training dtype."""

from __future__ import annotations

from dataclasses import dataclass

from planner.specs import ModelSpec

GIB = 1024**3
DEFAULT_MEMORY_HEADROOM_GIB = 2.0
"""Space every device keeps free beyond the predicted peak (allocator fragmentation, NCCL's buffers, a
spike the model does not see): a plan at 79.7 of 80 GiB is not a fit. `--memory-headroom` sets it."""


@dataclass(frozen=True)
class MemoryBreakdown:
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    overhead_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib + self.activations_gib + self.overhead_gib


def activation_bytes_per_layer(model: ModelSpec, tp: int, b: int, sequence_parallel: bool, recompute: str,
                               fused_attention: bool = False) -> float:
    """Activations one transformer block keeps for one microbatch until its backward (2-byte dtype)."""
    s, h, a, t = model.seq_len, model.hidden, model.heads, tp
    sbh = s * b * h
    if recompute == "full":
        # Korthikanti et al. 2022, section 4.3: full recomputation stores only the block input, 2sbh
        # (sharded over t with sequence parallelism).
        return 2 * sbh / (t if sequence_parallel else 1)
    # Korthikanti et al. 2022, eq. 1: s*b*h*(34 + 5as/h) with no parallelism; the 5as/h term is the
    # attention scores, softmax output and dropout mask, which selective recomputation (and a fused
    # FlashAttention kernel) does not store.
    scores = 0.0 if (recompute == "selective" or fused_attention) else 5 * a * s / h
    # The 34 splits into 24 (inside the tp-sharded GEMM regions, table 2) and 10 (LayerNorms and
    # dropouts, replicated over tp unless sequence parallelism shards them, eq. 2 vs table 2).
    if sequence_parallel:
        return sbh * (34 + scores) / t
    return sbh * (10 + 24 / t + scores / t)


def full_layer_activation_bytes(model: ModelSpec, tp: int, b: int, sequence_parallel: bool, fused_attention: bool) -> float:
    """What one block holds while it is recomputed for its backward (full recomputation's working set)."""
    return activation_bytes_per_layer(model, tp, b, sequence_parallel, "none", fused_attention)


def layer_param_count(model: ModelSpec, tp: int) -> float:
    """Parameters of one block on one tp rank (GEMM weights sharded, LayerNorms replicated)."""
    h = model.hidden
    return (model.layer_params() - 4 * h) / tp + 4 * h


def end_param_count(model: ModelSpec, tp: int, embedding: bool, head: bool) -> float:
    """Vocab-parallel embedding and positions on the first stage; final norm and an untied head on the last."""
    v, h = model.padded_vocab(tp), model.hidden
    n = 0.0
    if embedding:
        n += v * h / tp + model.seq_len * h
    if head:
        n += v * h / tp + 2 * h
    return n


def state_bytes_per_param(dtype_bytes: int, distributed_optimizer: bool, dp: int) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes per parameter.

    Mixed precision Adam (Rajbhandari et al. 2020, ZeRO, section 3.1, as Megatron-LM keeps it):
    2-byte weights, 4-byte fp32 main gradients, 12 bytes of fp32 master weights, momentum and
    variance: 18 bytes, or 6 + 12/d with the distributed optimizer (ZeRO-1). An fp32 run (CPU) keeps
    4 + 4 + 8 = 16 bytes, all of it sharded over d by FSDP2."""
    if dtype_bytes == 2:
        return 2.0, 4.0, 12.0 / (dp if distributed_optimizer else 1)
    d = dp if distributed_optimizer else 1
    return 4.0 / d, 4.0 / d, 8.0 / d


def embedding_activation_bytes(model: ModelSpec, tp: int, b: int, sequence_parallel: bool) -> float:
    # Korthikanti et al. 2022, section 4.4: the embedding's dropout keeps s*b*h (with its mask), /t with sp.
    return 3 * model.seq_len * b * model.hidden / (tp if sequence_parallel else 1)


def head_transient_bytes(model: ModelSpec, tp: int, b: int) -> float:
    """Logits and their gradient in fp32 for one microbatch on the last stage (Korthikanti et al. 2022,
    section 4.4: 4sbv/t for the output layer; the gradient doubles it while the loss backward runs)."""
    return 2 * 4 * model.seq_len * b * model.padded_vocab(tp) / tp


def device_memory(terms, params: float, activation_bytes: float, has_head: bool, full_recompute: bool) -> MemoryBreakdown:
    """One pipeline device from its cost terms (planner.terms.Terms): `params` on it, `activation_bytes` its
    peak in-flight activations (from the schedule's op order), plus the transient working set of the head and,
    where any of its blocks recomputes fully, of the block being re-run (whichever is larger)."""
    transient = terms.head_transient_bytes if has_head else 0.0
    if full_recompute:
        transient = max(transient, terms.recompute_working_bytes)
    return MemoryBreakdown(
        weights_gib=params * terms.weight_bytes / GIB,
        grads_gib=params * terms.grad_bytes / GIB,
        optimizer_gib=params * terms.optimizer_bytes / GIB,
        activations_gib=(activation_bytes + transient) / GIB,
        overhead_gib=terms.overhead_bytes / GIB,
    )
