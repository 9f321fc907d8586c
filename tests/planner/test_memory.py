"""The memory model against hand-computed closed forms of Korthikanti et al. 2022 (GPT-3 175B shapes)."""

import pytest

from planner import schedule
from planner.memory import activation_bytes_per_layer, state_bytes_per_param, step_grad_bytes_per_param
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


def test_mixed_precision_adam_is_18_bytes_then_6_plus_12_over_d_then_2_plus_16_over_d_then_18_over_d():
    # Rajbhandari et al. 2020, figure 1, with fp32 main gradients as Megatron-LM keeps them.
    assert sum(state_bytes_per_param(2, 0, 64, False)) == 18
    assert sum(state_bytes_per_param(2, 1, 64, False)) == pytest.approx(6 + 12 / 64)
    assert sum(state_bytes_per_param(2, 2, 64, False)) == pytest.approx(2 + 16 / 64)
    assert sum(state_bytes_per_param(2, 3, 64, False)) == pytest.approx(18 / 64)


def test_meshplans_runtime_keeps_fp32_weights_and_gradients_as_each_zero_stage_runs():
    # GPU: DDP + bf16 autocast's weight copies (0, 1); FSDP2 fp32 shards + bf16 gathered weights at stage 2.
    assert state_bytes_per_param(2, 0, 8, True) == (6.0, 4.0, 8.0)
    assert state_bytes_per_param(2, 1, 8, True) == (6.0, 4.0, 1.0)
    assert state_bytes_per_param(2, 2, 8, True) == (0.5 + 2.0, 0.5, 1.0)
    assert state_bytes_per_param(2, 3, 8, True) == (0.5, 0.5, 1.0)
    # CPU, fp32 throughout: 16 bytes; ZeRO-3 shards all of it.
    assert sum(state_bytes_per_param(4, 0, 4, True)) == 16
    assert sum(state_bytes_per_param(4, 3, 4, True)) == 4


@pytest.mark.parametrize("p,m", [(4, 8), (8, 8), (3, 10)])
def test_1f1b_stage_i_holds_p_minus_i_microbatches(p, m):
    vectors = schedule.inflight_vectors("1f1b", p, m)
    for i in range(p):
        assert schedule.peak_inflight(vectors[i], [1.0]) == p - i


def test_gpipe_holds_every_microbatch():
    vectors = schedule.inflight_vectors("gpipe", 4, 6)
    assert all(schedule.peak_inflight(vectors[i], [1.0]) == 6 for i in range(4))


# ---- Llama-family terms (GQA, SwiGLU, RMSNorm, no dropout) ----------------------------------------------

from planner.memory import MEGATRON_SAVED, RUNTIME_SAVED, end_param_count, layer_param_count  # noqa: E402

LLAMA8 = load_model("llama3-8b")  # s=8192, h=4096, a=32, kv_heads 8 (kv/h = 1/4), f=14336 (f/h = 3.5)
SBH8 = 8192 * 4096


def test_llama_block_as_meshplans_runtime_keeps_it():
    # Replicated: two norm inputs 4 and, the norms being plain ops, their normalized x 4; q/k/v input 2, MLP input
    # 2 (no dropout masks) = 12. Sharded: q 2, k and v 2 x 2 x 1/4 = 1, the attention output 2 and, GQA's being
    # laid out by head, its reshaped copy 2, SwiGLU's gate, silu, up and product 8 x 3.5 = 28: 35.
    assert activation_bytes_per_layer(LLAMA8, 1, 1, False, "none", True, RUNTIME_SAVED) == SBH8 * 47
    assert activation_bytes_per_layer(LLAMA8, 8, 1, False, "none", True, RUNTIME_SAVED) == SBH8 * (12 + 35 / 8)
    assert activation_bytes_per_layer(LLAMA8, 8, 1, True, "none", True, RUNTIME_SAVED) == SBH8 * 47 / 8


def test_llama_block_as_megatron_keeps_it_has_dropout_masks_and_a_fused_swiglu():
    # Replicated 8 + two masks = 10; sharded q 2 + k, v 1 + projection input 2 + fused SwiGLU's two inputs and
    # the product 6 x 3.5 = 21: 26. Non-fused attention adds the scores 5as/h = 5 x 32 x 8192 / 4096 = 320.
    assert activation_bytes_per_layer(LLAMA8, 1, 1, False, "none", True, MEGATRON_SAVED) == SBH8 * 36
    assert activation_bytes_per_layer(LLAMA8, 1, 1, False, "none", False, MEGATRON_SAVED) == SBH8 * (36 + 320)


