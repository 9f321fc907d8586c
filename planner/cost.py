"""Price one fully specified configuration (knobs and a layer split) by simulating its schedule: `predict`.

Every second and byte comes from the one cost model (planner/terms.py); the search's bounds
(planner/bounds.py) and the layer-split program (planner/ilp.py) read the same terms."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from planner import schedule
from planner.deepspeed import deepspeed_extras
from planner.errors import PlanError, SpecError
from planner.memory import MemoryBreakdown, device_memory
from planner.plan import PRECISIONS, RECOMPUTE, SCHEDULES, Breakdown, Knobs, Plan, Prediction, Stage, degrees_text, with_id
from planner.zero import ZERO_MODES, ZERO_STAGES
from planner.specs import ClusterSpec, DeviceProfile, ModelSpec, nodes_x
from planner.terms import (DEEPSPEED, DEFAULT_MEMORY_HEADROOM_GIB, FRAMEWORKS, MEGATRON, MESHPLAN, CostModel,  # noqa: F401
                           Framework, fits_bytes)


@dataclass(frozen=True)
class StageCost:
    """Per-microbatch seconds of one (virtual) stage and what it keeps in memory."""

    forward_s: float
    backward_s: float
    """Forward and backward (without recomputation), with blocking send/recv where the framework blocks."""
    recompute_s: float
    """Recomputation, run at the start of each backward."""
    tp_comm_s: float
    """Of forward_s + backward_s + recompute_s, the tensor-parallel collectives."""
    io_s: float
    """Of forward_s and of backward_s each, the blocking send/recv (0 where sends run beside compute)."""
    dp_exposed_s: float
    """Of forward_s + backward_s, ZeRO 2/3 weight gathers and gradient reduce-scatters not hidden under compute."""
    params: float
    activation_bytes: float
    """Kept per in-flight microbatch, bytes."""
    full_recompute: bool
    """Some of its blocks recompute fully (their working set is then on the device)."""
    sharded_overlap_s: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 0.0), (0.0, 0.0))
    """ZeRO 2/3 only: (compute, traffic) beside each other in the forward, then in the backward (recomputation
    included), the microbatch's edges left out: each phase lasts max(compute, traffic) plus its edge."""

    @property
    def busy_s(self) -> float:
        return self.forward_s + self.backward_s + self.recompute_s


def compile_problem(*, tp: int, sequence_parallel: bool) -> str | None:
    """Why meshplan's runtime cannot compile a plan's blocks (runtime/parallel/compile.py), or None; predict and the
    search refuse what it refuses. Checked on torch 2.13 (CPU, inductor), each against one process's losses:
    compile alone, with selective and full recomputation, DDP, FSDP2 zero 2 and 3, 1F1B and interleaved
    pipelining, cp, and tp with sequence parallelism (with cp, pp or FSDP2 too) all train as eager does. tp without
    sequence parallelism does not: its first backward fails in an eager DTensor redistribute that the compiled
    blocks hand a plain tensor gradient ('Tensor' object has no attribute '_local_tensor')."""
    if tp > 1 and not sequence_parallel:
        return ("compile with tp > 1 needs sequence_parallel: without it the backward fails on torch 2.13 (a DTensor "
                "redistribute is handed a plain tensor gradient by the compiled blocks); turn sequence_parallel on or "
                "compile off")
    return None


def sequence_parallel_problem(*, tp: int, sequence_parallel: bool) -> str | None:
    """Why sequence parallelism means nothing here, or None: predict refuses it pinned, the search does not make it."""
    if sequence_parallel and tp == 1:
        return "shards the norms and dropout over the tp group, so it needs tp > 1; got tp 1: turn it off or raise tp"
    return None


