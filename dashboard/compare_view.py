"""The dashboard's "Compare clusters" tab: the sidebar's model, batch, pins, headroom, framework, tokens and price, planned on
each cluster picked here (planner.compare.compare, as `planner compare` does), drawn as bars of days and cost per
cluster with the plan in the hover, and a table with the reason where nothing fits."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, data, inputs
from planner.compare import CompareTarget, compare
from planner.frameworks import FRAMEWORKS
from planner.specs import ModelSpec, load_cluster, load_device

DEFAULT_CLUSTERS = ("dgx-a100-80gb", "dgx-h100-80gb", "dgx-h200-141gb")


@st.cache_resource(show_spinner=False, max_entries=8)
def cached_compare(model: ModelSpec, global_batch: int, tokens: int | None, targets: tuple, pins: tuple, headroom_gib: float,
                   framework: str):
    """One search per cluster, once per input set (the specs are frozen, so they key the cache)."""
    return compare(model, global_batch, tokens, targets, dict(pins), memory_headroom_gib=headroom_gib,
                   framework=FRAMEWORKS[framework])


def metric_columns() -> dict:
    """How the plans table and the compare table show throughput, MFU, memory, days, GPU-hours and cost."""
    number = st.column_config.NumberColumn
    return {"tokens_per_s": number("tokens/s", format="localized"), "mfu_pct": number("MFU %", format="%.1f"),
            "peak_memory_gib": number("peak memory (GiB)", format="%.1f"), "days": number("days to train", format="%.1f"),
            "gpu_hours": number("GPU-hours", format="localized"), "cost_usd": number("cost (US$)", format="localized")}


def _targets(default_nodes: int, price: float | None) -> list[CompareTarget]:
    """The clusters picked, each with its nodes and price (blank: the sidebar's price)."""
    presets = inputs.presets("clusters")
    picked = st.multiselect("Clusters to compare", presets, default=[c for c in DEFAULT_CLUSTERS if c in presets],
                            key="compare_clusters", help="Each is planned with the sidebar's model, batch, pins, headroom and framework.")
    targets = []
    for name in picked:
        file_nodes = int(inputs.parse_yaml(inputs.preset_text("clusters", name), name)["nodes"])
        left, right = st.columns(2)
        # A one-node preset (a workstation) stays one node; a GPU cluster starts at the sidebar's node count.
        nodes = left.number_input(f"{name}: nodes", *inputs.NODES_RANGE, file_nodes if file_nodes == 1 else default_nodes,
                                  key=f"compare_nodes_{name}")
        own = right.number_input(f"{name}: US$ per GPU-hour", min_value=0.01, value=None, step=0.1, key=f"compare_price_{name}",
                                 placeholder="the sidebar's price" if price is not None else "no price")
        cluster = load_cluster(name, int(nodes))
        targets.append(CompareTarget(cluster, load_device(cluster.device), own if own is not None else price))
    return targets


def compare_tab(model: ModelSpec, global_batch: int, pins: dict, headroom_gib: float, training: tuple[int, float | None] | None,
                default_nodes: int, framework: str = "meshplan") -> None:
    tokens, price = training if training else (None, None)
    targets = _targets(default_nodes, price)
    if not targets:
        st.info("Pick one cluster or more to compare.")
        return
    if tokens is None:
        st.info("Give the training tokens in the sidebar (e.g. 15e12) to see the days, GPU-hours and cost on each cluster.")
    with st.spinner(f"Planning {model.name} on {len(targets)} cluster(s)..."):
        rows = cached_compare(model, global_batch, tokens, tuple(targets), tuple(sorted(pins.items())), headroom_gib, framework)
    df = data.compare_frame(rows)
    unpriced = [c for c, p, ok in zip(df["cluster"], df["gpu_hour_price_usd"], df["fits"]) if ok and p != p]  # p != p: NaN
    if tokens is not None and unpriced and len(unpriced) < int(df["fits"].sum()):
        st.warning(f"No price for {', '.join(unpriced)}: its cost is not drawn. Give one above or in the sidebar.")
    for cluster, reason in zip(df["cluster"], df["reason"]):
        if reason:
            st.warning(f"{cluster}: {reason}")
    if tokens is not None and df["fits"].any():
        st.plotly_chart(charts.compare_figure(df), key="compare_chart")
    st.dataframe(df.drop(columns=["fits"]), hide_index=True, column_config={
        "gpus": "GPUs", "plan": "best plan (tp×pp×dp, micro-batch, schedule, recompute)", "plan_id": "plan id",
        **metric_columns(), "gpu_hour_price_usd": st.column_config.NumberColumn("US$ per GPU-hour", format="%.2f"),
        "reason": "why nothing fits"})
    st.caption("days = tokens / tokens/s / 86,400; GPU-hours = days × 24 × GPUs; cost = GPU-hours × price; no time for "
               "restarts, checkpoints or evaluation. Predictions with each device's profile (datasheet unless measured).")
