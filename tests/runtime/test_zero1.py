"""runtime.parallel.optimizer.ShardedOptimizer (zero 1): a flat partition, cut inside parameters."""

import pytest
import torch

from runtime.parallel.optimizer import ranges
from tests.conftest import run_on_ranks
from tests.runtime.zero1_ranks import (resume_and_step, resume_without_zero1, save_after_steps,
                                       step_chunks_against_adamw_with_a_checkpoint_between)


def test_ranges_cut_the_flattened_elements_evenly_whatever_the_parameters_sizes():
    assert ranges(27, 2) == [(0, 14), (14, 27)]
    assert ranges(1, 2) == [(0, 1), (1, 1)]
    assert ranges(10, 4) == [(0, 3), (3, 6), (6, 9), (9, 10)]


def test_zero1_steps_and_resumes_like_adamw_with_ranges_cut_inside_parameters(tmp_path):
    # TwoLinears: replica 0's matrix range (14 of 27 elements) spans both weights, replica 1's lies inside one;
    # OneNumber: replica 1 owns nothing, holds no optimizer and only receives. A checkpoint between the steps
    # resumes to the weights uninterrupted AdamW reaches on every replica.
    got = run_on_ranks(step_chunks_against_adamw_with_a_checkpoint_between, 2, 3, str(tmp_path / "ckpt"))
    assert [g["resumed_at"] for g in got] == [3, 3]
    # Per replica, [TwoLinears, OneNumber]: 27 matrix elements cut 14 / 13 and 6 vector elements 3 / 3, where whole
    # parameters could do no better than 15 / 12 and 5 / 1; OneNumber's one element to replica 0.
    assert [g["state_elements"] for g in got] == [[17, 1], [16, 0]]
    assert [g["optimizers"] for g in got] == [[1, 1], [1, 0]]
    assert [g["groups"] for g in got] == [[2, 1], [2, 0]]  # the learning-rate schedule sets what each replica steps
    _assert_every_rank_has_the_reference_weights(got)


@pytest.mark.parametrize("saved, resumed", [(2, 3), (1, 2)])
def test_zero1_checkpoint_resumes_at_another_dp_to_the_weights_of_an_uninterrupted_run(tmp_path, saved, resumed):
    # Each bucket's state is one DTensor sharded over the replicas, whose Shard(0) chunks are the partition's
    # ranges, so DCP re-cuts it: 14 / 13 matrix elements saved by 2 replicas, 9 / 9 / 9 loaded by 3. One replica
    # under zero 1 saves the same form.
    run_on_ranks(save_after_steps, saved, 3, str(tmp_path / "ckpt"))
    got = run_on_ranks(resume_and_step, resumed, 3, str(tmp_path / "ckpt"))
    assert [g["resumed_at"] for g in got] == [3] * resumed
    _assert_every_rank_has_the_reference_weights(got)


def test_resuming_a_zero1_checkpoint_without_zero1_is_refused_on_every_rank_before_loading(tmp_path):
    run_on_ranks(save_after_steps, 2, 1, str(tmp_path / "ckpt"))
    got = run_on_ranks(resume_without_zero1, 2, 1, str(tmp_path / "ckpt"))
    for message in got:
        assert "was written by another layout than this plan's: it has no optim.stage0.state.a.weight." in message
        assert "dp may differ" in message and "changed" not in message


def _assert_every_rank_has_the_reference_weights(got: list[dict]) -> None:
    # To float32's last bits, not exactly: fused AdamW runs a tensor's elements through a vector path and its tail
    # through a scalar one, which may round differently, so a range cut inside a parameter can move an element by an
    # ulp (1.9e-9 once, on a 5-element bias cut 2 / 2 / 1). Wrong state (a moment or a step count not loaded) moves them by
    # 3e-3 to 5e-3 here.
    for g in got:
        for w, ref in zip(g["weights"], g["reference"]):
            torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-8)


def test_adamw_gives_each_mesh_and_the_plain_tensors_a_group_of_their_own():
    # The fused kernel takes one kind of tensor per list: torch before 2.9 refuses a step over DTensors of two
    # meshes (a GPT's position table and norms on the dp mesh beside its weights on dp x tp, under FSDP2 with tp).
    from tests.runtime.zero1_ranks import adamw_groups_of_mixed_tensors

    assert run_on_ranks(adamw_groups_of_mixed_tensors, 1) == [[["DTensor2"], ["DTensor1"], ["Parameter"]]]
