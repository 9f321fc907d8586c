"""planner validate: each measured plan priced again, per model and over all."""

import dataclasses
import json

import pytest

from planner.cost import predict
from planner.plan import Knobs
from planner.specs import load_cluster, load_device, load_model
from planner.validate import validate
from tests.dashboard.runs import run_line


def _plan(name: str, pp: int, dp: int, mbs: int):
    plan, _ = predict(load_model(name), load_cluster("local-cpu", gpus_per_node=2), load_device("cpu"), Knobs(1, pp, dp, mbs), 16)
    return plan


def test_validate_reports_each_model_beside_the_whole(tmp_path):
    plans = [_plan("gpt-tiny", 2, 1, 1), _plan("gpt-tiny", 1, 2, 8), _plan("llama-tiny", 2, 1, 1), _plan("llama-tiny", 1, 2, 4)]
    lines = [run_line(p, [p.prediction.iteration_s * f] * 3, None) for p, f in zip(plans, (1.1, 0.9, 1.2, 1.0))]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = validate([str(path)])
    assert set(report["by_model"]) == {"gpt-tiny", "llama-tiny"}
    errs = {r["model"]: [] for r in report["runs"]}
    for r in report["runs"]:
        errs[r["model"]].append(abs(r["error_pct"]))
    for name, summary in report["by_model"].items():
        assert summary["mape_pct"] == pytest.approx(sum(errs[name]) / len(errs[name]), rel=1e-12)
    # approx: the sums run in another order (with this machine's measured profile they differed in the last bit)
    assert report["mape_pct"] == pytest.approx(sum(sum(e) for e in errs.values()) / 4, rel=1e-12)


def test_validate_compares_every_ranks_peak_memory_with_its_pipeline_devices(tmp_path):
    from planner.cost import memory_by_device

    plan = _plan("llama-tiny", 2, 1, 1)
    devices = [m.total_gib - m.overhead_gib for m in memory_by_device(plan, load_device("cpu"))]
    line = run_line(plan, [plan.prediction.iteration_s] * 3, None)
    line["peak_memory_gib"] = [devices[0] * 1.1, devices[1] * 0.9]  # rank 0 on device 0, rank 1 on device 1
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(line) + "\n")
    report = validate([str(path)])
    errs = [m["error_pct"] for m in report["runs"][0]["memory"]]
    assert errs[0] == pytest.approx(100 * (1 / 1.1 - 1)) and errs[1] == pytest.approx(100 * (1 / 0.9 - 1))
    assert report["memory_mape_pct"] == pytest.approx((abs(errs[0]) + abs(errs[1])) / 2)


def test_validate_says_its_predicted_memory_is_the_plans_peak_less_the_framework_overhead(tmp_path, monkeypatch, capsys):
    # planner plan's table shows the peak with the overhead, the run and validate without it: the table says why.
    from planner.report_validation import print_validation

    monkeypatch.delenv("FORCE_COLOR", raising=False)
    plan = _plan("llama-tiny", 2, 1, 1)
    line = run_line(plan, [plan.prediction.iteration_s] * 3, None)
    line["peak_memory_gib"] = [0.2, 0.2]
    (path := tmp_path / "runs.jsonl").write_text(json.dumps(line) + "\n")
    print_validation(validate([str(path)]))
    said = " ".join(capsys.readouterr().out.split())
    assert "the predicted figure is the plan's peak GiB less the profile's framework overhead" in said


