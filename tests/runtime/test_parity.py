"""Given a seed, every parallel layout computes the losses and gradient norms one process computes (fp32, relative
difference <= 1e-4), for the same global batch of 8 sequences, in both model families: test-tiny (GPT) and the
Llama family: llama-test (planfiles.LLAMA_TEST: llama-tiny at half its width; GQA, SwiGLU, RMSNorm, RoPE, no
biases). The gradient norm is the whole model's, before clipping at 1.0, so equal norms show it is taken over every
stage and shard. The layouts of one world size share one spawn of their gloo ranks on CPU (two_rank_layouts,
four_rank_layouts), each run with a process group of its own.

llama-test covers every layout of the issue with every recompute policy spread over them (tp2 x pp2 selective,
tp2 full, dp2 DDP none, FSDP2 selective, pp2 uneven full-of-one, interleaved none), and its loss falls in each. Its
tensor-parallel layouts run the 3 short steps (planfiles.LLAMA_TEST says why)."""

from __future__ import annotations

import pytest

from tests.runtime.planfiles import (LLAMA_STEPS, LLAMA_TEST, PARITY_STEPS, max_relative_difference, reference, reference_losses, run_layout,
                                     run_layouts)

TOLERANCE = 1e-4


def assert_matches_single_process(result: dict, model: str = "test-tiny") -> None:
    expected = reference(model)
    steps = LLAMA_STEPS if model.startswith("llama") else PARITY_STEPS
    assert len(result["losses"]) == steps
    for key in ("losses", "grad_norms"):
        diff = max_relative_difference(result[key], expected[key])
        print(f"{model} {key}: max relative difference {diff:.1e} over {steps} steps: {[round(v, 4) for v in result[key]]}")
        assert diff <= TOLERANCE, f"{key} {result[key]} vs single process {expected[key]}: relative difference {diff:.2e}"


def assert_llama_matches_and_falls(result: dict, model: str = "llama-test") -> None:
    assert_matches_single_process(result, model)
    losses = result["losses"]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.5, losses


def test_loss_falls_on_the_synthetic_stream():
    losses = reference_losses()
    # ln(256) = 5.55 at init; the bigram chain's entropy is about 1.2 nats, 30 steps get well on the way.
    assert losses[0] == pytest.approx(5.55, abs=0.1)
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(b < a for a, b in zip(losses[:PARITY_STEPS], losses[1:PARITY_STEPS])), losses


def test_tp2_pp2_loss_matches_single_process(four_rank_layouts):
    # Sequence parallelism on, so the stage boundary carries the sequence shard (B, T/tp, h).
    assert_matches_single_process(four_rank_layouts["tp2_pp2_sp"])


def test_tp2_loss_matches_single_process(two_rank_layouts):
    assert_matches_single_process(two_rank_layouts["tp2"])


def test_tp2_run_prices_its_waits_block_by_block_between_the_largest_rank_and_the_sum(two_rank_layouts):
    # The tp ranks meet at every block: runtime.machine.synced_waits compares their waits stretch by stretch.
    m = two_rank_layouts["tp2"]["machine"]
    assert len(m["step_synced_wait_s"]) == len(m["step_wait_s"])
    for synced, waits in zip(m["step_synced_wait_s"], m["step_wait_s"]):
        assert max(waits) - 1e-5 <= synced <= sum(waits) + 1e-5, (synced, waits)


def test_dp2_ddp_loss_matches_single_process(two_rank_layouts):
    assert_matches_single_process(two_rank_layouts["dp2_ddp"])


def test_tp2_dp2_loss_matches_single_process(four_rank_layouts):
    # DP gradients averaged by hand under TP (runtime.parallel.data.all_reduce_gradients).
    assert_matches_single_process(four_rank_layouts["tp2_dp2"])


def test_pp2_dp2_loss_matches_single_process(four_rank_layouts):
    # DP gradients averaged by hand under pipelining too.
    assert_matches_single_process(four_rank_layouts["pp2_dp2"])


def test_dp2_zero3_fsdp2_loss_matches_single_process(two_rank_layouts):
    assert_matches_single_process(two_rank_layouts["dp2_zero3"])


def test_pp2_uneven_stages_loss_matches_single_process(two_rank_layouts):
    result = two_rank_layouts["pp2_uneven"]
    assert_matches_single_process(result)
    assert set(result["stage_timings"]) == {"stage0", "stage1"}