def check_knobs(model: ModelSpec, cluster: ClusterSpec, knobs: Knobs, global_batch: int) -> None:
    """Bad combinations of user-given knobs: one error naming the field."""
    src = "configuration"
    for name in ("tp", "pp", "dp", "micro_batch", "virtual_stages"):
        if getattr(knobs, name) <= 0:
            raise SpecError(src, name, f"must be positive, got {getattr(knobs, name)}")
    if global_batch <= 0:
        raise SpecError(src, "global_batch", f"must be positive, got {global_batch}")
    if knobs.schedule not in SCHEDULES:
        raise SpecError(src, "schedule", f"expected one of {', '.join(SCHEDULES)}, got {knobs.schedule!r}")
    if knobs.recompute not in RECOMPUTE:
        raise SpecError(src, "recompute", f"expected one of {', '.join(RECOMPUTE)}, got {knobs.recompute!r}")
    if knobs.cp <= 0:
        raise SpecError(src, "cp", f"must be positive, got {knobs.cp}")
    if knobs.zero not in ZERO_STAGES:
        raise SpecError(src, "zero", f"expected a ZeRO stage {', '.join(map(str, ZERO_STAGES))}, got {knobs.zero!r}")
    if knobs.precision not in PRECISIONS:
        raise SpecError(src, "precision", f"expected one of {', '.join(PRECISIONS)}, got {knobs.precision!r}")
    world = knobs.tp * knobs.cp * knobs.pp * knobs.dp
    if world != cluster.gpus:
        raise PlanError(f"{degrees_text(knobs)} = {world}, but the cluster has "
                        f"{cluster.gpus} devices ({nodes_x(cluster.nodes, cluster.gpus_per_node)}); choose degrees whose product is {cluster.gpus}")
    if knobs.cp > 1 and model.seq_len % (2 * knobs.cp):
        raise SpecError(src, "cp", f"seq_len {model.seq_len} does not split into 2 x cp = {2 * knobs.cp} equal chunks; pick a cp for which it does")
    if model.tp_problem(knobs.tp):
        raise SpecError(src, "tp", f"the model's {model.tp_problem(knobs.tp)}")
    if model.tie_embeddings and knobs.pp * knobs.virtual_stages > 1:
        raise SpecError(src, "pp", f"{model.name} ties its embedding and head, which meshplan's runtime keeps on one stage; "
                                   f"use pp 1 (got pp {knobs.pp} x virtual_stages {knobs.virtual_stages})")
    if why := sequence_parallel_problem(tp=knobs.tp, sequence_parallel=knobs.sequence_parallel):
        raise SpecError(src, "sequence_parallel", why)
    if knobs.schedule == "interleaved" and knobs.pp == 1:  # named by virtual_stages, which predict's flags infer it from
        raise SpecError(src, "virtual_stages", f"{knobs.virtual_stages} (interleaved) deals chunks of layers round the "
                                               "pipeline's devices, so it needs pp > 1; got pp 1: use 1, or raise pp")
    if knobs.compile and (why := compile_problem(tp=knobs.tp, sequence_parallel=knobs.sequence_parallel)):
        raise SpecError(src, "compile", why)
    if knobs.schedule != "interleaved" and knobs.virtual_stages != 1:
        raise SpecError(src, "virtual_stages", f"only the interleaved schedule takes virtual stages, got {knobs.virtual_stages} with {knobs.schedule}")
    if model.layers < knobs.pp * knobs.virtual_stages:
        raise SpecError(src, "pp", f"the model's {model.layers} layers are fewer than pp x virtual_stages = {knobs.pp * knobs.virtual_stages} stages")
    if global_batch % (knobs.micro_batch * knobs.dp):
        raise SpecError(src, "global_batch", f"{global_batch} is not divisible by micro_batch {knobs.micro_batch} x dp {knobs.dp}")
    why = schedule.schedule_constraint(knobs.schedule, knobs.pp, global_batch // (knobs.micro_batch * knobs.dp), knobs.virtual_stages)
    if why:
        raise SpecError(src, "schedule", why)


def uniform_stages(model: ModelSpec, n_stages: int, recompute: str) -> tuple[Stage, ...]:
    """Layers split as evenly as possible; the remainder goes to the middle stages, away from the
    embedding (first) and head (last)."""
    base, extra = divmod(model.layers, n_stages)
    counts = [base] * n_stages
    order = sorted(range(n_stages), key=lambda k: (k in (0, n_stages - 1), abs(k - (n_stages - 1) / 2)))
    for k in order[:extra]:
        counts[k] += 1
    stages, first = [], 0
    for k, c in enumerate(counts):
        stages.append(Stage((first, first + c), k == 0, k == n_stages - 1, recompute))
        first += c
    return tuple(stages)


def stage_cost_list(cm: CostModel, knobs: Knobs, stages: tuple[Stage, ...]) -> list[StageCost]:
    """Each stage's per-microbatch seconds and bytes from the configuration's terms."""
    tm = cm.terms(knobs)
    p2p = cm.p2p_s(knobs)
    blocking = cm.framework.p2p_blocking and knobs.pp > 1
    sharded = knobs.zero >= 2 and knobs.dp * knobs.cp > 1
    ends = {(e, h): (tm.fixed_forward_s(e, h), tm.fixed_backward_s(e, h), tm.end_params(cm.model, knobs.tp, e, h))
            for e in (False, True) for h in (False, True)}
    # The traffic at a microbatch's edges (fsdp_edges_s): the same for every stage, and none with pipelining.
    edge_f, edge_b = fsdp_edges_s(cm, knobs, ends[(True, True)][2] + tm.layer_params) if sharded else (0.0, 0.0)
    out = []
    rest_of = {knobs.recompute: tm}
    for k, s in enumerate(stages):
        n = s.layers[1] - s.layers[0]
        # A 'full' stage re-runs recompute_layers of its blocks (all when None: the split solver may recompute
        # only some); its other blocks, and every block of a 'none' or 'selective' stage, follow that policy.
        full = (n if s.recompute_layers is None else s.recompute_layers) if s.recompute == "full" else 0
        policy = "none" if s.recompute == "full" else s.recompute
        rest = rest_of.get(policy)
        if rest is None:
            rest = rest_of[policy] = cm.terms(dataclasses.replace(knobs, recompute=policy))
        fixed_f, fixed_b, end_params = ends[(s.embedding, s.head)]
        rc = full * tm.full_recompute_s + (n - full) * rest.layer_recompute_s
        f = n * tm.layer_forward_s + fixed_f
        bw = n * tm.layer_backward_s + fixed_b
        tpc = (n + full / 2) * tm.layer_tp_comm_s + tm.tp_all_reduce_s * s.embedding + tm.head_tp_comm_s * s.head  # a recompute re-runs the forward's
        acts = full * tm.full_activation_bytes + (n - full) * rest.layer_activation_bytes
        if s.embedding:
            acts += tm.embedding_activation_bytes
        if s.head:
            acts += tm.head_kept_bytes
        io = blocking_io_s(cm, knobs, p2p, k) if blocking else 0.0
        params = n * tm.layer_params + end_params
        exposed, overlap = 0.0, ((0.0, 0.0), (0.0, 0.0))
        if sharded:
            # ZeRO 2/3: the stage's weight gathers and gradient reduce-scatters run on their own stream beside
            # its compute (FSDP2 prefetches the next block's weights); what exceeds the compute is exposed, and
            # so is the traffic at a microbatch's edges where nothing runs beside it (fsdp_edges_s).
            gather_f, gather_b, _ = cm.sharding_s(knobs, params)
            overlap = ((f, gather_f - edge_f), (bw + rc, gather_b - edge_b))
            (cf, gf), (cb, gb) = overlap
            exposed = max(0.0, gf - cf) + edge_f + max(0.0, gb - cb) + edge_b
            f, bw = max(cf, gf) + edge_f, max(cb, gb) - rc + edge_b  # backward_s leaves the recomputation out
        out.append(StageCost(f + io, bw + io, rc, tpc, io, exposed, params, acts, full > 0, overlap))
    return out


def fsdp_edges_s(cm: CostModel, knobs: Knobs, edge_params: float) -> tuple[float, float]:
    """(forward, backward) seconds per microbatch of FSDP2 traffic that nothing overlaps (Framework.fsdp_serial_edges):
    the gathers of the root unit and the first block before the forward (stage 3, which reshards), and their
    reduce-scatters after the backward. `edge_params` is the root's and one block's parameters. Without
    pipelining only: a pipeline stage's edges sit among other stages' work, which the schedule prices; and not
    for a measured profile that timed FSDP2 itself (terms.device_tail_s)."""
    if not cm.framework.fsdp_serial_edges or knobs.pp > 1 or (cm.device.measured or {}).get("fsdp"):
        return 0.0, 0.0
    forward, backward, _ = cm.sharding_s(knobs, edge_params)
    gathers_in_backward = forward if ZERO_MODES[knobs.zero].param_gathers_per_microbatch >= 2 else 0.0
    return forward, backward - gathers_in_backward


def blocking_io_s(cm: CostModel, knobs: Knobs, p2p: tuple[float, ...], k: int) -> float:
    """Stage k's blocking send/recv per forward (and as much per backward); 0 where sends run beside compute.
    A blocking send/recv holds both devices for the transfer: stage k receives from k-1 and sends to k+1 in
    its forward, and the reverse in its backward."""
    if not (cm.framework.p2p_blocking and knobs.pp > 1):
        return 0.0
    return (p2p[k - 1] if k > 0 else 0.0) + (p2p[k] if k < len(p2p) else 0.0)


def stage_fixed_busy_s(cm: CostModel, knobs: Knobs) -> list[float]:
    """Each stage's seconds per microbatch with no blocks: embedding, head, pipelining's work, blocking sends."""
    tm, S, p2p = cm.terms(knobs), knobs.pp * knobs.virtual_stages, cm.p2p_s(knobs)
    return [tm.fixed_forward_s(k == 0, k == S - 1) + tm.fixed_backward_s(k == 0, k == S - 1) + 2 * blocking_io_s(cm, knobs, p2p, k)
            for k in range(S)]


def stage_costs(model: ModelSpec, cluster: ClusterSpec, device: DeviceProfile, knobs: Knobs, stages: tuple[Stage, ...],
                framework: Framework = MESHPLAN) -> list[StageCost]:
    """stage_cost_list for callers that hold specs rather than a CostModel (the profiler's fit)."""
    return stage_cost_list(CostModel(model, cluster, device, framework), knobs, stages)


def p2p_seconds(model: ModelSpec, cluster: ClusterSpec, device: DeviceProfile, knobs: Knobs, framework: Framework) -> list[float]:
    """Send/recv time of one microbatch's activation across each stage boundary (CostModel.p2p_s)."""
    return list(CostModel(model, cluster, device, framework).p2p_s(knobs))


def model_flops(model: ModelSpec, global_batch: int, recomputed_fraction: float) -> float:
    """FLOPs per iteration, Narayanan et al. 2021, section 5.1 (eq. 3), for a general MLP width:
    per block 2bs(4h^2 + 2hf + 2sh) forward, x3 with backward, +1 forward for recomputed blocks;
    logits 2bshV x3. With f = 4h and full recomputation this is 96Bslh^2(1 + s/6h + V/16lh).
    Grouped-query attention narrows k and v to kv_heads * head_dim columns, and SwiGLU has three h x f
    matrices instead of two; a GPT (kv_heads = heads, gelu) gets exactly the formula above."""
    B, s, h, l, V = global_batch, model.seq_len, model.hidden, model.layers, model.vocab
    # Narayanan et al. 2021 eq. 3's 2bs(4h^2 + 2hf + 2sh): 2 FLOPs per matrix weight per token (the block's
    # matrices as ModelSpec.block_matrix_params counts them, GQA and SwiGLU included) and the attention's 2sh.
    per_block_fwd = 2 * B * s * (model.block_matrix_params() + 2 * s * h)
    return (3 + recomputed_fraction) * l * per_block_fwd + 3 * 2 * B * s * h * V


def device_stages(k: int, pp: int, v: int) -> list[int]:
    """Global stages of pipeline device k: k, k + pp, k + 2pp, ... (looped placement)."""
    return [c * pp + k for c in range(v)]


def check_precision(device: DeviceProfile, precision: str) -> None:
    """fp8 only where the device has FP8 tensor cores (predict, and the search before it enumerates anything)."""
    if precision == "fp8" and not device.fp8_peak_tflops:
        raise SpecError("configuration", "precision", f"fp8 needs FP8 tensor cores (compute capability 8.9 or newer): "
                                                      f"{device.name}'s profile has no fp8_peak_tflops; use bf16")


def predict(model: ModelSpec, cluster: ClusterSpec, device: DeviceProfile, knobs: Knobs, global_batch: int,
            stages: tuple[Stage, ...] | None = None, framework: Framework = MESHPLAN,
            with_timeline: bool = False, exact_pp_comm: bool = True, memory_headroom_gib: float = DEFAULT_MEMORY_HEADROOM_GIB,
            cost_model: CostModel | None = None) -> tuple[Plan, schedule.SimResult | None]:
    """Price one configuration by simulating its schedule. Returns the plan (with prediction) and,
    when asked, the simulation (timeline) of the slowest pipeline.

    exact_pp_comm=False skips the second simulation (without sends) that splits the pipeline's
    idle time into send/recv and bubble; the search uses it for candidates it will not show.
    cost_model, when given, carries the specs, framework and headroom (and its memoised terms)."""
    cm = cost_model or CostModel(model, cluster, device, framework, memory_headroom_gib)
    model, cluster, device = cm.model, cm.cluster, cm.device
    check_knobs(model, cluster, knobs, global_batch)
    check_precision(device, knobs.precision)
    p, v, t = knobs.pp, knobs.virtual_stages, knobs.tp
    m = global_batch // (knobs.micro_batch * knobs.dp)
    stages = stages or uniform_stages(model, p * v, knobs.recompute)
    costs = stage_cost_list(cm, knobs, stages)
    # DeepSpeed's engine: per-microbatch and per-step terms beyond the shared ones (planner/deepspeed.py).
    extras = deepspeed_extras(cm, knobs, costs) if cm.framework.deepspeed_pipe else None
    costs = extras.stage_costs if extras else costs
    blocking = cm.framework.p2p_blocking and p > 1
    p2p = [0.0] * (p * v - 1) if blocking else list(cm.p2p_s(knobs))
    fwd = [c.forward_s for c in costs]
    bwd = [c.backward_s for c in costs]
    rc = [c.recompute_s for c in costs]
    sim = cm.simulate(knobs.schedule, p, m, v, fwd, bwd, p2p, rc, with_timeline)
    sim0 = cm.simulate(knobs.schedule, p, m, v, fwd, bwd, 0.0, rc) if any(p2p) and exact_pp_comm else sim

    mem = device_memories(cm, knobs, stages, costs, m)
    ends, dp_exposed, opt = [], [], []
    for i in range(p):
        mine = device_stages(i, p, v)
        dp_s, opt_s = cm.device_tail_s(knobs, sum(costs[k].params for k in mine), m, min(costs[k].backward_s for k in mine),
                                       tuple(costs[k].forward_s for k in mine))
        dp_s += extras.tail_s[i] if extras else 0.0
        dp_exposed.append(dp_s)
        opt.append(opt_s)
        ends.append(sim.finish_s[i] + dp_s + opt_s)
    crit = max(range(p), key=lambda i: ends[i])
    iteration = ends[crit]

    mine = device_stages(crit, p, v)
    busy = m * sum(costs[k].busy_s for k in mine)
    tpc = m * sum(costs[k].tp_comm_s for k in mine)
    io = m * 2 * sum(costs[k].io_s for k in mine)
    sharding = m * sum(costs[k].dp_exposed_s for k in mine)
    pp_comm = max(0.0, sim.iteration_s - sim0.iteration_s) + io
    bubble = max(0.0, sim.finish_s[crit] - busy - max(0.0, sim.iteration_s - sim0.iteration_s))
    bubble = bubble if bubble > 1e-12 * iteration else 0.0  # no pipeline: 8.9e-16 s of summation order, not a bubble
    breakdown = Breakdown(compute_s=busy - tpc - io - sharding, tp_comm_s=tpc, pp_comm_s=pp_comm, dp_comm_s=dp_exposed[crit] + sharding,
                          bubble_s=bubble, optimizer_s=opt[crit])

    peak_dev = max(range(p), key=lambda i: mem[i].total_gib)
    peak = mem[peak_dev].total_gib
    cap = cm.capacity_gib
    fits = fits_bytes(peak, cap)
    head = f" ({device.memory_gib:g} GiB less {cm.memory_headroom_gib:g} GiB headroom)" if cm.memory_headroom_gib else ""
    reason = "" if fits else (f"pipeline device {peak_dev} (stages {', '.join(str(k) for k in device_stages(peak_dev, p, v))}) needs "
                              f"{peak:.1f} GiB, {peak - cap:.1f} GiB over the {cap:g} GiB usable on one {device.name}{head}")
    recomputed = sum((s.layers[1] - s.layers[0]) if s.recompute == "full" and s.recompute_layers is None
                     else (s.recompute_layers or 0) if s.recompute == "full" else 0 for s in stages) / model.layers
    flops = model_flops(model, global_batch, recomputed)
    tflops = flops / (iteration * cluster.gpus) / 1e12
    mfu = model_flops(model, global_batch, 0.0) / (iteration * cluster.gpus) / 1e12 / device.peak_tflops
    pred = Prediction(iteration_s=iteration, tokens_per_s=global_batch * model.seq_len / iteration, tflops_per_gpu=tflops,
                      mfu=mfu, peak_memory_gib=peak, fits=fits, breakdown=breakdown, reason=reason, params=model.params())
    stages = tuple(dataclasses.replace(s, memory_gib=round(mem[k % p].total_gib, 3)) for k, s in enumerate(stages))
    plan = with_id(Plan(model=model, cluster=cluster, global_batch=global_batch, micro_batch=knobs.micro_batch,
                        num_microbatches=m, tp=t, pp=p, dp=knobs.dp, schedule=knobs.schedule, virtual_stages=v,
                        sequence_parallel=knobs.sequence_parallel, zero=knobs.zero, cp=knobs.cp, precision=knobs.precision,
                        compile=knobs.compile, framework=cm.framework.name,
                        stages=stages, prediction=pred, profile=device.label))
    return plan, (sim if with_timeline else None)


def memory_by_device(plan: Plan, device: DeviceProfile, memory_headroom_gib: float = DEFAULT_MEMORY_HEADROOM_GIB,
                     framework: Framework | None = None) -> list[MemoryBreakdown]:
    """Memory breakdown of each pipeline device of a priced plan (for the dashboard), under `framework` (default:
    the one the plan was priced for, so the parts add up to its stages' memory_gib)."""
    cm = CostModel(plan.model, plan.cluster, device, framework or FRAMEWORKS[plan.framework], memory_headroom_gib)
    costs = stage_cost_list(cm, plan.knobs, plan.stages)
    return device_memories(cm, plan.knobs, plan.stages, costs, plan.num_microbatches)


def device_memories(cm: CostModel, knobs: Knobs, stages: tuple[Stage, ...], costs: list[StageCost], m: int) -> list[MemoryBreakdown]:
    """Each pipeline device's memory: its stages' state, and their activations at the peak of its op order."""
    p, v = knobs.pp, knobs.virtual_stages
    tm = cm.terms(knobs)
    vectors = schedule.inflight_vectors(knobs.schedule, p, m, v)
    out = []
    for i in range(p):
        mine = device_stages(i, p, v)
        acts = schedule.peak_inflight(vectors[i], [costs[k].activation_bytes for k in mine])
        ends = sum(tm.end_params(cm.model, knobs.tp, stages[k].embedding, stages[k].head) for k in mine)
        blocks = sum(stages[k].layers[1] - stages[k].layers[0] for k in mine)
        out.append(device_memory(tm, sum(costs[k].params for k in mine), ends, blocks, acts, any(stages[k].head for k in mine),
                                 any(costs[k].full_recompute for k in mine), m, knobs))
    return out