def test_validate_scales_each_prediction_by_how_much_slower_the_reference_block_ran_than_when_profiled(tmp_path, monkeypatch, capsys):
    from planner.report_validation import print_validation

    from tests.planner.test_measured import _device

    import dataclasses

    measured = _device()
    # The profile's reference for gpt-tiny, timed as runtime.launch times it: 0.030 s.
    measured = dataclasses.replace(measured, measured={**measured.measured, "reference_s": {"gpt-tiny": 0.030}})
    monkeypatch.setattr("planner.validate.load_device", lambda name: measured)
    drifted, plain = _plan("gpt-tiny", 1, 2, 8), _plan("gpt-tiny", 2, 1, 1)
    line = run_line(drifted, [1.0] * 3, None)
    line["machine"] = {"reference_s": 0.039, "cpu_share": 0.7, "background_cores": 1.2, "cpu_count": 2}
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(line) + "\n")
    report = validate([str(path)])
    row = report["runs"][0]
    assert row["machine_drift"] == pytest.approx(1.3) and row["background_cores"] == 1.2
    assert row["rescaled_error_pct"] == pytest.approx(100 * (row["predicted_step_s"] * 1.3 - 1.0))
    assert report["rescaled_mape_pct"] == pytest.approx(abs(row["rescaled_error_pct"]))
    print_validation(report)
    out = " ".join(capsys.readouterr().out.split())
    assert "reference block ran ×1.30 to ×1.30" in out and "1.2 cores" in out and "not as it was when profiled" in out
    assert f"mean absolute error {abs(row['rescaled_error_pct']):.1f}%" in out
    # A run that did not record the machine has no drift, and then no rescaled figure is claimed for the whole.
    path.write_text(json.dumps(line) + "\n" + json.dumps(run_line(plain, [1.0] * 3, None)) + "\n")
    report = validate([str(path)])
    assert [r["machine_drift"] is None for r in report["runs"]].count(True) == 1 and report["rescaled_mape_pct"] is None


def test_a_results_line_with_a_garbled_machine_field_is_skipped_naming_it(tmp_path):
    line = run_line(_plan("gpt-tiny", 1, 2, 8), [1.0] * 3, None)
    line["machine"] = {"reference_s": "fast"}
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(line) + "\n")
    report = validate([str(path)])
    assert not report["runs"] and "machine.reference_s" in report["skipped"][0] and "non-negative number" in report["skipped"][0]


def test_a_profile_without_a_reference_for_the_model_claims_no_drift(tmp_path, monkeypatch):
    from tests.planner.test_measured import _device

    monkeypatch.setattr("planner.validate.load_device", lambda name: _device())  # an older profile: no reference_s
    line = run_line(_plan("gpt-tiny", 1, 2, 8), [1.0] * 3, None)
    line["machine"] = {"reference_s": 0.039, "cpu_share": 0.7, "background_cores": 0.1, "cpu_count": 2}
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(line) + "\n")
    row = validate([str(path)])["runs"][0]
    assert row["machine_drift"] is None and row["rescaled_error_pct"] is None and row["background_cores"] == 0.1


def test_validate_scales_the_prediction_by_the_machine_factor_against_the_step_less_waits(tmp_path, capsys, monkeypatch):
    from planner.report_validation import print_validation
    from tests.planner.test_measured import _device

    device = _device()
    device = dataclasses.replace(device, measured={**device.measured, "reference_s": {"gpt-tiny": 0.010}})
    monkeypatch.setattr("planner.validate.load_device", lambda name: device)
    line = run_line(_plan("gpt-tiny", 1, 2, 8), [9.0, 2.0, 2.2, 7.0], None)
    # The reference block ran 1.2x its profiled time; the slowest rank waited 1.0 and 1.1 s of the timed steps.
    line["machine"] = {"reference_s": 0.012, "cpu_share": 0.6, "background_cores": 1.1, "cpu_count": 2,
                       "step_wait_s": [[5.0, 0.1], [1.0, 0.4], [0.2, 1.1], [3.0, 0.0]], "timed_steps": [1, 2]}
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(line) + "\n")
    report = validate([str(path)])
    row = report["runs"][0]
    assert row["machine_drift"] == pytest.approx(1.2) and row["unloaded_step_s"] == pytest.approx(1.05)
    assert row["unloaded_rescaled_error_pct"] == pytest.approx(100 * (1.2 * row["predicted_step_s"] - 1.05) / 1.05)
    assert report["unloaded_rescaled_mape_pct"] == pytest.approx(abs(row["unloaded_rescaled_error_pct"]))
    print_validation(report)
    out = " ".join(capsys.readouterr().out.split())
    assert f"scaled by its run's factor as well: mean absolute error {abs(row['unloaded_rescaled_error_pct']):.1f}%" in out
    # Without a reference for the model, no scaled figure is claimed.
    monkeypatch.setattr("planner.validate.load_device", lambda name: _device())
    report = validate([str(path)])
    assert report["runs"][0]["unloaded_rescaled_error_pct"] is None and report["unloaded_rescaled_mape_pct"] is None


