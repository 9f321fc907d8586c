"""Activation recomputation per pipeline stage, with torch.utils.checkpoint (through torch's checkpoint_wrapper,
non-reentrant). Policies follow Korthikanti et al. 2022: 'selective' recomputes only the attention core
(softmax(q k^T) v: the s^2-sized activations, few FLOPs), 'full' recomputes whole blocks and keeps only each
block's input, 2*s*b*h bytes per layer."""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

# DCP's get_state_dict strips these from FQNs (checkpoint_wrapper's and torch.compile's); runtime code that
# names parameters strips them too.
WRAPPED_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def _checkpointed(module: nn.Module) -> nn.Module:
    # No dropout in the model, so the recomputed forward needs no saved RNG state.
    return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=False)


def apply_recompute(blocks: nn.ModuleDict, policy: str, recompute_layers: int | None = None) -> None:
    """Wrap this stage's blocks in place: 'none', 'selective' (every block's attention core) or 'full'
    (the first `recompute_layers` blocks of the stage, all of them when None)."""
    names = list(blocks.keys())
    if policy == "selective":
        for name in names:
            attn = blocks[name].attn
            attn.core = _checkpointed(attn.core)
    elif policy == "full":
        k = len(names) if recompute_layers is None else min(recompute_layers, len(names))
        for name in names[:k]:
            blocks[name] = _checkpointed(blocks[name])


def clean_fqn(name: str) -> str:
    """A parameter's model FQN with wrapper prefixes (checkpoint, compile, DDP) removed: the name it has in
    runtime.model.GPT."""
    for prefix in WRAPPED_PREFIXES:
        name = name.replace(prefix, "")
    return name[len("module."):] if name.startswith("module.") else name
