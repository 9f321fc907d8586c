"""RunResult: one measured run, as one line of a results/*.jsonl file (design.md's schema).

Written by runtime.launch, read by `planner validate` and the dashboard: it lives in the planner (pure Python,
no torch), so that no planner module imports the runtime to read a results file."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass

from planner.errors import SpecError
from planner.io import append_jsonl
from planner.parsing import from_dict


@dataclass(frozen=True)
class RunResult:
    plan_id: str
    """The plan's id (plan.json "id")."""
    plan: dict
    """The whole plan as plan.json holds it (planner.plan.plan_to_dict), so a validator can predict it again."""
    device: str
    """What ran it: a CUDA device name, or 'cpu (gloo)'."""
    world_size: int
    """Processes (ranks) in the run: tp * pp * dp."""
    steps: int
    """Training steps this run measured (len(step_s)); a resumed run counts only its own."""
    step_s: list
    """Wall time of each step in seconds, between barriers (after a device synchronise on GPU)."""
    tokens_per_s: float
    """global_batch * seq_len / the median step_s after warm-up."""
    losses: list
    """Mean loss of each step over the global batch (mean over data-parallel replicas of their microbatch means)."""
    peak_memory_gib: list
    """Per rank, GiB, as memory_counter says: on GPU the CUDA allocator's max_memory_reserved after warm-up (what an
    OOM is decided on); on CPU the peak of live tensor bytes in one step after warm-up (runtime.memory), or in a
    compiled run the resident set's peak (ru_maxrss)."""
    predicted: dict | None
    """The plan's prediction, as plan.json holds it, or None when the plan has none."""
    started_at: str
    """ISO 8601 UTC time at which training started."""
    meshplan_version: str
    """Version of meshplan that ran it."""
    stage_timings: dict | None = None
    """Per pipeline stage, 'stage<k>': mean forward_s and backward_s per microbatch (wall time, on CPU)."""
    grad_norms: list | None = None
    """Per step: the 2-norm of the whole model's gradient (every stage and shard) before clipping; None in
    results written before runtime.launch clipped gradients."""
    machine: dict | None = None
    """How busy the machine was, so that a validator can tell the model's error from the machine's drift:
    reference_s (one block of the plan's model family at tp 1 and micro-batch 1, forward and backward: the case
    `planner profile` times, timed on every rank at once just before training; the median over ranks),
    cpu_share (the share of a core a rank got meanwhile), background_cores (cores other processes used during
    the timed steps), cpu_count, step_wait_s (on CPU, per step and rank: seconds the rank's training thread
    waited for a core, runtime.machine.run_queue_wait_s; None elsewhere), timed_steps (the indices of step_s
    that tokens_per_s counts) and step_synced_wait_s (on CPU without torch.compile, per step: what the ranks'
    waits added to it, compared block by block within each tensor/context-parallel group,
    runtime.machine.synced_waits). None in results written before runtime.launch recorded it; older results lack
    the last three."""
    peak_allocated_gib: list | None = None
    """Per rank, GiB: on GPU max_memory_allocated after warm-up (tensors, without the allocator's cache); on CPU the
    same figure as peak_memory_gib (no cache). None in results written before runtime.launch recorded it."""
    memory_counter: str | None = None
    """How peak_memory_gib was measured (runtime.launch.rank_memory says it in words); None in older results."""
    memory_breakdown_bytes: list | None = None
    """Per rank on CPU: what the bytes live at the peak were (runtime.memory.CATEGORIES -> bytes, summing to the
    peak); None on GPU, in compiled CPU runs and in older results."""
    memory_transient_by_op: list | None = None
    """Per rank on CPU: the activations_and_transient bytes at the peak by the op that made them (aten.mm, ...;
    'first seen as an input of X' for storages made where the counter cannot see, such as gloo's buffers)."""
    memory_step: int | None = None
    """Index in step_s of the step that counted memory on CPU (the last; counting makes it slower, so tokens_per_s
    and stage_timings leave it out); None where no step was left out (GPU, compiled, or no other step after warm-up)."""


def timed_steps(steps: int, warmup: int, left_out: int | None = None) -> list[int]:
    """Indices of the steps that tokens/s counts: all but `left_out` (the step that counted memory), less the
    first `warmup` of them (all of them if none would be left)."""
    kept = [i for i in range(steps) if i != left_out]
    return kept[warmup:] or kept


def median_tokens_per_s(step_s: list[float], warmup: int, tokens_per_step: int, left_out: int | None = None) -> float:
    """Tokens per second of the median of the timed_steps."""
    timed = [step_s[i] for i in timed_steps(len(step_s), warmup, left_out)]
    return tokens_per_step / statistics.median(timed) if timed else 0.0


def result_to_dict(result: RunResult) -> dict:
    return dataclasses.asdict(result)


def result_from_dict(d: dict, source: str) -> RunResult:
    """Validate one results line (unknown or missing keys, types) and build the RunResult."""
    r = from_dict(RunResult, d, source)
    optional = tuple(n for n in ("grad_norms", "peak_allocated_gib") if getattr(r, n) is not None)
    for name in ("step_s", "losses", "peak_memory_gib") + optional:
        value = getattr(r, name)
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise SpecError(source, name, f"expected a list of numbers, got {value!r}")
    if r.steps != len(r.step_s):
        raise SpecError(source, "steps", f"{r.steps} steps but {len(r.step_s)} step_s entries")
    if r.machine is not None:
        for key in ("reference_s", "cpu_share", "background_cores"):
            v = r.machine.get(key)
            if v is not None and not _number(v):
                raise SpecError(source, f"machine.{key}", f"expected a non-negative number, got {v!r}")
        _check_waits(r, source)
    if len(r.peak_memory_gib) != r.world_size:
        raise SpecError(source, "peak_memory_gib", f"{len(r.peak_memory_gib)} entries for world_size {r.world_size}; expected one per rank")
    return r


def _number(v) -> bool:
    """A non-negative int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


def _check_waits(r: RunResult, source: str) -> None:
    """machine.step_wait_s: per step, one non-negative wait per rank; machine.step_synced_wait_s: one per step;
    machine.timed_steps: indices into step_s."""
    waits, timed = r.machine.get("step_wait_s"), r.machine.get("timed_steps")
    if waits is not None and (not isinstance(waits, list) or len(waits) != r.steps or not all(
            isinstance(w, list) and len(w) == r.world_size and all(_number(x) for x in w) for w in waits)):
        raise SpecError(source, "machine.step_wait_s", f"expected {r.steps} lists (one per step) of {r.world_size} "
                                                       f"non-negative seconds (one per rank), got {waits!r}")
    synced = r.machine.get("step_synced_wait_s")
    if synced is not None and (not isinstance(synced, list) or len(synced) != r.steps or not all(_number(x) for x in synced)):
        raise SpecError(source, "machine.step_synced_wait_s", f"expected {r.steps} non-negative seconds (one per step), got {synced!r}")
    if timed is not None and (not isinstance(timed, list) or not timed or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < r.steps for i in timed)):
        raise SpecError(source, "machine.timed_steps", f"expected a non-empty list of step indices below {r.steps}, got {timed!r}")


def append_result(path: str, result: RunResult) -> None:
    """Append the run as one JSON line (planner.io.append_jsonl: one O_APPEND write)."""
    append_jsonl(path, result_to_dict(result))
