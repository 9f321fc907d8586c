"""The layer-to-device integer program (PuLP, CBC).

Transformer blocks are identical, so the unknowns are counts, not assignments: n_i blocks on
pipeline device i and r_i of them fully recomputed. Minimise the slowest device's time per
microbatch subject to every device's memory. One binary per (layer, stage) did not finish in 30 s
for 96 layers on 8 stages; counts solve in milliseconds (design.md). With interleaving, a device's
blocks are then dealt evenly over its v virtual stages (split_chunks)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pulp


@dataclass(frozen=True)
class DeviceTerms:
    """Linear coefficients of one pipeline device, per microbatch."""

    fixed_s: float
    """Time that does not depend on the block count (embedding, head)."""
    layer_s: float
    """Forward + backward of one block (with the knob's recomputation policy)."""
    recompute_s: float
    """Extra time of one block switched to full recomputation."""
    inflight: float
    """Microbatches whose activations the device holds at its peak, per block (averaged over its
    virtual stages when it has several)."""
    layer_act_bytes: float
    """Activations of one block per in-flight microbatch under the knob's policy."""
    full_act_bytes: float
    """The same for a fully recomputed block."""
    fixed_bytes: float
    """Bytes independent of the block count (embedding/head state and activations, working sets)."""
    layer_state_bytes: float
    """Weights + grads + optimizer state of one block."""

    def memory_bytes(self, n: float, r: float) -> float:
        return (self.fixed_bytes + self.layer_state_bytes * n
                + self.inflight * (self.layer_act_bytes * n - (self.layer_act_bytes - self.full_act_bytes) * r))


@dataclass(frozen=True)
class Assignment:
    layers: tuple[int, ...]
    """Blocks per device."""
    recomputed: tuple[int, ...]
    """Fully recomputed blocks per device."""
    slowest_s: float
    """The slowest device's time per microbatch."""


def assign_layers(n_layers: int, terms: list[DeviceTerms], capacity_bytes: float, allow_recompute: bool,
                  min_layers: int = 1, time_limit_s: float = 5.0) -> Assignment | None:
    """Optimal blocks (and recomputed blocks) per device; None when nothing fits."""
    P = len(terms)
    lower = lower_bound_s(n_layers, terms, capacity_bytes, allow_recompute, min_layers)
    if lower is None:
        return None
    prob = pulp.LpProblem("layer_split", pulp.LpMinimize)
    n = [prob.add_variable(f"n{i}", lowBound=min_layers, upBound=n_layers, cat="Integer") for i in range(P)]
    r = [prob.add_variable(f"r{i}", lowBound=0, upBound=n_layers if allow_recompute else 0, cat="Integer") for i in range(P)]
    T = prob.add_variable("T", lowBound=0)
    prob += T
    prob += pulp.lpSum(n) == n_layers
    # lower_bound_s is this program's optimum: stating it spares CBC the proof by branching that
    # costs seconds on 64 near-identical devices (it stops at the first solution that meets it).
    prob += T >= lower * (1 - 1e-6)
    g = capacity_bytes  # memory rows as fractions of capacity: byte-sized coefficients upset CBC
    for i, t in enumerate(terms):
        prob += r[i] <= n[i]
        prob += t.fixed_s + t.layer_s * n[i] + t.recompute_s * r[i] <= T
        prob += (t.fixed_bytes / g + t.layer_state_bytes / g * n[i]
                 + t.inflight / g * (t.layer_act_bytes * n[i] - (t.layer_act_bytes - t.full_act_bytes) * r[i])) <= capacity_bytes / g
    with warnings.catch_warnings():
        # PuLP 3 warns that its bundled CBC goes away in PuLP 4; pyproject pins pulp<4.
        warnings.simplefilter("ignore", DeprecationWarning)
        solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=1e-3)
    status = prob.solve(solver)
    if pulp.LpStatus[status] != "Optimal" or T.value() is None:
        return None
    layers = tuple(int(round(x.value())) for x in n)
    # Recompute no more than memory forces: the fewest recomputed blocks that fit, per device
    # (fewer never costs time, so T stays optimal). Cheaper than a tie-break term in the objective.
    recomputed = tuple(next((k for k in range(int(round(x.value())) + 1) if t.memory_bytes(nl, k) <= capacity_bytes * (1 + 1e-6)),
                            int(round(x.value()))) for x, t, nl in zip(r, terms, layers))
    return Assignment(layers, recomputed, float(T.value()))


def _max_layers(t: DeviceTerms, budget_s: float, capacity_bytes: float, n_layers: int, allow_recompute: bool) -> int:
    """Most blocks device t can hold within budget_s per microbatch and capacity_bytes, recomputing as
    many as the time allows (recomputation only ever lowers memory). Holding n blocks is feasible for
    a prefix of n (more blocks: more time, less room to recompute, more memory): bisect it."""

    def ok(n: int) -> bool:
        spare = budget_s - t.fixed_s - t.layer_s * n
        if spare < -1e-12 * budget_s:
            return False
        if not allow_recompute:
            r = 0
        elif t.recompute_s > 0:
            r = min(n, int(max(spare, 0.0) / t.recompute_s + 1e-9))
        else:
            r = n
        return t.memory_bytes(n, r) <= capacity_bytes

    lo, hi = 0, n_layers  # ok(lo) holds (or lo == 0); find the largest ok n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def lower_bound_s(n_layers: int, terms: list[DeviceTerms], capacity_bytes: float, allow_recompute: bool,
                  min_layers: int = 1) -> float | None:
    """Smallest per-microbatch time at which the devices can hold all blocks (bisection). Devices are
    independent but for the block total, so this is the program's optimum (to 1e-7). None when no
    time is enough: the model does not fit."""
    hi = max(t.fixed_s for t in terms) + max(t.layer_s + t.recompute_s for t in terms) * n_layers

    def feasible(T: float) -> bool:
        caps = [_max_layers(t, T, capacity_bytes, n_layers, allow_recompute) for t in terms]
        return min(caps) >= min_layers and sum(caps) >= n_layers

    if not feasible(hi):
        return None
    lo = 0.0
    while hi - lo > 1e-7 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if feasible(mid) else (mid, hi)
    return hi


def split_chunks(n: int, r: int, v: int) -> list[tuple[int, int]]:
    """Deal a device's n blocks (r recomputed) over its v virtual stages: evenly, extra blocks to the
    later chunks, recomputation to the earlier chunks (they hold more microbatches in flight)."""
    base, extra = divmod(n, v)
    counts = [base + (1 if c >= v - extra else 0) for c in range(v)]
    out, left = [], r
    for c in counts:
        take = min(c, left)
        out.append((c, take))
        left -= take
    return out
