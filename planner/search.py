"""The search: enumerate tp*pp*dp = N and the other knobs, then branch and bound to the exact best plans.

Every candidate gets a lower bound that holds for every layer split (planner/bounds.py); candidates are taken
in bound order; the next one's layer split is solved (planner/ilp.py), which tightens its bound to the program's
optimum, then to that split's stages (their costs), then settles whether it fits (their memory); the next after
that is priced (predict: the schedule simulated). A priced plan
that comes up first is final: every other candidate's bound, hence its price, is at least as high. The search
stops when `top` plans are final; so its ranking is that of pricing every candidate (exhaustive_search), which
tests/planner/test_search.py checks on hundreds of random instances.

Every evaluated candidate is returned (the dashboard draws them all); an infeasible one is a result with
fits=False and a reason, never an exception."""

from __future__ import annotations

import dataclasses
import heapq
import time
from dataclasses import dataclass

from planner import schedule
from planner.bounds import every_split_bound_s, split_bound_s
from planner.cost import (DEFAULT_MEMORY_HEADROOM_GIB, MESHPLAN, CostModel, Framework, check_precision, compile_problem, device_memories,
                          fits_bytes, model_flops, predict, sequence_parallel_problem, stage_cost_list, stage_fixed_busy_s,
                          uniform_stages)
from planner.ilp import Assignment, device_terms, solve_split, split_chunks
from planner.memory import GIB
from planner.pins import explain_empty, zero_pins
from planner.plan import RECOMPUTE, Knobs, Plan, Stage
from planner.specs import ClusterSpec, DeviceProfile, ModelSpec

PINNABLE = ("tp", "cp", "pp", "dp", "micro_batch", "schedule", "virtual_stages", "recompute", "sequence_parallel", "zero",
            "distributed_optimizer", "precision", "compile")
LEVELS = ("bound", "split", "priced")
"""How far a candidate got: a bound over every split; its layer split solved (and its bound for that split);
priced by the simulator."""


@dataclass(frozen=True)
class Candidate:
    """One evaluated configuration: a lower bound on its iteration, or its exact price."""

    knobs: Knobs
    iteration_s: float
    """Exact when level is 'priced'; otherwise a lower bound (so tokens_per_s and tflops_per_gpu are upper bounds)."""
    tokens_per_s: float
    tflops_per_gpu: float
    peak_memory_gib: float
    """Exact once the split is solved; before, the least any split can need."""
    fits: bool
    reason: str
    level: str = "bound"
    """One of LEVELS."""

    @property
    def exact(self) -> bool:
        return self.level == "priced"


@dataclass(frozen=True)
class SearchResult:
    plans: tuple[Plan, ...]
    """Ranked best first: the plans that fit, or, when none does, the closest ones with reasons."""
    candidates: tuple[Candidate, ...]
    searched: int
    """Configurations enumerated (every one bounded)."""
    search_s: float
    phases_s: dict
    """Seconds per phase: bound, split (layer-split solves), simulate."""
    split: int = 0
    """Candidates whose layer split was solved."""
    priced: int = 0
    """Candidates priced by the simulator."""
    complete: bool = True
    """False when a time limit stopped the search before the ranking was proven."""
    gap_pct: float = 0.0
    """With complete=False: how much faster than the best plan returned an unpriced candidate may still be."""
    top: int = 5
    """How many plans were asked for."""
    time_limit_s: float | None = None
    """The time limit the search ran under (None: none). Every configuration is bounded first, whatever it is:
    the gap is measured against those bounds; the limit stops the layer splits and simulations that follow."""
    plan_knobs: tuple[Knobs, ...] = ()
    """The knobs each of plans was searched as (Plan.knobs reads recompute off the first stage, which a split
    that recomputes some blocks of a 'none' candidate sets to 'full')."""

    @property
    def bounded(self) -> int:
        return self.searched


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


CP_MAX = 32
CP_MIN_TOKENS = 1024
"""Context parallelism is searched over powers of two up to CP_MAX that leave each rank at least CP_MIN_TOKENS
of a sequence (two load-balanced chunks of half that); a pinned --cp may be any degree the sequence splits into."""


