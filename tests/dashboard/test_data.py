"""dashboard/data.py: inputs from YAML text, and the frames the charts draw."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dashboard import data, inputs
from planner.errors import SpecError
from planner.plan import Knobs, plan_from_dict
from planner.schedule import simulate
from planner.search import Candidate, search
from planner.specs import load_cluster, load_device, load_model
from tests.dashboard.runs import tiny_plan

TINY_YAML = "layers: 8\nhidden: 256\nheads: 8\nffn_hidden: 1024\nseq_len: 128\nvocab: 8192\n"


def test_malformed_model_yaml_is_a_spec_error_naming_the_line():
    with pytest.raises(SpecError, match=r"malformed YAML at line 3 \(mapping values are not allowed here\)"):
        inputs.model_from_yaml("layers: 8\nhidden: 256\n  heads: 8\n")


def test_model_yaml_with_a_bad_field_names_the_field():
    with pytest.raises(SpecError, match="heads"):
        inputs.model_from_yaml(TINY_YAML.replace("heads: 8", "heads: 7"))
    with pytest.raises(SpecError, match="layerz"):
        inputs.model_from_yaml(TINY_YAML + "layerz: 3\n")
    with pytest.raises(SpecError, match="top level"):
        inputs.model_from_yaml("just a string")


def test_a_pasted_hugging_face_config_json_is_the_model_the_cli_reads_from_that_file(tmp_path):
    import dataclasses

    from tests.planner.test_hf import LLAMA3_8B, MISTRAL_V01

    (path := tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B, indent=2))
    assert inputs.model_from_yaml(path.read_text()) == dataclasses.replace(load_model(str(path)), name="custom")
    with pytest.raises(SpecError, match="sliding_window") as pasted:  # refused with the CLI's message too
        inputs.model_from_yaml(json.dumps(MISTRAL_V01))
    (path := tmp_path / "mistral.json").write_text(json.dumps(MISTRAL_V01))
    with pytest.raises(SpecError) as read:
        load_model(str(path))
    assert str(pasted.value).split(": ", 1)[1] == str(read.value).split(": ", 1)[1]
    with pytest.raises(SpecError, match="malformed JSON at line 1"):
        inputs.model_from_yaml('{"architectures": ["LlamaForCausalLM"],')
    # A YAML flow mapping starts with '{' too: it is read as YAML, not refused as bad JSON.
    assert inputs.model_from_yaml("{layers: 2, hidden: 64, heads: 4, ffn_hidden: 256, seq_len: 128, vocab: 512}").layers == 2


def test_cluster_yaml_takes_nodes_gpus_and_device_from_the_pickers():
    c = inputs.cluster_from_yaml(inputs.preset_text("clusters", "local-cpu"), nodes=3, gpus_per_node=4, device="a100-sxm4-80gb")
    assert (c.nodes, c.gpus_per_node, c.device, c.name) == (3, 4, "a100-sxm4-80gb", "local-cpu")


def test_presets_and_devices_list_the_profiles():
    assert {"gpt-tiny", "gpt3-175b"} <= set(inputs.presets("models"))
    assert {"dgx-a100-80gb", "local-cpu"} <= set(inputs.presets("clusters"))
    assert {"cpu", "a100-sxm4-80gb"} <= set(inputs.device_names())


def test_divisors_are_every_divisor_in_order_even_for_a_huge_cluster():
    assert inputs.divisors(1) == [1]
    assert inputs.divisors(36) == [1, 2, 3, 4, 6, 9, 12, 18, 36]
    assert inputs.divisors(100_000 * 1024)[-3:] == [25_600_000, 51_200_000, 102_400_000]


def test_pins_from_choices_drops_auto_and_types_the_values():
    pins = inputs.pins_from_choices({"tp": "2", "pp": "auto", "schedule": "gpipe", "sequence_parallel": "on",
                                   "zero": "3", "virtual_stages": "4", "compile": "off", "cp": "2"})
    assert pins == {"tp": 2, "schedule": "gpipe", "sequence_parallel": True, "zero": 3, "virtual_stages": 4, "compile": False, "cp": 2}


def test_plans_frame_lists_the_ranked_plans_best_first():
    model, cluster = load_model("gpt-tiny"), load_cluster("local-cpu", gpus_per_node=2)
    result = search(model, cluster, load_device("cpu"), 16, {})
    df = data.plans_frame(result.plans)
    assert list(df["rank"]) == list(range(1, len(result.plans) + 1))
    assert list(df["plan_id"]) == [p.id for p in result.plans]
    assert df["tokens_per_s"].is_monotonic_decreasing
    assert (df["tp"] * df["pp"] * df["dp"] == 2).all()


def test_candidates_say_how_far_the_search_took_them():
    k = Knobs(1, 2, 1, 1)
    cands = [Candidate(k, 1.0, 10.0, 1.0, 70.0, True, "", "priced"), Candidate(k, 1.0, 10.0, 1.0, 60.0, True, "", "split"),
             Candidate(k, 2.0, 5.0, 0.5, 30.0, True, "", "bound"), Candidate(k, 1.0, 10.0, 1.0, 95.0, False, "over", "split")]
    df = data.candidates_frame(cands)
    assert list(df["memory_status"]) == ["fits", "fits", "bound only", "does not fit"]
    assert list(df["exact"]) == [True, False, False, False]


def test_breakdown_parts_add_up_to_the_iteration():
    plan = tiny_plan(pp=2, dp=1, micro_batch=1)
    df = data.breakdown_frame(plan)
    assert df["seconds"].sum() == pytest.approx(plan.prediction.iteration_s, rel=1e-9)
    assert df["share_pct"].sum() == pytest.approx(100.0)


def test_memory_per_device_adds_up_to_each_stage_memory():
    plan = tiny_plan(pp=2, dp=1, micro_batch=1)
    totals = data.memory_frame(plan, load_device("cpu")).groupby("device")["gib"].sum()
    assert list(totals.round(3)) == pytest.approx([s.memory_gib for s in plan.stages[:plan.pp]], abs=2e-3)


def test_stage_layer_ranges_cover_every_layer_once_in_order():
    plan = tiny_plan(pp=2, dp=1, micro_batch=1)
    df = data.stages_frame(plan)
    assert df["first_layer"].iloc[0] == 0 and df["end_layer"].iloc[-1] == plan.model.layers
    assert (df["first_layer"].iloc[1:].to_numpy() == df["end_layer"].iloc[:-1].to_numpy()).all()
    assert df["blocks"].sum() == plan.model.layers
    assert df["embedding"].tolist() == [True, False] and df["head"].tolist() == [False, True]


def test_plan_json_is_a_plan_file_the_runtime_accepts():
    plan = tiny_plan(pp=2, dp=1, micro_batch=1)
    assert plan_from_dict(json.loads(data.plan_json(plan)), "download") == plan


def test_idle_share_of_equal_1f1b_stages_is_the_bubble_fraction():
    p, m = 4, 8
    sim = simulate("1f1b", p, m, 1, [1.0] * p, [2.0] * p)
    view = data.timeline_view(sim.timeline, p)
    assert view.gap is None and view.note == ""
    assert len(view.events) == len(sim.timeline)
    assert view.stages == {d: [d] for d in range(p)}
    # Narayanan et al. 2021, section 2.2.1: (p-1)/(m+p-1) of the iteration is bubble on every device.
    for d in range(p):
        assert view.idle_pct[d] == pytest.approx(100 * (p - 1) / (m + p - 1))


def test_a_huge_timeline_is_cut_to_16_devices_and_its_warmup_and_cooldown():
    p, m = 64, 512
    sim = simulate("1f1b", p, m, 1, [1.0] * p, [2.0] * p, 0.1)
    assert len(sim.timeline) > 100_000
    view = data.timeline_view(sim.timeline, p)
    devices = sorted(view.events["device"].unique())
    assert len(devices) == 16 and devices[0] == 0 and devices[-1] == p - 1
    assert len(view.events) <= data.MAX_TIMELINE_EVENTS
    assert view.gap is not None and 0 < view.gap[0] < view.gap[1] < view.iteration_s
    kept = view.events
    assert not ((kept["start_s"] >= view.gap[0]) & (kept["end_s"] <= view.gap[1])).any()
    assert kept["start_s"].min() == 0.0 and kept["end_s"].max() >= view.iteration_s
    assert "16 of 64 pipeline devices" in view.note and "steady state" in view.note


def test_a_long_single_device_timeline_keeps_bars_wider_than_a_pixel():
    sim = simulate("1f1b", 1, 512, 1, [1.0], [2.0], recompute_s=[1.0])
    view = data.timeline_view(sim.timeline, 1)
    assert len(view.events) <= data.MAX_EVENTS_PER_DEVICE and view.gap is not None
    assert set(view.events["op"]) == {"forward", "recompute", "backward"}


def test_measured_timeline_replays_the_measured_stage_times():
    plan = tiny_plan(pp=2, dp=1, micro_batch=1)
    timings = {"stage0": {"forward_s": 0.05, "backward_s": 0.1}, "stage1": {"forward_s": 0.05, "backward_s": 0.1}}
    view = data.measured_timeline(plan, timings)
    fwd = view.events[view.events["op"] == "forward"]
    assert len(fwd) == plan.pp * plan.num_microbatches
    assert (fwd["end_s"] - fwd["start_s"]).round(9).eq(0.05).all()
    # 1F1B with equal stages and free sends: (m + p - 1) * (f + b).
    assert view.iteration_s == pytest.approx((plan.num_microbatches + 1) * 0.15)
    assert data.measured_timeline(plan, {"stage0": timings["stage0"]}) is None
    assert data.measured_timeline(plan, None) is None


def test_validation_reads_each_plan_run_and_reports_the_torn_line(results_dir):
    df, report, plans = data.load_validation(data.results_files(results_dir))
    assert len(df) == 2 and set(df["plan_id"]) == set(plans)
    assert df["has_stage_timings"].tolist().count(True) == 1
    row = df.iloc[0]
    assert row["error_pct"] == pytest.approx(100 * (row["predicted_step_s"] - row["measured_step_s"]) / row["measured_step_s"])
    assert report["mape_pct"] == pytest.approx(df["error_pct"].abs().mean())
    assert len(report["skipped"]) == 1 and "torn" in report["skipped"][0]


def test_results_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(data.RESULTS_DIR_ENV, str(tmp_path))
    assert data.results_dir() == tmp_path
    monkeypatch.delenv(data.RESULTS_DIR_ENV)
    assert data.results_dir() == data.DEFAULT_RESULTS_DIR


def test_training_inputs_parse_like_the_cli_and_name_the_field():
    assert data.training_inputs("", 2.0) is None and data.training_inputs(None, None) is None
    assert data.training_inputs("15T", None) == (15 * 10**12, None)
    assert data.training_inputs(" 300B ", 1.5) == (3 * 10**11, 1.5)
    with pytest.raises(SpecError, match="Training tokens: expected a number of tokens"):
        data.training_inputs("lots", None)


def test_with_training_gives_each_fitting_plan_the_days_gpu_hours_and_cost_of_its_tokens_per_s():
    model, cluster = load_model("gpt-tiny"), load_cluster("local-cpu", gpus_per_node=2)
    result = search(model, cluster, load_device("cpu"), 16, {})
    df = data.with_training(data.plans_frame(result.plans), result.plans, (10**9, 0.5))
    days = 10**9 / df["tokens_per_s"] / 86_400
    assert list(df["days"]) == list(days) and list(df["gpu_hours"]) == list(days * 24 * 2)
    assert list(df["cost_usd"]) == list(days * 24 * 2 * 0.5)


def test_compare_frame_is_one_row_per_cluster_with_the_reason_where_nothing_fits():
    from tests.dashboard.runs import compare_rows

    rows = compare_rows()
    df = data.compare_frame(rows)
    assert list(df["cluster"]) == ["dgx-a100-80gb (1×8)", "workstation-4x-rtx4090 (1×4)"] and list(df["fits"]) == [True, False]
    fit, nothing = df.iloc[0], df.iloc[1]
    assert fit["plan_id"] == rows[0].plan.id and fit["days"] == rows[0].cost.days and fit["cost_usd"] == rows[0].cost.cost_usd
    assert fit["reason"] == "" and nothing["reason"].startswith("nothing fits: ") and "GiB" in nothing["reason"]
    assert np.isnan(nothing["days"]) and np.isnan(nothing["tokens_per_s"]) and nothing["gpu_hour_price_usd"] == 2.0
    assert np.isnan(data.compare_frame(compare_rows(tokens=None))["days"]).all()  # no tokens: no days to draw


@pytest.mark.parametrize("params, message", [
    ({"tokens": "lots"}, "tokens='lots' is not a number of tokens such as 15e12 or 15T"),
    ({"tokens": "1.5"}, "tokens='1.5' is not a number of tokens such as 15e12 or 15T"),
    ({"gpu_hour_price": "-1"}, "gpu_hour_price='-1' is not a price in US dollars per GPU-hour above 0"),
])
def test_a_link_with_bad_training_inputs_is_reported(params, message):
    assert inputs.link_errors(params, ["Plans"], {"nodes": 1, "gpus_per_node": 8, "global_batch": 64}) == [message]
    assert inputs.link_errors({"tokens": "15T", "gpu_hour_price": "2.5"}, ["Plans"], {"nodes": 1, "gpus_per_node": 8, "global_batch": 64}) == []


def test_a_plans_timeline_is_priced_for_its_framework_unless_told_otherwise():
    from planner.frameworks import MEGATRON_CORE

    model, cluster = load_model("gpt3-13b"), load_cluster("dgx-h100-80gb", 2)
    device = load_device(cluster.device)
    plan = search(model, cluster, device, 64, {"pp": 2}, top=1, framework=MEGATRON_CORE).plans[0]
    assert plan.framework == "megatron-core"
    own, runtime = data.predicted_timeline(plan, device), data.predicted_timeline(plan, device, "meshplan")
    assert own.iteration_s == data.predicted_timeline(plan, device, "megatron-core").iteration_s
    # meshplan's runtime posts its sends beside compute and fuses nothing: the same plan takes another time there.
    assert abs(own.iteration_s / runtime.iteration_s - 1) > 0.01, (own.iteration_s, runtime.iteration_s)
