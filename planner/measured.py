"""A measured device profile (`planner profile`) read back: layer, embedding/head and optimizer times
of the runtime's own modules, interpolated to the shape asked for, and links fitted to the measured
collectives so that planner.comm's formulas reproduce them. Pure Python: no torch.

The profile's "measured" section (written by runtime/profile.py; every time in seconds, the median of
the repeats, with the spread beside it):

    layers:  [{hidden, heads, ffn_hidden, seq_len, kv_heads, mlp, norm, position, bias, qkv_bias,
               tp, sequence_parallel, micro_batch, forward_s, backward_s, selective_recompute_s, spread_pct,
               with_comm: {forward_s, backward_s}   # tp > 1 only: the DTensor layer on tp ranks
               with_cp: {cp, forward_s, backward_s}  # tp 1 only, optional: the block under context parallelism,
                                                     # each rank holding micro_batch*cp sequences' s/cp tokens}]
    ends:    [{hidden, vocab, seq_len, norm, position, tp, micro_batch, embedding_forward_s,
               embedding_backward_s, head_forward_s, head_backward_s}]   # vocab: padded; tp > 1: with collectives
    optimizer_s_per_param, collectives: [{op, ranks, bytes, median_s, min_s, max_s}],
    links: {collective, all_gather, reduce_scatter, send_recv: {bandwidth_GBps, latency_us}},
    stage_overhead_s: {forward_s, backward_s}    # torch.distributed.pipelining, per microbatch and stage
    fsdp: {params, per_step_s_per_param, per_microbatch_s_per_param, ...}   # what FSDP2 adds to a step
    ddp: {params, all_reduce_s, overlap_cost, ...}   # what DDP's all-reduce under the backward adds to a step,
                                                     # per second of that all-reduce alone (planner/fit.py)
    pipeline: [...], optimizer: {...}, gemm: [...], copy_GBps, cpu_share, waited_share (the share of the
    profile its ranks waited for a core, taken out of its CPU timings), and host facts (device_name,
    torch_version, date, cpu_count, world_size, backend, threads_per_rank, dtype, profile_s, suite_s).
Only layers, ends, optimizer_s_per_param and links are required; the rest is optional. A layer's
family keys (kv_heads ... qkv_bias, planner.specs.ModelSpec's fields) default to a GPT block's, and an
end's norm and position to GPT's, so a profile written before the Llama family existed reads as GPT.

A shape is looked up by its family (a Llama block never stands in for a GPT block, nor the reverse), its
tensor-parallel shard, (hidden, heads/tp, kv_heads/tp, head dim, ffn/tp), and the tp degree; times are
linear in the tokens of a microbatch between measured micro-batch sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner import comm
from planner.compute import EndTimes, LayerTimes
from planner.errors import SpecError
from planner.specs import MLPS, NORMS, POSITIONS, DeviceProfile, LinkSpec, ModelSpec

EXTRAPOLATE_TOKENS = 4.0
"""How far outside the measured tokens per microbatch a curve is stretched (a factor either way)."""
EXTRAPOLATE_SEQ = 2.0
"""A measured sequence length stands in for one this many times longer or shorter (scaled by tokens)."""
LINK_KINDS = ("collective", "all_gather", "reduce_scatter", "send_recv")
OPS = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")


@dataclass(frozen=True)
class _Point:
    micro_batch: int
    values: dict[str, float]


@dataclass(frozen=True)
class _Parsed:
    layers: dict[tuple, list[_Point]]
    """(hidden, heads, ffn_hidden, seq_len, tp, sequence_parallel, family) -> points sorted by micro_batch."""
    ends: dict[tuple, list[_Point]]
    """(hidden, vocab, seq_len, tp, norm, position) -> points sorted by micro_batch."""
    links: dict[str, LinkSpec]
    overlap_cost: float = 0.0
    """ddp.overlap_cost: step seconds a collective overlapped with the backward costs per second of it alone."""


_LAYER_INTS = ("hidden", "heads", "ffn_hidden", "seq_len", "tp", "micro_batch")
_LAYER_TIMES = ("forward_s", "backward_s", "selective_recompute_s")
_END_INTS = ("hidden", "vocab", "seq_len", "tp", "micro_batch")
_END_TIMES = ("embedding_forward_s", "embedding_backward_s", "head_forward_s", "head_backward_s")
_REGENERATE = "re-run `planner profile` to measure this machine again"


def layer_family(model: ModelSpec) -> dict:
    """What besides its sizes decides a block's cost: the ModelSpec fields of the Llama family, in a fixed order."""
    return {"kv_heads": model.kv_heads, "mlp": model.mlp, "norm": model.norm, "position": model.position,
            "bias": model.bias, "qkv_bias": model.qkv_bias}