def cp_options(model: ModelSpec, pins: dict) -> list[int]:
    if "cp" in pins:
        return [pins["cp"]]
    out, c = [1], 2
    while c <= CP_MAX and model.seq_len % (2 * c) == 0 and model.seq_len // c >= CP_MIN_TOKENS:
        out.append(c)
        c *= 2
    return out


def enumerate_knobs(model: ModelSpec, cluster: ClusterSpec, global_batch: int, pins: dict) -> list[Knobs]:
    """All configurations consistent with the pins. tp stays inside a node unless pinned (Narayanan et al. 2021,
    takeaway 1: tensor parallelism up to the GPUs of a node, pipeline across nodes); cp as cp_options says;
    every ZeRO stage where dp x cp > 1. precision and compile change numerics or start-up, so they are the
    user's to pin (default bf16, eager), not the search's."""
    pins = zero_pins(pins)
    precision, compile_ = pins.get("precision", "bf16"), pins.get("compile", False)
    out = []
    tps = [pins["tp"]] if "tp" in pins else [t for t in _divisors(cluster.gpus_per_node) if model.tp_problem(t) is None]
    for cp in cp_options(model, pins):
        if cluster.gpus % cp:
            continue
        N = cluster.gpus // cp
        for t in tps:
            if N % t:
                continue
            for p in ([pins["pp"]] if "pp" in pins else _divisors(N // t)):
                if (N // t) % p or p > model.layers or (model.tie_embeddings and p > 1 and "pp" not in pins):
                    continue  # tied embedding and head: one stage (check_knobs says so for a pinned pp)
                d = N // (t * p)
                if "dp" in pins and pins["dp"] != d:
                    continue
                if global_batch % d:
                    continue
                per_replica = global_batch // d
                zeros = [pins["zero"]] if "zero" in pins else ([0, 1, 2, 3] if d * cp > 1 else [0])
                for b in ([pins["micro_batch"]] if "micro_batch" in pins else [x for x in _divisors(per_replica) if x <= 64]):
                    if per_replica % b:
                        continue
                    m = per_replica // b
                    for sched, v in _schedules(p, m, model.layers, pins):
                        for rc in ([pins["recompute"]] if "recompute" in pins else RECOMPUTE):
                            for sp in ([pins["sequence_parallel"]] if "sequence_parallel" in pins else [False, True]):
                                if sequence_parallel_problem(tp=t, sequence_parallel=sp) or (
                                        compile_ and compile_problem(tp=t, sequence_parallel=sp)):
                                    continue  # check_knobs refuses these pinned (the same rules); unpinned they are not candidates
                                for z in zeros:
                                    out.append(Knobs(t, p, d, b, sched, v, rc, sp, z, cp, precision, compile_))
    return out


def _schedules(p: int, m: int, layers: int, pins: dict) -> list[tuple[str, int]]:
    if p == 1:
        options = [("1f1b", 1)]  # one stage: no pipeline, the schedule does not matter
    else:
        # The searched interleavings, every depth up to 8 that deals a device's blocks into equal chunks (Megatron-LM
        # runs no other: arguments.py asserts num_layers_per_pipeline_stage % num_layers_per_virtual_pipeline_stage
        # == 0; 112 layers on pp 16 interleave only 7 deep), and a pinned one of any depth the layers allow.
        even = {v for v in range(2, 9) if layers % p == 0 and (layers // p) % v == 0}
        depths = sorted({2, 3, 4, 6, 8} | even | ({pins["virtual_stages"]} if pins.get("virtual_stages", 1) > 1 else set()))
        options = [("1f1b", 1), ("gpipe", 1)] + [("interleaved", v) for v in depths if p * v <= layers]
    if "schedule" in pins:
        options = [(s, v) for s, v in options if s == pins["schedule"]]
    if "virtual_stages" in pins:
        options = [(s, v) for s, v in options if v == pins["virtual_stages"]]
    return [(s, v) for s, v in options if schedule.schedule_constraint(s, p, m, v) is None]


def stages_from_assignment(a: Assignment, v: int, knob_recompute: str) -> tuple[Stage, ...]:
    """Stages in model order from per-device counts: chunk c of device i is stage c*pp + i."""
    p = len(a.layers)
    per_stage = [(0, 0)] * (p * v)
    for i, (n, r) in enumerate(zip(a.layers, a.recomputed)):
        for c, nr in enumerate(split_chunks(n, r, v, holds_head=i == p - 1)):
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


def solve_layer_split(cm: CostModel, knobs: Knobs, m: int) -> Assignment | None:
    """The split program's optimum for these knobs (planner/ilp.py), or None when no split fits its memory rows."""
    tm = cm.terms(knobs)
    terms = device_terms(tm, knobs, m, cm.model, stage_fixed_busy_s(cm, knobs))
    return solve_split(cm.model.layers, terms, tm.capacity_bytes, knobs.recompute == "none", min_layers=knobs.virtual_stages)


def first_cut(cm: CostModel, knobs: Knobs, a: Assignment | None) -> tuple[tuple[Stage, ...], list]:
    """The stages of the split program's optimum `a` (an even split when no split fits: None) and their costs,
    before layer_split's repair (which only adds recomputation, so any bound on these stages holds after it)."""
    v = knobs.virtual_stages
    stages = uniform_stages(cm.model, knobs.pp * v, knobs.recompute) if a is None else stages_from_assignment(a, v, knobs.recompute)
    return stages, stage_cost_list(cm, knobs, stages)


def layer_split(cm: CostModel, knobs: Knobs, m: int, solved: Assignment | None | bool = False,
                first: tuple[tuple[Stage, ...], list] | None = None) -> tuple[tuple[Stage, ...], list, list]:
    """The stages price() runs, their costs and their devices' memory: the split program's optimum (`solved`, when
    the caller has it; `first`, its first_cut, when it has that too), or an even split when no split fits. With
    interleaving the program's memory rows average each device's chunks; where the exact peak of the dealt chunks
    is over capacity, that device recomputes one more block until it fits."""
    p, v = knobs.pp, knobs.virtual_stages
    tm = cm.terms(knobs)
    allow = knobs.recompute == "none"
    a = solve_layer_split(cm, knobs, m) if solved is False else solved
    stages, costs = first or first_cut(cm, knobs, a)
    while True:
        mem = device_memories(cm, knobs, stages, costs, m)
        over = [] if a is None else [i for i in range(p) if not fits_bytes(mem[i].total_gib * GIB, tm.capacity_bytes)
                                     and a.recomputed[i] < a.layers[i]]
        if not (allow and v > 1 and over):
            return stages, costs, mem
        rec = list(a.recomputed)
        for i in over:
            rec[i] += 1
        a = dataclasses.replace(a, recomputed=tuple(rec))
        stages = stages_from_assignment(a, v, knobs.recompute)
        costs = stage_cost_list(cm, knobs, stages)


def price(cm: CostModel, knobs: Knobs, global_batch: int, timings: dict | None = None, exact_pp_comm: bool = True) -> Plan:
    """The exact plan for fixed knobs: the split program's layer split (uneven where that is faster or fits),
    priced by the simulator; an even split (which then says why it does not fit) when no split fits."""
    timings = timings if timings is not None else {}
    m = global_batch // (knobs.micro_batch * knobs.dp)
    t0 = time.perf_counter()
    stages, _, _ = layer_split(cm, knobs, m)
    t1 = time.perf_counter()
    plan, _ = predict(cm.model, cm.cluster, cm.device, knobs, global_batch, stages, exact_pp_comm=exact_pp_comm, cost_model=cm)
    timings["split"] = timings.get("split", 0.0) + t1 - t0
    timings["simulate"] = timings.get("simulate", 0.0) + time.perf_counter() - t1
    return plan


def _bounded(cm: CostModel, k: Knobs, B: int, seconds: float, peak_gib: float, fits: bool, reason: str, level: str,
             flops: dict[bool, float]) -> Candidate:
    """A candidate known by its bound; flops: FLOPs per iteration with (True) and without full recomputation."""
    return Candidate(k, seconds, B * cm.model.seq_len / seconds, flops[k.recompute == "full"] / (seconds * cm.cluster.gpus) / 1e12,
                     peak_gib, fits, reason, level)


def search(model: ModelSpec, cluster: ClusterSpec, device: DeviceProfile, global_batch: int, pins: dict | None = None,
           top: int = 5, framework: Framework = MESHPLAN, memory_headroom_gib: float = DEFAULT_MEMORY_HEADROOM_GIB,
           time_limit_s: float | None = None) -> SearchResult:
    """The `top` fastest plans that fit, exactly as pricing every candidate would rank them (or, if
    time_limit_s runs out first, the best found with how far from proven it is)."""
    pins = {k: v for k, v in (pins or {}).items() if v is not None}
    start = time.perf_counter()
    check_precision(device, pins.get("precision", "bf16"))
    knobs = enumerate_knobs(model, cluster, global_batch, pins)
    if not knobs:
        explain_empty(model, cluster, global_batch, pins)
    cm = CostModel(model, cluster, device, framework, memory_headroom_gib)
    cap = cm.capacity_gib
    flops = {full: model_flops(model, global_batch, 1.0 if full else 0.0) for full in (False, True)}
    cands: list[Candidate] = []
    heap: list[tuple[float, int, int]] = []
    for idx, k in enumerate(knobs):
        m = global_batch // (k.micro_batch * k.dp)
        seconds, floor_gib = every_split_bound_s(cm, k, m)
        fits = fits_bytes(floor_gib, cap)
        reason = "" if fits else f"needs at least {floor_gib:.1f} GiB on some device whatever the layer split, over the {cap:g} GiB usable on one {device.name}"
        cands.append(_bounded(cm, k, global_batch, seconds, floor_gib, fits, reason, "bound", flops))
        if fits:
            heap.append((seconds, 0, idx))
    heapq.heapify(heap)
    timings = {"bound": time.perf_counter() - start, "split": 0.0, "simulate": 0.0}
    solved_of: dict[int, Assignment | None] = {}
    first_of: dict[int, tuple] = {}
    split_of: dict[int, tuple] = {}
    priced: dict[int, Plan] = {}

    def advance() -> int | None:
        """Take the candidate with the lowest bound one step further; its index once its price is final."""
        seconds, final, idx = heapq.heappop(heap)
        if final:
            return idx
        k = cands[idx].knobs
        m = global_batch // (k.micro_batch * k.dp)
        t0 = time.perf_counter()
        if idx not in solved_of:
            # The split program's optimum T* first (no stages built): the busiest device works m T*, then its
            # exposed reduction and step; a lower bound for the split price() runs (the repair only adds).
            a = solved_of[idx] = solve_layer_split(cm, k, m)
            if a is not None:
                i = max(range(k.pp), key=lambda j: a.layers[j])
                tm = cm.terms(k)
                params = a.layers[i] * tm.layer_params + tm.end_params(model, k.tp, i == 0, i == k.pp - 1)
                seconds = max(seconds, (m * a.slowest_s + sum(cm.device_tail_s(k, params, m, float("inf")))) * (1 - 1e-9))
                c = cands[idx]
                cands[idx] = _bounded(cm, k, global_batch, seconds, c.peak_memory_gib, c.fits, c.reason, "bound", flops)
            heapq.heappush(heap, (seconds, 0, idx))
            timings["split"] += time.perf_counter() - t0
            return None
        if idx not in split_of and idx not in first_of and solved_of[idx] is not None:
            # That split's stages and costs, and its bound (1)-(2), before their memory: most candidates stop here
            # (their bound passes the plans already final), and the memory is the dearer half.
            first_of[idx] = first_cut(cm, k, solved_of[idx])
            lb = max(seconds, split_bound_s(cm, k, m, first_of[idx][1]))
            c = cands[idx]
            cands[idx] = _bounded(cm, k, global_batch, lb, c.peak_memory_gib, c.fits, c.reason, "bound", flops)
            heapq.heappush(heap, (lb, 0, idx))
            timings["split"] += time.perf_counter() - t0
            return None
        if idx not in split_of:
            first = first_of.pop(idx, None)
            stages, costs, mem = layer_split(cm, k, m, solved_of[idx], first)
            split_of[idx] = stages
            peak = max(x.total_gib for x in mem)
            fits = fits_bytes(peak, cap)
            # The first cut's bound is in `seconds` already; only a repaired split has costs of its own to bound.
            lb = seconds if first is not None and costs is first[1] else max(seconds, split_bound_s(cm, k, m, costs))
            reason = "" if fits else f"no layer split fits: the best needs {peak:.1f} GiB, over the {cap:g} GiB usable on one {device.name}"
            cands[idx] = _bounded(cm, k, global_batch, lb, peak, fits, reason, "split", flops)
            if fits:
                heapq.heappush(heap, (lb, 0, idx))
            timings["split"] += time.perf_counter() - t0
            return None
        plan, _ = predict(model, cluster, device, k, global_batch, split_of[idx], exact_pp_comm=False, cost_model=cm)
        priced[idx] = plan
        cands[idx] = _priced_candidate(plan, k)
        if plan.prediction.fits:
            heapq.heappush(heap, (plan.prediction.iteration_s, 1, idx))
        timings["simulate"] += time.perf_counter() - t0
        return None

    ranked: list[int] = []
    complete = True
    while heap and len(ranked) < top:
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            complete = False
            break
        done = advance()
        if done is not None:
            ranked.append(done)
    gap = 0.0
    if not complete:
        # Out of time: what is priced and fits comes next, in order, unproven; with nothing priced, go on to
        # the first final plan. The gap is to the lowest bound among the candidates not priced.
        waiting = sorted((x for x in heap if x[1]), key=lambda x: (x[0], x[2]))
        ranked += [x[2] for x in waiting[:top - len(ranked)]]
        heap = [x for x in heap if not x[1]]
        heapq.heapify(heap)
        while heap and not ranked:
            done = advance()
            if done is not None:
                ranked.append(done)
        unpriced = [x[0] for x in heap if not x[1]]
        if ranked and unpriced:
            best = priced[ranked[0]].prediction.iteration_s
            gap = max(0.0, 100 * (best - min(unpriced)) / best)
            # Proven after all if the top are all there and no unpriced candidate could beat the last of them.
            complete = len(ranked) >= top and min(unpriced) >= priced[ranked[-1]].prediction.iteration_s
        else:
            complete = not unpriced
    if ranked:
        # The shown plans get their breakdown's send/recv share exactly (a second simulation).
        plans = [predict(model, cluster, device, cands[i].knobs, global_batch, split_of[i], cost_model=cm)[0] for i in ranked]
    else:
        # Nothing fits: show the configurations that come closest, each with its reason.
        closest = sorted(range(len(cands)), key=lambda i: (cands[i].peak_memory_gib, i))[:top]
        plans = [price(cm, cands[i].knobs, global_batch, timings) for i in closest]
        order = sorted(range(len(plans)), key=lambda j: (plans[j].prediction.peak_memory_gib, j))  # priced, closest first
        plans, closest = [plans[j] for j in order], [closest[j] for j in order]
    elapsed = time.perf_counter() - start
    knobs = tuple(cands[i].knobs for i in ranked) if ranked else tuple(cands[i].knobs for i in closest)
    return SearchResult(tuple(plans), tuple(cands), len(cands), elapsed, timings, split=len(solved_of), priced=len(priced),
                        complete=complete, gap_pct=gap, top=top, time_limit_s=time_limit_s, plan_knobs=knobs)


def _priced_candidate(plan: Plan, knobs: Knobs) -> Candidate:
    pr = plan.prediction
    return Candidate(knobs, pr.iteration_s, pr.tokens_per_s, pr.tflops_per_gpu, pr.peak_memory_gib, pr.fits, pr.reason, "priced")


def exhaustive_search(model: ModelSpec, cluster: ClusterSpec, device: DeviceProfile, global_batch: int, pins: dict | None = None,
                      framework: Framework = MESHPLAN, memory_headroom_gib: float = DEFAULT_MEMORY_HEADROOM_GIB) -> list[tuple[Knobs, Plan]]:
    """Every candidate priced, the fitting ones ranked by (iteration, enumeration order): the reference the
    branch and bound must reproduce. For tests and bench/search_optimality.py; slow on big clusters."""
    pins = {k: v for k, v in (pins or {}).items() if v is not None}
    cm = CostModel(model, cluster, device, framework, memory_headroom_gib)
    out = []
    for idx, k in enumerate(enumerate_knobs(model, cluster, global_batch, pins)):
        plan = price(cm, k, global_batch, exact_pp_comm=False)
        if plan.prediction.fits:
            out.append((plan.prediction.iteration_s, idx, k, plan))
    out.sort(key=lambda x: (x[0], x[1]))
    return [(k, plan) for _, _, k, plan in out]
