"""torch.compile of each transformer block, as torchtitan applies it (apply_compile, per TransformerBlock): the
blocks are identical, so one compiled graph serves them all, and what sits between blocks (embedding, head, the
pipeline's sends, FSDP2's hooks) stays eager. Applied after TP, CP and recomputation (which the compiled graph then
contains) and before FSDP2, which wraps the compiled block.

A compiled block is an OptimizedModule holding the block as `_orig_mod`; parameter names gain that prefix, which
runtime.parallel.recompute.clean_fqn strips (torch.distributed.checkpoint strips it too).

On CPU the blocks compile to C++ through inductor (gcc); on CUDA to Triton kernels."""

from __future__ import annotations

import torch
import torch.nn as nn


def apply_compile(blocks: nn.ModuleDict) -> None:
    """Compile each block of this stage in place (fullgraph: a graph break inside a block is an error, not a
    silent fall back to eager)."""
    for name in list(blocks.keys()):
        blocks[name] = torch.compile(blocks[name], fullgraph=True)


def compile_problem(*, tp: int, sequence_parallel: bool) -> str | None:
    """Why the runtime cannot compile a plan's blocks, or None. Checked on torch 2.13 (CPU, inductor), each against
    one process's losses: compile alone, with selective and full recomputation, DDP, FSDP2 zero 2 and 3, 1F1B and
    interleaved pipelining, cp, and tp with sequence parallelism (with cp, pp or FSDP2 too) all train as eager does.
    tp without sequence parallelism does not: its first backward fails in an eager DTensor redistribute that the
    compiled blocks hand a plain tensor gradient ('Tensor' object has no attribute '_local_tensor')."""
    if tp > 1 and not sequence_parallel:
        return ("compile with tp > 1 needs sequence_parallel: without it the backward fails on torch 2.13 (a DTensor "
                "redistribute is handed a plain tensor gradient by the compiled blocks); turn sequence_parallel on or "
                "compile off")
    return None
