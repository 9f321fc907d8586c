"""torch.compile of each transformer block, as torchtitan applies it (apply_compile, per TransformerBlock): the
blocks are identical, so one compiled graph serves them all, and what sits between blocks (embedding, head, the
pipeline's sends, FSDP2's hooks) stays eager. Applied after TP, CP and recomputation (which the compiled graph then
contains) and before FSDP2, which wraps the compiled block.

A compiled block is an OptimizedModule holding the block as `_orig_mod`; parameter names gain that prefix, which
runtime.parallel.recompute.clean_fqn strips (torch.distributed.checkpoint strips it too).

On CPU the blocks compile to C++ through inductor (gcc); on CUDA to Triton kernels. Which plans compile is
planner.cost.compile_problem's to say (the planner searches and prices only those)."""

from __future__ import annotations

import torch
import torch.nn as nn


def apply_compile(blocks: nn.ModuleDict) -> None:
    """Compile each block of this stage in place (fullgraph: a graph break inside a block is an error, not a
    silent fall back to eager)."""
    for name in list(blocks.keys()):
        blocks[name] = torch.compile(blocks[name], fullgraph=True)