def _family(source: str, where: str, e: dict, heads: int) -> tuple:
    """A profile entry's layer_family values, GPT's where the entry predates them."""
    bias = e.get("bias", True)
    got = {"kv_heads": e.get("kv_heads", heads), "mlp": e.get("mlp", "gelu"), "norm": e.get("norm", "layernorm"),
           "position": e.get("position", "learned"), "bias": bias, "qkv_bias": e.get("qkv_bias", bias)}
    for key, allowed in (("mlp", MLPS), ("norm", NORMS), ("position", POSITIONS)):
        if got[key] not in allowed:
            raise SpecError(source, f"{where}.{key}", f"expected one of {', '.join(allowed)}, got {got[key]!r}; {_REGENERATE}")
    for key in ("bias", "qkv_bias"):
        _need(source, where, got, key, "bool")
    _need(source, where, got, "kv_heads", "int")
    return tuple(got.values())


def _need(source: str, where: str, obj: dict, key: str, kind: str):
    if not isinstance(obj, dict):
        raise SpecError(source, where, f"expected a mapping, got {type(obj).__name__}; {_REGENERATE}")
    if key not in obj:
        raise SpecError(source, f"{where}.{key}", f"missing; {_REGENERATE}")
    v, path = obj[key], f"{where}.{key}"
    ok = {"int": isinstance(v, int) and not isinstance(v, bool) and v > 0,
          "time": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
          "positive": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
          "ratio": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
          "bool": isinstance(v, bool), "list": isinstance(v, list), "dict": isinstance(v, dict)}[kind]
    if not ok:
        want = {"int": "a positive integer", "time": "seconds (a number >= 0)", "positive": "a positive number",
                "ratio": "a number >= 0", "bool": "true or false", "list": "a list", "dict": "a mapping"}[kind]
        raise SpecError(source, path, f"expected {want}, got {v!r}; {_REGENERATE}")
    return float(v) if kind in ("time", "positive", "ratio") else v


def parse_link(data: dict, source: str, where: str) -> LinkSpec:
    return LinkSpec(bandwidth_GBps=_need(source, where, data, "bandwidth_GBps", "positive"),
                    latency_us=_need(source, where, data, "latency_us", "time"))


def check_measured(measured, source: str) -> _Parsed:
    """Validate a profile's "measured" section; one SpecError naming the first bad field."""
    if not isinstance(measured, dict) or not measured:
        raise SpecError(source, "measured", f"a measured profile needs its measurements, got {measured!r}; {_REGENERATE}")
    top = "measured"
    layers: dict[tuple, list[_Point]] = {}
    cps: dict[tuple, int] = {}  # each curve's cp degree under with_cp
    for i, e in enumerate(_need(source, top, measured, "layers", "list")):
        where = f"{top}.layers[{i}]"
        ints = [_need(source, where, e, k, "int") for k in _LAYER_INTS]
        sp = _need(source, where, e, "sequence_parallel", "bool")
        key = (*ints[:5], sp, _family(source, where, e, ints[1]))
        vals = {k: _need(source, where, e, k, "time") for k in _LAYER_TIMES}
        if ints[4] > 1 and "with_comm" in e:
            wc = _need(source, where, e, "with_comm", "dict")
            vals.update({f"with_comm_{k}": _need(source, f"{where}.with_comm", wc, k, "time") for k in ("forward_s", "backward_s")})
        if "with_cp" in e:
            wc = _need(source, where, e, "with_cp", "dict")
            cp = _need(source, f"{where}.with_cp", wc, "cp", "int")
            if ints[4] != 1 or cp < 2 or cps.setdefault(key, cp) != cp:
                raise SpecError(source, f"{where}.with_cp", f"the block under context parallelism is timed at tp 1 and one "
                                f"cp >= 2 per curve, got tp {ints[4]}, cp {cp}; {_REGENERATE}")
            vals.update({f"cp{cp}_{k}": _need(source, f"{where}.with_cp", wc, k, "time") for k in ("forward_s", "backward_s")})
        layers.setdefault(key, []).append(_Point(ints[5], vals))
    ends: dict[tuple, list[_Point]] = {}
    for i, e in enumerate(_need(source, top, measured, "ends", "list")):
        where = f"{top}.ends[{i}]"
        ints = [_need(source, where, e, k, "int") for k in _END_INTS]
        kind = (e.get("norm", "layernorm"), e.get("position", "learned"))
        ends.setdefault((*ints[:4], *kind), []).append(_Point(ints[4], {k: _need(source, where, e, k, "time") for k in _END_TIMES}))
    _need(source, top, measured, "optimizer_s_per_param", "time")
    links = {}
    for kind, data in _need(source, top, measured, "links", "dict").items():
        if kind not in LINK_KINDS:
            raise SpecError(source, f"{top}.links.{kind}", f"unknown link; expected one of {', '.join(LINK_KINDS)}; {_REGENERATE}")
        links[kind] = parse_link(data, source, f"{top}.links.{kind}")
    # Optional (older profiles have none): runtime.machine's reference block per model, the pipeline's overhead.
    for section, keys in (("reference_s", None), ("stage_overhead_s", ("forward_s", "backward_s"))):
        if section in measured:
            times = _need(source, top, measured, section, "dict")
            for k in keys or times:
                _need(source, f"{top}.{section}", times, k, "time")
    overlap = (_need(source, f"{top}.ddp", _need(source, top, measured, "ddp", "dict"), "overlap_cost", "ratio")
               if "ddp" in measured else 0.0)
    for curves in (layers, ends):
        for pts in curves.values():
            pts.sort(key=lambda p: p.micro_batch)
    return _Parsed(layers, ends, links, overlap)