def test_validate_takes_each_step_less_the_time_its_slowest_rank_waited_for_a_core(tmp_path, capsys):
    from planner.report_validation import print_validation

    plan = _plan("gpt-tiny", 1, 2, 8)
    line = run_line(plan, [9.0, 2.0, 2.2, 7.0], None)
    # Per step, each rank's run-queue wait; the warm-up (0) and the memory-counting step (3) are not timed.
    line["machine"] = {"reference_s": None, "cpu_share": None, "background_cores": 1.1, "cpu_count": 2,
                       "step_wait_s": [[5.0, 0.1], [1.0, 0.4], [0.2, 1.1], [3.0, 0.0]], "timed_steps": [1, 2]}
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(line) + "\n")
    report = validate([str(path)])
    row = report["runs"][0]
    assert row["unloaded_step_s"] == pytest.approx(1.05)  # median of 2.0 - 1.0 and 2.2 - 1.1
    assert row["waited_pct"] == pytest.approx(50.0)  # the slowest rank waited half of each timed step
    assert row["unloaded_error_pct"] == pytest.approx(100 * (row["predicted_step_s"] - 1.05) / 1.05)
    assert report["unloaded_mape_pct"] == pytest.approx(abs(row["unloaded_error_pct"]))
    print_validation(report)
    out = " ".join(capsys.readouterr().out.split())
    assert "50% of a step (the slowest rank's wait" in out and "50% to 50%" not in out and f"mean absolute error {abs(row['unloaded_error_pct']):.1f}%" in out
    assert "other processes took this machine's cores" in out
    # A run without waits (a GPU run, an older line) claims nothing for the whole.
    path.write_text(json.dumps(line) + "\n" + json.dumps(run_line(_plan("gpt-tiny", 2, 1, 1), [1.0] * 3, None)) + "\n")
    report = validate([str(path)])
    assert sorted(r["unloaded_step_s"] is None for r in report["runs"]) == [False, True] and report["unloaded_mape_pct"] is None


def test_ranks_that_meet_at_every_block_are_taken_less_their_block_by_block_wait(tmp_path):
    # A tp2 run: the runtime compared the ranks' waits stretch by stretch between blocks (step_synced_wait_s,
    # between the largest rank's wait and the sum); validate takes the step less that, not less the largest.
    plan = _plan("gpt-tiny", 2, 1, 1)
    line = run_line(plan, [9.0, 2.0, 2.2, 7.0], None)
    line["machine"] = {"reference_s": None, "cpu_share": None, "background_cores": 1.1, "cpu_count": 2,
                       "step_wait_s": [[5.0, 0.1], [1.0, 0.4], [0.2, 1.1], [3.0, 0.0]], "timed_steps": [1, 2],
                       "step_synced_wait_s": [5.0, 1.2, 1.2, 3.0]}
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(line) + "\n")
    row = validate([str(path)])["runs"][0]
    assert row["unloaded_step_s"] == pytest.approx(0.9)  # median of 2.0 - 1.2 and 2.2 - 1.2
    line["machine"]["step_synced_wait_s"] = [1.0, 1.2]  # not one per step: skipped, naming the field
    path.write_text(json.dumps(line) + "\n")
    report = validate([str(path)])
    assert not report["runs"] and "machine.step_synced_wait_s" in report["skipped"][0]


