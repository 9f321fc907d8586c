"""Combine compute, communication, memory and the schedule simulator into a Prediction.

`predict` prices one fully specified configuration (knobs plus a layer split); `estimate` is the
closed-form version the search uses to bound and rank thousands of candidates cheaply."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from planner import comm, schedule
from planner.compute import end_times, layer_times, optimizer_step_s
from planner.errors import PlanError, SpecError
from planner.memory import (MemoryBreakdown, activation_bytes_per_layer, device_memory, embedding_activation_bytes,
                            end_param_count, layer_param_count)
from planner.plan import RECOMPUTE, SCHEDULES, Breakdown, Knobs, Plan, Prediction, Stage, with_id
from planner.specs import ClusterSpec, DeviceProfile, ModelSpec
from planner.topology import dp_link, pp_links, tp_link


@dataclass(frozen=True)
class Framework:
    """What the software that runs the plan does, where that changes the cost."""

    name: str
    grad_reduce_bytes: int
    """Bytes per gradient element in the data-parallel reduction."""
    dp_overlap: bool
    """Gradient reduction overlaps the last microbatch's backward (DDP/FSDP2 buckets)."""

    def overlaps_dp(self, knobs: Knobs) -> bool:
        """meshplan's runtime overlaps only where DDP (pure data parallelism) or FSDP2 reduce; with
        TP or pipelining and no sharded optimizer it all-reduces by hand after the last backward
        (runtime/parallel/data.py says why)."""
        if self.name == "meshplan":
            return knobs.distributed_optimizer or (knobs.tp == 1 and knobs.pp == 1)
        return self.dp_overlap
    p2p_scatter_gather: bool
    """Narayanan et al. 2021, section 4.1: cross-node pipeline sends split over the t NICs of a node."""
    p2p_blocking: bool
    """Sends and receives wait for their peer and occupy the device (Megatron-LM 2021's
    send_forward_recv_backward, DeepSpeed's pipeline engine); otherwise they run beside compute."""


# meshplan's runtime: fp32 parameters (bf16 autocast on GPU), DDP/FSDP2 overlap the reduction,
# torch.distributed.pipelining posts its sends and receives asynchronously.
MESHPLAN = Framework("meshplan", grad_reduce_bytes=4, dp_overlap=True, p2p_scatter_gather=False, p2p_blocking=False)
# Megatron-LM as in Narayanan et al. 2021: fp16 gradients all-reduced after the flush, no overlap;
# blocking pipeline sends split over the node's NICs.
MEGATRON = Framework("megatron", grad_reduce_bytes=2, dp_overlap=False, p2p_scatter_gather=True, p2p_blocking=True)
# DeepSpeed's pipeline engine with ZeRO-1 as in Smith et al. 2022: blocking sends of whole
# activations, fp32 gradients reduce-scattered after the flush.
DEEPSPEED = Framework("deepspeed", grad_reduce_bytes=4, dp_overlap=False, p2p_scatter_gather=False, p2p_blocking=True)
FRAMEWORKS = {f.name: f for f in (MESHPLAN, MEGATRON, DEEPSPEED)}


@dataclass(frozen=True)
class StageCost:
    """Per-microbatch seconds of one (virtual) stage and its memory inputs."""

    forward_s: float
    backward_s: float
    recompute_s: float
    tp_comm_s: float
    """Of forward_s + backward_s + recompute_s, the tensor-parallel collectives."""
    params: float
    activation_bytes: float
    """Kept per in-flight microbatch (2-byte basis)."""


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
    if knobs.tp * knobs.pp * knobs.dp != cluster.gpus:
        raise PlanError(f"tp {knobs.tp} x pp {knobs.pp} x dp {knobs.dp} = {knobs.tp * knobs.pp * knobs.dp}, but the cluster has "
                        f"{cluster.gpus} devices ({cluster.nodes} nodes x {cluster.gpus_per_node}); choose degrees whose product is {cluster.gpus}")
    if model.heads % knobs.tp:
        raise SpecError(src, "tp", f"the model's {model.heads} heads are not divisible by tp {knobs.tp}")
    if model.ffn_hidden % knobs.tp:
        raise SpecError(src, "tp", f"ffn_hidden {model.ffn_hidden} is not divisible by tp {knobs.tp}")
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


