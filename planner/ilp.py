"""The layer split: how many blocks each pipeline device holds, and how many of them recompute fully.

Transformer blocks are identical, so the unknowns are counts, not assignments: n_i blocks on pipeline device i
and r_i of them fully recomputed. The integer program: minimise T, the slowest device's seconds per microbatch,
subject to sum(n_i) = L, n_i >= min_layers, 0 <= r_i <= n_i and every device's memory within its capacity. One
binary per (layer, stage) did not finish in 30 s for 96 layers on 8 stages; counts solve in milliseconds
(design.md). With interleaving a device's blocks are then dealt evenly over its v virtual stages (split_chunks).

Two solvers of the same program:
- `solve_split`, used by the planner: exact and direct. The program is separable: device i can hold n blocks
  within T exactly when t_i(n) <= T, where t_i(n) is its time for n blocks with the fewest recomputed blocks that
  fit, nondecreasing in n. So the optimum is T* = max(max_i t_i(min_layers), the L-th smallest of all t_i(n)),
  and any n_i <= cap_i(T*) summing to L is optimal. Written by hand because the search solves it hundreds of
  times per plan: CBC through PuLP costs 10-70 ms a call (a process start and a model file), this 0.1 ms.
- `assign_layers_cbc`, the PuLP/CBC formulation of the same program; tests/planner/test_ilp.py holds the direct
  solver to CBC's optimum on randomised instances.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from planner import schedule

TIME_TOLERANCE = 1e-9
"""Relative slack when comparing a device's time with T* (sums in another order differ in the last bits)."""


class DeviceTerms(NamedTuple):
    """Linear coefficients of one pipeline device, per microbatch (from planner.per_microbatch.Terms). A named tuple, not a
    dataclass: the search builds one per pipeline device for thousands of candidates, and reads them as rows of
    one array."""

    fixed_s: float
    """Time that does not depend on the block count (embedding, head, pipelining's per-stage work,
    blocking sends)."""
    layer_s: float
    """Forward + backward of one block (with the knob's recomputation policy)."""
    recompute_s: float
    """Extra time of one block switched to full recomputation (0 where the knob allows none)."""
    inflight: float
    """Microbatches whose activations the device holds at its peak, per block (the mean over its virtual stages
    of each stage's peak when it has several)."""
    layer_act_bytes: float
    """Activations of one block per in-flight microbatch under the knob's policy."""
    full_act_bytes: float
    """The same for a fully recomputed block."""
    fixed_bytes: float
    """Bytes independent of the block count (embedding/head state and activations, framework overhead)."""
    layer_state_bytes: float
    """Weights + grads + optimizer state of one block."""
    transient_bytes: float = 0.0
    """The head's logits while the loss runs (last device), or, under full recomputation, the re-run block's
    working set: whichever is larger, held at one moment."""
    working_bytes: float = 0.0
    """What a fully recomputed block holds while it re-runs, where recomputing is the split's choice (r_i > 0);
    the device then holds max(transient_bytes, working_bytes)."""
    step_fixed_bytes: float = 0.0
    layer_step_bytes: float = 0.0
    """What the device holds while the optimizer steps, when no activations are: its fixed state (framework
    overhead, embedding/head state with the step's copies) and per block its state with the step's copies
    (planner.memory.step_grad_bytes_per_param). It must fit as well as memory_bytes."""

    def step_memory_bytes(self, n: float) -> float:
        return self.step_fixed_bytes + self.layer_step_bytes * n

    def memory_bytes(self, n: float, r: float) -> float:
        transient = max(self.transient_bytes, self.working_bytes) if r > 0 else self.transient_bytes
        return (self.fixed_bytes + transient + self.layer_state_bytes * n
                + self.inflight * (self.layer_act_bytes * n - (self.layer_act_bytes - self.full_act_bytes) * r))

    def time_s(self, n: float, r: float) -> float:
        return self.fixed_s + self.layer_s * n + self.recompute_s * r


@dataclass(frozen=True)
class Assignment:
    layers: tuple[int, ...]
    """Blocks per device."""
    recomputed: tuple[int, ...]
    """Fully recomputed blocks per device."""
    slowest_s: float
    """The slowest device's time per microbatch."""


@lru_cache(maxsize=256)
def inflight_by_stage(sched: str, p: int, m: int, v: int) -> tuple[float, ...]:
    """Most microbatches of each (global) stage alive at once on its device (forward done, backward not)."""
    out = [0.0] * (p * v)
    for i, vecs in enumerate(schedule.inflight_vectors(sched, p, m, v)):
        for c in range(v):
            out[c * p + i] = float(vecs[:, c].max())
    return tuple(out)


