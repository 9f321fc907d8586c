"""The pure-Python half of `planner profile`: the samples that runtime/profile.py's ranks measured, turned into a
measured device profile (planner/measured.py documents its "measured" section), including the figures that are
fitted rather than read off: the per-microbatch stage overhead of torch.distributed.pipelining (bisecting
planner.schedule.simulate over planner.cost's stage costs until the simulated step is the measured one), what
FSDP2 adds per step and per microbatch, and what DDP's overlapped all-reduce costs the step. No torch: this runs
in the planner and is tested without ranks.

Sample keys, as runtime/profile_cases.py writes them (seconds, one list entry per repeat):
    ("layer", *layer_shape(model), tp, micro_batch, sequence_parallel, "forward_s" | "backward_s" |
     "selective_recompute_s" | "with_comm_forward_s" | "with_comm_backward_s" | "cp<N>_forward_s" | "cp<N>_backward_s")
     (cp<N>: tp 1, the block under context parallelism over N ranks, each holding micro_batch*N sequences' s/N tokens)
    ("end", *end_shape(model, tp), tp, micro_batch, "embedding_forward_s" | ...)
    ("pipe", schedule, micro_batch, num_microbatches, "step_s" | "stage<k>_forward_s" | ...)
    ("fsdp", params, num_microbatches, "plain_s" | "fsdp_s"), ("ddp", params, num_microbatches, "ddp_s"), ("optimizer", params, "step_s"),
    ("gemm", n, "s"), ("copy", bytes, "s"), ("coll", op, ranks, bytes), ("cpu_s",), ("wall_s",), ("rank_cpu_s",), ("rank_wait_s",)
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from planner.cost import MESHPLAN, p2p_seconds, stage_costs
from planner.measured import fit_links, layer_family
from planner.plan import Knobs, Stage
from planner.schedule import simulate
from planner import specs
from planner.parsing import read_mapping
from planner.specs import ClusterSpec, LinkSpec, ModelSpec, device_from_dict
from planner.terms import CostModel

FSDP_MICROBATCHES = (1, 3)
"""Microbatches of the FSDP2 and plain steps whose difference splits into per-step and per-microbatch costs."""
FSDP_LAYERS = 4
"""Blocks of the model the FSDP2, DDP and plain steps train (runtime/profile_cases.py fsdp_cases; fewer if it has fewer)."""


@dataclass(frozen=True)
class Shapes:
    """What one profile measures (a model is measured at the tp degrees that can shard it)."""

    models: tuple[ModelSpec, ...]
    tps: tuple[int, ...]
    micro_batches: tuple[int, ...]
    message_bytes: tuple[int, ...]
    gemm_sizes: tuple[int, ...]
    pipelines: tuple[tuple[str, int, int], ...]
    """(schedule, micro_batch, num_microbatches) of the two-stage pipeline runs."""
    repeats: int
    """Timed passes over the embedding/head and the collectives (more for the blocks, fewer for the rest)."""
    warmup: int
    layer_repeats: int = 0
    """Timed passes over the blocks (their DTensor timings are the noisiest and weigh the most); 0: repeats."""


def tps_for(shapes: Shapes, model: ModelSpec) -> tuple[int, ...]:
    """The tp degrees of the profile that can shard this model (planner.specs.ModelSpec.tp_problem)."""
    return tuple(t for t in shapes.tps if model.tp_problem(t) is None)


def cp_for(world: int, model: ModelSpec) -> int:
    """The cp degree a profile of `world` ranks times this model's block at (tp 1): 2 where the ranks pair up and
    the sequence cuts into 2*cp chunks; 1 (none) otherwise."""
    return 2 if world % 2 == 0 and model.seq_len % 4 == 0 else 1


def layer_shape(model: ModelSpec) -> tuple:
    """What a measured block is keyed by: its sizes and its family (planner.measured.layer_family), so that a Llama
    block never stands in for a GPT block of the same sizes."""
    return (model.hidden, model.heads, model.ffn_hidden, model.seq_len, *layer_family(model).values())


def end_shape(model: ModelSpec, tp: int) -> tuple:
    """What measured embedding and head times are keyed by: the padded vocabulary, and the final norm and positions."""
    return (model.hidden, model.padded_vocab(tp), model.seq_len, model.norm, model.position)


def _median(samples: dict, key: tuple) -> float:
    return statistics.median(samples[key])


def _spread_pct(values: list[float]) -> float:
    med = statistics.median(values)
    return round(100 * (max(values) - min(values)) / 2 / med, 1) if med > 0 else 0.0


def build_profile(samples: dict[tuple, list[float]], facts: dict, shapes: Shapes, device_type: str) -> dict:
    """The device profile JSON (DeviceProfile fields, raw measurements under "measured") from the samples."""
    r = lambda v: float(f"{v:.6g}")  # noqa: E731
    layers = []
    for model in shapes.models:
        dims = layer_shape(model)
        for t in tps_for(shapes, model):
            for sp in ((False,) if t == 1 else (False, True)):
                for b in shapes.micro_batches:
                    base = ("layer", *dims, t, b, False)
                    entry = {"hidden": model.hidden, "heads": model.heads, "ffn_hidden": model.ffn_hidden, "seq_len": model.seq_len,
                             **layer_family(model), "tp": t, "sequence_parallel": sp, "micro_batch": b}
                    keys = ("forward_s", "backward_s", "selective_recompute_s")
                    entry.update({k: r(_median(samples, (*base, k))) for k in keys})
                    spread = {k: _spread_pct(samples[(*base, k)]) for k in keys}
                    if t > 1:
                        wc = ("layer", *dims, t, b, sp)
                        entry["with_comm"] = {k: r(_median(samples, (*wc, f"with_comm_{k}"))) for k in ("forward_s", "backward_s")}
                        spread.update({f"with_comm_{k}": _spread_pct(samples[(*wc, f"with_comm_{k}")]) for k in ("forward_s", "backward_s")})
                    cp = cp_for(facts["world_size"], model)
                    if t == 1 and (*base, f"cp{cp}_forward_s") in samples:
                        entry["with_cp"] = {"cp": cp, **{k: r(_median(samples, (*base, f"cp{cp}_{k}"))) for k in ("forward_s", "backward_s")}}
                        spread.update({f"cp{cp}_{k}": _spread_pct(samples[(*base, f"cp{cp}_{k}")]) for k in ("forward_s", "backward_s")})
                    entry["spread_pct"] = spread
                    layers.append(entry)
    ends = []
    for model in shapes.models:
        for t in tps_for(shapes, model):
            for b in shapes.micro_batches:
                key = ("end", *end_shape(model, t), t, b)
                names = ("embedding_forward_s", "embedding_backward_s", "head_forward_s", "head_backward_s")
                ends.append({"hidden": model.hidden, "vocab": model.padded_vocab(t), "seq_len": model.seq_len, "norm": model.norm,
                             "position": model.position, "tp": t, "micro_batch": b,
                             **{k: r(_median(samples, (*key, k))) for k in names},
                             "spread_pct": {k: _spread_pct(samples[(*key, k)]) for k in names}})
    ((opt_key, opt_values),) = [(k, v) for k, v in samples.items() if k[0] == "optimizer"]
    collectives = [{"op": k[1], "ranks": k[2], "bytes": k[3], "median_s": r(statistics.median(v)), "min_s": r(min(v)), "max_s": r(max(v))}
                   for k, v in sorted(samples.items(), key=lambda kv: str(kv[0])) if k[0] == "coll"]
    links = fit_links(collectives) if collectives else {}
    gemm = []
    for n in shapes.gemm_sizes:
        s = _median(samples, ("gemm", n, "s"))
        gemm.append({"m": n, "n": n, "k": n, "gflop": r(2 * n**3 / 1e9), "tflops": r(2 * n**3 / s / 1e12)})
    peak = max(g["tflops"] for g in gemm)
    ((copy_key, copy_values),) = [(k, v) for k, v in samples.items() if k[0] == "copy"]
    bandwidth = 2 * copy_key[1] / min(copy_values) / 1e9  # read + write; the best run is the machine's
    measured = {
        "device_name": facts["device_name"], "torch_version": facts["torch_version"], "date": facts["date"],
        "cpu_count": facts["cpu_count"], "world_size": facts["world_size"], "backend": facts["backend"],
        "threads_per_rank": facts["threads_per_rank"], "dtype": facts["dtype"], "python": facts["python"],
        "profile_s": facts["profile_s"], "suite_s": facts.get("suite_s", {}), "quick": facts["quick"],
        "repeats": shapes.repeats, "layer_repeats": shapes.layer_repeats or shapes.repeats, "warmup": shapes.warmup,
        "cpu_share": round(sum(samples[("cpu_s",)]) / sum(samples[("wall_s",)]), 3) if ("cpu_s",) in samples else 1.0,
        "background_cores": round(max(0.0, facts.get("machine_busy_s", 0.0) - sum(samples.get(("rank_cpu_s",), [])))
                                  / facts["loop_s"], 2) if facts.get("loop_s") else 0.0,
        # The share of the profile its ranks spent waiting for a core, taken out of every CPU timing
        # (runtime.profile_cases.Clock); None where the platform does not count it.
        "waited_share": round(sum(samples[("rank_wait_s",)]) / (facts["loop_s"] * len(samples[("rank_wait_s",)])), 3)
        if samples.get(("rank_wait_s",)) and facts.get("loop_s") else None,
        "layers": layers, "ends": ends, "reference_s": {k: r(v) for k, v in facts.get("reference_s", {}).items()},
        "optimizer_s_per_param": r(statistics.median(opt_values) / opt_key[1]),
        "optimizer": {"params": opt_key[1], "step_s": r(statistics.median(opt_values)), "spread_pct": _spread_pct(opt_values)},
        "gemm": gemm, "copy_GBps": r(bandwidth), "collectives": collectives, "links": links,
    }
    name = facts["name"]
    profile = {
        "version": 1, "name": name, "source": "measured", "dtype": facts["dtype"],
        "peak_tflops": r(peak),
        "memory_gib": facts["memory_gib"],
        "memory_bandwidth_GBps": r(bandwidth),
        "gemm_efficiency": [{"gflop": g["gflop"], "efficiency": r(min(1.0, g["tflops"] / peak))} for g in gemm],
        "fused_attention": True,
        "memory_efficiency": 1.0,
        "framework_overhead_gib": facts["framework_overhead_gib"],
        "notes": (f"Measured by `planner profile` on {facts['device_name']} ({facts['cpu_count']} cores, {facts['world_size']} ranks, "
                  f"{facts['backend']}, {facts['threads_per_rank']} thread(s) per rank), torch {facts['torch_version']}, {facts['dtype']}, "
                  f"{facts['date']}{' (--quick)' if facts['quick'] else ''}. peak_tflops is the best GEMM rate seen and "
                  "memory_bandwidth_GBps the best copy rate (hence memory_efficiency 1); they serve shapes not in 'measured'."),
        "measured": measured,
    }
    fp8 = _datasheet_fp8(name)
    if fp8:
        profile |= fp8
        profile["notes"] += f" fp8_peak_tflops and fp8_gemm_efficiency are {name}.json's (the datasheet's), not measured."
    if any(k[0] == "pipe" for k in samples):
        measured["pipeline"], measured["stage_overhead_s"] = _stage_overhead(samples, shapes, profile)
    if any(k[0] == "fsdp" for k in samples):
        measured["fsdp"] = _fsdp_overhead(samples)
    if any(k[0] == "ddp" for k in samples) and "collective" in measured.get("links", {}):
        measured["ddp"] = _ddp_overlap(samples, *_ddp_priced(samples, shapes, profile))
    return profile


def _datasheet_fp8(name: str) -> dict:
    """The datasheet's FP8 peak and curve for a GPU profiled under its name: the profile times bf16 only, and
    without them a measured H100 refused --precision fp8 as a device without FP8 tensor cores."""
    sheet = specs.PROFILES_DIR / "devices" / f"{name}.json"
    data = read_mapping(sheet) if sheet.is_file() else {}
    if not data.get("fp8_peak_tflops"):
        return {}
    return {"fp8_peak_tflops": data["fp8_peak_tflops"], "fp8_gemm_efficiency": data.get("fp8_gemm_efficiency", [])}


def _stage_overhead(samples: dict, shapes: Shapes, profile: dict) -> tuple[list, dict]:
    """Per-microbatch seconds that a pipeline stage costs beyond what the cost model prices from this
    profile's layer and end times: the o that, added to every stage's forward and backward, makes
    planner.schedule.simulate of planner.cost's stage costs give the measured pipeline step."""
    device = device_from_dict(profile, "profile")
    link = LinkSpec(**profile["measured"]["links"].get("send_recv", {"bandwidth_GBps": 1e3, "latency_us": 0.0}))
    cluster = ClusterSpec("profile", 1, 2, device.name, link, link)
    model = shapes.models[0]
    half = max(1, min(model.layers // 2, 4))
    model = replace(model, layers=2 * half)
    stages = (Stage((0, half), True, False, "none"), Stage((half, 2 * half), False, True, "none"))
    runs, fits = [], []
    for sched, b, m in shapes.pipelines:
        key = ("pipe", sched, b, m)
        step = _median(samples, (*key, "step_s"))
        knobs = Knobs(tp=1, pp=2, dp=1, micro_batch=b, schedule=sched)
        costs = stage_costs(model, cluster, device, knobs, stages)
        f, bw = [c.forward_s for c in costs], [c.backward_s for c in costs]
        p2p = p2p_seconds(model, cluster, device, knobs, MESHPLAN)

        def sim(o: float) -> float:
            return simulate(sched, 2, m, 1, [x + o for x in f], [x + o for x in bw], p2p_s=p2p, with_timeline=False).iteration_s
        lo, hi = -min(f + bw), step
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if sim(mid) < step else (lo, mid)
        fits.append((lo + hi) / 2)
        r = lambda v: float(f"{v:.6g}")  # noqa: E731
        runs.append({"schedule": sched, "micro_batch": b, "num_microbatches": m, "step_s": r(step),
                     "spread_pct": _spread_pct(samples[(*key, "step_s")]),
                     "stage_forward_s": [r(_median(samples, (*key, f"stage{k}_forward_s"))) for k in (0, 1)],
                     "stage_backward_s": [r(_median(samples, (*key, f"stage{k}_backward_s"))) for k in (0, 1)],
                     "model_stage_forward_s": [r(x) for x in f], "model_stage_backward_s": [r(x) for x in bw],
                     "simulated_step_s": r(sim(0.0)), "overhead_s": r(fits[-1])})
    # Never negative: a stage cannot run faster inside the pipeline than on its own; a negative fit
    # means the layer and end times came out a little high, which is kept as measured.
    o = max(0.0, statistics.median(fits))
    return runs, {"forward_s": float(f"{o:.6g}"), "backward_s": float(f"{o:.6g}")}


def _fsdp_overhead(samples: dict) -> dict:
    """What FSDP2 adds to a step of P parameters: per_step_s + m * per_microbatch_s for m microbatches
    (plain_step reshards after forward, so it all-gathers twice per microbatch and reduce-scatters once)."""
    params = next(k[1] for k in samples if k[0] == "fsdp")
    m1, m2 = FSDP_MICROBATCHES
    extra = {m: _median(samples, ("fsdp", params, m, "fsdp_s")) - _median(samples, ("fsdp", params, m, "plain_s")) for m in (m1, m2)}
    per_mb = max(0.0, (extra[m2] - extra[m1]) / (m2 - m1))
    per_step = max(0.0, extra[m1] - m1 * per_mb)
    r = lambda v: float(f"{v:.6g}")  # noqa: E731
    return {"params": params, "microbatches": list(FSDP_MICROBATCHES),
            "fsdp_step_s": [r(_median(samples, ("fsdp", params, m, "fsdp_s"))) for m in (m1, m2)],
            "plain_step_s": [r(_median(samples, ("fsdp", params, m, "plain_s"))) for m in (m1, m2)],
            "per_step_s_per_param": r(per_step / params), "per_microbatch_s_per_param": r(per_mb / params)}


def _ddp_priced(samples: dict, shapes: Shapes, profile: dict) -> tuple[float, float]:
    """(the all-reduce of the DDP case's gradients as CostModel.dp_s prices it over the profile's ranks and fitted
    collective link, the backward of its last microbatch as planner.cost prices it: the window it runs under)."""
    device = device_from_dict(profile, "profile")
    ranks = profile["measured"]["world_size"]
    link = LinkSpec(**profile["measured"]["links"]["collective"])
    cluster = ClusterSpec("profile", 1, ranks, device.name, link, link)
    params = next(k[1] for k in samples if k[0] == "ddp")
    model = replace(shapes.models[0], layers=min(shapes.models[0].layers, FSDP_LAYERS))
    knobs = Knobs(tp=1, pp=1, dp=ranks, micro_batch=1)
    (cost,) = stage_costs(model, cluster, device, knobs, (Stage((0, model.layers), True, True, "none"),))
    return CostModel(model, cluster, device, MESHPLAN).dp_s(knobs, params), cost.backward_s


def _ddp_overlap(samples: dict, alone_s: float, window_s: float) -> dict:
    """What DDP's all-reduce (alone_s as priced), overlapped with the last microbatch's backward (window_s), adds
    to a step beyond what the cost model already leaves exposed (max(0, alone_s - window_s)), per second of the
    part under the backward: overlap_cost, the factor planner.terms prices that part with. 0 where it hides for
    free; on CPU ranks, which have no cores to spare, gloo's threads and DDP's bucket copies take the compute's:
    1 if none of it hides, more where the two also slow each other (bench/overlap_interference.py). The median
    over the profiled microbatch counts (the all-reduce is the same in each). Both steps are timed by the
    profile's Clock, less this thread's waits for a core; DDP's in-place zeroing of its buckets after the step
    is outside the timing, as the plain step's gradient frees are."""
    params = next(k[1] for k in samples if k[0] == "ddp")
    extra = [_median(samples, ("ddp", params, m, "ddp_s")) - _median(samples, ("fsdp", params, m, "plain_s")) for m in FSDP_MICROBATCHES]
    hidden = min(alone_s, window_s)
    cost = max(0.0, statistics.median(extra) - max(0.0, alone_s - window_s)) / hidden if hidden > 0 else 0.0
    r = lambda v: float(f"{v:.6g}")  # noqa: E731
    return {"params": params, "microbatches": list(FSDP_MICROBATCHES),
            "ddp_step_s": [r(_median(samples, ("ddp", params, m, "ddp_s"))) for m in FSDP_MICROBATCHES],
            "plain_step_s": [r(_median(samples, ("fsdp", params, m, "plain_s"))) for m in FSDP_MICROBATCHES],
            "all_reduce_s": r(alone_s), "backward_window_s": r(window_s), "overlap_cost": r(cost)}
