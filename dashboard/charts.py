"""Plotly figure builders for the dashboard: each takes a DataFrame from dashboard.data and returns a Figure
with a title, axis labels with units and a colour per meaning that stays the same across figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboard.data import TimelineView
from planner.report import seconds_format

# Tableau 10: distinguishable for the common colour-vision deficiencies, readable on white.
OP_COLORS = {"forward": "#4C78A8", "backward": "#F58518", "recompute": "#B279A2", "send": "#54A24B"}
PART_COLORS = {"compute": "#4C78A8", "TP communication": "#72B7B2", "PP send/recv": "#54A24B",
               "DP gradient reduction": "#EECA3B", "pipeline bubble": "#BAB0AC", "optimizer step": "#F58518",
               "weights": "#4C78A8", "gradients": "#72B7B2", "optimizer state": "#F58518",
               "gathered weights/gradients (ZeRO 2, 3)": "#9D755D", "activations": "#E45756", "framework overhead": "#BAB0AC"}
SCATTER_SYMBOLS = {"fits": "circle", "bound only": "diamond-open", "does not fit": "x-thin-open"}
LEVEL_HOVER = {"priced": "priced by the simulator", "split": "layer split solved: at most this fast",
               "bound": "bound only: at most this fast, at least this much memory"}
CATEGORY_COLORS = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#EECA3B", "#FF9DA6", "#9D755D"]
LAYOUT = dict(template="plotly_white", font=dict(size=13), margin=dict(l=10, r=10, t=80, b=10))


def _title(text: str, note: str = "") -> dict:
    return dict(text=text + (f"<br><sup>{note}</sup>" if note else ""), x=0.0, xanchor="left")


def plans_scatter(cands: pd.DataFrame, plans: pd.DataFrame, memory_limit_gib: float, color_by: str = "schedule") -> go.Figure:
    """Every evaluated configuration: predicted tokens/s against peak memory per GPU, coloured by a knob,
    shaped by whether it fits (data.candidates_frame's memory_status); stars are the ranked plans and the
    dashed line is the memory a plan may use (the device's less the headroom)."""
    fig = go.Figure()
    # One trace per (colour, memory status, exact) so the hover text is one short string per point: an
    # 11k-point scatter stays well under a megabyte for the browser.
    for i, (value, group) in enumerate(cands.groupby(color_by, sort=True)):
        color = CATEGORY_COLORS[i % len(CATEGORY_COLORS)]
        statuses = [st for st in SCATTER_SYMBOLS if (group["memory_status"] == st).any()]  # filled marker first in the legend
        for j, status in enumerate(statuses):
            for (exact, level), sub in group[group["memory_status"] == status].groupby(["exact", "level"]):
                how = LEVEL_HOVER[level]
                fig.add_trace(go.Scattergl(
                    x=sub["peak_memory_gib"].round(2), y=sub["tokens_per_s"].round(0), mode="markers", text=sub["knobs"],
                    hovertemplate=f"tp×pp×dp %{{text}}<br>%{{y:,.0f}} tokens/s · %{{x:.1f}} GiB<br>{status} · {how}<extra></extra>",
                    name=f"{color_by} {value}", legendgroup=str(value), showlegend=j == 0 and not exact,
                    marker=dict(color=color, size=8 if exact else 6, symbol=SCATTER_SYMBOLS[status], opacity=0.8 if status == "fits" else 0.35,
                                line=dict(color="black" if exact else color, width=1.5 if exact else 1))))  # open symbols are all stroke
    # WebGL traces draw above SVG ones, so the stars and the limit are WebGL too, added last.
    if len(plans):
        fig.add_trace(go.Scattergl(
            x=plans["peak_memory_gib"], y=plans["tokens_per_s"], mode="markers+text", name="ranked plans",
            text=["best" if r == 1 else "" for r in plans["rank"]], textposition="top center", customdata=plans["rank"],
            marker=dict(symbol="star", size=15, color="#FFD700", line=dict(color="black", width=1)),
            hovertemplate="plan #%{customdata}: %{y:,.0f} tokens/s, %{x:.1f} GiB<extra></extra>"))
    # A trace, not add_vline: on a log axis a shape's x is log10 of the value.
    fig.add_trace(go.Scattergl(x=[memory_limit_gib] * 2, y=[0, 1.05 * cands["tokens_per_s"].max()], mode="lines",
                             name=f"usable memory {memory_limit_gib:g} GiB", line=dict(color="#E45756", dash="dash", width=2),
                             hoverinfo="skip"))
    fig.update_layout(**LAYOUT, height=540, title=_title(
        f"All {len(cands):,} evaluated configurations: throughput against memory",
        "● fits (layer split solved) · ◇ bound only: it cannot beat the ranked plans, so the search went no further "
        "(at most this fast, at least this much memory) · ✕ does not fit<br>"
        "outlined: priced by the simulator; hover for the knobs"))
    fig.update_layout(margin=dict(t=100))
    fig.update_xaxes(title_text="peak memory per GPU (GiB, log scale)", type="log")
    fig.update_yaxes(title_text="predicted throughput (tokens/s)", rangemode="tozero")
    return fig


def timeline_figure(view: TimelineView, title: str, x_max_s: float | None = None) -> go.Figure:
    """Gantt chart of one iteration: a row per pipeline device, bars per op; white space is idle (bubble).
    Sends ride in a thin lane under their device's row, since they overlap its compute. x_max_s puts two
    timelines on one time scale."""
    ev = view.events
    end = max(view.iteration_s, x_max_s or 0.0)
    windows = [(0.0, end)] if view.gap is None else [(0.0, view.gap[0]), (view.gap[1], end)]
    fig = make_subplots(rows=1, cols=len(windows), shared_yaxes=True, horizontal_spacing=0.02)
    # About 6 significant digits of the iteration is finer than a pixel and halves what the browser receives.
    decimals = max(0, 6 - int(np.ceil(np.log10(max(end, 1e-9)))))
    for col, (lo, hi) in enumerate(windows, 1):
        in_window = ev[(ev["end_s"] > lo) & (ev["start_s"] < hi)]
        for op, color in OP_COLORS.items():
            sub = in_window[in_window["op"] == op]
            if sub.empty:
                continue
            send = op == "send"
            fig.add_trace(go.Bar(
                orientation="h", base=sub["start_s"].round(decimals), x=(sub["end_s"] - sub["start_s"]).round(decimals),
                y=sub["device"] + (0.36 if send else 0.0), width=0.16 if send else 0.62,
                marker=dict(color=color, line=dict(width=0)), name=op, legendgroup=op, showlegend=col == 1,
                customdata=sub[["stage", "microbatch"]].to_numpy(),
                hovertemplate=(f"{op} · stage %{{customdata[0]}} · microbatch %{{customdata[1]}}<br>"
                               "starts at %{base:.4g} s, takes %{x:.3g} s<extra></extra>")), row=1, col=col)
    for col, (lo, hi) in enumerate(windows, 1):
        fig.update_xaxes(range=[lo, hi], title_text="time within one iteration (s)", row=1, col=col)
    devices = sorted(view.idle_pct)
    fig.update_yaxes(tickvals=devices, ticktext=[f"{_device_label(d, view.stages[d])} · idle {max(0.0, view.idle_pct[d]):.0f}%"
                                                 for d in devices],
                     autorange="reversed", row=1, col=1)
    note = "white space is idle time (the pipeline bubble); sends run under each row"
    fig.update_layout(**LAYOUT, barmode="overlay", bargap=0, height=140 + 34 * max(3, len(devices)),
                      title=_title(title, "; ".join(x for x in (view.note, note) if x)))
    return fig


def _device_label(device: int, stages: list[int]) -> str:
    """'stage 3' when a device runs one stage; 'device 3: stages 3, 11, …' when interleaved."""
    if stages == [device]:
        return f"stage {device}"
    return f"device {device}: stages {', '.join(map(str, stages[:2]))}{', …' if len(stages) > 2 else ''}"


def breakdown_figure(df: pd.DataFrame, iteration_s: float) -> go.Figure:
    """Seconds per part of the iteration on the slowest device, with each part's share."""
    seconds = seconds_format(iteration_s)  # every bar to the same decimals, the title's
    fig = go.Figure(go.Bar(
        x=df["seconds"], y=df["part"], orientation="h", marker_color=[PART_COLORS[p] for p in df["part"]],
        text=[f"{seconds % s} s ({p:.0f}%)" for s, p in zip(df["seconds"], df["share_pct"])], textposition="auto",
        hovertemplate="%{y}: %{x:.4g} s<extra></extra>"))
    fig.update_layout(**LAYOUT, height=330, showlegend=False,
                      title=_title(f"Where the {seconds % iteration_s} s of an iteration go", "slowest pipeline device"))
    fig.update_xaxes(title_text="time per iteration (s)")
    fig.update_yaxes(autorange="reversed")
    return fig


def memory_figure(df: pd.DataFrame, capacity_gib: float) -> go.Figure:
    """Stacked memory per pipeline device against the memory a plan may use (the device's less the headroom)."""
    fig = go.Figure()
    labels = [f"dev {d}" for d in df["device"].unique()]
    for part in df["part"].unique():
        sub = df[df["part"] == part]
        fig.add_trace(go.Bar(x=[f"dev {d}" for d in sub["device"]], y=sub["gib"], name=part, marker_color=PART_COLORS[part],
                             customdata=sub[["stages"]].to_numpy(),
                             hovertemplate=f"{part}: %{{y:.2f}} GiB<br>stages %{{customdata[0]}}<extra></extra>"))
    fig.add_hline(y=capacity_gib, line=dict(color="#E45756", dash="dash", width=2),
                  annotation_text=f"usable memory {capacity_gib:g} GiB", annotation_position="top left",
                  annotation_font_color="#E45756")
    totals = df.groupby("device")["gib"].sum()
    fig.update_layout(**LAYOUT, barmode="stack", height=380, title=_title(
        "Memory per pipeline device", f"largest {totals.max():.1f} GiB of {capacity_gib:g} GiB"))
    fig.update_xaxes(title_text="pipeline device", categoryorder="array", categoryarray=labels)
    fig.update_yaxes(title_text="memory (GiB)", range=[0, 1.1 * max(capacity_gib, totals.max())])
    return fig


def validation_figure(df: pd.DataFrame) -> go.Figure:
    """Predicted against measured step time per plan run, with the y = x line (a perfect prediction)."""
    lo = 0.8 * min(df["measured_step_s"].min(), df["predicted_step_s"].min())
    hi = 1.25 * max(df["measured_step_s"].max(), df["predicted_step_s"].max())
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x (exact prediction)",
                             line=dict(color="#888888", dash="dash")))
    fig.add_trace(go.Scatter(
        x=df["measured_step_s"], y=df["predicted_step_s"], mode="markers+text", name="plan runs",
        text=[f"{p} ({e:+.0f}%)" for p, e in zip(df["plan_id"], df["error_pct"])], textposition="top center",
        marker=dict(size=11, color="#4C78A8", line=dict(color="black", width=1)),
        customdata=df[["plan_id", "tp", "pp", "dp", "micro_batch", "schedule", "error_pct"]].to_numpy(),
        hovertemplate=("plan %{customdata[0]}: tp %{customdata[1]} · pp %{customdata[2]} · dp %{customdata[3]} · "
                       "micro-batch %{customdata[4]} · %{customdata[5]}<br>measured %{x:.3g} s, predicted %{y:.3g} s "
                       "(%{customdata[6]:+.1f}%)<extra></extra>")))
    fig.update_layout(**LAYOUT, height=460, title=_title("Predicted against measured step time",
                                                         "above the line: the planner predicted a slower step than measured"),
                      legend=dict(x=0.01, y=0.99, xanchor="left", yanchor="top", bgcolor="rgba(255,255,255,0.8)"))
    fig.update_xaxes(title_text="measured step time (s, log scale)", type="log", range=[np.log10(lo), np.log10(hi)])
    fig.update_yaxes(title_text="predicted step time (s, log scale)", type="log", range=[np.log10(lo), np.log10(hi)])
    return fig


