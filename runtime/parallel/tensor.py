"""Tensor parallelism with DTensor (Megatron-LM's layout, Shoeybi et al. 2019, section 3): column-parallel q/k/v
and MLP fc (SwiGLU: gate and up), row-parallel attention output and MLP proj (SwiGLU: down), a vocab-parallel
embedding, a column-parallel head whose vocab-sharded logits go straight into a vocab-parallel cross-entropy
(`loss_parallel`), and, when the plan asks, sequence parallelism (Korthikanti et al. 2022, section 4.2.2) for the
norms (LayerNorm or RMSNorm).

Grouped-query attention shards k and v by whole K/V heads, so tp must divide kv_heads (planner.specs.ModelSpec.
tp_problem refuses a plan otherwise): rank r holds query heads [r*a/tp, (r+1)*a/tp) and K/V heads
[r*g/tp, (r+1)*g/tp), exactly the K/V heads those query heads read. K/V heads are never replicated.
Tied embeddings: the embedding (row-parallel over the vocabulary) and the head (column-parallel over it) both shard
the V x h matrix along V, so after sharding the head takes the embedding's DTensor again (GPT.tie_weights).

Every pipeline-stage boundary carries plain tensors: the residual stream (B, T, h) without sequence parallelism,
its local sequence shard (B, T/tp, h) with it. The head returns its local logit shard (B, T, V/tp) and
`cross_entropy` rewraps it as a DTensor; so `torch.distributed.pipelining` never sends or receives a DTensor.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def block_styles(fp8: bool) -> tuple[type, type, type]:
    """(column-parallel, row-parallel, input-preparing) styles for the blocks' linears: torchao's Float8 styles
    when they are Float8Linear (runtime.precision; the casts to float8 then happen before the all-gathers, as
    torchtitan shards them), DTensor's own otherwise."""
    if not fp8:
        return ColwiseParallel, RowwiseParallel, PrepareModuleInput
    from torchao.float8.float8_tensor_parallel import (Float8ColwiseParallel, Float8RowwiseParallel,
                                                        PrepareFloat8ModuleInput)
    return Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput


def tp_plan(*, sequence_parallel: bool, mlp: str, loss_parallel: bool = True, fp8: bool = False) -> dict[str, ParallelStyle]:
    """FQN pattern (fnmatch, as parallelize_module reads it) -> DTensor style, for runtime.model.GPT with this MLP."""
    sp, swiglu = sequence_parallel, mlp == "swiglu"
    Colwise, Rowwise, PrepareInput = block_styles(fp8)  # noqa: N806 (classes)
    # Layout of the residual stream between blocks: sharded along the sequence with SP, replicated without.
    stream = Shard(1) if sp else Replicate()
    plan = {
        # Vocab-parallel embedding: each rank holds V/tp rows; out-of-range ids give zeros and the partial
        # sums are all-reduced (Megatron-LM VocabParallelEmbedding).
        "embed.tok": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        # With SP the summed token + position embedding is cut along the sequence (a local slice, no comm).
        "embed": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1)) if sp else None,
        "layers.*.ln_1": SequenceParallel() if sp else None,
        # SP: all-gather the sequence before attention (Korthikanti et al. 2022, figure 5, the g operator). Without
        # SP the input is made one replicated DTensor here too, so that the input gradients of q, k and v are
        # summed as partial sums and all-reduced once at this boundary (Megatron-LM's f operator): left to each
        # Colwise, every linear all-reduces its own (5 all-reduces in a SwiGLU block's backward where the cost
        # model prices 2; counted with CommDebugMode: tests/runtime/test_tp_comm.py).
        "layers.*.attn": PrepareInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
        "layers.*.attn.wq": Colwise(),
        "layers.*.attn.wk": Colwise(),
        "layers.*.attn.wv": Colwise(),
        # All-reduce (or reduce-scatter into the sequence shard with SP) after the row-parallel projection.
        "layers.*.attn.wo": Rowwise(output_layouts=stream),
        "layers.*.ln_2": SequenceParallel() if sp else None,
        "layers.*.mlp": PrepareInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
        "layers.*.mlp.fc": Colwise() if not swiglu else None,
        "layers.*.mlp.proj": Rowwise(output_layouts=stream) if not swiglu else None,
        # SwiGLU: gate and up column-parallel, so silu(gate) * up is elementwise on the local f/tp columns.
        "layers.*.mlp.gate": Colwise() if swiglu else None,
        "layers.*.mlp.up": Colwise() if swiglu else None,
        "layers.*.mlp.down": Rowwise(output_layouts=stream) if swiglu else None,
        "norm": SequenceParallel() if sp else None,
        # With loss_parallel the logits stay sharded over the vocabulary, (B, T, V/tp) per rank, never gathered.
        "head": ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1) if loss_parallel else Replicate()),
    }
    return {fqn: style for fqn, style in plan.items() if style is not None}


def matching_modules(model: nn.Module, pattern: str) -> list[str]:
    """FQNs of the modules of `model` that a TP-plan key names."""
    return [name for name, _ in model.named_modules() if name and fnmatch.fnmatchcase(name, pattern)]


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool, mlp: str, loss_parallel: bool = True,
             fp8: bool = False) -> nn.Module:
    """Shard one model chunk (a pipeline stage, or the whole GPT) over the 1-D tp mesh, in place.

    Keys naming modules that this chunk does not hold (the head on the first stage, say) are left out,
    so parallelize_module sees only what exists."""
    styles = tp_plan(sequence_parallel=sequence_parallel, mlp=mlp, loss_parallel=loss_parallel, fp8=fp8)
    plan = {fqn: style for fqn, style in styles.items() if matching_modules(model, fqn)}
    parallelize_module(model, tp_mesh, plan)
    model.tie_weights()  # sharding gave the embedding and the head a DTensor each; tied, they share one
    return model


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, tp_mesh: DeviceMesh | None) -> torch.Tensor:
    """Mean next-token cross-entropy of a microbatch, in fp32.

    logits: (B, T, V), or this rank's vocab shard (B, T, V/tp) when tp_mesh is given (loss_parallel); then the
    softmax's max and sum are all-reduced over tp inside loss_parallel (Megatron-LM's vocab-parallel
    cross-entropy), and the full logits never exist. The caller runs backward under `loss_parallel()` too."""
    if tp_mesh is not None and tp_mesh.size() > 1:
        logits = DTensor.from_local(logits, tp_mesh, [Shard(2)], run_check=False)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))  # (B*T, V) vs (B*T,)


__all__ = ["tp_plan", "apply_tp", "cross_entropy", "matching_modules"]