def device_terms(tm, knobs, m: int, model, stage_fixed_s: list[float]) -> list[DeviceTerms]:
    """The program's coefficients for each pipeline device, read from the cost terms `tm` (planner.per_microbatch.Terms)
    of `knobs`; stage_fixed_s[k] is stage k's block-independent seconds per microbatch (forward + backward)."""
    p, v = knobs.pp, knobs.virtual_stages
    inflight = inflight_by_stage(knobs.schedule, p, m, v)
    allow = knobs.recompute == "none"
    sb, step_sb = tm.peak_state_bytes(m, knobs), tm.step_state_bytes
    shared = dict(layer_s=tm.layer_forward_s + tm.layer_backward_s + tm.layer_recompute_s,
                  recompute_s=tm.full_recompute_s if allow else 0.0, layer_act_bytes=tm.layer_activation_bytes,
                  full_act_bytes=tm.full_activation_bytes if allow else tm.layer_activation_bytes,
                  layer_state_bytes=tm.layer_state_bytes(m, knobs), layer_step_bytes=tm.layer_step_bytes)
    by_ends = {}  # the memory rows of a device with (embedding, head): the middle devices share one
    out = []
    for i in range(p):
        first, last = i == 0, i == p - 1
        rows = by_ends.get((first, last))
        if rows is None:
            ends = tm.end_params(model, knobs.tp, first, last)
            fixed_b = tm.overhead_bytes + ends * sb
            if first:
                fixed_b += inflight[0] * tm.embedding_activation_bytes
            if last:
                fixed_b += inflight[p * v - 1] * tm.head_kept_bytes
            rows = by_ends[(first, last)] = dict(
                fixed_bytes=fixed_b, transient_bytes=sum(tm.peak_transient(last, ends, knobs.recompute == "full")),
                working_bytes=sum(tm.peak_transient(False, ends, True)) if allow else 0.0,
                step_fixed_bytes=tm.overhead_bytes + ends * step_sb)
        # Device i runs stages i, p + i, ... (one per chunk).
        out.append(DeviceTerms(fixed_s=sum(stage_fixed_s[i::p]), inflight=sum(inflight[i::p]) / v, **shared, **rows))
    return out


def _device_times(n_layers: int, terms: list[DeviceTerms], capacity_bytes: float, allow_recompute: bool) -> tuple[np.ndarray, np.ndarray]:
    """t[i, n-1]: device i's time holding n blocks with the fewest recomputed blocks that fit (inf: none fits);
    r[i, n-1]: that fewest number. All devices at once: (devices, blocks) arrays."""
    n = np.arange(1, n_layers + 1, dtype=float)[None, :]
    c = dict(zip(DeviceTerms._fields, np.array(terms, dtype=float).T[:, :, None]))  # each field: a (devices, 1) column
    fixed_b, transient, state = c["fixed_bytes"], c["transient_bytes"], c["layer_state_bytes"]
    inflight, act, full = c["inflight"], c["layer_act_bytes"], c["full_act_bytes"]
    cap = capacity_bytes * (1 + 1e-9)
    base = fixed_b + transient + (state + inflight * act) * n
    # The optimizer step's peak (no activations) does not depend on recomputation: it rules n out or not.
    step_ok = c["step_fixed_bytes"] + c["layer_step_bytes"] * n <= cap
    ok0 = (base <= cap) & step_ok
    feasible, r = ok0, np.zeros_like(base)
    saving = inflight * (act - full)
    if allow_recompute:
        # With r > 0 the re-run block's working set joins: r >= (memory(n, 0) + extra - capacity) / saving.
        extra = np.maximum(transient, c["working_bytes"]) - transient
        with np.errstate(divide="ignore", invalid="ignore"):
            need = np.maximum(1.0, np.ceil((base + extra - cap) / saving - 1e-9))
        ok_r = ~ok0 & step_ok & (saving > 0) & (need <= n)
        r = np.where(ok_r, need, 0.0)
        feasible = ok0 | ok_r
    # Nondecreasing in n: more blocks need more memory, so never fewer recomputed blocks; and once even
    # recomputing every block does not fit, more blocks do not fit either (each adds at least as many
    # bytes as recomputing one saves). So cap_i(T) = #{n: t_i(n) <= T} is a prefix.
    T = np.where(feasible, c["fixed_s"] + c["layer_s"] * n + c["recompute_s"] * r, np.inf)
    return T, r


