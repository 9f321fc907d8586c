"""The memory model against hand-computed closed forms of Korthikanti et al. 2022 (GPT-3 175B shapes)."""

import pytest

from planner import schedule
from planner.memory import activation_bytes_per_layer, state_bytes_per_param
from planner.specs import load_model

GPT3 = load_model("gpt3-175b")  # s=2048, h=12288, a=96
SBH = 2048 * 1 * 12288  # = 25,165,824 for micro-batch 1


def test_no_parallelism_is_sbh_times_34_plus_5as_over_h():
    # 5*a*s/h = 5*96*2048/12288 = 80, so 34 + 80 = 114 bytes per s*b*h.
    assert activation_bytes_per_layer(GPT3, 1, 1, False, "none") == SBH * 114 == 2_868_903_936


def test_tensor_parallel_without_sp_is_sbh_times_10_plus_24_over_t_plus_5as_over_ht():
    # Korthikanti eq. 2 with t = 8: 10 + 3 + 10 = 23.
    assert activation_bytes_per_layer(GPT3, 8, 1, False, "none") == SBH * 23 == 578_813_952


def test_tensor_and_sequence_parallel_divide_everything_by_t():
    assert activation_bytes_per_layer(GPT3, 8, 1, True, "none") == SBH * 114 / 8 == 358_612_992


def test_selective_recompute_with_sp_keeps_34_sbh_over_t():
    assert activation_bytes_per_layer(GPT3, 8, 1, True, "selective") == 34 * SBH / 8 == 106_954_752


def test_full_recompute_keeps_only_the_block_input_2sbh():
    assert activation_bytes_per_layer(GPT3, 8, 1, False, "full") == 2 * SBH == 50_331_648
    assert activation_bytes_per_layer(GPT3, 8, 1, True, "full") == 2 * SBH / 8


def test_activations_scale_linearly_with_micro_batch():
    assert activation_bytes_per_layer(GPT3, 8, 4, True, "none") == 4 * activation_bytes_per_layer(GPT3, 8, 1, True, "none")


def test_fused_attention_drops_the_5as_over_h_term():
    assert activation_bytes_per_layer(GPT3, 1, 1, False, "none", fused_attention=True) == SBH * 34


def test_mixed_precision_adam_is_18_bytes_or_6_plus_12_over_d():
    assert sum(state_bytes_per_param(2, False, 64)) == 18
    assert sum(state_bytes_per_param(2, True, 64)) == pytest.approx(6 + 12 / 64)


@pytest.mark.parametrize("p,m", [(4, 8), (8, 8), (3, 10)])
def test_1f1b_stage_i_holds_p_minus_i_microbatches(p, m):
    vectors = schedule.inflight_vectors("1f1b", p, m)
    for i in range(p):
        assert schedule.peak_inflight(vectors[i], [1.0]) == p - i


def test_gpipe_holds_every_microbatch():
    vectors = schedule.inflight_vectors("gpipe", 4, 6)
    assert all(schedule.peak_inflight(vectors[i], [1.0]) == 6 for i in range(4))
