"""Pipeline schedules: the per-device op order, and a discrete-event simulator that times it.

The order is defined once, here, and is the order `torch.distributed.pipelining` (torch 2.13) runs:
`ScheduleGPipe`, `Schedule1F1B` (`_step_microbatches`) and `ScheduleInterleaved1F1B`
(`_calculate_single_rank_operations`). tests/planner/test_schedule.py runs torch's own schedule code
against recording stand-in stages and compares, so the simulator times what the runtime executes.

Placement is looped, as in `ScheduleInterleaved1F1B`: with pp devices and v virtual stages per device
there are pp*v global stages, and device i holds stages i, i+pp, i+2pp, ...

Pure Python, no torch import (house style habit 9).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from collections.abc import Sequence

# Same spelling and members as planner.plan.SCHEDULES (kept local so plan.py may import this module).
SCHEDULES = ("1f1b", "gpipe", "interleaved")


@dataclass(frozen=True)
class Op:
    """One compute op of one pipeline device."""

    kind: str
    """Forward "F" or full backward "B" (input and weight gradients together)."""
    microbatch: int
    """0 .. num_microbatches-1."""
    stage: int
    """Global stage index 0 .. pp*virtual_stages-1; it runs on device stage % pp."""


def schedule_constraint(schedule: str, pp: int, num_microbatches: int, virtual_stages: int = 1) -> str | None:
    """Why torch 2.13 would reject this combination, or None if it runs.

    The search calls this to skip a candidate; stage_order raises ValueError with the same text.
    """
    m, v = num_microbatches, virtual_stages
    if schedule not in SCHEDULES:
        return f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}"
    for name, value in (("pp", pp), ("num_microbatches", m), ("virtual_stages", v)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"{name} must be a positive integer, got {value!r}"
    if schedule != "interleaved" and v != 1:
        return f"virtual_stages must be 1 for schedule {schedule!r}, got {v}; use 'interleaved' for v > 1"
    if schedule == "1f1b" and m < pp:
        # Schedule1F1B.__init__ raises this.
        return f"1f1b needs num_microbatches >= pp, got num_microbatches={m} < pp={pp}"
    if schedule == "interleaved":
        # ScheduleInterleaved1F1B.__init__: rounds = max(1, m // pp) must divide m.
        rounds = max(1, m // pp)
        if m % rounds != 0:
            return (f"interleaved needs num_microbatches to be a multiple of its number of rounds "
                    f"max(1, num_microbatches // pp) = {rounds}, got num_microbatches={m} with pp={pp}; "
                    f"a multiple of pp always works")
    return None


@lru_cache(maxsize=256)
def stage_order(schedule: str, pp: int, num_microbatches: int, virtual_stages: int = 1) -> list[list[Op]]:
    """The compute ops of each pipeline device (rank 0..pp-1), in the order that device runs them."""
    return [[Op(*op) for op in ops] for ops in _order(schedule, pp, num_microbatches, virtual_stages)]


@lru_cache(maxsize=256)
def _order(schedule: str, pp: int, m: int, v: int) -> list[list[tuple[str, int, int]]]:
    # Cached: the search prices many candidates with the same (schedule, pp, m, v); callers only read it.
    # (kind, microbatch, stage) tuples: the simulator reads these without building 65k Op objects.
    reason = schedule_constraint(schedule, pp, m, v)
    if reason is not None:
        raise ValueError(reason)
    if schedule == "gpipe":
        return [_gpipe_ops(rank, m) for rank in range(pp)]
    if schedule == "1f1b":
        return [_1f1b_ops(rank, pp, m) for rank in range(pp)]
    return [_interleaved_ops(rank, pp, m, v) for rank in range(pp)]


def _gpipe_ops(rank: int, m: int) -> list[tuple[str, int, int]]:
    # ScheduleGPipe._step_microbatches: every forward, then every backward, both in microbatch order.
    return [("F", mb, rank) for mb in range(m)] + [("B", mb, rank) for mb in range(m)]


def _1f1b_ops(rank: int, pp: int, m: int) -> list[tuple[str, int, int]]:
    # Schedule1F1B._step_microbatches: min(m, pp - rank) warm-up forwards, then "1B1F" pairs until every
    # forward has run, then the remaining backwards (cooldown).
    warmup = min(m, pp - rank)
    ops = [("F", mb, rank) for mb in range(warmup)]
    for mb in range(m - warmup):
        ops += [("B", mb, rank), ("F", warmup + mb, rank)]
    ops += [("B", mb, rank) for mb in range(m - warmup, m)]
    return ops


def _interleaved_ops(rank: int, pp: int, m: int, v: int) -> list[tuple[str, int, int]]:
    # ScheduleInterleaved1F1B._calculate_single_rank_operations with _get_warmup_ops and _get_1f1b_rank_ops
    # (enable_zero_bubble=False), without the None padding, which only aligns torch's printed grid.
    # Note v=1 here is NOT Schedule1F1B: torch warms up 2*(pp-1-rank) forwards instead of pp-rank.
    rounds = max(1, m // pp)
    per_round = m // rounds
    warmup = min((v - 1) * per_round + 2 * (pp - 1 - rank), m * v)
    steady = m * v - warmup
    next_fwd_mb, next_bwd_mb = [0] * v, [0] * v
    ops: list[tuple[str, int, int]] = []

    def forward(step: int) -> None:
        local = (step // per_round) % v
        ops.append(("F", next_fwd_mb[local], local * pp + rank))
        next_fwd_mb[local] += 1

    def backward(step: int) -> None:
        local = v - 1 - ((step - warmup) // per_round) % v
        ops.append(("B", next_bwd_mb[local], local * pp + rank))
        next_bwd_mb[local] += 1

    for step in range(warmup + steady + warmup):
        if step < warmup:
            forward(step)
        elif step < warmup + steady:
            forward(step)
            backward(step)
        else:
            backward(step)
    return ops


@lru_cache(maxsize=256)
def inflight_vectors(schedule: str, pp: int, num_microbatches: int, virtual_stages: int = 1) -> tuple[np.ndarray, ...]:
    """Per device: the microbatches alive on each of its chunks (forward done, backward not), as counts per
    local chunk (one row each), at the moments right after a forward (the only moments a peak can occur),
    dominated rows dropped. A device's activation peak for any bytes per chunk is the largest dot product with
    one of these rows: exact for every layer split, at a cost independent of the number of microbatches."""
    reason = schedule_constraint(schedule, pp, num_microbatches, virtual_stages)
    if reason is not None:
        raise ValueError(reason)
    m, v = num_microbatches, virtual_stages
    if schedule == "gpipe":
        return tuple(np.array([[m]]) for _ in range(pp))  # every forward before any backward
    if schedule == "1f1b":
        return tuple(np.array([[min(m, pp - i)]]) for i in range(pp))  # the warm-up forwards, then 1B1F
    per_round = m // max(1, m // pp)
    out = []
    for rank in range(pp):
        # The counts _interleaved_ops produces, without building it: warm-up forwards, then steady steps of one
        # forward (chunk a(s)) and one backward (chunk b(s)). a and b are periodic in s with period
        # per_round * v, over which each chunk gains and loses per_round: the states repeat, so one period
        # of steady steps holds every distinct state. Every steady state holds warmup + 1 in all, so none
        # dominates another; the warm-up states are dominated by the first steady one.
        warmup = min((v - 1) * per_round + 2 * (pp - 1 - rank), m * v)
        steady = m * v - warmup
        cur = [0] * v
        for s in range(warmup):
            cur[(s // per_round) % v] += 1
        seen = {tuple(cur)} if steady == 0 else set()
        for s in range(warmup, warmup + min(steady, per_round * v)):
            cur[(s // per_round) % v] += 1
            seen.add(tuple(cur))
            cur[v - 1 - ((s - warmup) // per_round) % v] -= 1
        out.append(np.array(sorted(seen)))
    return tuple(out)


def peak_inflight(vectors: np.ndarray, bytes_by_chunk) -> float:
    """The largest sum of alive activations over a device's op order (see inflight_vectors)."""
    return float((vectors @ np.asarray(bytes_by_chunk, dtype=float)).max())