def test_pp2_gpipe_loss_matches_single_process(two_rank_layouts):
    assert_matches_single_process(two_rank_layouts["pp2_gpipe"])


def test_interleaved_pp2_v2_loss_matches_single_process(two_rank_layouts):
    result = two_rank_layouts["interleaved_pp2_v2"]
    assert_matches_single_process(result)
    assert set(result["stage_timings"]) == {"stage0", "stage1", "stage2", "stage3"}


def test_selective_recompute_loss_matches_single_process(two_rank_layouts):
    assert_matches_single_process(two_rank_layouts["pp2_selective"])


def test_full_recompute_of_first_layer_per_stage_loss_matches_single_process(two_rank_layouts):
    assert_matches_single_process(two_rank_layouts["pp2_full_of_first_layer"])


# ---------------------------------------------------------------- the Llama family


def test_llama_dp2_ddp_matches_single_process_and_loss_falls(two_rank_layouts):
    assert_llama_matches_and_falls(two_rank_layouts["llama_dp2_ddp"])


def test_llama_dp2_zero2_fsdp2_selective_recompute_matches_single_process_and_loss_falls(two_rank_layouts):
    assert_llama_matches_and_falls(two_rank_layouts["llama_dp2_zero2_selective"])


def test_llama_pp2_uneven_full_recompute_matches_single_process_and_loss_falls(two_rank_layouts):
    assert_llama_matches_and_falls(two_rank_layouts["llama_pp2_uneven_full_of_one"])


def test_llama_interleaved_pp2_v2_matches_single_process_and_loss_falls(two_rank_layouts):
    assert_llama_matches_and_falls(two_rank_layouts["llama_interleaved_pp2_v2"])


# ------------------------------------------------- cp, tensor parallelism, ZeRO stages and compile (llama-test, 3 steps)
#
# Each block of layouts shares one spawn of its ranks (planfiles.run_layouts), so the processes start once, and
# trains a global batch of 4 sequences for 3 steps on the 5-step learning-rate schedule, against one process
# doing the same (short_reference).

SHORT_STEPS = 3
SHORT_FLAGS = ("--lr-decay-steps", str(LLAMA_STEPS))
LLAMA = {"model": "llama-test"}
# The layouts of the tests above: test-tiny for PARITY_STEPS, llama-test for LLAMA_STEPS, with launch's defaults.
GPT_RUN = {"steps": PARITY_STEPS, "flags": ()}
LLAMA_RUN = {**LLAMA, "steps": LLAMA_STEPS, "flags": ()}
TWO_RANK_PARITY = {
    "tp2": {**GPT_RUN, "tp": 2, "micro_batch": 4, "num_microbatches": 2},
    "dp2_ddp": {**GPT_RUN, "dp": 2, "num_microbatches": 2},
    "dp2_zero3": {**GPT_RUN, "dp": 2, "num_microbatches": 2, "zero": 3},
    "pp2_uneven": {**GPT_RUN, "pp": 2, "layers": [[0, 1], [1, 4]]},
    "pp2_gpipe": {**GPT_RUN, "pp": 2, "schedule": "gpipe", "layers": [[0, 3], [3, 4]]},
    "interleaved_pp2_v2": {**GPT_RUN, "pp": 2, "virtual_stages": 2, "schedule": "interleaved",
                           "layers": [[0, 1], [1, 2], [2, 3], [3, 4]]},
    "pp2_selective": {**GPT_RUN, "pp": 2, "recompute": "selective"},
    "pp2_full_of_first_layer": {**GPT_RUN, "pp": 2, "recompute": "full", "recompute_layers": 1, "layers": [[0, 3], [3, 4]]},
    # llama-test: every recompute policy spread over the layouts.
    "llama_dp2_ddp": {**LLAMA_RUN, "dp": 2, "num_microbatches": 2},
    "llama_dp2_zero2_selective": {**LLAMA_RUN, "dp": 2, "num_microbatches": 2, "zero": 2, "recompute": "selective"},
    "llama_pp2_uneven_full_of_one": {**LLAMA_RUN, "pp": 2, "layers": [[0, 3], [3, 8]], "recompute": "full", "recompute_layers": 1},
    "llama_interleaved_pp2_v2": {**LLAMA_RUN, "pp": 2, "virtual_stages": 2, "schedule": "interleaved"},
}
FOUR_RANK_PARITY = {
    "tp2_pp2_sp": {**GPT_RUN, "tp": 2, "pp": 2, "sequence_parallel": True},
    "tp2_dp2": {**GPT_RUN, "tp": 2, "dp": 2, "micro_batch": 4, "num_microbatches": 1},
    "pp2_dp2": {**GPT_RUN, "pp": 2, "dp": 2, "num_microbatches": 2},
}