def test_a_results_line_whose_waits_do_not_match_its_steps_and_ranks_is_skipped_naming_the_field(tmp_path):
    line = run_line(_plan("gpt-tiny", 1, 2, 8), [1.0] * 3, None)
    line["machine"] = {"reference_s": 0.01, "cpu_share": 1.0, "background_cores": 0.0, "cpu_count": 2,
                       "step_wait_s": [[0.1, 0.2], [0.1]], "timed_steps": [1, 2]}
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(line) + "\n")
    report = validate([str(path)])
    assert not report["runs"] and "machine.step_wait_s" in report["skipped"][0] and "3 lists" in report["skipped"][0]


def test_the_run_column_gives_line_numbers_under_a_title_naming_the_file_when_every_run_is_in_one(tmp_path, monkeypatch, capsys):
    # A whole path per row (two runs each) was cut to 'docs/meas…' over two lines in a 200-column terminal.
    from planner.report_validation import print_validation

    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    plan = _plan("llama-tiny", 2, 1, 1)
    line = json.dumps(run_line(plan, [plan.prediction.iteration_s] * 3, None))
    (path := tmp_path / "deep" / "folder" / "runs.jsonl").parent.mkdir(parents=True)
    path.write_text(line + "\n" + line + "\n")
    print_validation(validate([str(path)]))
    out = capsys.readouterr().out
    assert f"Predicted vs measured ({path}; run: its lines)" in out
    assert any(row.startswith("│ 1, 2 ") for row in out.splitlines())


