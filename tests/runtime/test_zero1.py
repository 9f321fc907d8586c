"""runtime.parallel.optimizer.ShardedOptimizer (zero 1) where a replica owns no parameter."""

from tests.conftest import run_on_ranks

from tests.runtime.zero1_ranks import step_a_chunk_with_fewer_parameters_than_replicas


def test_zero1_over_more_replicas_than_parameters_steps_and_resumes_like_adamw_on_every_replica(tmp_path):
    # One weight, two replicas: replica 0 owns and updates it, replica 1 holds no state and receives it; a
    # checkpoint in between (replica 1 saves no optimizer state) resumes to the same weights as uninterrupted AdamW.
    got = run_on_ranks(step_a_chunk_with_fewer_parameters_than_replicas, 2, 3, str(tmp_path / "ckpt"))
    assert [g["resumed_at"] for g in got] == [3, 3]
    assert [g["owned_optimizers"] for g in got] == [1, 0]
    assert [g["groups"] for g in got] == [1, 0]  # the learning-rate schedule sets what each replica steps
    for g in got:
        assert (g["weight"] == g["reference"]).all()
    # launch warns where a replica's share of the state is far above the even one the plan's memory prices.
    assert all(g["quiet"] is None for g in got)
    assert all("0.00 GiB above the even share" in g["loud"] for g in got)
