"""FlashAttention-2's own rate (planner/kernels.py) prices attention where torch SDPA runs it on Hopper (torch before
2.11: bench/held_out.py's torchtitan of Dec 2024); from 2.11 SDPA runs cuDNN there, at the GEMM curve's rate."""

import dataclasses
import json

import pytest

from planner.kernels import AttentionPoint, flash_efficiency
from planner.compute import datasheet_layer_times
from planner.errors import SpecError
from planner.frameworks import FRAMEWORKS, MESHPLAN
from planner.specs import PROFILES_DIR, device_from_dict, load_cluster, load_device, load_model
from planner.terms import CostModel


def test_flash_efficiency_is_log_linear_between_points_and_flat_outside():
    pts = (AttentionPoint(1024, 0.2, 0.1), AttentionPoint(4096, 0.4, 0.3))
    assert flash_efficiency(pts, 512) == (0.2, 0.1)
    assert flash_efficiency(pts, 65536) == (0.4, 0.3)
    assert flash_efficiency(pts, 2048) == pytest.approx((0.3, 0.2))  # halfway in log tokens


def test_h100_attention_priced_as_flashattention2_runs_at_its_measured_rate():
    h100, model = load_device("h100-sxm5-80gb"), load_model("llama3-8b", 32768)
    fa2 = datasheet_layer_times(model, h100, 1, 1, False, fused_attention=True, flash=True)
    gemm = datasheet_layer_times(model, h100, 1, 1, False, fused_attention=True, flash=False)
    # Causal FLOPs of one sequence's attention core: 2 s^2 d per head, at 33.9% of 989 TFLOP/s past 16k tokens.
    flops = 2.0 * 32 * 32768 ** 2 * 128
    assert fa2.selective_recompute_s == pytest.approx(flops / (989e12 * 0.339))
    assert gemm.selective_recompute_s < 0.7 * fa2.selective_recompute_s  # the GEMM curve's ~0.55 of peak
    assert fa2.backward_s - gemm.backward_s == pytest.approx(2.5 * flops / (989e12 * 0.326) - 2.5 * gemm.selective_recompute_s)


def test_only_a_framework_that_runs_flashattention2_reads_the_curve_and_none_of_the_named_ones_does():
    h100 = load_device("h100-sxm5-80gb")
    model, cluster = load_model("llama3-8b", 32768), load_cluster("dgx-h100-80gb", nodes=1)
    layer = lambda fw, dev: CostModel(model, cluster, dev, fw).layer(1, 1, False)  # noqa: E731
    without = dataclasses.replace(h100, flash_attention_efficiency=())
    torch_2024 = dataclasses.replace(MESHPLAN, flash_attention=True)  # torchtitan's Dec 2024 torch: flash first
    assert layer(torch_2024, h100).forward_s > layer(torch_2024, without).forward_s
    # meshplan's runtime on torch 2.11+ and Megatron-Core (Transformer Engine) run cuDNN's attention: the GEMM curve.
    for fw in FRAMEWORKS.values():
        assert not fw.flash_attention and layer(fw, h100) == layer(fw, without), fw.name
    assert load_device("a100-sxm4-80gb").flash_attention_efficiency == ()


@pytest.mark.parametrize("points, field", [
    ([{"tokens": 2048, "forward": 0.3, "backward": 0.3}, {"tokens": 1024, "forward": 0.2, "backward": 0.2}], "flash_attention_efficiency[1].tokens"),
    ([{"tokens": 1024, "forward": 1.3, "backward": 0.2}], "flash_attention_efficiency[0]"),
])
def test_a_misordered_or_impossible_flash_curve_is_refused_by_field(points, field):
    data = json.loads((PROFILES_DIR / "devices" / "h100-sxm5-80gb.json").read_text()) | {"flash_attention_efficiency": points}
    with pytest.raises(SpecError) as err:
        device_from_dict(data, "mine.json")
    assert err.value.field == field
