"""meshplan dashboard: `streamlit run dashboard/app.py`.

Sidebar pickers (model, cluster, global batch, headroom, the framework the plans are priced for, pins), then one
cached search, then four tabs: the ranked plans with every evaluated configuration; the selected plan's timeline,
time, memory, stages and launch command; predicted against measured from results/*.jsonl (MESHPLAN_RESULTS_DIR
overrides the folder); the same inputs planned on other clusters. Only the open tab is built, and the inputs and the
tab live in the URL, so a view can be shared or bookmarked.

Default inputs: gpt-39.1b on 8 DGX A100 nodes, global batch 512 (its search takes about 2 s here)."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `streamlit run` puts only dashboard/ on the path

from dashboard import charts, compare_view, data, inputs  # noqa: E402
from planner.compare import check_tokens, plan_training_cost  # noqa: E402
from planner.errors import MeshplanError  # noqa: E402
from planner.frameworks import FRAMEWORKS, LABELS, priced_elsewhere  # noqa: E402
from planner.plan import Plan, degrees_text  # noqa: E402
from planner.report import schedule_label, seconds_format, tflops_format, tflops_text, tokens_label  # noqa: E402
from planner.slurm import node_commands  # noqa: E402
from planner.search import search  # noqa: E402
from planner.validate import priced_with  # noqa: E402
from planner.specs import ClusterSpec, DeviceProfile, ModelSpec, load_device, nodes_x  # noqa: E402
from planner.memory import DEFAULT_MEMORY_HEADROOM_GIB, check_headroom  # noqa: E402

DEFAULT_MODEL, DEFAULT_CLUSTER, DEFAULT_NODES, DEFAULT_BATCH = "gpt-39.1b", "dgx-a100-80gb", 8, 512
TABS = ["Plans", "Selected plan", "Predicted vs measured", "Compare clusters"]
QP = "query-params"


@st.cache_resource(show_spinner=False, max_entries=8)
def cached_search(model: ModelSpec, cluster: ClusterSpec, global_batch: int, pins: tuple, headroom_gib: float, framework: str):
    """The search and its tables, once per input set (the objects are frozen; nobody mutates the frames)."""
    device = load_device(cluster.device)
    result = search(model, cluster, device, global_batch, dict(pins), memory_headroom_gib=headroom_gib,
                    framework=FRAMEWORKS[framework])
    return result, data.plans_frame(result.plans), data.candidates_frame(result.candidates)


@st.cache_resource(show_spinner=False, max_entries=16)
def cached_timeline(plan: Plan, device: DeviceProfile, framework: str | None = None) -> data.TimelineView:
    return data.predicted_timeline(plan, device, framework)


@st.cache_data(show_spinner=False, max_entries=4)
def cached_validation(files: tuple, mtimes: tuple):
    return data.load_validation(list(files))


def reset_cluster_fields() -> None:
    """A new cluster preset brings its own nodes, GPUs per node and device."""
    text = inputs.preset_text("clusters", st.session_state["cluster"])
    st.session_state["nodes"] = DEFAULT_NODES if st.session_state["cluster"] == DEFAULT_CLUSTER else inputs.parse_yaml(text, "preset")["nodes"]
    st.session_state["gpus_per_node"] = inputs.default_gpus_per_node(text)
    st.session_state["device"] = inputs.parse_yaml(text, "preset")["device"]


def sidebar() -> tuple[ModelSpec, ClusterSpec, int, dict, float, str]:
    """The pickers. Raises MeshplanError (or UnicodeDecodeError for an upload) on bad input."""
    sb = st.sidebar
    sb.header("Inputs")
    models = inputs.presets("models")
    model_name = sb.selectbox("Model preset", models, index=models.index(DEFAULT_MODEL), key="model", bind=QP)
    with sb.expander("Edit or upload the model YAML (or a Hugging Face config.json)"):
        upload = st.file_uploader("Model YAML or config.json (replaces the text below)", type=["yaml", "yml", "json"], key="model_file")
        text = st.text_area("Model YAML", inputs.preset_text("models", model_name), height=190, key=f"model_yaml_{model_name}",
                            help="a meshplan model YAML, or paste a Hugging Face config.json (read as `planner plan --model` reads one)")
    clusters = inputs.presets("clusters")
    cluster_name = sb.selectbox("Cluster preset", clusters, index=clusters.index(DEFAULT_CLUSTER), key="cluster",
                                bind=QP, on_change=reset_cluster_fields)
    cluster_text = inputs.preset_text("clusters", cluster_name)
    c1, c2 = sb.columns(2)
    nodes = c1.number_input("Nodes", *inputs.NODES_RANGE, DEFAULT_NODES, key="nodes", bind=QP)
    gpus = c2.number_input("GPUs per node", *inputs.GPUS_PER_NODE_RANGE, inputs.default_gpus_per_node(cluster_text), key="gpus_per_node", bind=QP)
    devices = inputs.device_names()
    preset_device = inputs.parse_yaml(cluster_text, cluster_name)["device"]
    device = sb.selectbox("Device", devices, index=devices.index(preset_device) if preset_device in devices else 0,
                          key="device", bind=QP)
    with sb.expander("Edit the cluster YAML (links)"):
        st.caption("Nodes, GPUs per node and device come from the pickers above.")
        cluster_text = st.text_area("Cluster YAML", cluster_text, height=190, key=f"cluster_yaml_{cluster_name}")
    batch = sb.number_input("Global batch (sequences)", *inputs.GLOBAL_BATCH_RANGE, DEFAULT_BATCH, key="global_batch", bind=QP)
    headroom = sb.number_input("Memory headroom per device (GiB)", *inputs.HEADROOM_RANGE_GIB, DEFAULT_MEMORY_HEADROOM_GIB, step=0.5,
                               key="memory_headroom", bind=QP,
                               help="Kept free beyond the predicted peak (allocator fragmentation, communication buffers); "
                                    f"default {DEFAULT_MEMORY_HEADROOM_GIB:g} GiB, as `planner plan --memory-headroom`.")
    framework = sb.selectbox("Priced for (framework)", list(LABELS), key="framework", bind=QP,
                             help="The software that runs the plans, as `planner plan --framework`: "
                                  + "; ".join(f"{k}: {v}" for k, v in LABELS.items()) + ". Time and memory differ "
                                  "(overlap, fused kernels, gradient buffers); `planner export plan.json --to megatron` "
                                  "writes a plan's Megatron arguments.")

    options = inputs.pin_options(int(nodes) * int(gpus), int(batch))
    choices = {}
    # Before its widget exists on a first load, a pin lives only in the URL.
    pinned = any(st.session_state.get(knob, st.query_params.get(knob, "auto")) != "auto" for knob in options)
    with sb.expander("Pin knobs (the search chooses the rest)", expanded=pinned):
        for knob, opts in options.items():
            choices[knob] = st.selectbox(knob.replace("_", " "), ["auto"] + opts, key=knob, bind=QP)

    model_text = upload.getvalue().decode("utf-8") if upload is not None else text
    model = inputs.model_from_yaml(model_text, upload.name if upload is not None else "model YAML")
    cluster = inputs.cluster_from_yaml(cluster_text, int(nodes), int(gpus), device)
    return model, cluster, int(batch), inputs.pins_from_choices(choices), float(headroom), framework


def training_sidebar() -> tuple[str, float | None]:
    """The training tokens (text) and price per GPU-hour, as planner plan --tokens --gpu-hour-price take them."""
    sb = st.sidebar
    sb.header("Time and cost to train")
    tokens = sb.text_input("Training tokens", "", key="tokens", bind=QP, placeholder="e.g. 15e12, 15T or 300B",
                           help="The whole run's tokens: adds days, GPU-hours and (with a price) cost beside tokens/s.")
    price = sb.number_input("Price per GPU-hour (US$)", min_value=0.01, value=None, step=0.1, key="gpu_hour_price", bind=QP,
                            placeholder="no price", help="One GPU for one hour; the cost is GPU-hours × this.")
    return tokens, price


def training_inputs(model: ModelSpec, batch: int, tokens: str, price: float | None) -> tuple[int, float | None] | None:
    """(tokens, price) checked against the model and batch; None without tokens. Raises MeshplanError."""
    training = data.training_inputs(tokens, price)
    if training:
        check_tokens(training[0], model, batch, "Training tokens")
    return training


def plans_tab(plans_df, cands_df, usable_gib: float) -> None:
    st.subheader("Ranked plans")
    st.caption("Fastest first. Click a column header to sort.")
    first = ["rank", "tokens_per_s", *[c for c in ("days", "gpu_hours", "cost_usd") if c in plans_df], "tflops_per_gpu", "mfu_pct",
             "peak_memory_gib", "fits", "iteration_s"]
    cols = first + [c for c in plans_df.columns if c not in first and (c != "reason" or not plans_df["fits"].all())]
    shown = plans_df[cols].assign(tokens_per_s=plans_df["tokens_per_s"].round().astype(int))
    st.dataframe(shown, hide_index=True, column_config={
        "rank": "#", "plan_id": "plan id", "micro_batch": "micro-batch", "num_microbatches": "microbatches",
        "sequence_parallel": "SP", "zero": "ZeRO", "cp": "cp", "layers_per_stage": "layers/stage",
        "iteration_s": st.column_config.NumberColumn("iteration (s)", format=seconds_format(plans_df["iteration_s"].min())),
        "tflops_per_gpu": st.column_config.NumberColumn("TFLOP/s per GPU", format=tflops_format(plans_df["tflops_per_gpu"].min())),
        **compare_view.metric_columns(), "fits": "fits", "reason": "why it does not fit"})
    color_by = st.segmented_control("Colour the configurations by", ["schedule", "tp", "pp", "micro_batch", "recompute"],
                                    default="schedule", key="color_by") or "schedule"
    st.plotly_chart(charts.plans_scatter(cands_df, plans_df, usable_gib, color_by), key="scatter")


def plan_tab(plan: Plan, device: DeviceProfile, usable_gib: float) -> None:
    view = cached_timeline(plan, device)
    st.plotly_chart(charts.timeline_figure(view, f"Pipeline timeline of one iteration ({schedule_label(plan)}, "
                                                 f"{plan.num_microbatches} microbatches, predicted)"), key="timeline")
    left, right = st.columns(2)
    left.plotly_chart(charts.breakdown_figure(data.breakdown_frame(plan), plan.prediction.iteration_s), key="breakdown")
    right.plotly_chart(charts.memory_figure(data.memory_frame(plan, device), usable_gib), key="memory")
    st.subheader("Layers of each stage")
    st.dataframe(data.stages_frame(plan).drop(columns=["first_layer", "end_layer"]), hide_index=True, column_config={
        "layers": "layers (inclusive)", "recomputed_blocks": "recomputed blocks",
        "memory_gib": st.column_config.NumberColumn("device memory (GiB)", format="%.1f")})
    st.subheader("Run it")
    st.download_button("Download plan.json", data.plan_json(plan), file_name="plan.json",
                       mime="application/json", key="download_plan")
    if elsewhere := priced_elsewhere(plan.framework, "plan.json"):
        st.caption(elsewhere)
    # planner launch plan.json --print: the same command, with its comments (MASTER_ADDR, on every node)
    st.code(node_commands(plan, "plan.json", plan.cluster.nodes, plan.cluster.gpus_per_node), language="bash", wrap_lines=True)
    st.caption("As `planner launch plan.json --print` prints it. Add --results results/NAME.jsonl after plan.json to "
               "measure the run.")


def validation_tab() -> None:
    folder = data.results_dir()
    files = data.results_files(folder)
    if not files:
        st.info(f"No results files in {folder}. Run a plan with `torchrun ... -m runtime.launch plan.json --results "
                f"{folder}/NAME.jsonl`, or point {data.RESULTS_DIR_ENV} at a folder of them.")
        return
    df, report, plans = cached_validation(tuple(files), tuple(Path(f).stat().st_mtime for f in files))
    for message in report["skipped"]:
        st.warning(f"Skipped: {message}")
    if df.empty:
        st.info(f"No valid runs in {len(files)} results file(s) in {folder}.")
        return
    for m in report["profile_mismatches"]:
        st.warning(m["message"])
    st.caption(f"{len(files)} results file(s) in {folder}. Each run's plan is priced again with today's device profile; "
               f"repeated runs of a plan are pooled (median step time). {priced_with(report)}")
    rho = report["spearman"]
    c1, c2, c3 = st.columns(3)
    c1.metric("Plans measured", len(df), help=f"from {len(files)} file(s) in {folder}")
    c2.metric("Mean absolute error of step time", f"{report['mape_pct']:.1f}%")
    c3.metric("Rank correlation (Spearman)", "n/a" if rho is None else f"{rho:.2f}",
              help="Does the planner rank the measured plans in the right order? Needs 3 plans or more.")
    left, right = st.columns(2)
    left.plotly_chart(charts.validation_figure(df), key="validation")
    right.plotly_chart(charts.error_figure(df), key="errors")
    memory = data.memory_validation_frame(report)
    if not memory.empty:
        c4, c5 = st.columns([1, 2])
        c4.metric("Mean absolute error of peak memory", f"{report['memory_mape_pct']:.1f}%",
                  help="every rank of every run: predicted (less the framework overhead) against the runtime's peak")
        c5.plotly_chart(charts.memory_validation_figure(memory), key="memory_validation")
    order = ["plan_id", "tp", *(["cp"] if (df["cp"] > 1).any() else []), "pp", "dp", "micro_batch", "schedule", "measured_step_s", "predicted_step_s", "error_pct",
             "spread_pct", "machine_drift", "rescaled_error_pct", "waited_pct", "unloaded_error_pct", "unloaded_rescaled_error_pct", "measured_tokens_per_s", "predicted_tokens_per_s", "repeats",
             "model", "device", "run"]
    if report.get("rescaled_mape_pct") is not None:
        st.caption(f"Each run re-timed a reference block before training: the machine ran ×{df['machine_drift'].min():.2f} to "
                   f"×{df['machine_drift'].max():.2f} the profile's time. With each prediction scaled by its run's factor the "
                   f"mean absolute error is {report['rescaled_mape_pct']:.1f}% (compute slowed by other processes is "
                   f"corrected; their effect on communication is not).")
    if report.get("unloaded_mape_pct") is not None:
        st.caption(f"Each rank's training thread recorded how long it waited for a core (Linux run-queue delay): the "
                   f"ranks waited {df['waited_pct'].min():.0f}% to {df['waited_pct'].max():.0f}% of a step (the slowest rank; "
                   f"under tensor or context parallelism the slowest in each stretch between blocks). With each step taken "
                   f"less that wait the mean absolute error is {report['unloaded_mape_pct']:.1f}%"
                   + (f"; less that wait and with each prediction scaled by its run's factor, "
                      f"{report['unloaded_rescaled_mape_pct']:.1f}%." if report.get("unloaded_rescaled_mape_pct") is not None else "."))
    st.dataframe(df[order], hide_index=True, column_config={
        "waited_pct": st.column_config.NumberColumn("waited for a core %", format="%.0f",
                                                    help="the ranks' run-queue delay (the slowest rank's; block by block under tp or cp), share of the median step"),
        "unloaded_error_pct": st.column_config.NumberColumn("error less waits %", format="%+.1f"),
        "unloaded_rescaled_error_pct": st.column_config.NumberColumn("less waits, scaled %", format="%+.1f",
                                                                     help="the step less waits against the prediction scaled by the run's machine factor"),
        "machine_drift": st.column_config.NumberColumn("machine vs profile", format="×%.2f",
                                                       help="the reference block's time before this run over its time in the profile"),
        "rescaled_error_pct": st.column_config.NumberColumn("error, rescaled %", format="%+.1f"),
        "plan_id": "plan id", "micro_batch": "micro-batch", "run": "results line(s)",
        "predicted_step_s": st.column_config.NumberColumn("predicted step (s)", format="%.3g"),
        "measured_step_s": st.column_config.NumberColumn("measured step (s)", format="%.3g"),
        "error_pct": st.column_config.NumberColumn("error %", format="%+.1f"),
        "spread_pct": st.column_config.NumberColumn("spread ±%", format="%.0f"),
        "predicted_tokens_per_s": st.column_config.NumberColumn("predicted tokens/s", format="localized"),
        "measured_tokens_per_s": st.column_config.NumberColumn("measured tokens/s", format="localized")})
    timed = df[df["has_stage_timings"]]
    if timed.empty:
        st.caption("No run recorded per-stage timings, so there is no measured timeline to draw.")
        return
    pick = st.selectbox("Run to compare timelines", timed.index, key="timeline_run",
                        format_func=lambda i: f"{timed.at[i, 'plan_id']} · {timed.at[i, 'run']}")
    plan = plans[timed.at[pick, "plan_id"]]
    measured = data.measured_timeline(plan, timed.at[pick, "stage_timings"])
    predicted = cached_timeline(plan, data.device_for(plan), "meshplan")  # what ran, whatever it was priced for
    x_max = max(predicted.iteration_s, measured.iteration_s if measured else 0.0)
    left, right = st.columns(2)
    left.plotly_chart(charts.timeline_figure(predicted, "Predicted timeline", x_max), key="pred_timeline")
    if measured is None:
        right.info("This run's per-stage timings do not cover every stage.")
    else:
        right.plotly_chart(charts.timeline_figure(measured, "Measured per-stage times, replayed through the schedule", x_max),
                           key="meas_timeline")


class _NoSearch(Exception):
    """The inputs were not the ones asked for (a bad link): show the pickers, search nothing."""


def main() -> None:
    st.set_page_config(page_title="meshplan", page_icon="🧮", layout="wide")
    st.title("meshplan: parallel plans for training a GPT")
    found = None
    # Read the link before the widgets do: a widget drops a value it cannot take and shows its default instead.
    params = st.query_params.to_dict()
    cluster_name = params.get("cluster") if params.get("cluster") in inputs.presets("clusters") else DEFAULT_CLUSTER
    bad_link = inputs.link_errors(params, TABS, {"nodes": DEFAULT_NODES, "global_batch": DEFAULT_BATCH, "gpus_per_node":
                                               inputs.default_gpus_per_node(inputs.preset_text("clusters", cluster_name))})
    for message in bad_link:
        st.error(f"Link parameter {message}. Nothing was planned; pick the value in the sidebar.")
    try:
        model, cluster, batch, pins, headroom, framework = sidebar()
        tokens, price = training_sidebar()
        device = load_device(cluster.device)
        check_headroom(headroom, device, "Memory headroom per device")
        usable = device.memory_gib - headroom
        if bad_link:
            raise _NoSearch
        training = training_inputs(model, batch, tokens, price)
        with st.spinner(f"Searching plans for {model.name} on {cluster.gpus:,} × {cluster.device}..."):
            found = cached_search(model, cluster, batch, tuple(sorted(pins.items())), headroom, framework)
    except MeshplanError as e:
        st.error(f"Cannot plan with these inputs: {e}")
    except UnicodeDecodeError:
        st.error("The uploaded model file is not UTF-8 text; upload a YAML file or a config.json.")
    except _NoSearch:
        pass  # the link's errors are shown above; plans for inputs it did not ask for would mislead

    if found is not None:
        result, plans_df, cands_df = found
        if training:
            plans_df = data.with_training(plans_df, result.plans, training)
        best = result.plans[0]
        st.caption(f"{model.name} on {cluster.gpus:,} × {device.label} ({nodes_x(cluster.nodes, cluster.gpus_per_node, '×')}), "
                   f"global batch {batch}: searched {result.searched:,} configurations in {result.search_s:.2f} s "
                   f"(every one bounded, {result.split:,} layer splits solved, {result.priced:,} priced: the ranking is exact "
                   f"under the model); {headroom:g} GiB of headroom per device; priced for {LABELS[framework]}"
                   + (f"; pinned {', '.join(f'{k}={v}' for k, v in pins.items())}" if pins else ""))
        if not best.prediction.fits:
            st.warning(f"No configuration fits in the {usable:g} GiB usable on one {device.name} ({device.memory_gib:g} GiB less "
                       f"{headroom:g} GiB headroom). Below are the closest ones. "
                       f"Best: {best.prediction.reason}. Try more nodes, a smaller micro-batch, recomputation or a "
                       f"distributed optimizer.")
        pick = st.selectbox("Plan to inspect", range(len(result.plans)), key="plan_rank", format_func=lambda i: (
            f"#{i + 1} · {degrees_text(result.plans[i], '×')} · micro-batch "
            f"{result.plans[i].micro_batch} · {schedule_label(result.plans[i])} · "
            f"{result.plans[i].prediction.tokens_per_s:,.0f} tokens/s" + ("" if result.plans[i].prediction.fits else " · does not fit")))
        plan = result.plans[pick]
        pr = plan.prediction
        cols = st.columns(5)
        cols[0].metric("Throughput (tokens/s)", f"{pr.tokens_per_s:,.0f}")
        cols[1].metric("Iteration (s)", seconds_format(pr.iteration_s) % pr.iteration_s)
        cols[2].metric("TFLOP/s per GPU", tflops_text(pr.tflops_per_gpu))
        cols[3].metric("MFU", f"{100 * pr.mfu:.1f}%")
        cols[4].metric(f"Peak memory (GiB of {usable:g} usable)", f"{pr.peak_memory_gib:.1f}")
        if training and pr.fits:
            cost = plan_training_cost(plan, *training)
            cols = st.columns(5)
            cols[0].metric(f"Days to train {tokens_label(training[0])} tokens", f"{cost.days:,.1f}",
                           help="tokens / tokens/s / 86,400: no time for restarts, checkpoints or evaluation")
            cols[1].metric("GPU-hours", f"{cost.gpu_hours:,.0f}", help=f"days × 24 × {plan.cluster.gpus:,} GPUs")
            cols[2].metric("Cost (US$)", "no price" if cost.cost_usd is None else f"{cost.cost_usd:,.0f}",
                           help="GPU-hours × the price per GPU-hour")

    tabs = st.tabs(TABS, key="view", bind=QP)
    for tab, name in zip(tabs, TABS):
        if tab.open is False:
            continue  # only the open tab is built
        with tab:
            if name == "Predicted vs measured":
                try:
                    validation_tab()
                except MeshplanError as e:  # e.g. a run on a device with no profile here
                    st.error(f"Cannot compare these results with the planner: {e}")
            elif found is None:
                st.info("Fix the inputs (see the message above) to see plans.")
            elif name == "Compare clusters":
                compare_view.compare_tab(model, batch, pins, headroom, training, cluster.nodes, framework)
            elif name == "Plans":
                plans_tab(plans_df, cands_df, usable)
            else:
                plan_tab(plan, device, usable)


main()