def test_a_results_line_whose_plan_this_meshplan_no_longer_prices_is_skipped_not_the_whole_report(tmp_path):
    # An older meshplan wrote (and its runtime ran) sequence parallelism at tp 1, which predict now refuses.
    import dataclasses

    plan = _plan("llama-tiny", 2, 1, 1)
    old = dataclasses.replace(_plan("gpt-tiny", 1, 2, 1), sequence_parallel=True)
    lines = [run_line(plan, [plan.prediction.iteration_s] * 3, None), run_line(old, [old.prediction.iteration_s] * 3, None)]
    (path := tmp_path / "runs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = validate([str(path)])
    assert [r["model"] for r in report["runs"]] == ["llama-tiny"]
    assert any("runs.jsonl:2: this meshplan does not price its plan" in w and "sequence_parallel" in w for w in report["skipped"])


def test_a_results_file_with_one_binary_line_keeps_its_good_lines(tmp_path):
    plan = _plan("llama-tiny", 2, 1, 1)
    good = json.dumps(run_line(plan, [plan.prediction.iteration_s] * 3, None)).encode()
    (path := tmp_path / "runs.jsonl").write_bytes(b"\xd0\xff\n" + good + b"\n")
    report = validate([str(path)])
    assert len(report["runs"]) == 1 and any("line 1 is not valid JSON" in w for w in report["skipped"])



def test_a_context_parallel_runs_table_shows_its_cp_degree(tmp_path, monkeypatch, capsys):
    from planner.report_validation import print_validation

    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("COLUMNS", "220")
    plan, _ = predict(load_model("gpt-tiny"), load_cluster("local-cpu", gpus_per_node=2), load_device("cpu"),
                      Knobs(1, 1, 1, 4, cp=2), 16)
    (path := tmp_path / "runs.jsonl").write_text(json.dumps(run_line(plan, [plan.prediction.iteration_s] * 3, None)) + "\n")
    print_validation(validate([str(path)]))
    header, row = [line for line in capsys.readouterr().out.splitlines() if "┃ tp" in line or "│ 1 " in line][:2]
    cells = dict(zip([c.strip() for c in header.split("┃")], [c.strip() for c in row.split("│")]))
    assert (cells["tp"], cells["cp"], cells["pp"], cells["dp"]) == ("1", "2", "1", "1")


@pytest.fixture
def datasheets_only(tmp_path_factory, monkeypatch):
    """The project's profiles without this machine's measured one, as a fresh clone has them."""
    import shutil

    from planner import specs

    copy = tmp_path_factory.mktemp("profiles")
    shutil.copytree(specs.PROFILES_DIR, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.measured.json"))
    monkeypatch.setattr(specs, "PROFILES_DIR", copy)
    return copy


def test_runs_planned_with_another_profile_than_this_machines_are_priced_with_a_warning_once_naming_both(
        tmp_path, monkeypatch, capsys, datasheets_only):
    from planner.report_validation import print_validation

    monkeypatch.delenv("FORCE_COLOR", raising=False)
    lines = []
    for plan in (_plan("gpt-tiny", 2, 1, 1), _plan("gpt-tiny", 1, 2, 8)):
        line = run_line(plan, [plan.prediction.iteration_s] * 3, None)
        line["plan"]["profile"] = "cpu (measured)"  # as make run planned them
        lines += [line, line]
    (path := tmp_path / "runs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = validate([str(path)])
    assert report["profiles"] == ["cpu (datasheet)"] and [r["planned_profile"] for r in report["runs"]] == ["cpu (measured)"] * 2
    [mismatch] = report["profile_mismatches"]
    assert (mismatch["planned"], mismatch["priced"], mismatch["plans"]) == ("cpu (measured)", "cpu (datasheet)", 2)
    print_validation(report)
    said = " ".join(capsys.readouterr().out.split())
    assert "Priced with this machine's device profile: cpu (datasheet)." in said
    assert said.count("warning:") == 1 and "2 plan(s) were planned with the profile 'cpu (measured)' but are priced " \
                                              "with 'cpu (datasheet)'" in said
    assert "`planner profile --device cpu`" in said and str(datasheets_only / "devices" / "cpu.measured.json") in said


def test_runs_priced_with_the_profile_they_were_planned_with_warn_of_nothing(tmp_path, datasheets_only):
    plan = _plan("gpt-tiny", 2, 1, 1)
    (path := tmp_path / "runs.jsonl").write_text(json.dumps(run_line(plan, [plan.prediction.iteration_s] * 3, None)) + "\n")
    report = validate([str(path)])
    assert report["runs"][0]["planned_profile"] == "cpu (datasheet)" and report["profile_mismatches"] == []


def test_runs_whose_plan_names_a_device_file_are_told_that_file_prices_them_not_profiles_devices(tmp_path, datasheets_only):
    # The advice named profiles/devices/cpu.measured.json, which does not price a plan whose cluster names a file.
    device = tmp_path / "mine.json"
    device.write_text((datasheets_only / "devices" / "cpu.json").read_text())
    plan = _plan("gpt-tiny", 2, 1, 1)
    line = run_line(plan, [plan.prediction.iteration_s] * 3, None)
    line["plan"]["cluster"]["device"], line["plan"]["profile"] = str(device), "cpu (measured)"
    (path := tmp_path / "runs.jsonl").write_text(json.dumps(line) + "\n")
    [mismatch] = validate([str(path)])["profile_mismatches"]
    assert f"read from the device file {device} that the plan names" in mismatch["message"]
    assert "cpu.measured.json" not in mismatch["message"]


def test_the_predicted_and_measured_step_columns_write_every_run_to_the_same_decimals(tmp_path, capsys):
    from planner.report_validation import print_validation

    # A measured step of exactly 1 s read "1" under %.4g, beside a predicted step of four figures.
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(run_line(_plan("gpt-tiny", pp, dp, mbs), [1.0] * 3, None)) + "\n"
                            for pp, dp, mbs in ((1, 2, 8), (2, 1, 1))))
    print_validation(validate([str(path)]))
    rows = [[c.strip() for c in line.split("│")] for line in capsys.readouterr().out.splitlines() if line.startswith(("┃", "│"))]
    head = [c.strip() for c in rows[0][0].split("┃")]
    steps = [r[head.index(h)] for r in rows[1:] for h in ("pred step s", "meas step s")]
    # Whatever the profile (a local cpu.measured.json prices these below 1 s), one count of decimals for all.
    decimals = {len(s.split(".")[1]) for s in steps}
    assert len(decimals) == 1 and "1." + "0" * decimals.pop() in steps, steps
