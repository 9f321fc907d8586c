"""Lower bounds on what `predict` gives, for the search's branch and bound (planner/search.py).

Both bounds read the one cost model (planner/terms.py, through cost.stage_cost_list), so they move with it.

Why they are bounds. predict's iteration is max_i (finish_i + dp_i + opt_i) over pipeline devices i, where
finish_i is when device i ends its last op in the simulated schedule and dp_i + opt_i is its exposed gradient
reduction and optimizer step (CostModel.device_tail_s, nondecreasing in the device's parameters). In every
schedule meshplan runs (GPipe, 1F1B, interleaved 1F1B; tests/planner/test_bounds.py checks the op orders), the
first op of device i is a forward of its first chunk (global stage i) and its last op a backward of that chunk.
So, with W_i the device's work per microbatch (every op it runs, m times), F_k and B_k stage k's forward and
backward (recomputation included) and l_k the send from stage k to k+1:
  (1) finish_i >= sum_{k<i} (F_k + l_k) + m W_i              (the first microbatch reaches device i; then it works)
  (2) finish_0 >= sum_{k<i} (F_k + l_k) + m W_i + sum_{k<i} (B_k + l_k)   (device i's last backward travels back)
Both hold for every layer split. `split_bound_s` evaluates them for one split (the one `price` uses).
`every_split_bound_s` takes the least they can be over all splits the planner builds (n_i >= v blocks on device
i, dealt evenly over its chunks by ilp.split_chunks), without solving for the split:
  (3) max_i m W_i >= m * max(total / p, max_i W_i at v blocks)     (perfect balance, the cheapest recomputation;
      with ZeRO 2/3 a stage's time is at least its weight and gradient traffic, whose total is split-free too)
  (4) a convex combination of the right-hand sides of (2) whose weights make every W_i count the same (kappa),
      so that it depends on the total work only: kappa * total + terms for the fixed work and the sends. For
      equal stages and many microbatches it is the bubble's closed form with half of the bubble.
Memory: `every_split_bound_s` also gives a peak no split can go below (the device holding the embedding or the
head with the fewest blocks, all recomputed where recomputation is allowed, and the average device's state),
so a candidate above the capacity there cannot fit under predict, whatever the split.
"""

from __future__ import annotations

from functools import lru_cache

from planner import schedule
from planner.cost import device_stages, fsdp_edges_s
from planner.memory import GIB
from planner.plan import Knobs

SLACK = 1e-9
"""Relative margin below the bound: the simulator sums in another order than the bound does."""


@lru_cache(maxsize=1024)
def chain_weights(p: int, m: int, v: int) -> tuple[float, float, float, float]:
    """kappa, Lambda_{>0}, sum_k Lambda_{>k} and sum_i i lambda_i for (4).

    With X_i = sum_{k<i} S_k + m W_i and S_k >= (W_k - fixed_k)/v + (chunk 0's fixed) - c(v-1)/v (chunk 0 holds
    floor(n_k/v) of the device's n_k blocks), sum_i lambda_i X_i gives W_k the coefficient m lambda_k +
    Lambda_{>k}/v, where Lambda_{>k} = sum_{i>k} lambda_i. Setting it to kappa for every k: lambda_{p-1} =
    kappa/m, lambda_k = (kappa - Lambda_{>k}/v)/m, and sum lambda = 1 fixes kappa. Every lambda_k is positive
    (Lambda_{>k} < kappa v), so the combination is convex and bounds max_i X_i from below."""
    lam, after, tails = [0.0] * p, 0.0, [0.0] * p
    for k in range(p - 1, -1, -1):
        tails[k] = after
        lam[k] = (1.0 - after / v) / m
        after += lam[k]
    kappa = 1.0 / after
    return kappa, tails[0] * kappa, sum(tails) * kappa, sum(i * x for i, x in enumerate(lam)) * kappa