def alive_at_peak(schedule: str, pp: int, num_microbatches: int, virtual_stages: int, rank: int) -> int:
    """Most chunk-microbatches alive at once on device `rank`, in closed form from the orders above: GPipe all
    m; 1F1B its min(m, pp - rank) warm-up forwards; interleaved its warm-up forwards plus the first steady
    forward (tests/planner/test_schedule.py checks this against the op orders)."""
    m, v = num_microbatches, virtual_stages
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(m, pp - rank)
    per_round = m // max(1, m // pp)
    warmup = min((v - 1) * per_round + 2 * (pp - 1 - rank), m * v)
    return warmup + 1 if warmup < m * v else warmup


def bubble_fraction(schedule: str, pp: int, num_microbatches: int, virtual_stages: int = 1) -> float:
    """Idle share of the iteration, bubble_s / iteration_s, for equal stages and free communication.

    Narayanan et al. give the bubble relative to the ideal time m*(t_f+t_b); this returns it relative to the
    whole iteration (ideal + bubble), i.e. x / (1 + x) of theirs: (p-1)/(m+p-1) for GPipe and 1F1B,
    (p-1)/(v*m+p-1) for interleaved 1F1B. A cheap bound for the search; simulate() is the exact figure.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    p, m = pp, num_microbatches
    v = virtual_stages if schedule == "interleaved" else 1
    # Narayanan et al. 2021 §2.2.1 (bubble = (p-1)/m of ideal) and §2.2.2 (interleaving divides it by v)
    bubble_of_ideal = (p - 1) / (v * m)
    return bubble_of_ideal / (1.0 + bubble_of_ideal)


@dataclass(frozen=True)
class Event:
    """One interval on the timeline the dashboard draws."""

    device: int
    """Pipeline rank that runs it (for a send, the sending device)."""
    stage: int
    """Global stage (for a send, the sending stage: k -> k+1 for an activation, k -> k-1 for a gradient)."""
    microbatch: int
    op: str
    """One of "forward", "backward", "recompute" (runs at the start of a backward) or "send"."""
    start_s: float
    end_s: float


@dataclass(frozen=True)
class SimResult:
    """Timing of one iteration (all microbatches, forward and backward; no optimizer step)."""

    iteration_s: float
    """Time from the first op's start until the last device finishes its last op (pipeline flush)."""
    timeline: tuple[Event, ...]
    """Compute events in each device's run order and send events after the op that produced them;
    sort by start_s to draw. Empty when simulate(..., with_timeline=False)."""
    busy_s: tuple[float, ...]
    """Per device: the sum of its forward, recompute and backward time (sends excluded: they are async)."""
    bubble_s: float
    """iteration_s - max(busy_s): the idle time of the busiest device within the iteration (waiting for
    inputs during warm-up, steady state and flush). Equal stages, no communication: (p-1)*(t_f+t_b) for
    GPipe and 1F1B, where t_f, t_b are one stage's per-microbatch times."""
    finish_s: tuple[float, ...] = ()
    """Per device: when it ends its last op (max is iteration_s); available without the timeline."""