def overlap_cost(device: DeviceProfile) -> float:
    """The step seconds that a collective overlapped with the backward costs per second of it alone, as measured
    on this device (ddp.overlap_cost); 0 (hidden for free) for a datasheet or a profile that did not measure it."""
    return _parsed(device).overlap_cost if device.measured else 0.0


_CACHE: dict[int, tuple[dict, _Parsed]] = {}


def _parsed(device: DeviceProfile) -> _Parsed:
    # Keyed by the dict's identity (a DeviceProfile holding a dict is not hashable); the dict is kept
    # alive beside its parse so that the id cannot be reused.
    hit = _CACHE.get(id(device.measured))
    if hit is None or hit[0] is not device.measured:
        hit = (device.measured, check_measured(device.measured, f"device profile {device.name!r} (measured)"))
        if len(_CACHE) >= 16:  # a long-lived process (the dashboard) loads profiles again and again
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[id(device.measured)] = hit
    return hit[1]


def interpolate(points: list[tuple[float, float]], x: float) -> tuple[float, bool] | None:
    """Linear between measured (tokens, seconds) points, sorted by tokens; outside them, in proportion
    to the tokens from the nearest point, flagged as extrapolated; None beyond EXTRAPOLATE_TOKENS."""
    lo, hi = points[0], points[-1]
    if x < lo[0] / EXTRAPOLATE_TOKENS or x > hi[0] * EXTRAPOLATE_TOKENS:
        return None
    if x < lo[0]:
        return lo[1] * x / lo[0], True
    if x > hi[0]:
        return hi[1] * x / hi[0], True
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return (y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)), False
    return lo[1], False


def _curve(pts: list[_Point], seq_len: int, key: str) -> list[tuple[float, float]]:
    return [(p.micro_batch * seq_len, p.values[key]) for p in pts if key in p.values]


def _shard(hidden: int, heads: int, kv_heads: int, ffn: int, tp: int) -> tuple[int, int, int, int, int]:
    """What a tp rank computes: input width, local query and K/V heads, head dim, local MLP width."""
    return hidden, heads // tp, kv_heads // tp, hidden // heads, ffn // tp


def _find_layer_curve(parsed: _Parsed, model: ModelSpec, tp: int, sp: bool):
    """The best measured curve for this shard: same shard, tp and sequence parallelism first; then the
    other sequence-parallel setting; then another sequence length within EXTRAPOLATE_SEQ (extrapolated)."""
    want = _shard(model.hidden, model.heads, model.kv_heads, model.ffn_hidden, tp)
    # The family but kv_heads, which the shard compares as kv_heads/tp.
    family = tuple(v for k, v in layer_family(model).items() if k != "kv_heads")
    best = None
    for (h, a, f, s, t, csp, (kv, *fam)), pts in parsed.layers.items():
        if t != tp or tuple(fam) != family or _shard(h, a, kv, f, t) != want:
            continue
        ratio = max(s, model.seq_len) / min(s, model.seq_len)
        if ratio > EXTRAPOLATE_SEQ:
            continue
        rank = (s != model.seq_len, tp > 1 and csp != sp, ratio)
        if best is None or rank < best[0]:
            best = (rank, s, pts)
    return best


