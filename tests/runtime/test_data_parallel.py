"""runtime/parallel/data.py wraps each chunk as planner/zero.py's gradient_reducer says, the function the planner
prices the reduction's overlap and the gradients' memory from."""

from planner.zero import gradient_reducer
from tests.conftest import run_on_ranks
from tests.runtime.data_parallel_ranks import wrappers


def test_each_chunk_is_wrapped_as_the_planner_prices_its_gradient_reduction():
    got = run_on_ranks(wrappers, 2)
    expected = {}
    for zero in range(4):
        for tp in (1, 2):
            for pipelined in (False, True):
                reducer = gradient_reducer(zero=zero, replicas=2, tp=tp, pipelined=pipelined)
                expected[f"{zero} {tp} {pipelined}"] = {"by hand": "unwrapped"}.get(reducer, reducer)
    assert got == [expected, expected]
    assert sorted(set(expected.values())) == ["ddp", "fsdp2", "unwrapped"]
