"""Published runs held out of every fit (profiles/held_out/, bench/held_out.py) are priced as published."""

import importlib.util
import json

import pytest
from pathlib import Path

from planner.cost import predict
from planner.specs import PROFILES_DIR, load_cluster, load_device, load_model

ROOT = Path(__file__).resolve().parents[2]


def _held_out():
    spec = importlib.util.spec_from_file_location("held_out", ROOT / "bench" / "held_out.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_held_out_torchtitan_runs_are_priced_with_their_published_degrees_and_not_calibrated_on():
    from planner.calibration import calibration_files

    held = _held_out()
    assert not any("held_out" in str(p) for p in calibration_files())
    runs = json.loads((PROFILES_DIR / "held_out" / "torchtitan_llama3_h100_202412.json").read_text())["runs"]
    rows = held.torchtitan_rows(load_device("h100-sxm5-80gb"))
    assert [r["name"] for r in rows] == [r["name"] for r in runs]
    for run, row in zip(runs, rows):
        k = held.knobs_of(run)
        assert k.tp * k.pp * k.dp * k.cp == run["gpus"]
        assert row["fa2"] < row["gemm"]  # FlashAttention-2 on Hopper is slower than a GEMM-rate attention
    plan, _ = predict(load_model("llama3-8b", 32768), load_cluster("dgx-h100-80gb", nodes=1), load_device("h100-sxm5-80gb"),
                      held.knobs_of(runs[0]), 8)
    assert (plan.tp, plan.dp, plan.cp, plan.zero, plan.precision) == (1, 8, 1, 3, "fp8")


def test_held_out_kempnerforge_runs_are_priced_with_the_published_batch_and_model_shapes():
    # Each run's tokens per step, read from the report's step time and throughput, is the batch the bench prices
    # (dp x micro-batch x gradient accumulation x 4,096), and the 15B shape has the report's 14.84B parameters.
    from planner.specs import model_from_dict

    held = _held_out()
    data = json.loads((PROFILES_DIR / "held_out" / "kempnerforge_h200_202604.json").read_text())
    assert model_from_dict(data["models"]["kf-13b"], "kf").params() == 14_840_386_560
    rows = held.kempnerforge_rows(load_device("h200-sxm-141gb"))
    assert len(rows) == len(data["runs"]) == 14
    for run, row in zip(data["runs"], rows):
        tokens = run["dp"] * run["micro_batch"] * run["grad_accum"] * run["seq_len"]
        assert abs(run["tokens_per_s"] * run["step_s"] - tokens) / tokens < 0.01, run["name"]
        assert held.knobs_of(run).tp * run["dp"] == run["gpus"]
        assert row["predicted"] * row["step_predicted"] == pytest.approx(tokens)
        # 4 H200s a node, and torch 2.11's meshplan runtime (cuDNN attention), not the Dec 2024 torch's.
        assert (row["gpus_per_node"], row["nodes"], row["framework"]) == (min(4, run["gpus"]), -(-run["gpus"] // 4), "meshplan")
    # Priced as torch 2.11's meshplan runtime (cuDNN attention at the GEMM curve), not with the Dec 2024 torch's flash.
    run, row = data["runs"][0], rows[0]
    args = (load_model(run["model"], 4096), load_cluster(held.KF_CLUSTER, nodes=1, gpus_per_node=1), load_device("h200-sxm-141gb"),
            held.knobs_of(run), run["micro_batch"] * run["grad_accum"])
    assert row["predicted"] == pytest.approx(predict(*args, framework=held.KEMPNERFORGE)[0].prediction.tokens_per_s, rel=1e-9)
    assert row["predicted"] > 1.01 * predict(*args, framework=held.TORCH_DEC_2024)[0].prediction.tokens_per_s
    # A TP run is priced with KempnerForge's TP plan (per-linear gathers, the logits gathered for the loss), slower
    # than meshplan's own.
    run, row = data["runs"][4], rows[4]
    assert run["name"] == "7B, TP 4"
    args = (load_model(run["model"], 4096), load_cluster(held.KF_CLUSTER, nodes=1, gpus_per_node=4), load_device("h200-sxm-141gb"),
            held.knobs_of(run), run["micro_batch"] * run["grad_accum"])
    assert row["predicted"] == pytest.approx(predict(*args, framework=held.KEMPNERFORGE)[0].prediction.tokens_per_s, rel=1e-9)
    assert row["predicted"] < 0.9 * predict(*args, framework=held.MESHPLAN)[0].prediction.tokens_per_s


def test_the_mm_rate_column_prices_kempnerforge_with_the_gemm_curve_topped_at_torch_mms_rate():
    # The diagnostic column: the same runs on a device whose GEMM curve keeps its shape but tops out at torch.mm's
    # measured 790 of 989 TFLOP/s, and nothing else changed.
    held = _held_out()
    device = load_device("h200-sxm-141gb")
    scaled = held.at_gemm_rate(device, held.TORCH_MM_RATE)
    assert max(p.efficiency for p in scaled.gemm_efficiency) == pytest.approx(790.29 / 989)
    factor = scaled.gemm_efficiency[0].efficiency / device.gemm_efficiency[0].efficiency
    assert factor == pytest.approx(held.TORCH_MM_RATE / max(p.efficiency for p in device.gemm_efficiency)) and factor > 1.3
    for a, b in zip(scaled.gemm_efficiency, device.gemm_efficiency):
        assert (a.gflop, a.efficiency) == (b.gflop, pytest.approx(b.efficiency * factor))
    assert scaled.fp8_gemm_efficiency == device.fp8_gemm_efficiency and scaled.memory_efficiency == device.memory_efficiency
    data = json.loads((PROFILES_DIR / "held_out" / "kempnerforge_h200_202604.json").read_text())
    run, row = data["runs"][0], held.kempnerforge_rows(device)[0]
    args = (load_model(run["model"], 4096), load_cluster(held.KF_CLUSTER, nodes=1, gpus_per_node=1), scaled,
            held.knobs_of(run), run["micro_batch"] * run["grad_accum"])
    assert row["at_mm_rate"] == pytest.approx(predict(*args, framework=held.KEMPNERFORGE)[0].prediction.tokens_per_s, rel=1e-9)
    # One GPU is compute-bound: the faster curve makes it faster, by less than the curve's factor (elementwise,
    # attention's and the optimizer's time do not scale).
    assert row["predicted"] * 1.05 < row["at_mm_rate"] < row["predicted"] * factor


def test_calibration_mm_rate_prices_every_h100_run_again_and_megatrons_tp1_run_comes_out_fast():
    # bench/calibration.py --mm-rate: the 21 H100 runs beside their fitted errors. At torch.mm's rate the Megatron-LM
    # README's one run without TP is far faster than published, as the README says: the loss the curve absorbs
    # there does not come with TP.
    import re
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "bench/calibration.py", "--mm-rate"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    table = out[out.index("topped at torch.mm's"):]
    rows = [line for line in table.splitlines() if re.search(r"(bf16|fp8)\s", line)]
    assert len(rows) == 21
    fitted, mm = (float(x) for x in re.findall(r"([+-]\d+\.\d)%", next(r for r in rows if "1.7B/48" in r)))
    assert abs(fitted) < 10 and mm > fitted + 15


def test_the_sm_tax_slows_only_the_compute_beside_fsdp_traffic_and_lengthens_a_phase_only_past_that_traffic():
    # The hypothesis column: at torch.mm's rate, the compute beside FSDP2's traffic loses NCCL_SM_SHARE of the SMs
    # while they overlap; a phase the traffic sets (max(compute, traffic)) grows only if the slowed compute passes it.
    held = _held_out()
    rows = {r["name"]: r for r in held.kempnerforge_rows(load_device("h200-sxm-141gb"))}
    for name in ("7B, 1 GPU", "7B, TP 2", "7B, TP 4"):  # no FSDP2 traffic: nothing to tax
        assert rows[name]["sm_tax"] == pytest.approx(rows[name]["at_mm_rate"], rel=1e-12), name
    # Compute-bound (7B at TP 4 over 8 nodes): each phase is its compute, which grows by the share of the traffic.
    fast = rows["7B, TP 4 FSDP 8 (8 nodes)"]
    assert fast["sm_tax"] < 0.95 * fast["at_mm_rate"]
    # The 70B run is bound by FSDP2's traffic over InfiniBand in both phases, and its compute, slowed, stays under
    # it: no tax, though most of its traffic runs beside compute.
    big = rows["70B, TP 4 FSDP 8 (8 nodes)"]
    assert big["sm_tax"] == pytest.approx(big["at_mm_rate"], rel=1e-12)
    data = json.loads((PROFILES_DIR / "held_out" / "kempnerforge_h200_202604.json").read_text())
    (run,) = [r for r in data["runs"] if r["name"] == big["name"]]
    device = held.at_gemm_rate(load_device("h200-sxm-141gb"), held.TORCH_MM_RATE)
    model = load_model(run["model"], run["seq_len"])  # a preset: Llama 3 70B at KempnerForge's 4,096 tokens
    plan, _ = predict(model, load_cluster(held.KF_CLUSTER, nodes=8, gpus_per_node=4), device, held.knobs_of(run),
                      run["dp"] * run["micro_batch"] * run["grad_accum"], framework=held.KEMPNERFORGE, memory_headroom_gib=0)
    (stage,) = held.stage_cost_list(held.CostModel(plan.model, plan.cluster, device, held.KEMPNERFORGE), plan.knobs, plan.stages)
    for compute, traffic in stage.sharded_overlap_s:
        assert compute < traffic and compute * (1 + held.NCCL_SM_SHARE) < traffic