def memory_validation_figure(df: pd.DataFrame) -> go.Figure:
    """Each rank's predicted against measured peak memory (tensors only), with the y = x line."""
    lo = 0.8 * min(df["measured_gib"].min(), df["predicted_gib"].min())
    hi = 1.25 * max(df["measured_gib"].max(), df["predicted_gib"].max())
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x (exact prediction)", line=dict(color="#888888", dash="dash")))
    fig.add_trace(go.Scatter(
        x=df["measured_gib"], y=df["predicted_gib"], mode="markers", name="ranks",
        marker=dict(size=9, color="#E45756", line=dict(color="black", width=1)),
        customdata=df[["plan_id", "rank", "pipeline_device", "error_pct"]].to_numpy(),
        hovertemplate=("plan %{customdata[0]}, rank %{customdata[1]} (pipeline device %{customdata[2]})<br>measured %{x:.3f} GiB, "
                       "predicted %{y:.3f} GiB (%{customdata[3]:+.1f}%)<extra></extra>")))
    fig.update_layout(**LAYOUT, height=460, title=_title("Predicted against measured peak memory, every rank",
                                                         "tensors only: the runtime's peak (CUDA: reserved; CPU: live tensor bytes)"))
    fig.update_xaxes(title_text="measured peak memory (GiB, log scale)", type="log", range=[np.log10(lo), np.log10(hi)])
    fig.update_yaxes(title_text="predicted peak memory (GiB, log scale)", type="log", range=[np.log10(lo), np.log10(hi)])
    return fig