@pytest.fixture(scope="module")
def short_reference(tmp_path_factory):
    return run_layout(tmp_path_factory.mktemp("ref"), steps=SHORT_STEPS, extra=SHORT_FLAGS, model="llama-test",
                      micro_batch=1, num_microbatches=4)


@pytest.fixture(scope="module")
def short_tied_reference(tmp_path_factory):
    return run_layout(tmp_path_factory.mktemp("ref"), steps=SHORT_STEPS, extra=SHORT_FLAGS, model="llama-test-tied",
                      micro_batch=1, num_microbatches=4)


def assert_prefix_matches_and_falls(result: dict, expected: dict) -> None:
    for key in ("losses", "grad_norms"):
        diff = max_relative_difference(result[key], expected[key])
        print(f"{key}: max relative difference {diff:.1e}: {[round(v, 4) for v in result[key]]}")
        assert diff <= TOLERANCE, f"{key} {result[key]} vs single process {expected[key]}: {diff:.2e}"
    losses = result["losses"]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.5, losses


@pytest.fixture(scope="module")
def four_rank_layouts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("four")
    one_each = {"micro_batch": 1, "num_microbatches": 1}
    zero1_tp = {**LLAMA, "tp": 2, "dp": 2, "zero": 1, "micro_batch": 1, "num_microbatches": 2}
    resume = ("--checkpoint-dir", tmp / "ckpt", *SHORT_FLAGS)
    return run_layouts(tmp, {
        "cp2_tp2": {**LLAMA, "cp": 2, "tp": 2, "micro_batch": 2, "num_microbatches": 2, "sequence_parallel": True},
        "cp2_pp2": {**LLAMA, "cp": 2, "pp": 2, "micro_batch": 1, "num_microbatches": 4},
        "dp4_zero1": {**LLAMA, "dp": 4, "zero": 1, **one_each},
        "dp4_zero2": {**LLAMA, "dp": 4, "zero": 2, **one_each},
        "dp4_zero3": {**LLAMA, "dp": 4, "zero": 3, **one_each},
        "dp4_zero3_a_step_more": {**LLAMA, "dp": 4, "zero": 3, **one_each, "steps": SHORT_STEPS + 1},
        "tp2_dp2_zero3": {**LLAMA, "tp": 2, "dp": 2, "zero": 3, "micro_batch": 1, "num_microbatches": 2},
        "tp2_dp2_zero1": zero1_tp,
        # The same, stopped after a step with a checkpoint, then resumed from it.
        "tp2_dp2_zero1_first": {**zero1_tp, "steps": 1, "flags": resume},
        "tp2_dp2_zero1_resumed": {**zero1_tp, "flags": resume},
        "pp2_dp2_zero2": {**LLAMA, "pp": 2, "dp": 2, "zero": 2, "micro_batch": 1, "num_microbatches": 2},
        "llama_tp2_pp2_sp_selective": {**LLAMA, "tp": 2, "pp": 2, "sequence_parallel": True, "recompute": "selective",
                                       "micro_batch": 1, "num_microbatches": 4},
        **FOUR_RANK_PARITY,
    }, SHORT_STEPS, SHORT_FLAGS)


