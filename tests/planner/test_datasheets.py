"""The device datasheets people rent in 2026 load, say where their numbers come from, keep one memory convention,
and plan a model that should fit; the RTX 4090 workstation has no NVLink, so its groups run at the PCIe link."""

from __future__ import annotations

import json

import pytest

from planner.cli import main
from planner.specs import load_cluster, load_device
from planner.topology import dp_link, tp_link

# nvidia-smi's total memory of each card, MiB (the sources are in each file's notes).
NVIDIA_SMI_TOTAL_MIB = {"h200-sxm-141gb": 143_771, "b200-sxm-180gb": 183_359, "l40s-pcie-48gb": 46_068, "rtx4090-pcie-24gb": 24_564}


@pytest.mark.parametrize("name", sorted(NVIDIA_SMI_TOTAL_MIB))
def test_memory_gib_is_the_total_nvidia_smi_reports_in_gib(name):
    d = load_device(name)
    assert d.memory_gib == pytest.approx(NVIDIA_SMI_TOTAL_MIB[name] / 1024, abs=0.01)
    assert "nvidia-smi" in d.notes and "MiB / 1024" in d.notes  # the convention is stated where the number is


@pytest.mark.parametrize("name", sorted(NVIDIA_SMI_TOTAL_MIB))
def test_each_datasheet_has_dense_bf16_and_fp8_peaks_fused_attention_and_sources(name):
    d = load_device(name)
    assert d.source == "datasheet" and d.dtype == "bf16" and d.fused_attention
    # Dense FP8 is twice dense bf16 on Hopper, Blackwell and Ada; a sparse figure in either would break this.
    assert d.fp8_peak_tflops == pytest.approx(2 * d.peak_tflops, rel=0.03)
    assert "dense" in d.notes and ("datasheet" in d.notes or "whitepaper" in d.notes)
    efficiencies = [p.efficiency for p in d.gemm_efficiency]
    assert efficiencies == sorted(efficiencies) and len(efficiencies) == 5  # never falls with GEMM size
    if name != "h200-sxm-141gb":
        assert "scaled from the H100" in d.notes and "not checked against any training run" in d.notes


@pytest.mark.parametrize("argv", [
    ("--model", "llama3-8b", "--cluster", "dgx-h200-141gb", "--nodes", "1", "--global-batch", "64"),
    ("--model", "llama3-8b", "--cluster", "dgx-b200-180gb", "--nodes", "1", "--global-batch", "64"),
    ("--model", "gpt3-1.3b", "--cluster", "workstation-4x-rtx4090", "--global-batch", "64"),
    ("--model", "gpt3-2.7b", "--cluster", "workstation-4x-rtx4090", "--device", "l40s-pcie-48gb", "--global-batch", "64"),
], ids=["h200", "b200", "rtx4090", "l40s"])
def test_every_new_datasheet_plans_a_model_that_fits(capsys, argv):
    code = main(["plan", *argv, "--json", "--top", "1"])
    best = json.loads(capsys.readouterr().out)["plans"][0]
    assert code == 0 and best["prediction"]["fits"]
    device = argv[argv.index("--device") + 1] if "--device" in argv else load_cluster(argv[3]).device
    assert best["profile"] == f"{device} (datasheet)"
    assert 0 < best["prediction"]["peak_memory_gib"] <= load_device(device).memory_gib - 2  # the default headroom


def test_the_rtx4090_workstation_runs_every_group_at_its_pcie_link_not_nvlink():
    ws, dgx = load_cluster("workstation-4x-rtx4090"), load_cluster("dgx-h100-80gb", nodes=1)
    assert ws.nodes == 1 and ws.gpus_per_node == 4
    for link in (tp_link(ws, 4), tp_link(ws, 2), dp_link(ws, 1, 4)):
        assert link.bandwidth_GBps == ws.intra_node.bandwidth_GBps == 12
    assert tp_link(dgx, 8).bandwidth_GBps == 450  # the NVLink node it is not