def simulate(schedule: str, pp: int, num_microbatches: int, virtual_stages: int,
             forward_s: Sequence[float], backward_s: Sequence[float],
             p2p_s: float | Sequence[float] = 0.0, recompute_s: Sequence[float] | None = None,
             *, with_timeline: bool = True) -> SimResult:
    """Time stage_order(...) with per-stage costs.

    forward_s[k], backward_s[k], recompute_s[k]: seconds per microbatch of global stage k (pp*virtual_stages
    entries); the recomputation runs at the start of each backward and backward_s excludes it. p2p_s: seconds
    to send an activation from stage k to k+1, and the same-size gradient back (one number, or pp*v-1 of them);
    stages on one device (pp=1) pass tensors locally for free, as torch does.

    An op starts when its device is free (each device runs its ops in order) and its input has arrived:
    F(mb, k) needs F(mb, k-1) + p2p; B(mb, k) needs B(mb, k+1) + p2p and F(mb, k); B of the last stage needs
    its own F. Sends are asynchronous and uncontended: they occupy the link, not the device.
    Raises ValueError on bad lengths or an inconsistent order (rather than hanging).
    """
    order = _order(schedule, pp, num_microbatches, virtual_stages)
    m, n = num_microbatches, pp * virtual_stages
    fwd, bwd = _per_stage_s("forward_s", forward_s, n), _per_stage_s("backward_s", backward_s, n)
    rec = [0.0] * n if recompute_s is None else _per_stage_s("recompute_s", recompute_s, n)
    if isinstance(p2p_s, (int, float)):
        link = [float(p2p_s)] * (n - 1)
    else:
        link = _per_stage_s("p2p_s", p2p_s, n - 1)
    if pp == 1:
        link = [0.0] * (n - 1)  # all stages on one device: torch hands tensors over locally

    # Every op is a slot: F(mb, k) is k*m + mb and B(mb, k) is n*m + k*m + mb. Per slot: its duration, the
    # slot whose end it waits for (-1: none) and the link latency on that edge. B(mb, k) needing F(mb, k)
    # is implied: B(mb, k+1) cannot end before F(mb, k) has, and an order that puts F(mb, k) after
    # B(mb, k) on its device deadlocks, which is reported below.
    nm = n * m
    dur = [x for x in fwd for _ in range(m)] + [r + b for r, b in zip(rec, bwd) for _ in range(m)]
    lat = [0.0] * m + [x for x in link for _ in range(m)] + [x for x in link for _ in range(m)] + [0.0] * m
    seqs, dep = _slots(schedule, pp, m, virtual_stages)

    # Advance a device while its next op's input has arrived; a blocked device registers on the slot it
    # waits for and is pushed back on the stack when that slot finishes. Each op settles once: O(ops).
    end: list[float | None] = [None] * (2 * nm)
    begin = [0.0] * (2 * nm)
    waiter = [-1] * (2 * nm)
    pos, free_s = [0] * pp, [0.0] * pp
    stack = list(range(pp - 1, -1, -1))
    while stack:
        d = stack.pop()
        seq, i, t = seqs[d], pos[d], free_s[d]
        while i < len(seq):
            s = seq[i]
            before = dep[s]
            if before >= 0:
                arrived = end[before]
                if arrived is None:
                    waiter[before] = d
                    break
                arrived += lat[s]
                if arrived > t:
                    t = arrived
            begin[s] = t
            t += dur[s]
            end[s] = t
            if waiter[s] >= 0:
                stack.append(waiter[s])
            i += 1
        pos[d], free_s[d] = i, t

    stuck = [d for d in range(pp) if pos[d] < len(seqs[d])]
    if stuck:
        d = stuck[0]
        raise ValueError(f"inconsistent order: no device can proceed; device {d} waits at "
                         f"{Op(*order[d][pos[d]])} ({len(stuck)} of {pp} devices blocked)")
    # Each device runs every microbatch of each of its stages once: m times their forward, recompute and backward.
    busy = [m * sum(fwd[k] + rec[k] + bwd[k] for k in range(d, n, pp)) for d in range(pp)]
    iteration_s = max(free_s)
    timeline = _timeline(order, seqs, begin, end, rec, link) if with_timeline else ()
    return SimResult(iteration_s, timeline, tuple(busy), iteration_s - max(busy), tuple(free_s))


