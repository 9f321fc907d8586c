"""Terms: one configuration's per-microbatch seconds and bytes on one device, the record planner/terms.py's
CostModel builds and every caller (exact pricing, the split program, the search's bounds) reads."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from planner.plan import Knobs
from planner.specs import ModelSpec


@dataclass(frozen=True)
class Terms:
    """One configuration's per-microbatch seconds and bytes on one device (a tp shard)."""

    layer_forward_s: float
    """One block's forward, with its two tensor-parallel all-reduces."""
    layer_backward_s: float
    """Its backward, with its two all-reduces."""
    layer_recompute_s: float
    """What the knob's policy re-runs per block before its backward: the attention core (selective), the
    whole forward (full), nothing (none)."""
    full_recompute_s: float
    """One block switched to full recomputation: its forward again, collectives included."""
    layer_tp_comm_s: float
    """Of the block's forward + backward, its tensor-parallel collectives."""
    tp_all_reduce_s: float
    """One all-reduce of a microbatch's activations over tp, the part not hidden under GEMMs (the unit of the
    counts above)."""
    embedding_forward_s: float
    embedding_backward_s: float
    head_forward_s: float
    head_backward_s: float
    """The embedding (first stage) and final norm + head + loss (last stage), with their all-reduces."""
    head_tp_comm_s: float
    """Of the head's forward + backward, its tensor-parallel collectives: its input gradient's all-reduce, and the
    logits' all-gather where the loss is not vocab-parallel (Framework.loss_parallel False)."""
    stage_forward_s: float
    stage_backward_s: float
    """torch.distributed.pipelining's own work per microbatch and stage (a measured profile's; 0 otherwise)."""
    layer_activation_bytes: float
    """What one block keeps per in-flight microbatch under the knob's policy."""
    full_activation_bytes: float
    """The same for a fully recomputed block (its input)."""
    embedding_activation_bytes: float
    """What the embedding keeps per in-flight microbatch (first stage)."""
    head_transient_bytes: float
    """Logits and their gradient while the loss runs (last stage): memory.head_transient_bytes."""
    head_kept_bytes: float
    """What the last stage keeps of the logits' size per microbatch in flight (memory.head_kept_bytes)."""
    logit_bytes: float
    """One tensor of a microbatch's logits on this tp rank (memory.logit_bytes)."""
    recompute_working_bytes: float
    """What a fully recomputed block holds while it is re-run for its backward."""
    layer_params: float
    """Parameters of one block on this tp rank."""
    layer_cache_bytes: float
    """Bytes one block keeps all step long beyond its parameters' state: FP8 copies of its weights where the
    framework casts them once per step (memory.fp8_weight_cache_bytes; 0 otherwise)."""
    weight_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    """Bytes per parameter of weights, gradients and optimizer state (sharding over dp x cp included)."""
    step_bytes: float
    """Bytes per parameter alive only during the optimizer step, never beside activations (memory.step_grad_bytes_per_param)."""
    sharding_transient_bytes: float
    """ZeRO stages 2 and 3: the gathered weights and full gradients of the blocks in flight (fsdp_transient_bytes)."""
    end_gathered_bytes: float
    """Bytes per embedding/head parameter that ZeRO-3 gathers again for the head's backward (fsdp_root_bytes)."""
    grads_from_backward: bool
    """The gradients are made by the backward, not held in buffers (Framework.grad_buffers, and no DDP)."""
    cp_all_gather_s: float
    """Context parallelism: one block's keys and values all-gathered over cp (forward), and their gradients
    reduce-scattered back (as much again, in the backward); inside layer_forward_s and layer_backward_s."""
    overhead_bytes: float
    """The framework's memory besides tensors."""
    capacity_bytes: float
    """Device memory minus the headroom: what a device's peak must stay within."""

    def layer_state_bytes(self, m: int, knobs: Knobs) -> float:
        """One block's bytes beside the activations at their peak: its parameters' state and its cached copies."""
        return self.layer_params * self.peak_state_bytes(m, knobs) + self.layer_cache_bytes

    @property
    def layer_step_bytes(self) -> float:
        """One block's bytes during the optimizer step."""
        return self.layer_params * self.step_state_bytes + self.layer_cache_bytes

    @property
    def state_bytes_per_param(self) -> float:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes

    def grads_at_peak(self, m: int, knobs: Knobs) -> bool:
        """Whether the gradients exist while the activations peak (at the first backward): gradients that the
        backward makes do not exist yet with one microbatch, nor under GPipe, whose forwards all come first (the
        moment after the first backward, one microbatch fewer beside the gradients, is left out: measured 2-4%
        over the prediction on gpt-tiny/llama-tiny, bench/memory_vs_measured.py)."""
        gpipe = knobs.pp > 1 and knobs.schedule == "gpipe"
        return not self.grads_from_backward or (m > 1 and not gpipe)

    def peak_state_bytes(self, m: int, knobs: Knobs) -> float:
        """Bytes per parameter held beside the activations at their peak."""
        return self.weight_bytes + self.optimizer_bytes + (self.grad_bytes if self.grads_at_peak(m, knobs) else 0.0)

    @property
    def step_state_bytes(self) -> float:
        """Bytes per parameter held during the optimizer step (no activations, nothing gathered then)."""
        return self.state_bytes_per_param + self.step_bytes

    def peak_transient(self, head: bool, end_params: float, full_recompute: bool) -> tuple[float, float]:
        """(activation bytes, ZeRO-gathered bytes) of the largest working set beside the kept activations: the
        loss's backward on the last stage (under ZeRO-3 with, instead, one logits tensor and the embedding/head
        weights gathered again), or a block's gathered weights and full gradients under ZeRO 2/3 with, where it
        recomputes fully, its re-run. They happen at different moments of the backward: the larger counts."""
        block = (self.recompute_working_bytes if full_recompute else 0.0, self.sharding_transient_bytes)
        if not head:
            return block
        loss = max((self.head_transient_bytes, 0.0), (self.logit_bytes, end_params * self.end_gathered_bytes), key=sum)
        return max(loss, block, key=sum)

    @cached_property
    def fixed_busy_s(self) -> tuple[float, float, float]:
        """A middle stage's block-independent forward + backward seconds, and what the embedding and the head add
        to it (the search's bounds read these for every candidate)."""
        mid = self.fixed_forward_s(False, False) + self.fixed_backward_s(False, False)
        return (mid, self.fixed_forward_s(True, False) + self.fixed_backward_s(True, False) - mid,
                self.fixed_forward_s(False, True) + self.fixed_backward_s(False, True) - mid)

    def fixed_forward_s(self, embedding: bool, head: bool) -> float:
        """A stage's forward seconds that do not depend on its blocks (sends aside)."""
        return self.stage_forward_s + (self.embedding_forward_s if embedding else 0.0) + (self.head_forward_s if head else 0.0)

    def fixed_backward_s(self, embedding: bool, head: bool) -> float:
        return self.stage_backward_s + (self.embedding_backward_s if embedding else 0.0) + (self.head_backward_s if head else 0.0)

    end_param_table: tuple = ()
    """end_param_count for (embedding, head) = (F, F), (F, T), (T, F), (T, T), computed once."""

    def end_params(self, model: ModelSpec, tp: int, embedding: bool, head: bool) -> float:
        return self.end_param_table[2 * embedding + head]
