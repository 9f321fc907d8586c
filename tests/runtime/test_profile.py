"""runtime/profile.py: a quick profile of this machine is a valid measured device profile that the planner
reads back and prefers, for GPT and Llama blocks alike (planner/fit.py's fitting is tested in tests/planner)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from planner.compute import end_times, layer_times, optimizer_step_s
from planner.cost import predict
from planner.errors import SpecError
from planner.plan import Knobs
from planner.specs import load_cluster, load_device, load_model
from runtime import profile

TINY = load_model("gpt-tiny")
LLAMA_TINY = load_model("llama-tiny")


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
    assert 0 <= m["waited_share"] < 1  # the share of the profile its ranks waited for a core: out of every timing
    # The reference block of each model, timed as runtime.launch re-times it before a run (planner validate's drift).
    assert set(m["reference_s"]) == {"gpt-tiny", "llama-tiny"} and all(v > 0 for v in m["reference_s"].values())

    device = load_device(str(out))
    assert device.label == "cpu (measured)"
    assert layer_times(TINY, device, 1, 2, False).source == "measured"
    assert layer_times(LLAMA_TINY, device, 1, 2, False).source == "measured"
    assert {(e["mlp"], e["kv_heads"]) for e in m["layers"]} == {("gelu", 8), ("swiglu", 2)}
    assert end_times(LLAMA_TINY, device, 1, 1).head_forward_s > 0
    assert end_times(TINY, device, 1, 1).head_forward_s > 0
    assert optimizer_step_s(device, 1e6) == pytest.approx(1e6 * m["optimizer_s_per_param"])
    if (os.cpu_count() or 1) >= 2:
        assert layer_times(TINY, device, 2, 1, True).source == "measured"
        assert layer_times(LLAMA_TINY, device, 2, 1, True).source == "measured"
        assert {"collective", "send_recv"} <= set(m["links"])
        assert set(m["stage_overhead_s"]) == {"forward_s", "backward_s"}
        # DDP's step beside the plain one: what its all-reduce under the backward costs (planner/fit.py _ddp_overlap).
        assert m["ddp"]["all_reduce_s"] > 0 and m["ddp"]["backward_window_s"] > 0 and len(m["ddp"]["ddp_step_s"]) == 2
        cluster = load_cluster("local-cpu", gpus_per_node=2)
        plan, _ = predict(TINY, cluster, device, Knobs(tp=2, pp=1, dp=1, micro_batch=2), 8)
        assert plan.profile == "cpu (measured)" and plan.prediction.iteration_s > 0
        # Both models' blocks under context parallelism over the 2 ranks (runtime.parallel.context), priced from them.
        assert {e["mlp"] for e in m["layers"] if e.get("with_cp", {}).get("cp") == 2} == {"gelu", "swiglu"}
        assert layer_times(LLAMA_TINY, device, 1, 1, False, cp=2, masked_chunks=True).cp_comm_included  # the runtime's cp
        assert not layer_times(LLAMA_TINY, device, 1, 1, False, cp=2).cp_comm_included  # another framework's


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_profile_without_a_gpu_is_refused_naming_the_flag():
    with pytest.raises(SpecError) as e:
        profile.main(device="cuda", out="unused.json", quick=True)
    assert e.value.field == "device"


def test_a_gpu_profile_is_named_after_the_datasheet_the_cluster_presets_name(monkeypatch):
    from types import SimpleNamespace

    from runtime import profile

    def on(gpu, gib):
        monkeypatch.setattr(profile.torch.cuda, "get_device_name", lambda i=0: gpu)
        monkeypatch.setattr(profile.torch.cuda, "get_device_properties", lambda i=0: SimpleNamespace(total_memory=gib * 2**30))
        return profile.device_name("cuda")

    assert on("NVIDIA H200", 140.4) == "h200-sxm-141gb"  # dgx-h200-141gb's device, so the preset reads the measurement
    assert on("NVIDIA H100 PCIe", 79.6) == "nvidia-h100-pcie"


def test_planner_profile_times_the_models_it_is_given(monkeypatch):
    # bench/gpu_check.sh profiles the Llama-family model its plans run: measured layer times are per block shape.
    import runtime.profile
    from planner.cli import main

    got = {}
    monkeypatch.setattr(runtime.profile, "main", lambda **kw: got.update(kw) or 0)
    assert main(["profile", "--device", "cpu", "--quick", "--model", "gpt-tiny", "--model", "mine.yaml"]) == 0
    assert got["models"] == ("gpt-tiny", "mine.yaml")
    assert main(["profile", "--device", "cpu", "--quick"]) == 0 and got["models"] is None
    assert 16 in runtime.profile.choose_shapes("cuda", 1, False).micro_batches


def test_a_gpu_gemm_is_timed_over_about_a_teraflop_and_a_cpu_one_alone():
    # One 1024^3 GEMM is a few microseconds on an H200, less than the synchronisation around its reading.
    from runtime.profile_cases import timed_repeats

    assert [timed_repeats(True, 2 * n**3) for n in (1024, 2048, 4096, 8192)] == [466, 58, 7, 1]
    assert timed_repeats(False, 2 * 1024**3) == 1  # the CPU profile (make run's numbers) as it was