def solve_split(n_layers: int, terms: list[DeviceTerms], capacity_bytes: float, allow_recompute: bool,
                min_layers: int = 1) -> Assignment | None:
    """The program's optimum (see the module docstring); None when no split fits. Of the optimal splits it
    takes the one that gives each device its full capacity at T* from the first device on and trims the
    excess from the last devices: the later a device, the less its blocks delay the others in a pipeline."""
    P = len(terms)
    if P * min_layers > n_layers:
        return None
    T, R = _device_times(n_layers, terms, capacity_bytes, allow_recompute)
    finite = T[np.isfinite(T)]
    if finite.size < n_layers:
        return None
    t_star = max(float(np.max(T[:, min_layers - 1])), float(np.partition(finite, n_layers - 1)[n_layers - 1]))
    if not np.isfinite(t_star):
        return None
    caps = (T <= t_star * (1 + TIME_TOLERANCE)).sum(axis=1)
    layers = [int(c) for c in caps]
    excess = sum(layers) - n_layers
    for i in range(P - 1, -1, -1):
        take = min(excess, layers[i] - min_layers)
        layers[i] -= take
        excess -= take
    recomputed = tuple(int(R[i, n - 1]) for i, n in enumerate(layers))
    slowest = max(t.time_s(n, r) for t, n, r in zip(terms, layers, recomputed))
    return Assignment(tuple(layers), recomputed, slowest)


def optimum_s(n_layers: int, terms: list[DeviceTerms], capacity_bytes: float, allow_recompute: bool,
              min_layers: int = 1) -> float | None:
    """T*, the smallest per-microbatch time of the slowest device over every split that fits; None if none fits."""
    a = solve_split(n_layers, terms, capacity_bytes, allow_recompute, min_layers)
    return None if a is None else a.slowest_s


def assign_layers_cbc(n_layers: int, terms: list[DeviceTerms], capacity_bytes: float, allow_recompute: bool,
                      min_layers: int = 1, time_limit_s: float = 30.0) -> Assignment | None:
    """The same program as an integer program for CBC (through PuLP): the reference solve_split is held to.
    A binary z_i per device says whether it recomputes (r_i > 0), which adds the re-run block's working set."""
    import pulp

    P = len(terms)
    prob = pulp.LpProblem("layer_split", pulp.LpMinimize)
    n = [prob.add_variable(f"n{i}", lowBound=min_layers, upBound=n_layers, cat="Integer") for i in range(P)]
    r = [prob.add_variable(f"r{i}", lowBound=0, upBound=n_layers if allow_recompute else 0, cat="Integer") for i in range(P)]
    z = [prob.add_variable(f"z{i}", lowBound=0, upBound=1, cat="Integer") for i in range(P)]
    T = prob.add_variable("T", lowBound=0)
    prob += T
    prob += pulp.lpSum(n) == n_layers
    g = capacity_bytes  # memory rows as fractions of capacity: byte-sized coefficients upset CBC
    for i, t in enumerate(terms):
        prob += r[i] <= n[i]
        prob += r[i] <= n_layers * z[i]
        prob += t.fixed_s + t.layer_s * n[i] + t.recompute_s * r[i] <= T
        extra = max(t.transient_bytes, t.working_bytes) - t.transient_bytes
        prob += t.step_fixed_bytes / g + t.layer_step_bytes / g * n[i] <= 1
        prob += ((t.fixed_bytes + t.transient_bytes) / g + extra / g * z[i] + t.layer_state_bytes / g * n[i]
                 + t.inflight / g * (t.layer_act_bytes * n[i] - (t.layer_act_bytes - t.full_act_bytes) * r[i])) <= 1
    with warnings.catch_warnings():
        # PuLP 3 warns that its bundled CBC goes away in PuLP 4; pyproject pins pulp<4.
        warnings.simplefilter("ignore", DeprecationWarning)
        status = prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=0))
    if pulp.LpStatus[status] != "Optimal" or T.value() is None:
        return None
    layers = tuple(int(round(x.value())) for x in n)
    recomputed = tuple(int(round(x.value())) for x in r)
    return Assignment(layers, recomputed, max(t.time_s(a, b) for t, a, b in zip(terms, layers, recomputed)))


def split_chunks(n: int, r: int, v: int, holds_head: bool = False) -> list[tuple[int, int]]:
    """Deal a device's n blocks (r recomputed) over its v virtual stages: evenly, extra blocks to the
    later chunks (the first chunk of the first device holds the embedding) except on the device whose last
    chunk holds the head, where they go to the earlier chunks; recomputation to the earlier chunks (they
    hold more microbatches in flight)."""
    base, extra = divmod(n, v)
    counts = [base + (1 if (c < extra if holds_head and v > 1 else c >= v - extra) else 0) for c in range(v)]
    out, left = [], r
    for c in counts:
        take = min(c, left)
        out.append((c, take))
        left -= take
    return out