def stage_costs(model: ModelSpec, cluster: ClusterSpec, device: DeviceProfile, knobs: Knobs,
                stages: tuple[Stage, ...]) -> list[StageCost]:
    t, b, sp = knobs.tp, knobs.micro_batch, knobs.sequence_parallel
    lt = layer_times(model, device, t, b, sp)
    et = end_times(model, device, t, b)
    link = tp_link(cluster, t)
    act = b * model.seq_len * model.hidden * device.dtype_bytes
    # Shoeybi et al. 2019, section 3: two all-reduces of the block's activations in the forward and
    # two in the backward (with sequence parallelism, all-gather + reduce-scatter of the same volume;
    # Korthikanti et al. 2022, section 4.2.2).
    ar = comm.all_reduce_s(act, t, link)
    layer_f, layer_b = lt.forward_s + 2 * ar, lt.backward_s + 2 * ar
    # torch.distributed.pipelining's own work per microbatch and stage (measured by planner profile).
    so_f, so_b = (0.0, 0.0)
    if device.measured and knobs.pp > 1:
        from planner.measured import stage_overhead_s

        so_f, so_b = stage_overhead_s(device)
    out = []
    for s in stages:
        n = s.layers[1] - s.layers[0]
        full = n if s.recompute == "full" and s.recompute_layers is None else (s.recompute_layers or 0) if s.recompute == "full" else 0
        f, bw, tpc = n * layer_f, n * layer_b, 4 * n * ar
        rc = full * layer_f + (n * lt.selective_recompute_s if s.recompute == "selective" else 0.0)
        tpc += 2 * full * ar
        acts = (full * activation_bytes_per_layer(model, t, b, sp, "full", device.fused_attention)
                + (n - full) * activation_bytes_per_layer(model, t, b, sp, "selective" if s.recompute == "selective" else "none", device.fused_attention))
        if s.embedding:
            # Vocab-parallel embedding: one all-reduce of its output (Shoeybi et al. 2019, section 3).
            f += et.embedding_forward_s + ar
            bw += et.embedding_backward_s
            tpc += ar
            acts += embedding_activation_bytes(model, t, b, sp)
        if s.head:
            # Column-parallel head: the input gradient is all-reduced in the backward.
            f += et.head_forward_s
            bw += et.head_backward_s + ar
            tpc += ar
        params = n * layer_param_count(model, t) + end_param_count(model, t, s.embedding, s.head)
        out.append(StageCost(f + so_f, bw + so_b, rc, tpc, params, acts))
    return out


def p2p_seconds(model: ModelSpec, cluster: ClusterSpec, device: DeviceProfile, knobs: Knobs, framework: Framework) -> list[float]:
    """Send/recv time of one microbatch's activation across each stage boundary."""
    nbytes = knobs.micro_batch * model.seq_len * model.hidden * device.dtype_bytes
    n_stages = knobs.pp * knobs.virtual_stages
    links = pp_links(cluster, knobs.tp, knobs.dp, knobs.pp)
    out = []
    for k in range(n_stages - 1):
        link = links[k % knobs.pp]
        split = knobs.tp if (knobs.sequence_parallel or (framework.p2p_scatter_gather and link.bandwidth_GBps < cluster.intra_node.bandwidth_GBps)) else 1
        out.append(comm.send_recv_s(nbytes / split, link))
    return out


def dp_seconds(cluster: ClusterSpec, knobs: Knobs, params: float, framework: Framework, dtype_bytes: int) -> float:
    """Gradient reduction of one pipeline device's parameters over its data-parallel group."""
    if knobs.dp == 1:
        return 0.0
    link = dp_link(cluster, knobs.tp, knobs.dp)
    g = params * framework.grad_reduce_bytes
    if knobs.distributed_optimizer:
        # ZeRO-1 / Megatron distributed optimizer: reduce-scatter the gradients, all-gather the
        # updated parameters (Rajbhandari et al. 2020, section 5.1: the same volume as all-reduce).
        return comm.reduce_scatter_s(g, knobs.dp, link) + comm.all_gather_s(params * dtype_bytes, knobs.dp, link)
    return comm.all_reduce_s(g, knobs.dp, link)


