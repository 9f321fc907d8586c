"""The layer-split ILP: optimal against brute force, uneven where that pays, recomputing only what memory forces."""

import itertools

import pytest

from planner.ilp import DeviceTerms, assign_layers, lower_bound_s, split_chunks


def terms(p, fixed_first=0.0, fixed_last=0.0, layer_s=1.0, recompute_s=0.3, act=1.0, full_act=0.1, state=1.0):
    return [DeviceTerms(fixed_first * (i == 0) + fixed_last * (i == p - 1), layer_s, recompute_s, p - i, act, full_act, 0.0, state)
            for i in range(p)]


def brute_force(n_layers, ts, cap, allow):
    best = None
    for ns in itertools.product(range(1, n_layers + 1), repeat=len(ts)):
        if sum(ns) != n_layers:
            continue
        for rs in itertools.product(*[range(0, (n if allow else 0) + 1) for n in ns]):
            if any(t.memory_bytes(n, r) > cap for t, n, r in zip(ts, ns, rs)):
                continue
            T = max(t.fixed_s + t.layer_s * n + t.recompute_s * r for t, n, r in zip(ts, ns, rs))
            best = T if best is None else min(best, T)
    return best


@pytest.mark.parametrize("cap", [40.0, 20.0, 12.0])
def test_ilp_matches_brute_force_on_small_instances(cap):
    ts = terms(3, fixed_first=0.5, fixed_last=1.5)
    a = assign_layers(9, ts, cap, allow_recompute=True)
    assert a is not None
    assert a.slowest_s == pytest.approx(brute_force(9, ts, cap, True), abs=1e-6)


def test_a_heavy_head_gets_fewer_blocks_on_the_last_stage():
    a = assign_layers(24, terms(4, fixed_last=3.0), 1e9, allow_recompute=False)
    assert a.layers[-1] < a.layers[1]
    assert sum(a.layers) == 24


def test_no_recomputation_when_memory_does_not_force_it():
    a = assign_layers(16, terms(4), 1e9, allow_recompute=True)
    assert sum(a.recomputed) == 0 and a.layers == (4, 4, 4, 4)


def test_memory_pressure_recomputes_on_the_first_devices_that_hold_the_most_microbatches():
    # Device 0 holds 4 microbatches: 4 blocks x (1 state + 4 x 1.0 act) = 20 > 12 without recomputation.
    a = assign_layers(16, terms(4), 12.0, allow_recompute=True)
    assert a is not None and a.recomputed[0] > 0 and a.recomputed[-1] == 0


def test_nothing_fits_returns_none():
    assert assign_layers(16, terms(4), 0.5, allow_recompute=True) is None
    assert lower_bound_s(16, terms(4), 0.5, True) is None


def test_split_chunks_deals_blocks_evenly_and_recompute_to_early_chunks():
    assert split_chunks(7, 3, 2) == [(3, 3), (4, 0)]
    assert sum(n for n, _ in split_chunks(10, 0, 4)) == 10
