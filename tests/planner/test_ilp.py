"""The layer split: the direct solver reaches the integer program's optimum (brute force, and CBC on random
instances), splits unevenly where that pays, and recomputes only what memory forces."""

import itertools
import random

import pytest

from planner.ilp import DeviceTerms, assign_layers_cbc, optimum_s, solve_split, split_chunks


def terms(p, fixed_first=0.0, fixed_last=0.0, layer_s=1.0, recompute_s=0.3, act=1.0, full_act=0.1, state=1.0, working=0.0):
    return [DeviceTerms(fixed_first * (i == 0) + fixed_last * (i == p - 1), layer_s, recompute_s, p - i, act, full_act, 0.0, state,
                        working_bytes=working) for i in range(p)]


def brute_force(n_layers, ts, cap, allow, min_layers=1):
    best = None
    for ns in itertools.product(range(min_layers, n_layers + 1), repeat=len(ts)):
        if sum(ns) != n_layers:
            continue
        for rs in itertools.product(*[range(0, (n if allow else 0) + 1) for n in ns]):
            if any(t.memory_bytes(n, r) > cap for t, n, r in zip(ts, ns, rs)):
                continue
            T = max(t.time_s(n, r) for t, n, r in zip(ts, ns, rs))
            best = T if best is None else min(best, T)
    return best


@pytest.mark.parametrize("cap", [40.0, 20.0, 12.0])
@pytest.mark.parametrize("working", [0.0, 3.0])
def test_direct_solver_matches_brute_force_on_small_instances(cap, working):
    ts = terms(3, fixed_first=0.5, fixed_last=1.5, working=working)
    a = solve_split(9, ts, cap, allow_recompute=True)
    want = brute_force(9, ts, cap, True)
    assert (a is None) == (want is None)
    if a is not None:
        assert a.slowest_s == pytest.approx(want, abs=1e-9)
        assert sum(a.layers) == 9 and all(t.memory_bytes(n, r) <= cap for t, n, r in zip(ts, a.layers, a.recomputed))


def test_direct_solver_reaches_cbcs_optimum_on_random_instances():
    rng = random.Random(7)
    for _ in range(40):
        p = rng.randint(1, 6)
        L = rng.randint(p, 24)
        ts = [DeviceTerms(rng.uniform(0, 3) * (i in (0, p - 1)), rng.uniform(0.5, 2), rng.uniform(0.1, 1), rng.randint(1, p + 2),
                          rng.uniform(0.5, 2), rng.uniform(0.01, 0.4), rng.uniform(0, 5), rng.uniform(0.1, 1),
                          transient_bytes=rng.uniform(0, 3) * (i == p - 1), working_bytes=rng.uniform(0, 4)) for i in range(p)]
        cap = rng.uniform(5, 40)
        allow = rng.random() < 0.7
        lo = rng.choice([1, 1, 2]) if L >= 2 * p else 1
        mine, cbc = solve_split(L, ts, cap, allow, lo), assign_layers_cbc(L, ts, cap, allow, lo)
        assert (mine is None) == (cbc is None)
        if mine is not None:
            assert mine.slowest_s == pytest.approx(cbc.slowest_s, rel=1e-7)
            assert min(mine.layers) >= lo and sum(mine.layers) == L


def test_a_heavy_head_gets_fewer_blocks_on_the_last_stage():
    a = solve_split(24, terms(4, fixed_last=3.0), 1e9, allow_recompute=False)
    assert a.layers[-1] < a.layers[1]
    assert sum(a.layers) == 24


def test_no_recomputation_when_memory_does_not_force_it():
    a = solve_split(16, terms(4), 1e9, allow_recompute=True)
    assert sum(a.recomputed) == 0 and a.layers == (4, 4, 4, 4)


def test_memory_pressure_recomputes_on_the_first_devices_that_hold_the_most_microbatches():
    # Device 0 holds 4 microbatches: 4 blocks x (1 state + 4 x 1.0 act) = 20 > 12 without recomputation.
    a = solve_split(16, terms(4), 12.0, allow_recompute=True)
    assert a is not None and a.recomputed[0] > 0 and a.recomputed[-1] == 0


def test_recomputing_brings_the_rerun_blocks_working_set():
    # One device, 4 blocks: 4 x (1 state + 1 act) = 8 bytes. Recomputing one saves 0.9 but adds the re-run
    # block's working set: without one, 7.9 bytes fit with a block recomputed; with a working set of 5, nothing does.
    light = [DeviceTerms(0, 1, 0.3, 1, 1.0, 0.1, 0, 1)]
    heavy = [DeviceTerms(0, 1, 0.3, 1, 1.0, 0.1, 0, 1, working_bytes=5.0)]
    assert solve_split(4, heavy, 8.0, True).recomputed == (0,)
    assert solve_split(4, light, 7.9, True).recomputed == (1,)
    assert solve_split(4, heavy, 7.9, True) is None


def test_nothing_fits_returns_none():
    assert solve_split(16, terms(4), 0.5, allow_recompute=True) is None
    assert optimum_s(16, terms(4), 0.5, True) is None


def test_split_chunks_deals_blocks_evenly_and_recompute_to_early_chunks():
    assert split_chunks(7, 3, 2) == [(3, 3), (4, 0)]
    assert sum(n for n, _ in split_chunks(10, 0, 4)) == 10


def test_the_device_holding_the_head_keeps_its_extra_blocks_off_its_last_chunk():
    from planner.ilp import Assignment
    from planner.search import stages_from_assignment

    assert split_chunks(7, 0, 4) == [(1, 0), (2, 0), (2, 0), (2, 0)]  # the first chunk of device 0 holds the embedding
    assert split_chunks(7, 0, 4, holds_head=True) == [(2, 0), (2, 0), (2, 0), (1, 0)]
    assert split_chunks(7, 2, 4, holds_head=True) == [(2, 2), (2, 0), (2, 0), (1, 0)]
    # 126 blocks on pp 16 x v 4 (Llama 3 405B): the two one-block chunks are the embedding's and the head's
    stages = stages_from_assignment(Assignment((7,) + (8,) * 14 + (7,), (0,) * 16, 0.0), 4, "none")
    counts = [s.layers[1] - s.layers[0] for s in stages]
    assert counts[0] == counts[-1] == 1 and set(counts[1:-1]) == {2} and stages[-1].head


def test_a_split_must_also_fit_while_the_optimizer_steps():
    # Activations and state fit 4 blocks on the first device (2 in flight: 3 bytes a block) and 6 on the second
    # (2 a block), 10 in all; the step's state (3 bytes a block, no activations) fits only 4 on either device of
    # 12: 8 blocks go 4 and 4, and 9, which would fit without the step, do not fit at all.
    ts = [t._replace(layer_step_bytes=3.0) for t in terms(2, act=1.0, full_act=1.0, state=1.0)]
    a = solve_split(8, ts, 12.0, allow_recompute=True)
    assert a is not None and a.layers == (4, 4)
    assert solve_split(9, ts, 12.0, allow_recompute=True) is None
    assert assign_layers_cbc(9, ts, 12.0, allow_recompute=True) is None