def model_flops(model: ModelSpec, global_batch: int, recomputed_fraction: float) -> float:
    """FLOPs per iteration, Narayanan et al. 2021, section 5.1 (eq. 3), for a general MLP width:
    per block 2bs(4h^2 + 2hf + 2sh) forward, x3 with backward, +1 forward for recomputed blocks;
    logits 2bshV x3. With f = 4h and full recomputation this is 96Bslh^2(1 + s/6h + V/16lh).
    Grouped-query attention narrows k and v to kv_heads * head_dim columns, and SwiGLU has three h x f
    matrices instead of two; a GPT (kv_heads = heads, gelu) gets exactly the formula above."""
    B, s, h, f, l, V = global_batch, model.seq_len, model.hidden, model.ffn_hidden, model.layers, model.vocab
    kv, mlp_matrices = model.kv_dim, 3 if model.mlp == "swiglu" else 2
    # Narayanan et al. 2021 eq. 3's 2bs(4h^2 + 2hf + 2sh), with q and o at h^2 and k and v at h*kv each (Ainslie
    # et al. 2023, GQA) and 3hf for SwiGLU's gate, up and down (Shazeer 2020, eq. 6).
    per_block_fwd = 2 * B * s * (2 * h * h + 2 * h * kv + mlp_matrices * h * f + 2 * s * h)
    return (3 + recomputed_fraction) * l * per_block_fwd + 3 * 2 * B * s * h * V


def _device_of_stage(k: int, pp: int) -> int:
    return k % pp


def predict(model: ModelSpec, cluster: ClusterSpec, device: DeviceProfile, knobs: Knobs, global_batch: int,
            stages: tuple[Stage, ...] | None = None, framework: Framework = MESHPLAN,
            with_timeline: bool = False, exact_pp_comm: bool = True) -> tuple[Plan, schedule.SimResult | None]:
    """Price one configuration by simulating its schedule. Returns the plan (with prediction) and,
    when asked, the simulation (timeline) of the slowest pipeline.

    exact_pp_comm=False skips the second simulation (without sends) that splits the pipeline's
    idle time into send/recv and bubble; the search uses it for candidates it will not show."""
    check_knobs(model, cluster, knobs, global_batch)
    p, v, t = knobs.pp, knobs.virtual_stages, knobs.tp
    m = global_batch // (knobs.micro_batch * knobs.dp)
    stages = stages or uniform_stages(model, p * v, knobs.recompute)
    costs = stage_costs(model, cluster, device, knobs, stages)
    p2p = p2p_seconds(model, cluster, device, knobs, framework)
    fwd = [c.forward_s for c in costs]
    bwd = [c.backward_s for c in costs]
    rc = [c.recompute_s for c in costs]
    io = [0.0] * (p * v)
    if framework.p2p_blocking and p > 1:
        # A blocking send/recv holds both devices for the transfer: stage k receives from k-1 and
        # sends to k+1 in its forward, and the reverse in its backward.
        io = [(p2p[k - 1] if k > 0 else 0.0) + (p2p[k] if k < p * v - 1 else 0.0) for k in range(p * v)]
        fwd = [f + x for f, x in zip(fwd, io)]
        bwd = [b + x for b, x in zip(bwd, io)]
        p2p = [0.0] * len(p2p)
    sim = schedule.simulate(knobs.schedule, p, m, v, fwd, bwd, p2p_s=p2p, recompute_s=rc, with_timeline=with_timeline)
    sim0 = schedule.simulate(knobs.schedule, p, m, v, fwd, bwd, p2p_s=0.0, recompute_s=rc, with_timeline=False) if any(p2p) and exact_pp_comm else sim
    finish = list(sim.finish_s)

    mem = _device_memories(model, device, knobs, stages, costs, m)
    ends, dp_exposed, opt = [], [], []
    for i in range(p):
        mine = [k for k in range(p * v) if _device_of_stage(k, p) == i]
        params = sum(costs[k].params for k in mine)
        fsdp = (device.measured or {}).get("fsdp") if framework is MESHPLAN and knobs.distributed_optimizer and knobs.dp > 1 else None
        if fsdp:
            # Measured FSDP2 cost on this machine: per step, plus a re-gather per microbatch where the
            # runtime reshards after forward (pp == 1); exposed, not overlapped.
            per_mb = m if p == 1 else 1
            dp_exposed.append(params * (fsdp["per_step_s_per_param"] + per_mb * fsdp["per_microbatch_s_per_param"]))
        else:
            dp_s = dp_seconds(cluster, knobs, params, framework, device.dtype_bytes)
            window = min(costs[k].backward_s for k in mine) if framework.overlaps_dp(knobs) else 0.0
            dp_exposed.append(max(0.0, dp_s - window))
        opt.append(optimizer_step_s(device, params / (knobs.dp if knobs.distributed_optimizer else 1)))
        ends.append(finish[i] + dp_exposed[-1] + opt[-1])
    crit = max(range(p), key=lambda i: ends[i])
    iteration = ends[crit]

    mine = [k for k in range(p * v) if _device_of_stage(k, p) == crit]
    busy = m * sum(costs[k].forward_s + costs[k].backward_s + costs[k].recompute_s for k in mine)
    tpc = m * sum(costs[k].tp_comm_s for k in mine)
    blocking = m * 2 * sum(io[k] for k in mine)
    busy += blocking
    pp_comm = max(0.0, sim.iteration_s - sim0.iteration_s) + blocking
    bubble = max(0.0, finish[crit] - busy - pp_comm)
    breakdown = Breakdown(compute_s=busy - tpc, tp_comm_s=tpc, pp_comm_s=pp_comm, dp_comm_s=dp_exposed[crit],
                          bubble_s=bubble, optimizer_s=opt[crit])

    peak_dev = max(range(p), key=lambda i: mem[i].total_gib)
    peak = mem[peak_dev].total_gib
    fits = peak <= device.memory_gib
    reason = "" if fits else (f"pipeline device {peak_dev} (stages {', '.join(str(k) for k in range(p * v) if k % p == peak_dev)}) needs "
                              f"{peak:.1f} GiB, {peak - device.memory_gib:.1f} GiB over the {device.memory_gib:g} GiB of one {device.name}")
    recomputed = sum((s.layers[1] - s.layers[0]) if s.recompute == "full" and s.recompute_layers is None
                     else (s.recompute_layers or 0) if s.recompute == "full" else 0 for s in stages) / model.layers
    flops = model_flops(model, global_batch, recomputed)
    tflops = flops / (iteration * cluster.gpus) / 1e12
    mfu = model_flops(model, global_batch, 0.0) / (iteration * cluster.gpus) / 1e12 / device.peak_tflops
    pred = Prediction(iteration_s=iteration, tokens_per_s=global_batch * model.seq_len / iteration, tflops_per_gpu=tflops,
                      mfu=mfu, peak_memory_gib=peak, fits=fits, breakdown=breakdown, reason=reason)
    stages = tuple(dataclasses.replace(s, memory_gib=round(mem[k % p].total_gib, 3)) for k, s in enumerate(stages))
    plan = with_id(Plan(model=model, cluster=cluster, global_batch=global_batch, micro_batch=knobs.micro_batch,
                        num_microbatches=m, tp=t, pp=p, dp=knobs.dp, schedule=knobs.schedule, virtual_stages=v,
                        sequence_parallel=knobs.sequence_parallel, distributed_optimizer=knobs.distributed_optimizer,
                        stages=stages, prediction=pred, profile=device.label))
    return plan, (sim if with_timeline else None)


