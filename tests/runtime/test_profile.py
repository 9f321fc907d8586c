"""runtime/profile.py: a quick profile of this machine is a valid measured device profile that the planner
reads back and prefers, and the per-microbatch pipeline overhead is fitted so the simulator reproduces
the measured step."""

from __future__ import annotations

import json
import os

import pytest
import torch

from planner.compute import end_times, layer_times, optimizer_step_s
from planner.cost import predict
from planner.errors import SpecError
from planner.plan import Knobs
from planner.schedule import simulate
from planner.specs import load_cluster, load_device, load_model
from runtime import profile

TINY = load_model("gpt-tiny")


def test_quick_profile_writes_a_measured_profile_that_load_device_reads_back(tmp_path):
    out = tmp_path / "cpu.measured.json"
    assert profile.main(device="cpu", out=str(out), quick=True) == 0
    raw = json.loads(out.read_text())
    assert raw["version"] == 1 and raw["source"] == "measured" and raw["dtype"] == "fp32"
    m = raw["measured"]
    for fact in ("device_name", "torch_version", "date", "cpu_count", "backend", "threads_per_rank"):
        assert fact in m
    assert m["torch_version"] == torch.__version__ and m["threads_per_rank"] == 1 and m["quick"] is True
    assert 0 < m["cpu_share"] <= 1.5  # share of a core while timing blocks: flags a busy machine

    device = load_device(str(out))
    assert device.label == "cpu (measured)"
    assert layer_times(TINY, device, 1, 2, False).source == "measured"
    assert end_times(TINY, device, 1, 1).head_forward_s > 0
    assert optimizer_step_s(device, 1e6) == pytest.approx(1e6 * m["optimizer_s_per_param"])
    if (os.cpu_count() or 1) >= 2:
        assert layer_times(TINY, device, 2, 1, True).source == "measured"
        assert {"collective", "send_recv"} <= set(m["links"])
        assert set(m["stage_overhead_s"]) == {"forward_s", "backward_s"}
        cluster = load_cluster("local-cpu", gpus_per_node=2)
        plan, _ = predict(TINY, cluster, device, Knobs(tp=2, pp=1, dp=1, micro_batch=2), 8)
        assert plan.profile == "cpu (measured)" and plan.prediction.iteration_s > 0


def _synthetic_samples(shapes, layer_s, end_s, step_s) -> dict:
    """Samples as the ranks return them: every layer and end time proportional to the micro-batch."""
    samples = {("optimizer", 1000, "step_s"): [1e-5], ("copy", 1 << 20, "s"): [1e-4]}
    for n in shapes.gemm_sizes:
        samples[("gemm", n, "s")] = [2 * n**3 / 5e10]
    for b in shapes.micro_batches:
        for k, v in zip(("forward_s", "backward_s", "selective_recompute_s"), layer_s):
            samples[("layer", 256, 8, 1024, 128, 1, b, False, k)] = [v * b]
        for k, v in zip(("embedding_forward_s", "embedding_backward_s", "head_forward_s", "head_backward_s"), end_s):
            samples[("end", 256, 8192, 128, 1, b, k)] = [v * b]
    for sched, b, m in shapes.pipelines:
        samples[("pipe", sched, b, m, "step_s")] = [step_s(sched, b, m)]
        for k in (0, 1):
            samples[("pipe", sched, b, m, f"stage{k}_forward_s")] = [0.1]
            samples[("pipe", sched, b, m, f"stage{k}_backward_s")] = [0.2]
    return samples


def test_stage_overhead_is_what_the_simulated_cost_model_misses_per_microbatch():
    shapes = profile.Shapes((TINY,), (1,), (1, 2, 4), (), (256,), (("1f1b", 2, 4), ("gpipe", 1, 8)), repeats=1, warmup=0)
    layer, ends, o = (0.010, 0.020, 0.001), (0.001, 0.002, 0.008, 0.016), 0.004

    def step_s(sched, b, m):
        # 4 blocks per stage (gpt-tiny's 8 over two stages); the embedding on the first, the head on the last.
        f = [b * (4 * layer[0] + ends[0]) + o, b * (4 * layer[0] + ends[2]) + o]
        bw = [b * (4 * layer[1] + ends[1]) + o, b * (4 * layer[1] + ends[3]) + o]
        return simulate(sched, 2, m, 1, f, bw, with_timeline=False).iteration_s

    facts = {"device_name": "test", "torch_version": "x", "date": "today", "cpu_count": 2, "world_size": 2, "backend": "gloo",
             "threads_per_rank": 1, "dtype": "fp32", "python": "3", "memory_gib": 8.0, "framework_overhead_gib": 0.2,
             "name": "cpu", "profile_s": 1.0, "quick": True}
    prof = profile.build_profile(_synthetic_samples(shapes, layer, ends, step_s), facts, shapes, "cpu")
    assert prof["measured"]["stage_overhead_s"] == {"forward_s": pytest.approx(o, rel=1e-4), "backward_s": pytest.approx(o, rel=1e-4)}
    assert [r["overhead_s"] for r in prof["measured"]["pipeline"]] == [pytest.approx(o, rel=1e-4)] * 2
    assert prof["peak_tflops"] == pytest.approx(0.05) and prof["gemm_efficiency"][0]["efficiency"] == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_profile_without_a_gpu_is_refused_naming_the_flag():
    with pytest.raises(SpecError) as e:
        profile.main(device="cuda", out="unused.json", quick=True)
    assert e.value.field == "device"
