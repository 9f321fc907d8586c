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


def test_megatron_core_h100_bf16_runs_within_3_percent_mean_and_7_percent_max(rows):
    # The max is 1.7B/48 (+6.2%; 4.3% before Transformer Engine's FP8 casts and transposes were priced from its
    # code on 2026-12-03: the refit, fitted to both files, raised the shared memory-bandwidth share 0.346 -> 0.368,
    # which speeds this tp-1 run's elementwise work most).
    errs = errors(rows, "megatron_lm_readme_h100")
    assert len(errs) == 9 and sum(errs) / len(errs) <= 3.0 and max(errs) <= 7.0


def test_nemo_h100_fp8_runs_within_4_percent_mean_and_11_percent_max(rows):
    # The max is GPT3-175B/128 (+9.5%): it ran 13% slower per GPU (716 tokens/s) than the same layout at 512 GPUs
    # with micro-batch 2 (825), which the model prices only 2% slower; what costs micro-batch 1 that much has no
    # term yet.
    errs = errors(rows, "nemo_2407_h100_fp8")
    assert len(errs) == 12 and sum(errs) / len(errs) <= 4.0 and max(errs) <= 11.0


def test_nemotron_340b_fits_as_nvidias_recipe_runs_it_without_full_recomputation(rows):
    # dgxc-benchmarking's recipe (selective recomputation, 8x8x2, v=12, FP8) fits in 80 GB: it does in the memory
    # model once FP8 GEMM inputs take 1 byte and the fp32 gradient shard exists only during the step.
    (r,) = [r for r in rows if r.name == "Nemotron-340B/128"]
    assert r.plan.prediction.fits and {s.recompute for s in r.plan.stages} == {"selective"}
    assert abs(r.error_pct) <= 5.0


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


def test_plan_quality_sets_each_changed_knob_back_and_prices_it(rows):
    from planner.calibration import QUALITY_KNOBS, plan_quality

    (q,) = plan_quality([r for r in rows if r.name == "gpt-1.7b"])
    assert q.speedup >= 1.0  # the search's plan is never predicted slower than the published one it could have picked
    assert q.knob_gains and set(q.knob_gains) <= set(QUALITY_KNOBS) | {"tp x cp x pp x dp"}
    for name, gain in q.knob_gains.items():
        assert isinstance(gain, str) or gain >= -1e-9, (name, gain)  # setting a knob back never makes the best plan faster
