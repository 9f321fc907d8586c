"""dashboard/app.py driven by streamlit's AppTest: every view renders for good and bad inputs, with the
message a user needs in the page and never a traceback. Small models keep this quick."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard import data, inputs
from tests.dashboard.runs import run_line, tiny_plan

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")
TINY = dict(model="gpt-tiny", cluster="local-cpu", nodes="1", gpus_per_node="2", device="cpu", global_batch="16")


def open_app(monkeypatch, results: Path, **query) -> AppTest:
    """Run the app once as if its URL carried these query parameters (the sidebar inputs and the tab)."""
    monkeypatch.setenv(data.RESULTS_DIR_ENV, str(results))
    at = AppTest.from_file(APP, default_timeout=60)
    for key, value in query.items():
        at.query_params[key] = value
    return at.run()


def charts(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def test_default_inputs_render_plans_table_and_scatter(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path)
    assert not at.exception and not at.error
    assert at.caption[0].value.startswith("gpt-39.1b on 64 × a100-sxm4-80gb")
    assert [t.label for t in at.tabs] == ["Plans", "Selected plan", "Predicted vs measured", "Compare clusters"]
    assert len(at.dataframe) == 1 and charts(at) == 1  # only the open tab is built
    assert at.metric[0].label == "Throughput (tokens/s)"


def test_selected_plan_shows_timeline_breakdown_memory_stages_and_the_torchrun_command(monkeypatch, tmp_path):
    from planner.search import search
    from planner.slurm import node_commands
    from planner.specs import load_cluster, load_device, load_model

    at = open_app(monkeypatch, tmp_path, **TINY, view="Selected plan")
    assert not at.exception and not at.error
    assert charts(at) == 3
    assert any(s.value == "Layers of each stage" for s in at.subheader)
    assert at.get("download_button")[0].label == "Download plan.json"
    plan = search(load_model("gpt-tiny"), load_cluster("local-cpu", gpus_per_node=2), load_device("cpu"), 16).plans[0]
    assert at.code[0].value == node_commands(plan, "plan.json", 1, 2).rstrip()  # planner launch --print's, written once


def test_a_cpu_plans_tflops_per_gpu_shows_enough_digits_not_0_0(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path, **TINY)
    assert not at.exception and at.metric[2].label == "TFLOP/s per GPU"
    assert float(at.metric[2].value) > 0 and at.metric[2].value.startswith("0.0") and len(at.metric[2].value) == 5  # e.g. 0.045


def test_a_multi_node_plans_run_it_command_is_planner_launchs_with_master_addr_and_this_pythons_torchrun(monkeypatch, tmp_path):
    import shlex

    at = open_app(monkeypatch, tmp_path, model="gpt3-1.3b", cluster="dgx-a100-80gb", nodes="2", global_batch="64",
                  view="Selected plan")
    assert not at.exception and not at.error
    command = at.code[0].value.splitlines()[-1]
    assert "MASTER_ADDR: the host name or IP address" in at.code[0].value and "HOST" not in command
    argv = shlex.split(command)
    assert os.path.abspath(argv[0]) == os.path.join(os.path.dirname(sys.executable), "torchrun")
    assert "--rdzv-id" in argv and argv[argv.index("--rdzv-endpoint") + 1] == "MASTER_ADDR:29500"


def test_the_plan_picker_names_a_context_parallel_plans_cp_degree(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path, **TINY, cp="2")
    assert not at.exception and not at.error
    assert at.selectbox(key="plan_rank").options[0].startswith("#1 · tp 1 × cp 2 × pp 1 × dp 1 · micro-batch")


def test_pinned_knobs_constrain_every_ranked_plan(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path, **TINY, pp="2", schedule="gpipe", micro_batch="2")
    assert not at.exception and not at.error
    assert "pinned pp=2, micro_batch=2, schedule=gpipe" in at.caption[0].value
    table = at.dataframe[0].value
    assert set(table["pp"]) == {2} and set(table["micro_batch"]) == {2} and set(table["schedule"]) == {"gpipe"}
    assert at.expander[2].proto.expanded  # the pins stay in view once one is set


def test_a_plan_that_does_not_fit_is_a_warning_and_still_drawn(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path, model="gpt3-1.3b", cluster="local-cpu", nodes="1", gpus_per_node="2",
                  device="cpu", global_batch="8", view="Selected plan")
    assert not at.exception and not at.error
    assert len(at.warning) == 1 and "No configuration fits in the 6 GiB usable on one cpu (8 GiB less 2 GiB headroom)" in at.warning[0].value
    assert "GiB over" in at.warning[0].value
    assert charts(at) == 3


def test_malformed_model_yaml_shows_an_error_naming_the_line(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path, **TINY)
    at.text_area(key="model_yaml_gpt-tiny").set_value("layers: 8\nhidden: 256\n  heads: 8\n").run()
    assert not at.exception
    assert len(at.error) == 1 and "malformed YAML at line 3" in at.error[0].value
    assert "Fix the inputs" in at.info[0].value


def test_model_yaml_with_a_bad_value_names_the_field(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path, **TINY)
    at.text_area(key="model_yaml_gpt-tiny").set_value(inputs.preset_text("models", "gpt-tiny").replace("heads: 8", "heads: 3")).run()
    assert not at.exception and "heads: hidden 256 is not divisible by heads 3" in at.error[0].value


def test_uploaded_model_yaml_replaces_the_preset(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path, **TINY)
    text = inputs.preset_text("models", "gpt-tiny").replace("name: gpt-tiny", "name: my-gpt").replace("layers: 8", "layers: 4")
    at.file_uploader(key="model_file").set_value(("my-gpt.yaml", text.encode(), "application/x-yaml")).run()
    assert not at.exception and not at.error
    assert at.caption[0].value.startswith("my-gpt on 2 × cpu")
    at.file_uploader(key="model_file").set_value(("bad.yaml", b"\xff\xfe\x00", "application/x-yaml")).run()
    assert not at.exception and "not UTF-8" in at.error[0].value


def test_a_hugging_face_config_json_pasted_into_the_model_box_is_planned(monkeypatch, tmp_path):
    from tests.planner.test_hf import LLAMA3_8B

    tiny = dict(LLAMA3_8B, hidden_size=256, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4,
                intermediate_size=1024, max_position_embeddings=128, vocab_size=8192)
    at = open_app(monkeypatch, tmp_path, **TINY)
    at.text_area(key="model_yaml_gpt-tiny").set_value(json.dumps(tiny, indent=2)).run()
    assert not at.exception and not at.error
    assert at.caption[0].value.startswith("custom on 2 × cpu")


def test_pins_that_no_configuration_satisfies_show_the_planner_message(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path, **TINY, tp="2", pp="2")
    assert not at.exception
    assert len(at.error) == 1 and "tp 2 x pp 2" in at.error[0].value and "2 devices" in at.error[0].value


def test_without_results_files_the_page_says_how_to_make_them(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path, **TINY, view="Predicted vs measured")
    assert not at.exception and not at.error
    assert f"No results files in {tmp_path}" in at.info[0].value and "--results" in at.info[0].value


def test_with_results_files_shows_the_error_per_run_and_both_timelines(monkeypatch, results_dir):
    at = open_app(monkeypatch, results_dir, **TINY, view="Predicted vs measured")
    assert not at.exception and not at.error
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Plans measured"] == "2" and metrics["Mean absolute error of step time"].endswith("%")
    assert len(at.warning) == 1 and "torn" in at.warning[0].value  # the bad line is reported, the rest still shown
    # Predicted vs measured step and peak memory, error per run, predicted and measured timelines.
    assert charts(at) == 5 and metrics["Mean absolute error of peak memory"].endswith("%")
    assert len(at.dataframe[0].value) == 2
    # The runs recorded their waits for a core: the error less them is shown beside the raw one.
    assert any("waited 3% to 4% of a step" in " ".join(c.value.split()) for c in at.caption)
    assert "unloaded_error_pct" in at.dataframe[0].value.columns


def test_runs_planned_with_another_profile_say_which_profile_priced_them_and_warn_once(monkeypatch, tmp_path):
    from planner.validate import profile_mismatch

    line = run_line(tiny_plan(pp=1, dp=2, micro_batch=8), [1.0, 1.0], None)
    line["plan"]["profile"] = "cpu (measured)"
    (tmp_path / "runs.jsonl").write_text((json.dumps(line) + "\n") * 2)
    at = open_app(monkeypatch, tmp_path, **TINY, view="Predicted vs measured")
    assert not at.exception and not at.error
    assert [w.value for w in at.warning] == [profile_mismatch("cpu (measured)", data.load_device("cpu"), 1)]
    assert any("Priced with this machine's device profile: cpu (datasheet)." in c.value for c in at.caption)


def test_a_run_on_a_device_without_a_profile_is_skipped_with_a_warning(monkeypatch, tmp_path):
    line = run_line(tiny_plan(pp=1, dp=2, micro_batch=8), [1.0, 1.0], None)
    line["plan"]["cluster"]["device"] = "tpu-v9"
    (tmp_path / "tpu.jsonl").write_text(json.dumps(line) + "\n")
    at = open_app(monkeypatch, tmp_path, **TINY, view="Predicted vs measured")
    assert not at.exception and not at.error
    assert len(at.warning) == 1 and "unknown device 'tpu-v9'" in at.warning[0].value


@pytest.mark.parametrize("view", ["Plans", "Selected plan", "Predicted vs measured", "Compare clusters"])
def test_every_tab_renders_for_a_pipelined_plan(monkeypatch, results_dir, view):
    at = open_app(monkeypatch, results_dir, **TINY, pp="2", view=view, tokens="1e9")  # tokens: the compare tab draws days
    assert not at.exception and not at.error
    assert charts(at) >= 1


def test_the_memory_headroom_is_an_input_and_decides_what_fits(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path, model="gpt3-1.3b", cluster="local-cpu", nodes="1", gpus_per_node="2",
                  device="cpu", global_batch="8", memory_headroom="0")
    assert not at.exception and "0 GiB of headroom" in at.caption[0].value
    assert "No configuration fits in the 8 GiB usable" in at.warning[0].value


@pytest.mark.parametrize("query, message", [
    (dict(model="no-such-model"), "model='no-such-model' is not one of"),
    (dict(nodes="-3"), "nodes='-3' is not a whole number from 1 to 100,000"),
    (dict(nodes="eight"), "nodes='eight' is not a whole number"),
    (dict(global_batch="1e9"), "global_batch='1e9' is not a whole number from 1 to 65,536"),
    (dict(**TINY, tp="3"), "tp='3' cannot be pinned here; expected auto or one of 1, 2"),
    (dict(memory_headroom="lots"), "memory_headroom='lots' is not a number of GiB from 0 to 1024"),
    (dict(view="Nope"), "view='Nope' is not one of Plans, Selected plan, Predicted vs measured, Compare clusters"),
    (dict(tokens="lots"), "tokens='lots' is not a number of tokens such as 15e12 or 15T"),
    (dict(framework="torchtitan"), "framework='torchtitan' is not one of meshplan, megatron, deepspeed, megatron-core"),
])
def test_a_link_with_a_bad_query_parameter_shows_the_error_instead_of_plans_for_the_defaults(monkeypatch, tmp_path, query, message):
    at = open_app(monkeypatch, tmp_path, **query)
    assert not at.exception
    assert len(at.error) == 1 and at.error[0].value.startswith("Link parameter ") and message in at.error[0].value
    assert "Nothing was planned" in at.error[0].value and not at.metric  # no plan of inputs the link did not ask for


# gpt3-13b fits one DGX node; on the 4x RTX 4090 workstation nothing fits.
COMPARE = dict(model="gpt3-13b", cluster="dgx-a100-80gb", nodes="1", global_batch="64", view="Compare clusters")


def test_training_tokens_and_price_add_days_gpu_hours_and_cost_beside_tokens_per_s(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path, **TINY, tokens="1e9", gpu_hour_price="0.5")
    assert not at.exception and not at.error
    metrics = {m.label: m.value for m in at.metric}
    tokens_per_s = float(metrics["Throughput (tokens/s)"].replace(",", ""))
    assert float(metrics["Days to train 1B tokens"]) == pytest.approx(1e9 / tokens_per_s / 86_400, abs=0.06)
    table = at.dataframe[0].value
    assert list(table.columns[:5]) == ["rank", "tokens_per_s", "days", "gpu_hours", "cost_usd"]
    assert list(table["cost_usd"]) == pytest.approx(list(table["gpu_hours"] * 0.5))
    assert "Days to train 1B tokens" not in {m.label for m in open_app(monkeypatch, tmp_path, **TINY).metric}  # none without tokens


def test_compare_tab_draws_days_and_cost_per_cluster_and_says_why_one_does_not_fit(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path, **COMPARE, tokens="1T", gpu_hour_price="2")
    assert not at.exception and not at.error
    at.multiselect(key="compare_clusters").set_value(["dgx-a100-80gb", "workstation-4x-rtx4090"]).run()
    assert not at.exception and not at.error and charts(at) == 1
    table = at.dataframe[0].value
    assert list(table["cluster"]) == ["dgx-a100-80gb (1×8)", "workstation-4x-rtx4090 (1×4)"]
    assert table.at[0, "cost_usd"] == pytest.approx(table.at[0, "gpu_hours"] * 2) and table.at[0, "reason"] == ""
    assert table.at[1, "reason"].startswith("nothing fits: ") and "rtx4090-pcie-24gb" in table.at[1, "reason"]
    assert len(at.warning) == 1 and at.warning[0].value.startswith("workstation-4x-rtx4090 (1×4): nothing fits: ")
    at.number_input(key="compare_price_dgx-a100-80gb").set_value(3.0).run()  # a cluster's own price wins over the sidebar's
    assert at.dataframe[0].value.at[0, "cost_usd"] == pytest.approx(at.dataframe[0].value.at[0, "gpu_hours"] * 3)


def test_compare_tab_without_tokens_shows_the_plans_and_asks_for_tokens(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path, **COMPARE)
    assert not at.exception and not at.error and charts(at) == 0
    assert "Give the training tokens in the sidebar" in at.info[0].value
    assert len(at.dataframe[0].value) == 3 and at.dataframe[0].value["tokens_per_s"].gt(0).all()


def test_fewer_training_tokens_than_one_iteration_is_an_error_naming_the_field(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path, **TINY, tokens="1k")
    assert not at.exception and len(at.error) == 1 and not at.metric
    assert "Training tokens: 1,000 tokens are fewer than one iteration's 2,048" in at.error[0].value


def test_plans_priced_for_another_framework_are_that_frameworks_search_and_say_so(monkeypatch, tmp_path):
    from planner.frameworks import MEGATRON_CORE, priced_elsewhere
    from planner.search import search
    from planner.specs import load_cluster, load_device, load_model

    inputs = dict(model="gpt3-13b", cluster="dgx-h100-80gb", nodes="1", global_batch="64")
    cluster = load_cluster("dgx-h100-80gb", 1)
    want = search(load_model("gpt3-13b"), cluster, load_device(cluster.device), 64, top=1, framework=MEGATRON_CORE).plans[0]
    at = open_app(monkeypatch, tmp_path, **inputs, framework="megatron-core", view="Selected plan")
    assert not at.exception and not at.error
    assert at.caption[0].value.endswith("priced for Megatron-Core as NVIDIA benchmarks it on H100")
    assert at.metric[0].value == f"{want.prediction.tokens_per_s:,.0f}"
    assert at.metric[0].value != open_app(monkeypatch, tmp_path, **inputs).metric[0].value  # meshplan's runtime differs
    assert priced_elsewhere("megatron-core", "plan.json") in [c.value for c in at.caption]
    assert "`planner export plan.json --to megatron`" in priced_elsewhere("megatron-core", "plan.json")
    at = open_app(monkeypatch, tmp_path, **inputs, framework="megatron-core", view="Compare clusters")
    at.multiselect(key="compare_clusters").set_value(["dgx-h100-80gb"]).run()
    row = at.dataframe[0].value.iloc[0]  # the id leaves the framework out: the throughput is Megatron-Core's
    assert not at.exception and row["plan_id"] == want.id and row["tokens_per_s"] == pytest.approx(want.prediction.tokens_per_s)


def test_a_headroom_over_the_devices_memory_is_refused_as_the_cli_refuses_it(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path, **TINY, memory_headroom="500")
    assert not at.exception
    assert any("leaves nothing of the" in e.value and "Memory headroom per device" in e.value for e in at.error)
