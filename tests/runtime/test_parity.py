"""Given a seed, every parallel layout computes the losses and gradient norms one process computes (fp32, relative
difference <= 1e-4), for the same global batch of 8 sequences, in both model families: test-tiny (GPT) and
llama-tiny (GQA, SwiGLU, RMSNorm, RoPE, no biases). The gradient norm is the whole model's, before clipping at 1.0,
so equal norms show it is taken over every stage and shard. Each test spawns its layout's gloo ranks on CPU once.

llama-tiny covers every layout of the issue with every recompute policy spread over them (tp2 x pp2 selective,
tp2 full, dp2 DDP none, FSDP2 selective, pp2 uneven full-of-one, interleaved none), and its loss falls in each."""

from __future__ import annotations

import pytest

from tests.runtime.planfiles import LLAMA_STEPS, PARITY_STEPS, max_relative_difference, reference, reference_losses, run_layout

TOLERANCE = 1e-4


def assert_matches_single_process(result: dict, model: str = "test-tiny") -> None:
    expected = reference(model)
    steps = LLAMA_STEPS if model.startswith("llama") else PARITY_STEPS
    assert len(result["losses"]) == steps
    for key in ("losses", "grad_norms"):
        diff = max_relative_difference(result[key], expected[key])
        print(f"{model} {key}: max relative difference {diff:.1e} over {steps} steps: {[round(v, 4) for v in result[key]]}")
        assert diff <= TOLERANCE, f"{key} {result[key]} vs single process {expected[key]}: relative difference {diff:.2e}"


def assert_llama_matches_and_falls(result: dict, model: str = "llama-tiny") -> None:
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


def test_tp2_pp2_loss_matches_single_process(tmp_path):
    # Sequence parallelism on, so the stage boundary carries the sequence shard (B, T/tp, h).
    assert_matches_single_process(run_layout(tmp_path, tp=2, pp=2, sequence_parallel=True))


def test_tp2_loss_matches_single_process(tmp_path):
    assert_matches_single_process(run_layout(tmp_path, tp=2, micro_batch=4, num_microbatches=2))


def test_dp2_ddp_loss_matches_single_process(tmp_path):
    assert_matches_single_process(run_layout(tmp_path, dp=2, num_microbatches=2))


def test_tp2_dp2_loss_matches_single_process(tmp_path):
    # DP gradients averaged by hand under TP (runtime.parallel.data.all_reduce_gradients).
    assert_matches_single_process(run_layout(tmp_path, tp=2, dp=2, micro_batch=4, num_microbatches=1))


def test_pp2_dp2_loss_matches_single_process(tmp_path):
    # DP gradients averaged by hand under pipelining too.
    assert_matches_single_process(run_layout(tmp_path, pp=2, dp=2, num_microbatches=2))


def test_dp2_zero3_fsdp2_loss_matches_single_process(tmp_path):
    assert_matches_single_process(run_layout(tmp_path, dp=2, num_microbatches=2, zero=3))


def test_pp2_uneven_stages_loss_matches_single_process(tmp_path):
    result = run_layout(tmp_path, pp=2, layers=[[0, 1], [1, 4]])
    assert_matches_single_process(result)
    assert set(result["stage_timings"]) == {"stage0", "stage1"}


def test_pp2_gpipe_loss_matches_single_process(tmp_path):
    assert_matches_single_process(run_layout(tmp_path, pp=2, schedule="gpipe", layers=[[0, 3], [3, 4]]))


def test_interleaved_pp2_v2_loss_matches_single_process(tmp_path):
    result = run_layout(tmp_path, pp=2, virtual_stages=2, schedule="interleaved", layers=[[0, 1], [1, 2], [2, 3], [3, 4]])
    assert_matches_single_process(result)
    assert set(result["stage_timings"]) == {"stage0", "stage1", "stage2", "stage3"}


def test_selective_recompute_loss_matches_single_process(tmp_path):
    assert_matches_single_process(run_layout(tmp_path, pp=2, recompute="selective"))


def test_full_recompute_of_first_layer_per_stage_loss_matches_single_process(tmp_path):
    assert_matches_single_process(run_layout(tmp_path, pp=2, recompute="full", recompute_layers=1, layers=[[0, 3], [3, 4]]))


# ---------------------------------------------------------------- llama-tiny


def test_llama_tp2_pp2_sequence_parallel_selective_recompute_matches_single_process_and_loss_falls(tmp_path):
    assert_llama_matches_and_falls(run_layout(tmp_path, model="llama-tiny", tp=2, pp=2, sequence_parallel=True, recompute="selective"))


def test_llama_tp2_full_recompute_matches_single_process_and_loss_falls(tmp_path):
    assert_llama_matches_and_falls(run_layout(tmp_path, model="llama-tiny", tp=2, micro_batch=4, num_microbatches=2, recompute="full"))


def test_llama_dp2_ddp_matches_single_process_and_loss_falls(tmp_path):
    assert_llama_matches_and_falls(run_layout(tmp_path, model="llama-tiny", dp=2, num_microbatches=2))


def test_llama_dp2_zero2_fsdp2_selective_recompute_matches_single_process_and_loss_falls(tmp_path):
    assert_llama_matches_and_falls(run_layout(tmp_path, model="llama-tiny", dp=2, num_microbatches=2, zero=2,
                                              recompute="selective"))


def test_llama_pp2_uneven_full_recompute_matches_single_process_and_loss_falls(tmp_path):
    assert_llama_matches_and_falls(run_layout(tmp_path, model="llama-tiny", pp=2, layers=[[0, 3], [3, 8]], recompute="full",
                                              recompute_layers=1))


def test_llama_interleaved_pp2_v2_matches_single_process_and_loss_falls(tmp_path):
    assert_llama_matches_and_falls(run_layout(tmp_path, model="llama-tiny", pp=2, virtual_stages=2, schedule="interleaved"))


def test_llama_tied_embeddings_under_tp2_match_single_process_and_loss_falls(tmp_path):
    # The vocab-parallel embedding and the column-parallel head share one DTensor (GPT.tie_weights after apply_tp).
    assert_llama_matches_and_falls(run_layout(tmp_path, model="llama-tiny-tied", tp=2, micro_batch=4, num_microbatches=2),
                                   "llama-tiny-tied")
