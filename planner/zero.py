"""Data parallelism by ZeRO stage (Rajbhandari et al. 2020): what each stage shards over the data-parallel group,
how it communicates and what it overlaps with the backward.

One table, read by both sides: the cost model prices and sizes a plan's `zero` from it (planner/terms.py) and
the runtime applies it (runtime/parallel/data.py). `--distributed-optimizer` is stage 1."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataParallelMode:
    zero: int
    """The ZeRO stage, 0 to 3."""
    runtime: str
    """How meshplan's runtime runs it."""
    shards_optimizer: bool
    """Optimizer state (and fp32 master weights where they are separate) split over dp."""
    shards_grads: bool
    """Gradients kept only as this rank's shard after each reduction."""
    shards_params: bool
    """Weights kept only as this rank's shard between uses."""
    reshard_after_forward: bool | None
    """FSDP2's fully_shard flag (None: not FSDP2)."""
    reduce_per_microbatch: bool
    """Gradients are reduce-scattered after every microbatch's backward (kept sharded); otherwise reduced once,
    after the last microbatch's."""
    param_gathers_per_microbatch: int
    """All-gathers of the weights per microbatch (forward and backward under resharding)."""
    param_gathers_per_step: int
    """All-gathers of the weights per step (the updated shards after the optimizer step, or the first forward's)."""
    overlaps_backward: bool
    """The reduction runs under the backward (DDP's buckets, FSDP2's hooks); otherwise after it."""
    through_ddp: bool
    """Reduced by DDP, which falls short under tp and pp (gradient_reducer)."""


ZERO_MODES = {
    0: DataParallelMode(0, "DDP (or a bucketed all-reduce by hand under tp or pp)", False, False, False, None,
                        False, 0, 0, True, True),
    1: DataParallelMode(1, "DDP with ZeRO-1 (a flat partition as Megatron's distributed optimizer, runtime.parallel.optimizer: "
                           "optimizer state sharded, each owner's updated range broadcast)", True, False, False, None, False, 0, 1, True, True),
    2: DataParallelMode(2, "FSDP2 fully_shard(reshard_after_forward=False)", True, True, True, False, True, 0, 1, True, False),
    3: DataParallelMode(3, "FSDP2 fully_shard(reshard_after_forward=True)", True, True, True, True, True, 2, 0, True, False),
}
ZERO_STAGES = tuple(ZERO_MODES)


def gradient_reducer(*, zero: int, replicas: int, tp: int, pipelined: bool) -> str:
    """What reduces meshplan's gradients over the replicas (dp * cp ranks): 'none' over one replica, 'fsdp2' for
    zero 2/3, 'ddp' for zero 0/1, and 'by hand' for zero 0/1 under tp or pipelining, where DDP falls short
    (runtime/parallel/data.py says why): a bucketed all-reduce after the step's last backward, not under it.
    Context parallelism alone keeps DDP. The runtime applies it; the planner prices the overlap and the gradient
    buffers from it."""
    if replicas == 1:
        return "none"
    if not ZERO_MODES[zero].through_ddp:
        return "fsdp2"
    return "by hand" if tp > 1 or pipelined else "ddp"
