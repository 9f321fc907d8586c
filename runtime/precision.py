"""Numerics of a run: fp32 on CPU ranks; bf16 mixed precision on CUDA; FP8 linears on GPUs that have FP8 tensor cores.

bf16 on CUDA (plan.precision "bf16", and everything but the linears under "fp8"):
- zero 0 and 1: torch.autocast(bf16) around the whole step (runtime.launch): every microbatch's forward and
  backward, through the last one, under one autocast region. Autocast caches the bf16 copy of each weight it casts
  (a leaf that requires grad) until the outermost region exits, so one bf16 copy of every weight of the rank
  (2 bytes per parameter) lives for the whole step, beside the fp32 weights, gradients and AdamW state.
- zero 2 and 3: FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), as torchtitan trains: fp32
  master shards, weights all-gathered in bf16, gradients reduce-scattered in fp32; no autocast
  (runtime.parallel.data.apply_fsdp).

fp8 (Micikevicius et al. 2022, "FP8 Formats for Deep Learning"): torchao's float8 training with tensorwise dynamic
scaling, convert_to_float8_training on every linear of the blocks (the LM head stays bf16, as torchtitan leaves
it, and so does any linear whose dims are not multiples of 16, which torch._scaled_mm needs); under TP the blocks'
linears take torchao's Float8 TP styles (runtime.parallel.tensor). torch._scaled_mm needs FP8 tensor cores, CUDA
compute capability 8.9 (Ada, Hopper) or newer: anywhere else the plan is refused. torchao is imported only here,
only for fp8 (pyproject's optional extra `fp8`)."""

from __future__ import annotations

import torch
import torch.nn as nn

FP8_MIN_CAPABILITY = (8, 9)


def fp8_problem() -> str | None:
    """Why this machine cannot train in fp8, or None if it can."""
    if not torch.cuda.is_available():
        return "fp8 needs a CUDA GPU of compute capability >= 8.9 (FP8 tensor cores); these ranks run on CPU"
    cap = torch.cuda.get_device_capability()
    if cap < FP8_MIN_CAPABILITY:
        return (f"fp8 needs CUDA compute capability >= 8.9 (FP8 tensor cores); {torch.cuda.get_device_name()} has "
                f"{cap[0]}.{cap[1]}")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "fp8 needs torchao (pip install -e '.[fp8]')"
    return None


def fp8_convertible(module: nn.Module, fqn: str) -> bool:
    """torchtitan's filter: the blocks' linears, not the LM head, with both dims multiples of 16."""
    return (isinstance(module, nn.Linear) and not fqn.endswith("head")
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def apply_fp8(chunk: nn.Module) -> nn.Module:
    """Swap the chunk's eligible linears for torchao Float8Linear (tensorwise dynamic scaling), in place; before TP,
    whose Float8 styles then shard them, as torchtitan converts the model before parallelising it."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(chunk, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                               module_filter_fn=fp8_convertible)
    return chunk
