"""The search: enumerate tp*pp*dp = N and the other knobs, bound each candidate in closed form,
then price the most promising with the layer-split ILP and the schedule simulator.

Every evaluated candidate is returned (the dashboard draws them all); an infeasible one is a result
with fits=False and a reason, never an exception."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import lru_cache

from planner import comm, schedule
from planner.compute import end_times, layer_times, optimizer_step_s
from planner.cost import MESHPLAN, Framework, check_knobs, dp_seconds, model_flops, p2p_seconds, predict, uniform_stages
from planner.errors import PlanError
from planner.ilp import Assignment, DeviceTerms, assign_layers, split_chunks
from planner.memory import (GIB, activation_bytes_per_layer, embedding_activation_bytes, end_param_count,
                            full_layer_activation_bytes, head_transient_bytes, layer_param_count, state_bytes_per_param)
from planner.plan import RECOMPUTE, Knobs, Plan, Stage
from planner.specs import ClusterSpec, DeviceProfile, ModelSpec
from planner.topology import tp_link

PINNABLE = ("tp", "pp", "dp", "micro_batch", "schedule", "virtual_stages", "recompute", "sequence_parallel", "distributed_optimizer")


@dataclass(frozen=True)
class Candidate:
    """One evaluated configuration: a closed-form estimate, or the exact price if it was a finalist."""

    knobs: Knobs
    iteration_s: float
    tokens_per_s: float
    tflops_per_gpu: float
    peak_memory_gib: float
    fits: bool
    reason: str
    exact: bool
    """Priced by the ILP and the simulator (a finalist); otherwise the closed-form estimate."""
    may_fit: bool = True
    """The memory lower bound (the average device, recomputing all it may) fits: only such
    candidates are worth the ILP, which can move blocks off the fuller devices."""


@dataclass(frozen=True)
class SearchResult:
    plans: tuple[Plan, ...]
    """Ranked best first: the plans that fit, or, when none does, the closest ones with reasons."""
    candidates: tuple[Candidate, ...]
    searched: int
    """Configurations evaluated."""
    search_s: float
    phases_s: dict
    """Seconds per phase: enumerate+bound, ilp, simulate."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_knobs(model: ModelSpec, cluster: ClusterSpec, global_batch: int, pins: dict) -> list[Knobs]:
    """All configurations consistent with the pins. tp stays inside a node unless pinned (Narayanan
    et al. 2021, takeaway 1: tensor parallelism up to the GPUs of a node, pipeline across nodes)."""
    N = cluster.gpus
    out = []
    tps = [pins["tp"]] if "tp" in pins else [t for t in _divisors(cluster.gpus_per_node) if model.heads % t == 0 and model.ffn_hidden % t == 0]
    for t in tps:
        if N % t:
            continue
        for p in ([pins["pp"]] if "pp" in pins else _divisors(N // t)):
            if (N // t) % p or p > model.layers:
                continue
            d = N // (t * p)
            if "dp" in pins and pins["dp"] != d:
                continue
            if global_batch % d:
                continue
            per_replica = global_batch // d
            for b in ([pins["micro_batch"]] if "micro_batch" in pins else [x for x in _divisors(per_replica) if x <= 64]):
                if per_replica % b:
                    continue
                m = per_replica // b
                for sched, v in _schedules(p, m, model.layers, pins):
                    for rc in ([pins["recompute"]] if "recompute" in pins else RECOMPUTE):
                        for sp in ([pins["sequence_parallel"]] if "sequence_parallel" in pins else ([False, True] if t > 1 else [False])):
                            for do in ([pins["distributed_optimizer"]] if "distributed_optimizer" in pins else ([False, True] if d > 1 else [False])):
                                out.append(Knobs(t, p, d, b, sched, v, rc, sp, do))
    return out


def _schedules(p: int, m: int, layers: int, pins: dict) -> list[tuple[str, int]]:
    if p == 1:
        options = [("1f1b", 1)]  # one stage: no pipeline, the schedule does not matter
    else:
        options = [("1f1b", 1), ("gpipe", 1)] + [("interleaved", v) for v in (2, 3, 4, 6, 8) if p * v <= layers]
    if "schedule" in pins:
        options = [(s, v) for s, v in options if s == pins["schedule"]]
        if pins["schedule"] == "interleaved" and p > 1 and "virtual_stages" in pins and not options:
            options = [("interleaved", pins["virtual_stages"])]
    if "virtual_stages" in pins:
        options = [(s, v) for s, v in options if v == pins["virtual_stages"]]
    return [(s, v) for s, v in options if schedule.schedule_constraint(s, p, m, v) is None]


class _Bounds:
    """Closed-form estimates with the per-(tp, micro-batch) work memoised across candidates."""

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, device: DeviceProfile, global_batch: int, framework: Framework):
        self.model, self.cluster, self.device, self.B, self.fw = model, cluster, device, global_batch, framework
        self._layer, self._end, self._ar = {}, {}, {}

    def layer(self, t, b, sp):
        key = (t, b, sp)
        if key not in self._layer:
            self._layer[key] = layer_times(self.model, self.device, t, b, sp)
        return self._layer[key]

    def ends(self, t, b):
        if (t, b) not in self._end:
            self._end[(t, b)] = end_times(self.model, self.device, t, b)
        return self._end[(t, b)]

    def allreduce(self, t, b):
        if (t, b) not in self._ar:
            self._ar[(t, b)] = comm.all_reduce_s(b * self.model.seq_len * self.model.hidden * self.device.dtype_bytes, t, tp_link(self.cluster, t))
        return self._ar[(t, b)]

    def per_layer_s(self, k: Knobs) -> tuple[float, float, float]:
        """(forward, backward, recompute under the knob) of one block with its tp collectives."""
        lt, ar = self.layer(k.tp, k.micro_batch, k.sequence_parallel), self.allreduce(k.tp, k.micro_batch)
        f, bw = lt.forward_s + 2 * ar, lt.backward_s + 2 * ar
        rc = f if k.recompute == "full" else lt.selective_recompute_s if k.recompute == "selective" else 0.0
        return f, bw, rc

    def estimate(self, k: Knobs) -> Candidate:
        model, dev = self.model, self.device
        t, p, d, b, v = k.tp, k.pp, k.dp, k.micro_batch, k.virtual_stages
        m = self.B // (b * d)
        f, bw, rc = self.per_layer_s(k)
        et, ar = self.ends(t, b), self.allreduce(t, b)
        emb = et.embedding_forward_s + et.embedding_backward_s + ar
        head = et.head_forward_s + et.head_backward_s + ar
        # Memory of the first device with a uniform split (it holds the embedding and the most
        # in-flight microbatches).
        w, g, o = state_bytes_per_param(dev.dtype_bytes, k.distributed_optimizer, d)
        scale = dev.dtype_bytes / 2
        a_layer = activation_bytes_per_layer(model, t, b, k.sequence_parallel, k.recompute, dev.fused_attention) * scale
        inflight_chunks = _inflight_closed_form(k.schedule, p, m, v, 0)
        per_chunk_layers = model.layers / (p * v)
        emb_acts = min(m, inflight_chunks) * embedding_activation_bytes(model, t, b, k.sequence_parallel) * scale
        first_params = model.layers / p * layer_param_count(model, t) + end_param_count(model, t, True, p == 1)
        transient = full_layer_activation_bytes(model, t, b, k.sequence_parallel, dev.fused_attention) * scale if k.recompute == "full" else 0.0
        if p == 1:
            transient = max(transient, head_transient_bytes(model, t, b))
        fixed = first_params * (w + g + o) + emb_acts + transient + dev.framework_overhead_gib * GIB
        acts = inflight_chunks * per_chunk_layers * a_layer
        peak = (fixed + acts) / GIB
        fits = peak <= dev.memory_gib
        extra_rc = 0.0
        if not fits and k.recompute == "none":
            # The ILP may recompute some blocks fully to fit: price the share the first device needs,
            # if recomputing all of them would fit at all.
            a_full = activation_bytes_per_layer(model, t, b, k.sequence_parallel, "full", dev.fused_attention) * scale
            peak_full = (fixed + inflight_chunks * per_chunk_layers * a_full) / GIB
            if peak_full <= dev.memory_gib:
                extra_rc, fits = (peak - dev.memory_gib) / (peak - peak_full) * f, True
                peak = dev.memory_gib  # after recomputing just enough blocks, the device is full
        layer = f + bw + rc + extra_rc
        total = model.layers * layer + emb + head
        dev_s = max(total / p, layer + (head if p > 1 else emb + head))
        if p > 1 and dev.measured:
            from planner.measured import stage_overhead_s

            dev_s += v * sum(stage_overhead_s(dev))  # pipelining's own work per microbatch and stage
        p2p = max(p2p_seconds(model, self.cluster, dev, dataclasses.replace(k, virtual_stages=1), self.fw)) if p > 1 else 0.0
        pipe = (m + (p - 1) / v) * dev_s + 2 * (p - 1) * p2p
        params = (model.layers * layer_param_count(model, t) + end_param_count(model, t, True, True)) / p
        dp_s = dp_seconds(self.cluster, k, params, self.fw, dev.dtype_bytes)
        window = bw * model.layers / (p * v) if self.fw.overlaps_dp(k) else 0.0
        opt = optimizer_step_s(dev, params / (d if k.distributed_optimizer else 1))
        iteration = pipe + max(0.0, dp_s - window) + opt
        reason = "" if fits else f"first pipeline device needs about {peak:.1f} GiB with an even split, {peak - dev.memory_gib:.1f} GiB over the {dev.memory_gib:g} GiB of one {dev.name}"
        # No split can do better than the average device: its blocks' state, the mean in-flight
        # microbatches, with full recomputation where the ILP may add it.
        a_min = activation_bytes_per_layer(model, t, b, k.sequence_parallel, "full" if k.recompute == "none" else k.recompute, dev.fused_attention) * scale
        mean_inflight = sum(_inflight_closed_form(k.schedule, p, m, v, i) for i in range(p)) / p
        avg = (params * (w + g + o) + mean_inflight * per_chunk_layers * a_min) / GIB + dev.framework_overhead_gib
        tokens = self.B * model.seq_len / iteration
        tflops = model_flops(model, self.B, 1.0 if k.recompute == "full" else 0.0) / (iteration * self.cluster.gpus) / 1e12
        return Candidate(k, iteration, tokens, tflops, peak, fits, reason, exact=False, may_fit=avg <= dev.memory_gib)

    def device_terms(self, k: Knobs) -> tuple[list[DeviceTerms], float]:
        """ILP coefficients for each pipeline device, and the device capacity in bytes."""
        model, dev = self.model, self.device
        t, p, d, b, v = k.tp, k.pp, k.dp, k.micro_batch, k.virtual_stages
        m = self.B // (b * d)
        f, bw, rc = self.per_layer_s(k)
        et, ar = self.ends(t, b), self.allreduce(t, b)
        w, g, o = state_bytes_per_param(dev.dtype_bytes, k.distributed_optimizer, d)
        scale = dev.dtype_bytes / 2
        a_knob = activation_bytes_per_layer(model, t, b, k.sequence_parallel, k.recompute, dev.fused_attention) * scale
        a_full = activation_bytes_per_layer(model, t, b, k.sequence_parallel, "full", dev.fused_attention) * scale
        inflight = _inflight_by_stage(k.schedule, p, m, v)
        allow = k.recompute == "none"
        working = full_layer_activation_bytes(model, t, b, k.sequence_parallel, dev.fused_attention) * scale
        S = p * v
        terms = []
        for i in range(p):
            first, last = i == 0, i == p - 1
            fixed_s = (et.embedding_forward_s + et.embedding_backward_s + ar if first else 0.0) + (et.head_forward_s + et.head_backward_s + ar if last else 0.0)
            fixed_b = end_param_count(model, t, first, last) * (w + g + o)
            if first:
                fixed_b += inflight[0] * embedding_activation_bytes(model, t, b, k.sequence_parallel) * scale
            if last:
                fixed_b += head_transient_bytes(model, t, b)
            if k.recompute == "full":
                fixed_b += working
            mean_inflight = sum(inflight[c * p + i] for c in range(v)) / v
            terms.append(DeviceTerms(fixed_s, f + bw + rc, f if allow else 0.0, mean_inflight, a_knob, a_full if allow else a_knob,
                                     fixed_b, layer_param_count(model, t) * (w + g + o)))
        capacity = (dev.memory_gib - dev.framework_overhead_gib) * GIB
        return terms, capacity


def _inflight_closed_form(sched: str, p: int, m: int, v: int, i: int) -> int:
    """Chunk-microbatches device i holds at its peak: GPipe all m; 1F1B p - i (Narayanan et al.
    2021, section 2.2.1); interleaved, torch's warm-up 2(p-1-i) + (v-1)p forwards plus one."""
    if sched == "gpipe":
        return m
    if sched == "1f1b":
        return min(m, p - i)
    return min(m * v, 2 * (p - 1 - i) + (v - 1) * p + 1)


@lru_cache(maxsize=64)
def _inflight_by_stage(sched: str, p: int, m: int, v: int) -> list[float]:
    """Most microbatches of each stage alive at once (forward done, backward not) on its device."""
    peak = [0] * (p * v)
    cur = [0] * (p * v)
    for ops in schedule.stage_order(sched, p, m, v):
        for op in ops:
            cur[op.stage] += 1 if op.kind == "F" else -1
            if cur[op.stage] > peak[op.stage]:
                peak[op.stage] = cur[op.stage]
    return [float(x) for x in peak]


def stages_from_assignment(a: Assignment, v: int, knob_recompute: str) -> tuple[Stage, ...]:
    """Stages in model order from per-device counts: chunk c of device i is stage c*pp + i."""
    p = len(a.layers)
    per_stage = [(0, 0)] * (p * v)
    for i, (n, r) in enumerate(zip(a.layers, a.recomputed)):
        for c, nr in enumerate(split_chunks(n, r, v)):
            per_stage[c * p + i] = nr
    out, first, S = [], 0, p * v
    for k, (n, r) in enumerate(per_stage):
        if r == 0:
            rc, rl = knob_recompute, None
        else:
            rc, rl = "full", (None if r == n else r)
        out.append(Stage((first, first + n), k == 0, k == S - 1, rc, rl))
        first += n
    return tuple(out)


def price(model: ModelSpec, cluster: ClusterSpec, device: DeviceProfile, knobs: Knobs, global_batch: int,
          framework: Framework = MESHPLAN, bounds: _Bounds | None = None, timings: dict | None = None,
          exact_pp_comm: bool = True) -> Plan:
    """The exact plan for fixed knobs: the ILP's layer split (uneven where that is faster or fits),
    priced by the simulator. Falls back to an even split (which then reports why it does not fit)."""
    bounds = bounds or _Bounds(model, cluster, device, global_batch, framework)
    timings = timings if timings is not None else {}
    t0 = time.perf_counter()
    terms, capacity = bounds.device_terms(knobs)
    a = assign_layers(model.layers, terms, capacity, allow_recompute=knobs.recompute == "none", min_layers=knobs.virtual_stages)
    t1 = time.perf_counter()
    timings["ilp"] = timings.get("ilp", 0.0) + t1 - t0
    stages = stages_from_assignment(a, knobs.virtual_stages, knobs.recompute) if a else uniform_stages(model, knobs.pp * knobs.virtual_stages, knobs.recompute)
    plan, _ = predict(model, cluster, device, knobs, global_batch, stages, framework, exact_pp_comm=exact_pp_comm)
    timings["simulate"] = timings.get("simulate", 0.0) + time.perf_counter() - t1
    return plan


def search(model: ModelSpec, cluster: ClusterSpec, device: DeviceProfile, global_batch: int, pins: dict | None = None,
           top: int = 5, framework: Framework = MESHPLAN, max_finalists: int = 24) -> SearchResult:
    pins = {k: v for k, v in (pins or {}).items() if v is not None}
    start = time.perf_counter()
    knobs = enumerate_knobs(model, cluster, global_batch, pins)
    if not knobs:
        _explain_empty(model, cluster, global_batch, pins)
    bounds = _Bounds(model, cluster, device, global_batch, framework)
    cands = [bounds.estimate(k) for k in knobs]
    t_bound = time.perf_counter() - start
    # Branch and bound on the estimates: price candidates in order of estimated time until the next
    # estimate cannot beat the top-th priced plan. A 'none' candidate that does not fit evenly still
    # goes to the ILP, which may recompute some blocks (or split unevenly) to make it fit.
    order = sorted(range(len(cands)), key=lambda i: cands[i].iteration_s)
    timings: dict = {}
    priced: dict[int, Plan] = {}
    best: list[float] = []
    for i in order:
        c = cands[i]
        if len(best) >= top and c.iteration_s > best[top - 1]:
            break
        if len(priced) >= max_finalists and best:
            break
        if not c.may_fit:
            continue  # not even the average device fits: no split can make it fit
        plan = price(model, cluster, device, c.knobs, global_batch, framework, bounds, timings, exact_pp_comm=False)
        priced[i] = plan
        if plan.prediction.fits:
            best = sorted(best + [plan.prediction.iteration_s])
    for i, plan in priced.items():
        pr = plan.prediction
        cands[i] = Candidate(cands[i].knobs, pr.iteration_s, pr.tokens_per_s, pr.tflops_per_gpu, pr.peak_memory_gib, pr.fits, pr.reason, True)
    fitting = sorted((p for p in priced.values() if p.prediction.fits), key=lambda p: p.prediction.iteration_s)
    if fitting:
        # The shown plans get their breakdown's send/recv share exactly (a second simulation).
        plans = [predict(model, cluster, device, p.knobs, global_batch, p.stages, framework)[0] for p in fitting[:top]]
    else:
        # Nothing fits: show the configurations that come closest, each with its reason.
        closest = sorted(range(len(cands)), key=lambda i: cands[i].peak_memory_gib)[:top]
        plans = [priced.get(i) or price(model, cluster, device, cands[i].knobs, global_batch, framework, bounds, timings) for i in closest]
    elapsed = time.perf_counter() - start
    return SearchResult(tuple(plans), tuple(cands), len(cands), elapsed,
                        {"enumerate_and_bound": t_bound, "ilp": timings.get("ilp", 0.0), "simulate": timings.get("simulate", 0.0)})


def _explain_empty(model: ModelSpec, cluster: ClusterSpec, global_batch: int, pins: dict) -> None:
    """No configuration is consistent with the pins: say which constraint rules them out."""
    knobs = Knobs(pins.get("tp", 1), pins.get("pp", 1), pins.get("dp", cluster.gpus // (pins.get("tp", 1) * pins.get("pp", 1)) or 1),
                  pins.get("micro_batch", 1), pins.get("schedule", "1f1b"), pins.get("virtual_stages", 1),
                  pins.get("recompute", "none"), pins.get("sequence_parallel", False), pins.get("distributed_optimizer", False))
    check_knobs(model, cluster, knobs, global_batch)
    raise PlanError(f"no configuration of {model.name} on {cluster.gpus} devices with global batch {global_batch} satisfies "
                    f"{', '.join(f'{k}={v}' for k, v in pins.items()) or 'the constraints'}: the global batch must divide by "
                    f"micro_batch x dp, and tp x pp x dp must equal the device count")