def test_gpt_block_under_meshplans_runtime_drops_the_masks_and_the_attention_output_copy():
    # 8 replicated + (q, k, v 6 + projection input 2 + GELU's 16) sharded.
    assert activation_bytes_per_layer(GPT3, 8, 1, False, "none", True, RUNTIME_SAVED) == SBH * (8 + 24 / 8)
    assert activation_bytes_per_layer(GPT3, 8, 1, False, "full", True, RUNTIME_SAVED) == 2 * SBH


def test_llama_state_counts_its_own_norms_and_no_biases():
    # RMSNorm weights (2h per block) replicated over tp, every matrix sharded; no positions, an untied head.
    h = 4096
    assert layer_param_count(LLAMA8, 1) == LLAMA8.layer_params()
    assert layer_param_count(LLAMA8, 8) == (LLAMA8.layer_params() - 2 * h) / 8 + 2 * h
    v = LLAMA8.padded_vocab(8)
    assert end_param_count(LLAMA8, 8, True, False) == v * h / 8
    assert end_param_count(LLAMA8, 8, False, True) == v * h / 8 + h
    assert LLAMA8.layers * layer_param_count(LLAMA8, 1) + end_param_count(LLAMA8, 1, True, True) == LLAMA8.padded_params(1)


def test_transformer_engine_fp8_keeps_gemm_inputs_in_one_byte():
    # TE v1.8 (linear.py, layernorm_linear.py): the q/k/v input and the MLP's input 1 each instead of 2
    # (replicated 10 -> 8), the output projection's FP8 copy 1 beside the attention kernel's bf16 output 2, GELU's
    # input 8 and the last matrix's FP8 input 4 instead of 8: sharded 6 + 3 + 12 = 21 instead of 24.
    from planner.memory import MEGATRON_CORE_SAVED
    assert activation_bytes_per_layer(GPT3, 8, 1, True, "none", True, MEGATRON_CORE_SAVED, fp8=True) == SBH * (8 + 21) / 8
    assert activation_bytes_per_layer(GPT3, 8, 1, True, "none", True, MEGATRON_CORE_SAVED) == SBH * 34 / 8


def test_fp8_with_checkpointed_attention_core_keeps_only_the_projections_fp8_copy():
    # Selective recomputation re-runs the attention core, so its bf16 output is not kept: 2 less than without.
    from planner.memory import MEGATRON_CORE_SAVED
    none = activation_bytes_per_layer(GPT3, 8, 1, True, "none", True, MEGATRON_CORE_SAVED, fp8=True)
    assert activation_bytes_per_layer(GPT3, 8, 1, True, "selective", True, MEGATRON_CORE_SAVED, fp8=True) == none - 2 * SBH / 8


def test_fp8_changes_nothing_where_the_software_keeps_bf16_inputs():
    # meshplan's runtime and Megatron-LM 2021 do not keep FP8 copies (SavedTensors.fp8_gemm_inputs False).
    for saved in (RUNTIME_SAVED, MEGATRON_SAVED):
        assert activation_bytes_per_layer(LLAMA8, 8, 1, True, "none", True, saved, fp8=True) == \
            activation_bytes_per_layer(LLAMA8, 8, 1, True, "none", True, saved)


def test_fp32_gradient_shard_exists_only_during_the_optimizer_step():
    # Megatron-Core's bf16 gradient buffer: 2 + 2 + 12/n while activations are held, and the fp32 copy of the
    # gradient shard (4/n) only inside step(); fp32 gradients and meshplan's runtime have no such copy.
    assert state_bytes_per_param(2, 1, 8, False, grad_bytes=2) == (2.0, 2.0, 1.5)
    assert step_grad_bytes_per_param(1, 8, False, grad_bytes=2) == 0.5
    assert step_grad_bytes_per_param(0, 8, False, grad_bytes=2) == 4.0
    assert step_grad_bytes_per_param(1, 8, False, grad_bytes=4) == 0.0
    assert step_grad_bytes_per_param(1, 8, True, grad_bytes=2) == 0.0