@pytest.fixture(scope="module")
def two_rank_layouts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    # test-tiny's 1-D weights (biases, norms) all go to rank 1 of 2 under zero 1: rank 0 owns none of that group.
    # The decay is pinned so that the 2-step run follows the 4-step one's learning-rate schedule.
    zero1 = {**GPT_RUN, "dp": 2, "num_microbatches": 2, "zero": 1, "flags": ("--lr-decay-steps", str(PARITY_STEPS))}
    resume = (*zero1["flags"], "--checkpoint-dir", tmp / "ckpt")
    return run_layouts(tmp, {
        **TWO_RANK_PARITY,
        "dp2_zero1": zero1,
        # The same, stopped after 2 steps with a checkpoint, then resumed from it.
        "dp2_zero1_first": {**zero1, "steps": 2, "flags": resume},
        "dp2_zero1_resumed": {**zero1, "flags": resume},
        "cp2": {**LLAMA, "cp": 2, "micro_batch": 1, "num_microbatches": 4},
        "llama_tp2_full": {**LLAMA, "tp": 2, "micro_batch": 4, "num_microbatches": 1, "recompute": "full"},
        "llama_tied_tp2": {**LLAMA, "model": "llama-test-tied", "tp": 2, "micro_batch": 2, "num_microbatches": 2},
        # GPT's learned position table must follow the chunks too (Embedding takes the positions).
        "gpt_cp2": {**GPT_RUN, "cp": 2},
        # compile of every block, inside FSDP2's zero 3 units and around selective recomputation's checkpoint.
        "compile_dp2_zero3_selective": {**LLAMA, "compile": True, "dp": 2, "zero": 3, "micro_batch": 1,
                                        "num_microbatches": 2, "recompute": "selective"},
    }, SHORT_STEPS, SHORT_FLAGS)


def test_cp2_loss_matches_single_process(two_rank_layouts, short_reference):
    assert_prefix_matches_and_falls(two_rank_layouts["cp2"], short_reference)


def test_gpt_cp2_learned_positions_loss_matches_single_process(two_rank_layouts):
    assert_matches_single_process(two_rank_layouts["gpt_cp2"])


def test_cp2_tp2_loss_matches_single_process(four_rank_layouts, short_reference):
    # Sequence parallelism on top: each rank holds T/cp tokens, cut again over tp between the blocks.
    assert_prefix_matches_and_falls(four_rank_layouts["cp2_tp2"], short_reference)


def test_cp2_pp2_loss_matches_single_process(four_rank_layouts, short_reference):
    assert_prefix_matches_and_falls(four_rank_layouts["cp2_pp2"], short_reference)


def test_dp4_zero1_loss_matches_single_process_with_the_optimizer_state_sharded(four_rank_layouts, short_reference):
    result = four_rank_layouts["dp4_zero1"]
    assert_prefix_matches_and_falls(result, short_reference)
    state = [b["optimizer_state"] for b in result["memory_breakdown_bytes"]]
    weights = result["memory_breakdown_bytes"][0]["parameters"]
    # AdamW's two moments of every weight, split over the 4 replicas (whole tensors each: not exactly a quarter).
    assert sum(state) >= 2 * weights and max(state) < 0.3 * 2 * weights, state
    assert all(b["gradients"] == weights for b in result["memory_breakdown_bytes"])  # gradients stay whole


def test_dp4_zero2_loss_matches_single_process_with_gradients_sharded_and_weights_gathered(four_rank_layouts, short_reference):
    result = four_rank_layouts["dp4_zero2"]
    assert_prefix_matches_and_falls(result, short_reference)
    for b in result["memory_breakdown_bytes"]:
        # Never whole gradients: at most this rank's quarter (FSDP2's shards; none yet at a peak inside the backward).
        assert b["gradients"] <= b["parameters"]
        assert b["gathered_weights"] == pytest.approx(4 * b["parameters"], rel=1e-3)  # the whole model, kept gathered


def test_dp4_zero3_loss_matches_single_process_with_weights_gathered_a_block_at_a_time(four_rank_layouts, short_reference):
    result = four_rank_layouts["dp4_zero3"]
    assert_prefix_matches_and_falls(result, short_reference)
    for b in result["memory_breakdown_bytes"]:
        assert b["gradients"] <= b["parameters"]
        assert 0 < b["gathered_weights"] < 0.5 * 4 * b["parameters"]


def test_memory_counted_in_the_third_and_the_fourth_step_is_the_same(four_rank_layouts):
    # runtime.launch counts the last step: from the third on it is the steady state, whatever ran before in the
    # process (here, four other layouts). The transient part may differ by one FSDP2 all-gather buffer (a block's
    # fp32 weights: a gloo worker can drop the last reference to it a moment after the training thread does) and a
    # few scalars. With llama-test the buffer is 6% of the transient bytes: seen once, exactly 705,536 bytes.
    from planner.memory import layer_param_count
    from planner.specs import model_from_dict

    buffer = 4 * layer_param_count(model_from_dict(LLAMA_TEST, "test"), 1)
    third, fourth = (four_rank_layouts[k]["memory_breakdown_bytes"] for k in ("dp4_zero3", "dp4_zero3_a_step_more"))
    for a, b in zip(third, fourth):
        assert all(a[k] == b[k] for k in ("parameters", "gradients", "optimizer_state", "gathered_weights")), (a, b)
        assert abs(a["activations_and_transient"] - b["activations_and_transient"]) <= buffer + 1024, (a, b)


