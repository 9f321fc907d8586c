"""planner/measured.py: measured layer times interpolate between measured shapes and say when they
extrapolate, the fitted links reproduce the collectives through planner.comm's formulas, bad profiles
fail with the field named, and load_cluster takes the fitted link only from a measured profile."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess
import sys

import pytest

from planner import comm, specs
from planner.compute import end_times, layer_times
from planner.cost import CostModel
from planner.errors import SpecError
from planner.measured import (check_measured, fit_link, fit_links, interpolate, measured_end_times, measured_layer_times,
                              stage_overhead_s)
from planner.plan import Knobs
from planner.specs import LinkSpec, device_from_dict, load_cluster, load_model

TINY = load_model("gpt-tiny")
LINK = {"bandwidth_GBps": 2.0, "latency_us": 100.0}


def _layer(tp, b, fwd, bwd, sp=False, with_comm=None, seq=128):
    e = {"hidden": 256, "heads": 8, "ffn_hidden": 1024, "seq_len": seq, "tp": tp, "sequence_parallel": sp, "micro_batch": b,
         "forward_s": fwd, "backward_s": bwd, "selective_recompute_s": fwd / 10}
    if with_comm:
        e["with_comm"] = {"forward_s": with_comm[0], "backward_s": with_comm[1]}
    return e


def _end(tp, b, scale):
    return {"hidden": 256, "vocab": 8192, "seq_len": 128, "tp": tp, "micro_batch": b, "embedding_forward_s": 0.001 * scale,
            "embedding_backward_s": 0.002 * scale, "head_forward_s": 0.01 * scale, "head_backward_s": 0.02 * scale}


def _profile(**measured_overrides) -> dict:
    measured = {
        "layers": [_layer(1, 1, 0.010, 0.020), _layer(1, 2, 0.018, 0.036), _layer(1, 4, 0.034, 0.068),
                   _layer(2, 1, 0.005, 0.010, with_comm=(0.030, 0.040)), _layer(2, 4, 0.017, 0.034, with_comm=(0.060, 0.090))],
        "ends": [_end(1, 1, 1.0), _end(1, 4, 4.0), _end(2, 1, 0.6), _end(2, 4, 2.4)],
        "optimizer_s_per_param": 1e-8,
        "links": {"collective": dict(LINK), "send_recv": {"bandwidth_GBps": 4.0, "latency_us": 50.0}},
        "stage_overhead_s": {"forward_s": 0.002, "backward_s": 0.002},
    }
    measured.update(measured_overrides)
    return {"version": 1, "name": "cpu", "source": "measured", "dtype": "fp32", "peak_tflops": 0.05, "memory_gib": 8.0,
            "memory_bandwidth_GBps": 10.0, "gemm_efficiency": [{"gflop": 0.03, "efficiency": 0.6}, {"gflop": 0.3, "efficiency": 1.0}],
            "fused_attention": True, "memory_efficiency": 1.0, "framework_overhead_gib": 0.25, "measured": measured}


def _device(**overrides):
    return device_from_dict(_profile(**overrides), "test profile")


def _cp_device():
    """The tp-1 curve with its block under cp 2 timed beside it (with_cp): 1.5x the forward, 4x the plain forward
    for the backward."""
    return _device(layers=[dict(_layer(1, b, f, 2 * f), with_cp={"cp": 2, "forward_s": 1.5 * f, "backward_s": 4 * f})
                           for b, f in ((1, 0.010), (2, 0.018), (4, 0.034))])


# ---- interpolation ------------------------------------------------------------------------------------


def test_layer_times_are_linear_in_micro_batch_between_measured_sizes():
    dev = _device()
    lt = measured_layer_times(dev, TINY, 1, 3, False)
    assert lt.source == "measured"
    assert lt.forward_s == pytest.approx((0.018 + 0.034) / 2)
    assert lt.backward_s == pytest.approx((0.036 + 0.068) / 2)
    assert measured_layer_times(dev, TINY, 1, 2, False).forward_s == pytest.approx(0.018)


def test_micro_batch_beyond_the_measured_ones_is_flagged_extrapolated():
    dev = _device()
    lt = measured_layer_times(dev, TINY, 1, 8, False)
    assert lt.source == "measured (extrapolated)"
    assert lt.forward_s == pytest.approx(0.034 * 2)  # in proportion to the tokens from b = 4


def test_shape_far_from_anything_measured_gives_none_and_the_datasheet_takes_over():
    dev = _device()
    assert measured_layer_times(dev, TINY, 1, 64, False) is None  # 16x the largest measured micro-batch
    wide = load_model("gpt3-125m")
    assert measured_layer_times(dev, wide, 1, 1, False) is None
    assert measured_end_times(dev, wide, 1, 1) is None
    assert layer_times(wide, dev, 1, 1, False).source == "datasheet"
    assert layer_times(TINY, dev, 1, 2, False).source == "measured"
    assert measured_layer_times(dev, TINY, 4, 1, False) is None  # tp 4 never measured


def test_another_sequence_length_within_2x_scales_by_tokens_and_is_flagged():
    dev = _device()
    short = specs.ModelSpec("short", 8, 256, 8, 1024, 64, 8192)
    lt = measured_layer_times(dev, short, 1, 2, False)  # 128 tokens: the measured b=1 at seq 128
    assert lt.source == "measured (extrapolated)"
    assert lt.forward_s == pytest.approx(0.010)
    assert measured_layer_times(dev, specs.ModelSpec("long", 8, 256, 8, 1024, 512, 8192), 1, 1, False) is None


def test_sequence_parallel_falls_back_to_the_other_setting_as_extrapolated():
    dev = _device()
    assert measured_layer_times(dev, TINY, 2, 1, False).source == "measured"
    assert measured_layer_times(dev, TINY, 2, 1, True).source == "measured (extrapolated)"


def test_tp_layer_plus_the_modelled_all_reduces_adds_up_to_the_dtensor_measurement():
    dev = _device()
    lt = measured_layer_times(dev, TINY, 2, 1, False)
    ar = comm.all_reduce_s(1 * 128 * 256 * 4, 2, LinkSpec(**LINK))
    # cost.stage_costs prices a TP block as LayerTimes plus two all-reduces each way.
    assert lt.forward_s + 2 * ar == pytest.approx(0.030)
    assert lt.backward_s + 2 * ar == pytest.approx(0.040)


def test_a_cp_plan_prices_its_blocks_from_the_measured_cp_block_with_its_gather_inside():
    dev = _cp_device()
    # cp 2 at micro-batch 4: each rank holds 4 sequences' halves, the tokens of 2 whole sequences (b = 2).
    lt = measured_layer_times(dev, TINY, 1, 2, False, cp=2)
    assert (lt.forward_s, lt.backward_s, lt.cp_comm_included) == (pytest.approx(0.027), pytest.approx(0.072), True)
    assert lt.source == "measured"
    t = CostModel(TINY, load_cluster("local-cpu", gpus_per_node=2), dev).terms(Knobs(1, 1, 1, 4, cp=2))
    assert t.cp_all_gather_s > 0  # priced, but the measured block holds it: not added a second time
    assert (t.layer_forward_s, t.layer_backward_s) == (pytest.approx(0.027), pytest.approx(0.072))


def test_a_cp_plan_without_a_measured_cp_block_adds_the_modelled_gather_and_says_extrapolated():
    dev = _device()
    lt = measured_layer_times(dev, TINY, 1, 2, False, cp=2)
    assert (lt.forward_s, lt.cp_comm_included, lt.source) == (pytest.approx(0.018), False, "measured (extrapolated)")
    t = CostModel(TINY, load_cluster("local-cpu", gpus_per_node=2), dev).terms(Knobs(1, 1, 1, 4, cp=2))
    assert t.layer_forward_s == pytest.approx(0.018 + t.cp_all_gather_s)


def test_another_frameworks_cp_plan_is_not_priced_from_meshplans_cp_block():
    dev = _cp_device()
    # Megatron-Core's cp (ring attention, no masked chunk calls) is not the runtime's that the profile timed.
    lt = layer_times(TINY, dev, 1, 2, False, cp=2, masked_chunks=False)
    assert (lt.forward_s, lt.cp_comm_included, lt.source) == (pytest.approx(0.018), False, "measured (extrapolated)")
    assert lt.selective_recompute_s == pytest.approx(0.0018)
    ours = layer_times(TINY, dev, 1, 2, False, cp=2, masked_chunks=True)
    assert ours.cp_comm_included
    # The core selective recomputation re-runs is the runtime's cp core: its masked rectangles, 5/4 of the
    # causal work the plain core was timed at.
    assert ours.selective_recompute_s == pytest.approx(0.0018 * 5 / 4)


def test_tp_layer_is_never_below_its_shard_compute():
    dev = _device(links={"collective": {"bandwidth_GBps": 0.001, "latency_us": 1e5}})
    lt = measured_layer_times(dev, TINY, 2, 1, False)
    assert (lt.forward_s, lt.backward_s) == (pytest.approx(0.005), pytest.approx(0.010))


def test_end_times_interpolate_and_take_out_the_modelled_tp_collectives():
    dev = _device()
    et = measured_end_times(dev, TINY, 1, 2)
    assert et.head_forward_s == pytest.approx(0.02)
    et2 = end_times(TINY, dev, 2, 1)
    ar = comm.all_reduce_s(128 * 256 * 4, 2, LinkSpec(**LINK))
    assert et2.embedding_forward_s == pytest.approx(max(0.0006 / 2, 0.0006 - ar))
    assert et2.head_backward_s == pytest.approx(0.012 - ar)


def test_interpolate_flags_and_limits():
    pts = [(128.0, 1.0), (512.0, 4.0)]
    assert interpolate(pts, 256.0) == (2.0, False)
    assert interpolate(pts, 1024.0) == (8.0, True)
    assert interpolate(pts, 64.0) == (0.5, True)
    assert interpolate(pts, 4096.0) is None


def test_stage_overhead_is_read_from_the_profile():
    assert stage_overhead_s(_device()) == (0.002, 0.002)


# ---- link fit -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "reduce_scatter", "send_recv"])
def test_fitted_link_reproduces_synthetic_measurements_through_comm(op):
    true = LinkSpec(bandwidth_GBps=3.0, latency_us=80.0)
    formula = {"all_reduce": lambda n, r: comm.all_reduce_s(n, r, true), "all_gather": lambda n, r: comm.all_gather_s(n, r, true),
               "reduce_scatter": lambda n, r: comm.reduce_scatter_s(n, r, true), "send_recv": lambda n, r: comm.send_recv_s(n, true)}[op]
    points = [(float(1 << k), 2, formula(1 << k, 2)) for k in range(12, 25, 2)]
    if op != "send_recv":
        points += [(float(1 << k), 4, formula(1 << k, 4)) for k in range(12, 25, 4)]
    fitted = fit_link(points, op)
    assert fitted.bandwidth_GBps == pytest.approx(3.0, rel=1e-6)
    assert fitted.latency_us == pytest.approx(80.0, rel=1e-6)


def test_fit_links_reproduces_noisy_gloo_like_measurements_within_20_percent():
    # All-reduce measured at 1.2 GB/s bus bandwidth and 0.3 ms per step, with +-10% noise.
    noise = [1.1, 0.9, 1.05, 0.95, 1.0, 1.08, 0.92]
    rows = []
    for i, k in enumerate(range(12, 26, 2)):
        nbytes = 1 << k
        t = (nbytes / 1.2e9 + 3e-4) * noise[i]
        rows.append({"op": "all_reduce", "ranks": 2, "bytes": nbytes, "median_s": t})
        rows.append({"op": "send_recv", "ranks": 2, "bytes": nbytes, "median_s": (nbytes / 3e9 + 1e-4) * noise[-1 - i]})
    links = fit_links(rows)
    ar, p2p = LinkSpec(**links["collective"]), LinkSpec(**links["send_recv"])
    for r in rows:
        got = comm.all_reduce_s(r["bytes"], 2, ar) if r["op"] == "all_reduce" else comm.send_recv_s(r["bytes"], p2p)
        assert got == pytest.approx(r["median_s"], rel=0.2)


def test_fit_link_keeps_latency_non_negative_and_bandwidth_positive():
    # Bandwidth-only data (time exactly proportional to size) with a slight downward bend.
    points = [(1e6, 2, 1e-3), (4e6, 2, 3.9e-3), (16e6, 2, 15e-3)]
    link = fit_link(points, "send_recv")
    assert link.bandwidth_GBps > 0 and link.latency_us >= 0
    link = fit_link([(4096.0, 2, 1e-3), (8192.0, 2, 1e-3)], "all_reduce")  # flat: latency only
    assert link.latency_us == pytest.approx(500.0, rel=1e-3) and link.bandwidth_GBps > 1e3  # 2(n-1) steps


# ---- bad input ----------------------------------------------------------------------------------------


def test_device_profile_of_another_schema_version_is_rejected():
    data = _profile()
    data["version"] = 2
    with pytest.raises(SpecError) as e:
        device_from_dict(data, "cpu.measured.json")
    assert e.value.field == "version" and "planner profile" in str(e.value)


@pytest.mark.parametrize("mutate, field", [
    (lambda m: None, "measured"),
    (lambda m: {k: v for k, v in m.items() if k != "layers"}, "measured.layers"),
    (lambda m: {**m, "layers": [{**m["layers"][0], "forward_s": "fast"}]}, "measured.layers[0].forward_s"),
    (lambda m: {**m, "layers": [{k: v for k, v in m["layers"][0].items() if k != "micro_batch"}]}, "measured.layers[0].micro_batch"),
    (lambda m: {**m, "layers": [{**m["layers"][0], "with_cp": {"forward_s": 0.1, "backward_s": 0.2}}]}, "measured.layers[0].with_cp.cp"),
    (lambda m: {**m, "layers": [{**m["layers"][0], "with_cp": {"cp": 1, "forward_s": 0.1, "backward_s": 0.2}}]}, "measured.layers[0].with_cp"),
    (lambda m: {**m, "layers": [{**m["layers"][3], "with_cp": {"cp": 2, "forward_s": 0.1, "backward_s": 0.2}}]}, "measured.layers[0].with_cp"),
    (lambda m: {**m, "layers": [{**m["layers"][i], "with_cp": {"cp": 2 * (i + 1), "forward_s": 0.1, "backward_s": 0.2}} for i in (0, 1)]},
     "measured.layers[1].with_cp"),
    (lambda m: {**m, "ends": [{**m["ends"][0], "head_backward_s": -1.0}]}, "measured.ends[0].head_backward_s"),
    (lambda m: {**m, "optimizer_s_per_param": None}, "measured.optimizer_s_per_param"),
    (lambda m: {**m, "links": {"collective": {"bandwidth_GBps": 0, "latency_us": 5}}}, "measured.links.collective.bandwidth_GBps"),
    (lambda m: {**m, "links": {"nvlink": dict(LINK)}}, "measured.links.nvlink"),
])
def test_garbled_measured_section_is_one_spec_error_naming_the_field(mutate, field):
    measured = mutate(copy.deepcopy(_profile()["measured"]))
    with pytest.raises(SpecError) as e:
        check_measured(measured, "cpu.measured.json")
    assert e.value.field == field
    assert "planner profile" in e.value.message


def test_garbled_measured_section_surfaces_when_the_cost_model_reads_it():
    dev = _device(layers=[{"hidden": 256}])
    with pytest.raises(SpecError, match=r"measured\.layers\[0\]\.heads"):
        layer_times(TINY, dev, 1, 1, False)


# ---- load_cluster -------------------------------------------------------------------------------------


@pytest.fixture
def profiles(tmp_path, monkeypatch):
    root = tmp_path / "profiles"
    for kind in ("clusters", "devices", "models"):
        shutil.copytree(specs.PROFILES_DIR / kind, root / kind, ignore=shutil.ignore_patterns("*.measured.json"))
    monkeypatch.setattr(specs, "PROFILES_DIR", root)
    return root


def test_local_cpu_takes_the_fitted_link_only_when_a_measured_profile_exists(profiles):
    yaml_link = load_cluster("local-cpu").intra_node
    assert yaml_link == LinkSpec(bandwidth_GBps=2.0, latency_us=50.0)
    (profiles / "devices" / "cpu.measured.json").write_text(json.dumps(_profile()))
    cluster = load_cluster("local-cpu")
    assert cluster.intra_node == LinkSpec(**LINK)
    assert cluster.inter_node == LinkSpec(bandwidth_GBps=1.0, latency_us=100.0)
    assert load_cluster("dgx-a100-80gb").intra_node.bandwidth_GBps == 300.0


def test_a_measured_profile_without_links_leaves_the_cluster_spec_alone(profiles):
    (profiles / "devices" / "cpu.measured.json").write_text(json.dumps(_profile(links={})))
    assert load_cluster("local-cpu").intra_node == LinkSpec(bandwidth_GBps=2.0, latency_us=50.0)


def test_load_cluster_with_a_broken_measured_profile_names_the_file_and_field(profiles):
    bad = _profile()
    del bad["measured"]["links"]
    (profiles / "devices" / "cpu.measured.json").write_text(json.dumps(bad))
    with pytest.raises(SpecError) as e:
        load_cluster("local-cpu")
    assert e.value.field == "measured.links" and e.value.source.endswith("cpu.measured.json")


def test_plan_priced_with_a_measured_profile_says_so(profiles):
    from planner.cost import predict
    from planner.plan import Knobs

    (profiles / "devices" / "cpu.measured.json").write_text(json.dumps(_profile()))
    device = specs.load_device("cpu")
    plan, _ = predict(TINY, load_cluster("local-cpu", gpus_per_node=2), device, Knobs(tp=1, pp=1, dp=2, micro_batch=2), 16)
    assert plan.profile == "cpu (measured)"
    assert plan.prediction.iteration_s > 0


def test_planner_measured_does_not_import_torch():
    code = "import sys, planner.measured, planner.specs; planner.specs.load_cluster('local-cpu'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_llama_block_never_stands_in_for_a_gpt_block_of_the_same_sizes_nor_the_reverse():
    llama = specs.ModelSpec("llama-like", 8, 256, 8, 1024, 128, 8192, kv_heads=2, mlp="swiglu", norm="rmsnorm",
                            position="rope", bias=False)
    gpt_profile = _device()  # its layer entries predate the family keys: they read as GPT blocks
    assert measured_layer_times(gpt_profile, TINY, 1, 2, False) is not None
    assert measured_layer_times(gpt_profile, llama, 1, 2, False) is None
    family = {"kv_heads": 2, "mlp": "swiglu", "norm": "rmsnorm", "position": "rope", "bias": False, "qkv_bias": False}
    llama_profile = _device(layers=[{**_layer(1, b, 0.01 * b, 0.02 * b), **family} for b in (1, 2, 4)],
                            ends=[{**_end(1, b, b), "norm": "rmsnorm", "position": "rope"} for b in (1, 4)])
    assert measured_layer_times(llama_profile, llama, 1, 2, False).forward_s == pytest.approx(0.02)
    assert measured_layer_times(llama_profile, TINY, 1, 2, False) is None
    assert measured_end_times(llama_profile, llama, 1, 1) is not None and measured_end_times(llama_profile, TINY, 1, 1) is None
    # Another kv_heads is another shard: 4 K/V heads do not stand in for 2.
    assert measured_layer_times(llama_profile, dataclasses.replace(llama, kv_heads=4), 1, 2, False) is None


def test_a_bad_family_key_in_a_profile_is_refused_naming_it():
    with pytest.raises(SpecError) as e:
        check_measured(_profile(layers=[{**_layer(1, 1, 0.01, 0.02), "mlp": "geglu"}])["measured"], "p.json")
    assert e.value.field == "measured.layers[0].mlp"


# ---- DDP's overlapped all-reduce ----------------------------------------------------------------------


def test_ddps_all_reduce_under_the_backward_costs_the_measured_share_of_itself_and_is_free_without_it():
    from planner.cost import predict, stage_cost_list
    from planner.frameworks import MESHPLAN
    from planner.plan import Knobs
    from planner.specs import ClusterSpec
    from planner.terms import CostModel

    link = LinkSpec(**LINK)
    cluster = ClusterSpec("two ranks", 1, 2, "cpu", link, link)
    knobs = Knobs(tp=1, pp=1, dp=2, micro_batch=1)  # zero 0: DDP, its all-reduce under the last backward
    free, costly = _device(), _device(ddp={"params": 1, "overlap_cost": 1.5})
    plan, _ = predict(TINY, cluster, costly, knobs, 8)
    cm = CostModel(TINY, cluster, costly, MESHPLAN)
    (stage,) = stage_cost_list(cm, knobs, plan.stages)
    reduce = cm.dp_s(knobs, stage.params)
    assert 0 < reduce < stage.backward_s  # all of it under the backward
    assert predict(TINY, cluster, free, knobs, 8)[0].prediction.breakdown.dp_comm_s == pytest.approx(0.0, abs=1e-12)
    assert plan.prediction.breakdown.dp_comm_s == pytest.approx(1.5 * reduce)
    # Over a link slow enough that the all-reduce outlasts the backward, the rest is exposed at full cost.
    slow = LinkSpec(bandwidth_GBps=0.05, latency_us=100.0)
    cluster = ClusterSpec("two slow ranks", 1, 2, "cpu", slow, slow)
    cm = CostModel(TINY, cluster, costly, MESHPLAN)
    reduce, window = cm.dp_s(knobs, stage.params), stage.backward_s
    assert reduce > window
    got = predict(TINY, cluster, costly, knobs, 8)[0].prediction.breakdown.dp_comm_s
    assert got == pytest.approx(reduce - window + 1.5 * window)
    # Another framework on the same profile: the factor was measured on meshplan's DDP, not on it.
    from planner.frameworks import MEGATRON_CORE  # which overlaps its gradient reduction too
    other = [predict(TINY, cluster, d, knobs, 8, framework=MEGATRON_CORE)[0].prediction.breakdown.dp_comm_s for d in (free, costly)]
    assert other[1] == pytest.approx(other[0])


def test_a_negative_ddp_overlap_cost_is_refused_naming_the_field():
    with pytest.raises(SpecError, match=r"measured\.ddp\.overlap_cost.*a number >= 0"):
        check_measured(_profile(ddp={"overlap_cost": -0.5})["measured"], "test profile")