def every_split_bound_s(cm, knobs: Knobs, m: int) -> tuple[float, float]:
    """(seconds, GiB): no layer split of these knobs gives predict an iteration shorter, or a peak lower.
    Constant time per candidate (the search bounds every one of them)."""
    model, p, v = cm.model, knobs.pp, knobs.virtual_stages
    tm = cm.terms(knobs)
    L, S = model.layers, p * v
    # The cheapest legal block: the knob's policy, no extra recomputation.
    c = tm.layer_forward_s + tm.layer_backward_s + tm.layer_recompute_s
    mid, emb, head = tm.fixed_busy_s
    p2p = cm.p2p_s(knobs)
    blocking = cm.framework.p2p_blocking and p > 1
    # Blocking sends: each link's transfer sits in both neighbours' forward and backward.
    total = S * mid + emb + head + (4 * sum(p2p) if blocking else 0.0) + L * c
    busy = m * max(total / p, v * mid + emb + (head if p == 1 else 0.0) + v * c, v * mid + head + v * c)
    if knobs.zero >= 2 and knobs.dp * knobs.cp > 1:
        # ZeRO 2/3: a stage takes at least its weight gathers and gradient reduce-scatters per microbatch
        # (cost.stage_cost_list: max(compute, traffic)), which are affine in its parameters: over all stages
        # S intercepts and the slope times every parameter, whatever the split; the busiest device at least 1/p.
        # Forward and backward apart: sum_k max(f_k, g_k) >= max(sum f_k, sum g_k) for each.
        zero_f, zero_b, _ = cm.sharding_s(knobs, 0.0)
        one_f, one_b, _ = cm.sharding_s(knobs, tm.layer_params)
        all_params = L * tm.layer_params + tm.end_params(model, knobs.tp, True, True)
        traffic_f = S * zero_f + (one_f - zero_f) / tm.layer_params * all_params
        traffic_b = S * zero_b + (one_b - zero_b) / tm.layer_params * all_params
        # Each stage: max(f, gather_f) + max(b + recompute, gather_b) + its blocking sends (cost.stage_cost_list).
        fwd = (S - 2) * tm.fixed_forward_s(False, False) + tm.fixed_forward_s(True, False) + tm.fixed_forward_s(False, True) + L * tm.layer_forward_s
        sends = 4 * sum(p2p) if blocking else 0.0
        bwd = total - fwd - sends
        # The microbatch's edges, which nothing overlaps (cost.fsdp_edges_s: without pipelining, one stage).
        e_f, e_b = fsdp_edges_s(cm, knobs, tm.end_params(model, knobs.tp, True, True) + tm.layer_params)
        busy = max(busy, m * (max(fwd, traffic_f - e_f) + e_f + max(bwd, traffic_b - e_b) + e_b + sends) / p)
    # Exposed reduction and optimizer step grow with a device's parameters: at least those of v blocks (the
    # overlap window, at most the device's backward, taken as unbounded).
    # The device with the fewest parameters (a middle one, with no embedding or head, where there is one) has the
    # least of it.
    def tail(e: bool, h: bool) -> float:
        return sum(cm.device_tail_s(knobs, v * tm.layer_params + tm.end_params(model, knobs.tp, e, h), m, float("inf")))

    first = tail(True, p == 1)
    least = first if p == 1 else tail(False, False) if p > 2 else min(first, tail(False, True))
    bound = busy + least
    if p > 1:
        kappa, after0, after_sum, lam_i = chain_weights(p, m, v)
        # sum_k Lambda_{>k} (chunk 0's fixed - device's fixed / v - c(v-1)/v): the embedding's share on device 0,
        # each stage's blocking sends bounded by two of the largest (none of it when v = 1), and the blocks dealt.
        correction = after0 * emb * (1 - 1 / v) - after_sum * c * (v - 1) / v
        if blocking and v > 1:
            correction -= after_sum * 2 * max(p2p)
        sends = 0.0 if blocking else 2 * min(p2p) * lam_i
        bound = max(bound, kappa * total + correction + sends + first)
    return bound * (1 - SLACK), _memory_floor_gib(cm, knobs, m, tm)


def _memory_floor_gib(cm, knobs: Knobs, m: int, tm) -> float:
    """The device holding the embedding, or the head, with its fewest blocks (v), all recomputed where the
    knobs allow it; and the average device's state: a peak no split goes below."""
    model, p, v = cm.model, knobs.pp, knobs.virtual_stages
    sb, step_sb = tm.peak_state_bytes(m, knobs), tm.step_state_bytes
    layer_b, layer_step_b = tm.layer_state_bytes(m, knobs), tm.layer_step_bytes
    a_min = tm.full_activation_bytes if knobs.recompute == "none" else tm.layer_activation_bytes
    floors = []
    for i in (0, p - 1) if p > 1 else (0,):
        e, h = i == 0, i == p - 1
        # At its peak the device holds alive_at_peak chunk-microbatches, each of at least one block (every
        # chunk has one); the embedding's activations of at least one microbatch.
        acts = (schedule.alive_at_peak(knobs.schedule, p, m, v, i) * a_min + (tm.embedding_activation_bytes if e else 0.0)
                + (tm.head_kept_bytes if h else 0.0))  # at least the microbatch whose loss runs backward
        ends = tm.end_params(model, knobs.tp, e, h)
        transient = sum(tm.peak_transient(h, ends, knobs.recompute == "full"))
        floors.append(tm.overhead_bytes + max(v * layer_b + ends * sb + acts + transient, v * layer_step_b + ends * step_sb))
    # The average device's state during the optimizer step (no activations then).
    state = (model.layers * layer_step_b + tm.end_params(model, knobs.tp, True, True) * step_sb) / p
    floors.append(tm.overhead_bytes + state)
    return max(floors) / GIB


def split_bound_s(cm, knobs: Knobs, m: int, costs: list) -> float:
    """No shorter than predict's iteration for the split whose stage costs are `costs`: (1) and (2) above,
    with each device's exposed reduction and optimizer step for its own parameters."""
    p, v = knobs.pp, knobs.virtual_stages
    S = p * v
    lat = [0.0] * (S - 1) if cm.framework.p2p_blocking or p == 1 else list(cm.p2p_s(knobs))
    start = back = 0.0
    to_first, best_chain = [], 0.0
    for i in range(p):
        mine = device_stages(i, p, v)
        work = m * sum(costs[k].busy_s for k in mine)
        params = sum(costs[k].params for k in mine)
        dp, opt = cm.device_tail_s(knobs, params, m, min(costs[k].backward_s for k in mine))
        to_first.append(start + work + dp + opt)
        best_chain = max(best_chain, start + work + back)
        if i < S - 1:
            start += costs[i].forward_s + lat[i]
            back += costs[i].backward_s + costs[i].recompute_s + lat[i]
    params0 = sum(costs[k].params for k in device_stages(0, p, v))
    dp0, opt0 = cm.device_tail_s(knobs, params0, m, min(costs[k].backward_s for k in device_stages(0, p, v)))
    return max(max(to_first), best_chain + dp0 + opt0) * (1 - SLACK)