def measured_layer_times(device: DeviceProfile, model: ModelSpec, tp: int, b: float, sequence_parallel: bool,
                         cp: int = 1, runtime_cp: bool = True) -> LayerTimes | None:
    """One block's shard on one device, per microbatch, from the profile; None when nothing measured is
    close enough (the caller falls back to the datasheet model). b: sequences' worth of tokens on the device
    (micro_batch / cp under context parallelism).

    For tp > 1 the profile holds the block as the runtime runs it under DTensor, collectives included.
    The cost model adds the TP all-reduces priced by planner.comm on top of LayerTimes, so what is
    returned is that measurement minus those modelled collectives (never below the shard's compute
    alone): model plus modelled comm then add up to what the runtime measured.

    Under cp, the profile's block under context parallelism at that cp (with_cp: its masked chunk calls against
    the gathered keys, the gather and its reduce-scatter), returned with cp_comm_included, where it has one and
    the framework runs cp as that runtime does (runtime_cp: Framework.cp_masked_chunks); else the plain block at
    the same tokens, flagged extrapolated (the cost model then adds its modelled gather)."""
    parsed = _parsed(device)
    found = _find_layer_curve(parsed, model, tp, sequence_parallel)
    if found is None:
        return None
    (other_seq, other_sp, _), seq, pts = found
    tokens = b * model.seq_len
    out, extrapolated = {}, other_seq or other_sp
    for key in _LAYER_TIMES:
        got = interpolate(_curve(pts, seq, key), tokens)
        if got is None:
            return None
        out[key], flag = got
        extrapolated |= flag
    if tp > 1 and all("with_comm_forward_s" in p.values for p in pts):
        link = parsed.links.get("collective")
        modelled = 2 * comm.all_reduce_s(b * model.seq_len * model.hidden * device.dtype_bytes, tp, link) if link else 0.0
        for key in ("forward_s", "backward_s"):
            got = interpolate(_curve(pts, seq, f"with_comm_{key}"), tokens)
            if got is not None:
                out[key] = max(out[key], got[0] - modelled)
    included = False
    if cp > 1 and runtime_cp:
        got = [interpolate(_curve(pts, seq, f"cp{cp}_{key}"), tokens) if all(f"cp{cp}_{key}" in p.values for p in pts) else None
               for key in ("forward_s", "backward_s")]
        included = None not in got
        if included:
            (out["forward_s"], f1), (out["backward_s"], f2) = got
            extrapolated |= f1 or f2
    extrapolated |= cp > 1 and not included
    return LayerTimes(forward_s=out["forward_s"], backward_s=out["backward_s"],
                      selective_recompute_s=out["selective_recompute_s"],
                      source="measured (extrapolated)" if extrapolated else "measured", cp_comm_included=included)


def measured_end_times(device: DeviceProfile, model: ModelSpec, tp: int, b: int) -> EndTimes | None:
    """Embedding and final norm + head + cross-entropy, per microbatch; None when not measured close by.

    For tp > 1 they were measured with their collectives; the cost model adds one modelled all-reduce
    to the embedding's forward and one to the head's backward, so those are taken out here."""
    parsed = _parsed(device)
    vocab = model.padded_vocab(tp)
    best = None
    for (h, v, s, t, norm, position), pts in parsed.ends.items():
        ratio = max(s, model.seq_len) / min(s, model.seq_len)
        same = (h, v, t, norm, position) == (model.hidden, vocab, tp, model.norm, model.position)
        if same and ratio <= EXTRAPOLATE_SEQ and (best is None or ratio < best[0]):
            best = (ratio, s, pts)
    if best is None:
        return None
    _, seq, pts = best
    tokens = b * model.seq_len
    out = {}
    for key in _END_TIMES:
        got = interpolate(_curve(pts, seq, key), tokens)
        if got is None:
            return None
        out[key] = got[0]
    link = parsed.links.get("collective")
    if tp > 1 and link:
        ar = comm.all_reduce_s(b * model.seq_len * model.hidden * device.dtype_bytes, tp, link)
        # Never below half the measurement: the modelled all-reduce is a fit, the measurement is real.
        out["embedding_forward_s"] = max(out["embedding_forward_s"] / 2, out["embedding_forward_s"] - ar)
        out["head_backward_s"] = max(out["head_backward_s"] / 2, out["head_backward_s"] - ar)
    return EndTimes(**out)


def measured_link(device: DeviceProfile, kind: str = "collective") -> LinkSpec | None:
    """The link fitted to this profile's collectives of one kind (see fit_link), if it has one."""
    if device.source != "measured" or not device.measured:
        return None
    return _parsed(device).links.get(kind)