def test_peak_is_the_larger_of_activations_and_the_steps_copies():
    from planner.memory import MemoryBreakdown
    assert MemoryBreakdown(10, 2, 6, activations_gib=20, overhead_gib=1, step_gib=5).total_gib == 39
    assert MemoryBreakdown(10, 2, 6, activations_gib=3, overhead_gib=1, step_gib=5).total_gib == 24


def test_transformer_engines_fp8_weight_copies_add_two_bytes_per_matrix_weight_unless_they_are_the_primary_weights():
    # Megatron-Core with FP8: Transformer Engine keeps each block matrix's FP8 weight and its FP8 transpose all
    # step long. NVIDIA's FP8 recipes keep no bf16 weights beside them (fp8_params): the 2 bytes the state
    # counts. Without that, 2 bytes more per matrix weight, and the ILP's and bounds' memory read the same term.
    import dataclasses

    from planner.cost import predict
    from planner.plan import Knobs
    from planner.search import search
    from planner.specs import load_cluster, load_device
    from planner.terms import MEGATRON_CORE

    cached = dataclasses.replace(MEGATRON_CORE, fp8_primary_weights=False)
    h100, cluster = load_device("h100-sxm5-80gb"), load_cluster("dgx-h100-80gb", nodes=4)
    knobs = Knobs(tp=4, pp=8, dp=1, micro_batch=1, schedule="1f1b", virtual_stages=1, recompute="full",
                  sequence_parallel=True, zero=1, cp=1, precision="fp8")
    base, mine = (predict(GPT3, cluster, h100, knobs, 64, framework=f)[0].prediction for f in (MEGATRON_CORE, cached))
    per_block = 2 * GPT3.block_matrix_params() / 4  # 1 byte FP8 + 1 byte transpose per weight of the rank's shard
    assert mine.peak_memory_gib - base.peak_memory_gib == pytest.approx(12 * per_block / 2**30, rel=1e-9)  # 96 / 8 blocks
    bf16 = dataclasses.replace(knobs, precision="bf16")
    assert predict(GPT3, cluster, h100, bf16, 64, framework=cached)[0].prediction.peak_memory_gib == pytest.approx(
        predict(GPT3, cluster, h100, bf16, 64, framework=MEGATRON_CORE)[0].prediction.peak_memory_gib, rel=1e-12)
    # The split program and the search's bound read the same term: the program's memory of this split (12 blocks
    # on every device) is predict's peak on each device, and the bound's floor rises by the copies too.
    from planner.bounds import every_split_bound_s
    from planner.cost import CostModel
    from planner.ilp import device_terms
    from planner.search import stage_fixed_busy_s

    for f, pred in ((MEGATRON_CORE, base), (cached, mine)):
        cm = CostModel(GPT3, cluster, h100, f)
        plan = predict(GPT3, cluster, h100, knobs, 64, cost_model=cm)[0]
        program = [max(d.memory_bytes(12, 0), d.step_memory_bytes(12)) / 2**30
                   for d in device_terms(cm.terms(knobs), knobs, 64, GPT3, stage_fixed_busy_s(cm, knobs))]
        assert max(program) == pytest.approx(pred.peak_memory_gib, rel=1e-9)
        assert program == pytest.approx([s.memory_gib for s in plan.stages], abs=1e-3)
    floors = [every_split_bound_s(CostModel(GPT3, cluster, h100, f), knobs, 64)[1] for f in (MEGATRON_CORE, cached)]
    assert floors[1] - floors[0] == pytest.approx(12 * per_block / 2**30, rel=1e-6) and floors[1] <= mine.peak_memory_gib
    # The search prices the copies as predict does: between the two peaks, the primary-weight plan fits, the other not.
    tight = dataclasses.replace(h100, memory_gib=(base.peak_memory_gib + mine.peak_memory_gib) / 2 + 2.0)
    pins = {"tp": 4, "pp": 8, "dp": 1, "micro_batch": 1, "schedule": "1f1b", "recompute": "full", "sequence_parallel": True,
            "zero": 1, "cp": 1, "precision": "fp8"}
    fits = {f.fp8_primary_weights: [p.prediction.fits for p in search(GPT3, cluster, tight, 64, pins, framework=f).plans]
            for f in (MEGATRON_CORE, cached)}
    assert any(fits[True]) and not any(fits[False])