@lru_cache(maxsize=256)
def _slots(schedule: str, pp: int, m: int, v: int) -> tuple[list[list[int]], list[int]]:
    """simulate's slot numbers of each device's ops (F(mb, k) is k*m + mb, B(mb, k) n*m + k*m + mb) and the slot
    each one waits for (-1: none): they depend on the order only, so the search's many simulations of one
    (schedule, pp, m, v) share them. Callers only read them."""
    n = pp * v
    nm = n * m
    dep = list(range(-m, nm - m)) + list(range(nm + m, 2 * nm)) + list(range(nm - m, nm))
    seqs = [[k * m + mb if kind == "F" else nm + k * m + mb for kind, mb, k in ops] for ops in _order(schedule, pp, m, v)]
    return seqs, dep


def _timeline(order: list[list[tuple[str, int, int]]], seqs: list[list[int]], begin: list[float],
              end: list, rec: list[float], link: list[float]) -> tuple[Event, ...]:
    # Built only on request: 130k frozen Events cost about as much as the simulation itself.
    events = []
    for d, (ops, seq) in enumerate(zip(order, seqs)):
        for (kind, mb, k), s in zip(ops, seq):
            start, stop = begin[s], end[s]
            if kind == "F":
                events.append(Event(d, k, mb, "forward", start, stop))
                if k < len(link) and link[k] > 0.0:
                    events.append(Event(d, k, mb, "send", stop, stop + link[k]))
                continue
            if rec[k] > 0.0:
                events.append(Event(d, k, mb, "recompute", start, start + rec[k]))
            events.append(Event(d, k, mb, "backward", start + rec[k], stop))
            if k > 0 and link[k - 1] > 0.0:
                events.append(Event(d, k, mb, "send", stop, stop + link[k - 1]))
    return tuple(events)


def _per_stage_s(name: str, values: Sequence[float], expected: int) -> list[float]:
    out = [float(x) for x in values]
    if len(out) != expected:
        raise ValueError(f"{name} needs {expected} entries (one per stage or link), got {len(out)}")
    if any(x < 0.0 or x != x for x in out):
        raise ValueError(f"{name} must be non-negative seconds, got {out}")
    return out


if __name__ == "__main__":
    import time

    for schedule, pp, m, v in (("1f1b", 64, 512, 1), ("interleaved", 8, 64, 4), ("gpipe", 64, 512, 1)):
        n = pp * v
        for with_timeline in (False, True):
            best_s = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                result = simulate(schedule, pp, m, v, [1.0] * n, [2.0] * n, 0.1, with_timeline=with_timeline)
                best_s = min(best_s, time.perf_counter() - t0)
            ms = best_s * 1e3
            print(f"{schedule:12s} pp={pp:3d} m={m:4d} v={v}  timeline={with_timeline!s:5s}  {ms:7.1f} ms  "
                  f"iteration={result.iteration_s:.1f}  bubble={result.bubble_s:.1f}")