def error_figure(df: pd.DataFrame) -> go.Figure:
    """Each run's error (predicted − measured, % of measured), with its repeat spread as an error bar."""
    labels = [f"{p} ({tp}×{pp}×{dp}, mb {mb})" for p, tp, pp, dp, mb in
              zip(df["plan_id"], df["tp"], df["pp"], df["dp"], df["micro_batch"])]
    fig = go.Figure(go.Bar(
        x=labels, y=df["error_pct"], error_y=dict(type="data", array=df["spread_pct"], visible=True, color="#555555"),
        marker_color=["#E45756" if e > 0 else "#4C78A8" for e in df["error_pct"]],
        text=[f"{e:+.1f}%" for e in df["error_pct"]], textposition="inside", insidetextanchor="middle",
        textfont=dict(color="white"),
        hovertemplate="%{x}: %{y:+.1f}%<extra></extra>"))
    fig.add_hline(y=0, line=dict(color="#888888"))
    fig.update_layout(**LAYOUT, height=380, showlegend=False, title=_title(
        "Prediction error per run", "predicted − measured step time, % of measured; whiskers: spread over repeats and steps"))
    fig.update_xaxes(title_text="plan (tp×pp×dp, micro-batch)")
    fig.update_yaxes(title_text="error (%)")
    return fig


