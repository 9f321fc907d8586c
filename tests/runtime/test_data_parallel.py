"""The planner prices the gradient reduction's overlap exactly where runtime/parallel/data.py keeps DDP or FSDP2."""

import itertools

from planner.frameworks import MESHPLAN
from planner.plan import Knobs
from runtime.parallel.data import reduces_by_hand


def test_the_planner_overlaps_the_reduction_exactly_where_the_runtime_does_not_reduce_by_hand():
    # Every zero stage and tp, pp, cp in {1, 2} over 2 data-parallel replicas (the replicas mesh is dp * cp ranks).
    for zero, tp, pp, cp in itertools.product(range(4), (1, 2), (1, 2), (1, 2)):
        knobs = Knobs(tp, pp, 2, 1, zero=zero, cp=cp)
        by_hand = reduces_by_hand(zero=zero, replicas=2 * cp, tp=tp, pipelined=pp > 1)
        assert MESHPLAN.overlaps_dp(knobs) == (not by_hand), (zero, tp, pp, cp)

