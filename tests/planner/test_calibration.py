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


def test_mt_nlg_deepspeed_runs_are_predicted_too_fast_by_at_most_25_percent(rows):
    # The known weakness: the published MT-NLG iterations imply ~6 s per iteration of fixed
    # DeepSpeed overhead and a ~10% slower microbatch than Megatron-LM's own pipeline, which the
    # model has no term for. This pins how far off it is, so a change that worsens it shows.
    errs = [r.error_pct for r in rows if r.source.startswith("smith")]
    assert all(0 < e <= 25 for e in errs)


def test_every_calibration_plan_fits_in_memory(rows):
    assert all(r.plan.prediction.fits for r in rows)