def test_tp2_dp2_zero3_loss_matches_single_process(four_rank_layouts, short_reference):
    # FSDP2's dim of a TP-sharded weight is a _StridedShard: the gradient norm must count it as a shard.
    assert_prefix_matches_and_falls(four_rank_layouts["tp2_dp2_zero3"], short_reference)


def test_tp2_dp2_zero1_loss_matches_single_process_with_dtensor_optimizer_state_sharded(four_rank_layouts, short_reference):
    # DTensor weights, which ZeroRedundancyOptimizer cannot broadcast: runtime.parallel.optimizer.ShardedOptimizer.
    result = four_rank_layouts["tp2_dp2_zero1"]
    assert_prefix_matches_and_falls(result, short_reference)
    for b in result["memory_breakdown_bytes"]:
        assert b["optimizer_state"] < 0.75 * 2 * b["parameters"]  # this rank's share of its tp shard's state


def test_dp2_zero1_loss_matches_single_process_with_a_rank_owning_no_1d_weight(two_rank_layouts):
    assert_matches_single_process(two_rank_layouts["dp2_zero1"])


def test_dp2_zero1_resumes_exactly_when_a_rank_owns_no_weight_of_a_param_group(two_rank_layouts):
    # DCP's flattened optimizer state names a param group by its first weight: an empty group on rank 0
    # (torch's ZeroRedundancyOptimizer keeps one) made the resumed run fail to load (IndexError).
    first, resumed = (two_rank_layouts[k]["losses"] for k in ("dp2_zero1_first", "dp2_zero1_resumed"))
    assert len(first) == 2 and first + resumed == two_rank_layouts["dp2_zero1"]["losses"]


def test_tp2_dp2_zero1_resumes_exactly_with_each_ranks_own_optimizer_state(four_rank_layouts):
    # Each rank saves the state of the weights it owns, and the resumed run steps on with the learning-rate
    # schedule, not the one the checkpoint recorded (the third step's loss is the first that shows it).
    first, resumed = (four_rank_layouts[k]["losses"] for k in ("tp2_dp2_zero1_first", "tp2_dp2_zero1_resumed"))
    assert first + resumed == four_rank_layouts["tp2_dp2_zero1"]["losses"]


def test_pp2_dp2_zero2_reduce_scatters_after_every_microbatch_and_matches_single_process(four_rank_layouts, short_reference):
    result = four_rank_layouts["pp2_dp2_zero2"]
    assert_prefix_matches_and_falls(result, short_reference)
    # Each rank's stage is 5 FSDP2 groups (4 blocks and the rest), 2 microbatches a step, 3 steps: gradients are
    # reduce-scattered after every microbatch's backward (the first step's shape inference reduces nothing).
    assert result["reduce_scatters"] == [5 * 2 * SHORT_STEPS] * 4, result["reduce_scatters"]


def test_compile_under_fsdp2_and_selective_recompute_loss_matches_single_process(two_rank_layouts, short_reference):
    result = two_rank_layouts["compile_dp2_zero3_selective"]
    assert_prefix_matches_and_falls(result, short_reference)
    assert all(n >= 1 for n in result["compiled_graphs"]), result["compiled_graphs"]


def test_llama_tp2_pp2_sequence_parallel_selective_recompute_matches_single_process_and_loss_falls(four_rank_layouts, short_reference):
    assert_prefix_matches_and_falls(four_rank_layouts["llama_tp2_pp2_sp_selective"], short_reference)


def test_llama_tp2_full_recompute_matches_single_process_and_loss_falls(two_rank_layouts, short_reference):
    assert_prefix_matches_and_falls(two_rank_layouts["llama_tp2_full"], short_reference)


def test_llama_tied_embeddings_under_tp2_match_single_process_and_loss_falls(two_rank_layouts, short_tied_reference):
    # The vocab-parallel embedding and the column-parallel head share one DTensor (GPT.tie_weights after apply_tp).
    assert_prefix_matches_and_falls(two_rank_layouts["llama_tied_tp2"], short_tied_reference)
