"""The search: every candidate is a result, pins hold, the winner fits, and it finds uneven splits."""

from planner.search import search
from planner.specs import load_cluster, load_device, load_model

A100 = load_device("a100-sxm4-80gb")


def test_search_ranks_fitting_plans_and_keeps_every_candidate():
    r = search(load_model("gpt3-175b"), load_cluster("dgx-a100-80gb", nodes=64), A100, 1536, top=3)
    assert r.searched == len(r.candidates) > 1000
    assert all(p.prediction.fits for p in r.plans)
    times = [p.prediction.iteration_s for p in r.plans]
    assert times == sorted(times)
    assert all(c.fits or c.reason for c in r.candidates)
    assert any(c.exact for c in r.candidates)


def test_pins_hold_for_every_candidate():
    r = search(load_model("gpt3-13b"), load_cluster("dgx-a100-80gb", nodes=4), A100, 256, {"tp": 4, "recompute": "full"})
    assert {c.knobs.tp for c in r.candidates} == {4} and {c.knobs.recompute for c in r.candidates} == {"full"}


def test_nothing_fits_gives_reasons_not_an_exception():
    r = search(load_model("gpt3-175b"), load_cluster("dgx-a100-80gb", nodes=1), A100, 8)
    assert r.plans and not any(p.prediction.fits for p in r.plans)
    assert all("GiB over" in p.prediction.reason for p in r.plans)


def test_the_ilp_splits_unevenly_when_the_head_is_heavy():
    # gpt3-350m on 8 devices with pp pinned: the 51,200-word head is worth several blocks.
    r = search(load_model("gpt3-350m"), load_cluster("dgx-a100-80gb", nodes=1), A100, 64, {"tp": 1, "pp": 4, "schedule": "1f1b"})
    counts = [s.layers[1] - s.layers[0] for s in r.plans[0].stages]
    assert sum(counts) == 24 and counts[-1] < max(counts)
