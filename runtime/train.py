"""One training step, with pipelining or without, and what runtime.launch times and logs around it.

A step is: every microbatch's forward and backward (the pipeline schedule's, or the plain loop's), the gradient
reduction the ZeRO stage leaves to the end (runtime.parallel.data), clipping, and the optimizer step."""

from __future__ import annotations

import inspect
import math
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def lr_at(step: int, *, peak: float, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """The learning rate of step `step` (0-based): linear warm-up to peak over warmup_steps steps (the first step
    gets peak / warmup_steps, not 0), then cosine decay to min_ratio * peak at decay_steps, flat after it
    (Loshchilov & Hutter 2017, eq. 5, one cycle; GPT-3, Brown et al. 2020, appendix B, and Llama 2, section
    2.2, train with warm-up plus cosine decay to 10% of the peak). A function of the step alone, so a resumed run
    follows the schedule of the run it resumes."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step + 1 - warmup_steps) / max(1, decay_steps - warmup_steps))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


_STEP_HAS_RETURN_OUTPUTS = None


def pipeline_step(schedule, stages, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """One schedule step over this rank's stages; the batch's mean loss on the rank holding the last stage."""
    global _STEP_HAS_RETURN_OUTPUTS
    if _STEP_HAS_RETURN_OUTPUTS is None:
        _STEP_HAS_RETURN_OUTPUTS = "return_outputs" in inspect.signature(schedule.step).parameters
    first, last = any(s.is_first for s in stages), any(s.is_last for s in stages)
    mb_losses: list[torch.Tensor] = []
    kwargs = {"target": y, "losses": mb_losses} if last else {}
    if _STEP_HAS_RETURN_OUTPUTS:
        kwargs["return_outputs"] = False  # the last stage would otherwise keep every microbatch's logits
    schedule.step(*((x,) if first else ()), **kwargs)
    return float(torch.stack(mb_losses).detach().mean()) if last else None


def plain_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_microbatches: int, loss_fn,
               timing: dict | None) -> float:
    """Gradient accumulation over microbatches without pipelining. DDP reduces only during the last microbatch's
    backward (no_sync before it); FSDP2 (zero 2/3) reduce-scatters after every microbatch's, as its own hooks do."""
    total = 0.0
    for i, (xm, ym) in enumerate(zip(x.chunk(num_microbatches), y.chunk(num_microbatches))):
        last = i == num_microbatches - 1
        no_sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()
        with no_sync:
            t0 = time.perf_counter()
            loss = loss_fn(model(xm), ym)
            t1 = time.perf_counter()
            (loss / num_microbatches).backward()
            t2 = time.perf_counter()
        if timing is not None:
            timing["forward_s"].append(t1 - t0), timing["backward_s"].append(t2 - t1)
        total = total + loss.detach()
    return float(total) / num_microbatches


def time_stage_calls(stages, timings: dict) -> None:
    """Record the wall time of each stage's forward and backward per microbatch (CPU only: on a GPU these
    calls return before the kernels finish). The send/recv waits are outside these calls."""
    for stage in stages:
        for method, key in (("forward_one_chunk", "forward_s"), ("backward_one_chunk", "backward_s")):
            def timed(*a, _call=getattr(stage, method), _into=timings[stage.stage_index][key], **kw):
                t0 = time.perf_counter()
                out = _call(*a, **kw)
                _into.append(time.perf_counter() - t0)
                return out
            setattr(stage, method, timed)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