def compare_figure(df: pd.DataFrame) -> go.Figure:
    """Days to train and (when any cluster is priced) cost per cluster, from data.compare_frame: one bar per
    cluster with a plan, its plan in the hover; a cluster on which nothing fits is marked at zero, the reason in its hover."""
    priced = bool(df["cost_usd"].notna().any())
    fig = make_subplots(rows=1, cols=2 if priced else 1, horizontal_spacing=0.12,
                        subplot_titles=["days to train"] + (["cost (US$)"] if priced else []))
    fits, nothing = df[df["fits"]], df[~df["fits"]]
    hover = ("<b>%{x}</b><br>plan %{customdata[0]} (%{customdata[1]})<br>%{customdata[2]:,.0f} tokens/s · MFU "
             "%{customdata[3]:.1f}% · peak %{customdata[4]:.1f} GiB<br>%{customdata[5]:,.1f} days · %{customdata[6]:,.0f} "
             "GPU-hours · %{customdata[7]}<extra></extra>")
    cost_text = [f"${c:,.0f}" if c == c else "no price" for c in fits["cost_usd"]]  # c == c: not NaN
    custom = fits.assign(cost_text=cost_text)[["plan", "plan_id", "tokens_per_s", "mfu_pct", "peak_memory_gib", "days", "gpu_hours",
                                               "cost_text"]].to_numpy(dtype=object)
    panels = [("days", lambda v: f"{v:,.1f} d", 1)] + ([("cost_usd", lambda v: f"${v / 1e6:,.2f}M" if v >= 1e6 else f"${v:,.0f}", 2)]
                                                      if priced else [])
    for column, label, col in panels:
        fig.add_trace(go.Bar(x=fits["cluster"], y=fits[column], name=column, marker_color=CATEGORY_COLORS[col - 1],
                             text=[label(v) if v == v else "" for v in fits[column]], textposition="outside",
                             customdata=custom, hovertemplate=hover, showlegend=False), row=1, col=col)
        if len(nothing):
            fig.add_trace(go.Scatter(x=nothing["cluster"], y=[0] * len(nothing), mode="markers+text", text=["nothing fits"] * len(nothing),
                                     textposition="top center", marker=dict(symbol="x", size=12, color="#E45756"), showlegend=False,
                                     customdata=nothing[["reason"]].to_numpy(), hovertemplate="<b>%{x}</b><br>%{customdata[0]}<extra></extra>"),
                          row=1, col=col)
    order = list(df["cluster"])
    fig.update_xaxes(title_text="cluster (nodes×GPUs per node)", categoryorder="array", categoryarray=order)
    fig.update_yaxes(title_text="days (wall clock)", rangemode="tozero", row=1, col=1)
    if priced:
        fig.update_yaxes(title_text="cost (US$, GPU-hours × price)", rangemode="tozero", row=1, col=2)
    fig.update_layout(**LAYOUT, height=440, title=_title("Time and cost to train, per cluster",
                                                         "the fastest plan on each; hover a bar for its plan"))
    return fig
