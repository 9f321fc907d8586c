"""Agreement with the record: every published Megatron-LM run predicted from its configuration."""

import pytest

from planner.calibration import calibrate


@pytest.fixture(scope="module")
def rows():
    return calibrate()


def test_every_published_run_is_predicted(rows, capsys):
    assert len(rows) == 13
    with capsys.disabled():
        print()
        for r in rows:
            print(f"  {r.name:22s} published {r.published_tflops:5.0f}  predicted {r.predicted_tflops:6.1f} TFLOP/s/GPU  {r.error_pct:+5.1f}%  ({r.assumed})")


def test_narayanan_table1_within_3_percent_mean_and_5_percent_max(rows):
    errs = [abs(r.error_pct) for r in rows if r.source.startswith("narayanan")]
    assert sum(errs) / len(errs) <= 3.0
    assert max(errs) <= 5.0


def test_mt_nlg_deepspeed_runs_are_within_10_percent_at_280_and_350_nodes_and_15_at_420(rows):
    # planner/deepspeed.py prices what DeepSpeed's engine did (sends split over tp and re-gathered, bf16
    # gradients accumulated in fp32 every microbatch, ZeRO-1's fp32 all-reduce, the tied embedding's
    # reduction), each from DeepSpeed's code; nothing is fitted to these three runs, so these are also the
    # leave-one-out errors. Still too fast: about 5 s per iteration at all three sizes has no term yet.
    errs = {r.name: r.error_pct for r in rows if r.source.startswith("smith")}
    assert all(e > 0 for e in errs.values())
    assert errs["mt-nlg-530b-280nodes"] <= 10 and errs["mt-nlg-530b-350nodes"] <= 10 and errs["mt-nlg-530b-420nodes"] <= 15
    assert sum(errs.values()) / len(errs) <= 11.5


def test_every_calibration_plan_fits_in_memory(rows):
    assert all(r.plan.prediction.fits for r in rows)