def stage_overhead_s(device: DeviceProfile) -> tuple[float, float]:
    """(forward, backward) seconds that torch.distributed.pipelining adds per microbatch to a stage."""
    so = (device.measured or {}).get("stage_overhead_s") or {}
    return float(so.get("forward_s", 0.0)), float(so.get("backward_s", 0.0))


def intra_node_link(device_name: str) -> LinkSpec | None:
    """For load_cluster: the collective link measured on this machine when the cluster's device has a
    measured profile with one. Reads only specs.measured_profile_path(NAME) (or a measured JSON file)."""
    from pathlib import Path

    from planner import specs
    from planner.parsing import read_mapping

    path = Path(device_name) if specs._is_file_arg(device_name) else specs.measured_profile_path(device_name)
    if not path.is_file():
        return None
    device = specs.device_from_dict(read_mapping(path), str(path))
    if device.source != "measured":
        return None
    return check_measured(device.measured, str(path)).links.get("collective")


# ---------------------------------------------------------------- fitting links to collectives

def _unit_terms(op: str, nbytes: float, n: int) -> tuple[float, float]:
    """(seconds per 1/GBps, seconds per us of latency) of planner.comm's formula for op: its time is
    linear in 1/bandwidth and latency, t = a * (1/bandwidth_GBps) + c * latency_us."""
    eff = comm.COLLECTIVE_EFFICIENCY
    # Same formulas as planner.comm (Thakur, Rabenseifner & Gropp 2005 for the rings).
    if op == "all_reduce":
        return 2 * (n - 1) / n * nbytes / (1e9 * eff), 2 * (n - 1) * 1e-6
    if op in ("all_gather", "reduce_scatter"):
        return (n - 1) / n * nbytes / (1e9 * eff), (n - 1) * 1e-6
    if op == "send_recv":
        return nbytes / 1e9, 1e-6
    raise ValueError(f"unknown collective {op!r}")


def fit_link(points: list[tuple[float, int, float]], op: str) -> LinkSpec:
    """The LinkSpec whose planner.comm time for `op` best matches measured (bytes, ranks, seconds)
    points: least squares on the relative error (each point weighs the same at every size), with
    bandwidth > 0 and latency >= 0. all_gather/reduce_scatter bytes are the full (gathered) size."""
    rows = []
    for nbytes, n, t in points:
        if t <= 0 or n < 2:
            continue
        a, c = _unit_terms(op, nbytes, n)
        rows.append((a / t, c / t))
    if not rows:
        raise ValueError("fit_link needs at least one measurement on two or more ranks")

    def solve_one(col: int) -> float:
        num = sum(r[col] for r in rows)
        den = sum(r[col] ** 2 for r in rows)
        return num / den if den > 0 else 0.0

    saa = sum(a * a for a, _ in rows)
    scc = sum(c * c for _, c in rows)
    sac = sum(a * c for a, c in rows)
    sa, sc = sum(a for a, _ in rows), sum(c for _, c in rows)
    det = saa * scc - sac * sac
    inv_bw, lat = ((sa * scc - sc * sac) / det, (saa * sc - sac * sa) / det) if det > 1e-30 * saa * scc else (-1.0, -1.0)
    if inv_bw <= 0 or lat < 0:
        inv_bw_only, lat_only = solve_one(0), solve_one(1)
        # The better of bandwidth alone and latency alone (a latency-only fit keeps a huge bandwidth).
        err_bw = sum((a * inv_bw_only - 1) ** 2 for a, _ in rows)
        err_lat = sum((c * lat_only - 1) ** 2 for _, c in rows)
        inv_bw, lat = (inv_bw_only, 0.0) if err_bw <= err_lat or lat_only <= 0 else (1e-6, lat_only)
    return LinkSpec(bandwidth_GBps=1.0 / max(inv_bw, 1e-6), latency_us=max(lat, 0.0))


def fit_links(collectives: list[dict]) -> dict[str, dict]:
    """{kind: {bandwidth_GBps, latency_us}} for the measured collectives (profile "collectives" rows):
    'collective' is all-reduce (the TP and DP collective; load_cluster's intra-node link), 'send_recv'
    is point-to-point, which planner.comm prices without COLLECTIVE_EFFICIENCY."""
    out = {}
    for op, kind in zip(OPS, ("collective", "all_gather", "reduce_scatter", "send_recv")):
        pts = [(r["bytes"], r["ranks"], r["median_s"]) for r in collectives if r["op"] == op]
        if pts:
            link = fit_link(pts, op)
            out[kind] = {"bandwidth_GBps": round(link.bandwidth_GBps, 6), "latency_us": round(link.latency_us, 3)}
    return out