def memory_by_device(plan: Plan, device: DeviceProfile) -> list[MemoryBreakdown]:
    """Memory breakdown of each pipeline device of a priced plan (for the dashboard)."""
    costs = stage_costs(plan.model, plan.cluster, device, plan.knobs, plan.stages)
    return _device_memories(plan.model, device, plan.knobs, plan.stages, costs, plan.num_microbatches)


def _device_memories(model: ModelSpec, device: DeviceProfile, knobs: Knobs, stages: tuple[Stage, ...],
                     costs: list[StageCost], m: int) -> list[MemoryBreakdown]:
    """Each pipeline device's memory: its stages' state, and their activations at the peak of its op order."""
    p = knobs.pp
    order = schedule.stage_order(knobs.schedule, p, m, knobs.virtual_stages)
    out = []
    for i in range(p):
        mine = [k for k in range(len(stages)) if _device_of_stage(k, p) == i]
        out.append(device_memory(model, device, knobs.tp, knobs.dp, knobs.micro_batch, knobs.sequence_parallel,
                                 knobs.distributed_optimizer, sum(costs[k].params for k in mine),
                                 _peak_inflight_bytes(order[i], {k: costs[k].activation_bytes for k in mine}),
                                 any(stages[k].head for k in mine), any(stages[k].recompute == "full" for k in mine)))
    return out


def _peak_inflight_bytes(ops: list, bytes_by_stage: dict[int, float]) -> float:
    """Largest sum of activations kept between a forward and its backward, over the device's op order."""
    cur = peak = 0.0
    for op in ops:
        cur += bytes_by_stage[op.stage] if op.kind == "F" else -bytes_by_stage[op.stage]
        peak = max(peak, cur)
    return peak


