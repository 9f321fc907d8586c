"""Agreement with the record: every published run predicted from its configuration, on its own device and
framework (the constants fitted by bench/fit_calibration.py; leave-one-out errors there and in the README)."""

import pytest

from planner.calibration import calibrate


@pytest.fixture(scope="module")
def rows():
    return calibrate()


def errors(rows, prefix):
    return [abs(r.error_pct) for r in rows if r.source.startswith(prefix)]


def test_every_published_run_is_predicted(rows, capsys):
    assert len(rows) == 34
    with capsys.disabled():
        print()
        for r in rows:
            print(f"  {r.name:22s} {r.metric:22s} published {r.published:9.1f}  predicted {r.predicted:9.1f}  {r.error_pct:+5.1f}%  ({r.assumed})")


def test_narayanan_table1_within_3_percent_mean_and_5_percent_max(rows):
    errs = errors(rows, "narayanan")
    assert sum(errs) / len(errs) <= 3.0
    assert max(errs) <= 5.0


def test_megatron_core_h100_bf16_runs_within_5_percent_mean_and_10_percent_max(rows):
    errs = errors(rows, "megatron_lm_readme_h100")
    assert len(errs) == 9 and sum(errs) / len(errs) <= 5.0 and max(errs) <= 10.0


def test_nemo_h100_fp8_runs_within_6_percent_mean(rows):
    errs = errors(rows, "nemo_2407_h100_fp8")
    assert len(errs) == 12 and sum(errs) / len(errs) <= 6.0


def test_mt_nlg_deepspeed_runs_are_predicted_too_fast_by_at_most_25_percent(rows):
    # The known weakness: the published MT-NLG iterations imply ~6 s per iteration of fixed
    # DeepSpeed overhead and a ~10% slower microbatch than Megatron-LM's own pipeline, which the
    # model has no term for. This pins how far off it is, so a change that worsens it shows.
    errs = [r.error_pct for r in rows if r.source.startswith("smith")]
    assert all(0 < e <= 25 for e in errs)


def test_every_calibration_plan_fits_in_memory(rows):
    assert all(r.plan.prediction.fits for r in rows)
