"""What the dashboard draws, as pandas DataFrames (its inputs: dashboard/inputs.py): the search's plans and
candidates, a plan's timeline, time breakdown, memory and stages, and measured runs against predictions.

No streamlit import here: every function is plain and unit-tested (tests/dashboard/test_data.py)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from planner.compare import parse_price, parse_tokens, plan_training_cost
from planner.cost import memory_by_device, predict
from planner.frameworks import FRAMEWORKS
from planner.plan import Plan, plan_to_dict
from planner.report import cluster_label, plan_label, precision_label, schedule_label, stage_summary
from planner.schedule import simulate
from planner.specs import DeviceProfile, load_device
from planner.validate import load_runs, validate

RESULTS_DIR_ENV = "MESHPLAN_RESULTS_DIR"
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"
# A Gantt chart stays legible (and quick in a browser) up to about this many rows and bars.
MAX_TIMELINE_DEVICES = 16
MAX_TIMELINE_EVENTS = 3000
# Past about this many bars per row a bar is narrower than a pixel and whichever op is drawn last hides the rest.
MAX_EVENTS_PER_DEVICE = 250
COMPUTE_OPS = ("forward", "backward", "recompute")


# ---------------------------------------------------------------- plans and candidates

def plans_frame(plans: tuple[Plan, ...]) -> pd.DataFrame:
    """The ranked plans, best first, one row each."""
    rows = []
    for rank, p in enumerate(plans, 1):
        pr = p.prediction
        rows.append({"rank": rank, "plan_id": p.id, "tp": p.tp, "pp": p.pp, "dp": p.dp, "micro_batch": p.micro_batch,
                     "num_microbatches": p.num_microbatches, "schedule": schedule_label(p), "recompute": recompute_label(p),
                     "sequence_parallel": p.sequence_parallel, "zero": p.zero, "cp": p.cp, "precision": precision_label(p),
                     "layers_per_stage": stage_summary(p), "iteration_s": pr.iteration_s, "tokens_per_s": pr.tokens_per_s,
                     "tflops_per_gpu": pr.tflops_per_gpu, "mfu_pct": 100 * pr.mfu, "peak_memory_gib": pr.peak_memory_gib,
                     "fits": pr.fits, "reason": pr.reason})
    return pd.DataFrame(rows)


def recompute_label(plan: Plan) -> str:
    kinds = {s.recompute for s in plan.stages}
    if kinds == {"full"} and any(s.recompute_layers is not None for s in plan.stages):
        return "full (some blocks)"
    return kinds.pop() if len(kinds) == 1 else "mixed: " + "/".join(sorted(kinds))


def candidates_frame(candidates) -> pd.DataFrame:
    """Every configuration the search enumerated, with how far it got (level: 'bound', 'split', 'priced').

    knobs: one line for hover text. memory_status: 'fits', 'does not fit', or 'bound only' for a configuration
    whose lower bound already lost to the ranked plans: its tokens/s is an upper bound and its memory the least
    any layer split needs, and the search never solved its split."""
    rows = [(c.knobs.tp, c.knobs.pp, c.knobs.dp, c.knobs.micro_batch, c.knobs.schedule, c.knobs.virtual_stages,
             c.knobs.recompute, c.knobs.sequence_parallel, c.knobs.zero, c.knobs.cp, c.iteration_s, c.tokens_per_s,
             c.tflops_per_gpu, c.peak_memory_gib, c.fits, c.level, c.exact) for c in candidates]
    df = pd.DataFrame(rows, columns=["tp", "pp", "dp", "micro_batch", "schedule", "virtual_stages", "recompute",
                                     "sequence_parallel", "zero", "cp", "iteration_s", "tokens_per_s",
                                     "tflops_per_gpu", "peak_memory_gib", "fits", "level", "exact"])
    interleaved = pd.Series(np.where(df["schedule"] == "interleaved", " v=" + df["virtual_stages"].astype(str), ""), index=df.index)
    df["knobs"] = (df["tp"].astype(str) + "×" + df["pp"].astype(str) + "×" + df["dp"].astype(str) + " · micro-batch "
                   + df["micro_batch"].astype(str) + " · " + df["schedule"] + interleaved + " · recompute " + df["recompute"]
                   + np.where(df["sequence_parallel"], " · SP", "") + np.where(df["zero"] > 0, " · ZeRO-" + df["zero"].astype(str), "")
                   + np.where(df["cp"] > 1, " · cp " + df["cp"].astype(str), ""))
    df["memory_status"] = np.where(~df["fits"], "does not fit", np.where(df["level"] == "bound", "bound only", "fits"))
    return df


# ---------------------------------------------------------------- one plan

BREAKDOWN_LABELS = {"compute_s": "compute", "tp_comm_s": "TP communication", "pp_comm_s": "PP send/recv",
                    "dp_comm_s": "DP gradient reduction", "bubble_s": "pipeline bubble", "optimizer_s": "optimizer step"}


def breakdown_frame(plan: Plan) -> pd.DataFrame:
    """Where the iteration's seconds go on the slowest pipeline device."""
    pr = plan.prediction
    rows = [{"part": label, "seconds": getattr(pr.breakdown, key)} for key, label in BREAKDOWN_LABELS.items()]
    df = pd.DataFrame(rows)
    df["share_pct"] = 100 * df["seconds"] / pr.iteration_s
    return df


MEMORY_PARTS = {"weights_gib": "weights", "grads_gib": "gradients", "optimizer_gib": "optimizer state",
                "sharding_gib": "gathered weights/gradients (ZeRO 2, 3)", "activations_gib": "activations",
                "overhead_gib": "framework overhead"}


def memory_frame(plan: Plan, device: DeviceProfile) -> pd.DataFrame:
    """Per pipeline device and part (weights, gradients, optimizer, activations, overhead), in GiB, long format."""
    rows = []
    for i, mem in enumerate(memory_by_device(plan, device)):
        stages = [k for k in range(len(plan.stages)) if k % plan.pp == i]
        for key, label in MEMORY_PARTS.items():
            rows.append({"device": i, "stages": ", ".join(map(str, stages)), "part": label, "gib": getattr(mem, key)})
    return pd.DataFrame(rows)


def stages_frame(plan: Plan) -> pd.DataFrame:
    """Each (virtual) stage: its pipeline device, its half-open layer range, what else it holds."""
    rows = []
    for k, s in enumerate(plan.stages):
        n = s.layers[1] - s.layers[0]
        recomputed = 0 if s.recompute != "full" else (n if s.recompute_layers is None else s.recompute_layers)
        rows.append({"stage": k, "device": k % plan.pp, "layers": f"{s.layers[0]}–{s.layers[1] - 1}" if n else "none",
                     "first_layer": s.layers[0], "end_layer": s.layers[1], "blocks": n, "embedding": s.embedding,
                     "head": s.head, "recompute": s.recompute, "recomputed_blocks": recomputed, "memory_gib": s.memory_gib})
    return pd.DataFrame(rows)


def plan_json(plan: Plan) -> str:
    """plan.json as `planner plan --out` writes it (the file runtime.launch runs)."""
    return json.dumps(plan_to_dict(plan), indent=1) + "\n"


@dataclass(frozen=True)
class TimelineView:
    """The part of a simulated iteration that a Gantt chart draws, and what was left out."""

    events: pd.DataFrame
    """device, stage, microbatch, op, start_s, end_s; only the devices and time windows drawn."""
    iteration_s: float
    """End of the last compute op (the pipeline flush)."""
    idle_pct: dict
    """Per device drawn: share of the iteration it is idle (the bubble as that device sees it)."""
    stages: dict
    """Per device drawn: the (virtual) stages it runs, in order."""
    gap: tuple[float, float] | None
    """(start, end) of the steady-state stretch left out to stay under the event cap, or None."""
    note: str
    """What was left out, in words, for the figure's subtitle ('' when everything is drawn)."""


def timeline_view(events, pp: int, max_devices: int = MAX_TIMELINE_DEVICES, max_events: int = MAX_TIMELINE_EVENTS,
                  max_per_device: int = MAX_EVENTS_PER_DEVICE) -> TimelineView:
    """Cut a simulator timeline down to what a browser draws quickly and legibly: at most max_devices rows
    (evenly spaced, first and last kept) and about min(max_events, max_per_device x rows) bars. When there
    are more, keep the warm-up and the cool-down, where the bubbles are, and leave out the middle of the
    steady state."""
    df = pd.DataFrame.from_records([(e.device, e.stage, e.microbatch, e.op, e.start_s, e.end_s) for e in events],
                                   columns=["device", "stage", "microbatch", "op", "start_s", "end_s"])
    notes = []
    if pp > max_devices:
        keep = sorted({round(i * (pp - 1) / (max_devices - 1)) for i in range(max_devices)})
        df = df[df["device"].isin(keep)]
        notes.append(f"{len(keep)} of {pp} pipeline devices shown")
    compute = df[df["op"].isin(COMPUTE_OPS)]
    iteration_s = float(compute["end_s"].max()) if len(compute) else 0.0
    busy = (compute["end_s"] - compute["start_s"]).groupby(compute["device"]).sum()
    idle_pct = {int(d): 100 * (1 - b / iteration_s) if iteration_s else 0.0 for d, b in busy.items()}
    stages = {int(d): sorted(int(k) for k in g.unique()) for d, g in compute.groupby("device")["stage"]}
    gap = None
    cap = min(max_events, max_per_device * max(1, len(stages)))
    if len(df) > cap:
        half = cap // 2
        t_a = float(np.sort(df["start_s"].to_numpy())[half])
        t_b = float(np.sort(df["end_s"].to_numpy())[-half - 1])
        if t_a < t_b:
            total = len(df)
            df = df[(df["start_s"] < t_a) | (df["end_s"] > t_b)]
            gap = (t_a, t_b)
            notes.append(f"warm-up and cool-down shown, {t_b - t_a:.3g} s of steady state between them left out "
                         f"({len(df):,} of {total:,} events)")
    return TimelineView(df.reset_index(drop=True), iteration_s, idle_pct, stages, gap, "; ".join(notes))


def predicted_timeline(plan: Plan, device: DeviceProfile, framework: str | None = None) -> TimelineView:
    """The simulator's pipeline for one iteration of the plan (its own layer split), priced for `framework`: by
    default the plan's own (a search's plan); a results line's plan ran on meshplan's runtime, whatever it was priced for."""
    _, sim = predict(plan.model, plan.cluster, device, plan.knobs, plan.global_batch, plan.stages, with_timeline=True,
                     framework=FRAMEWORKS[framework or plan.framework])
    return timeline_view(sim.timeline, plan.pp)


def measured_timeline(plan: Plan, stage_timings: dict | None) -> TimelineView | None:
    """The plan's schedule replayed with a run's measured per-stage forward/backward times (send/recv
    waits are not measured, so none are drawn). None when the run has no timing for every stage."""
    n = plan.pp * plan.virtual_stages
    try:
        fwd = [float(stage_timings[f"stage{k}"]["forward_s"]) for k in range(n)]
        bwd = [float(stage_timings[f"stage{k}"]["backward_s"]) for k in range(n)]
    except (KeyError, TypeError, ValueError):
        return None
    sim = simulate(plan.schedule, plan.pp, plan.num_microbatches, plan.virtual_stages, fwd, bwd, with_timeline=True)
    return timeline_view(sim.timeline, plan.pp)


# ---------------------------------------------------------------- measured runs

def results_dir() -> Path:
    return Path(os.environ.get(RESULTS_DIR_ENV) or DEFAULT_RESULTS_DIR)


def results_files(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.glob("*.jsonl"))


def load_validation(paths: list[str]) -> tuple[pd.DataFrame, dict, dict[str, Plan]]:
    """planner validate's report as a table (one row per plan run), the report, and each plan by id."""
    report = validate(paths)
    runs, _ = load_runs(paths)
    plans = {r["plan"].id or r["result"].plan_id: r["plan"] for r in runs}
    rows = []
    for r in report["runs"]:
        k = r["knobs"]
        rows.append({"run": r["run"], "plan_id": r["plan_id"], "model": r["model"], "device": r["device"],
                     "tp": k["tp"], "cp": k["cp"], "pp": k["pp"], "dp": k["dp"],
                     "micro_batch": k["micro_batch"], "schedule": k["schedule"], "repeats": r["repeats"], "predicted_step_s": r["predicted_step_s"],
                     "measured_step_s": r["measured_step_s"], "error_pct": r["error_pct"], "spread_pct": r["spread_pct"],
                     "predicted_tokens_per_s": r["predicted_tokens_per_s"], "measured_tokens_per_s": r["measured_tokens_per_s"],
                     "has_stage_timings": bool(r["stage_timings"]), "stage_timings": r["stage_timings"],
                     "memory_error_pct": r["memory_error_pct"], "machine_drift": r["machine_drift"],
                     "rescaled_error_pct": r["rescaled_error_pct"], "waited_pct": r["waited_pct"],
                     "unloaded_error_pct": r["unloaded_error_pct"], "unloaded_rescaled_error_pct": r["unloaded_rescaled_error_pct"]})
    return pd.DataFrame(rows), report, plans


def memory_validation_frame(report: dict) -> pd.DataFrame:
    """Every rank's predicted and measured peak memory (planner validate's memory rows), one row per rank."""
    rows = [{"plan_id": r["plan_id"], "model": r["model"], **m} for r in report["runs"] for m in r["memory"]]
    return pd.DataFrame(rows, columns=["plan_id", "model", "rank", "pipeline_device", "predicted_gib", "measured_gib", "error_pct"])


def device_for(plan: Plan) -> DeviceProfile:
    return load_device(plan.cluster.device)


# ---------------------------------------------------------------- time and cost to train, per plan and per cluster

def training_inputs(tokens_text: str | None, price: float | None) -> tuple[int, float | None] | None:
    """The sidebar's training tokens (text: 15e12, 15T, ...) and price; None when no tokens are given. Bad text is a
    SpecError naming the field, as the CLI's --tokens and --gpu-hour-price are."""
    if tokens_text is None or not tokens_text.strip():
        return None
    return parse_tokens(tokens_text, "Training tokens"), None if price is None else parse_price(price, "Price per GPU-hour")


def with_training(plans_df: pd.DataFrame, plans: tuple[Plan, ...], training: tuple[int, float | None]) -> pd.DataFrame:
    """plans_frame with the days, GPU-hours and cost of each plan that fits (NaN for the others), from
    planner.compare.plan_training_cost, as planner plan --tokens prints them."""
    costs = [plan_training_cost(p, *training) if p.prediction.fits else None for p in plans]
    def column(name):
        return [np.nan if c is None or getattr(c, name) is None else getattr(c, name) for c in costs]
    return plans_df.assign(days=column("days"), gpu_hours=column("gpu_hours"), cost_usd=column("cost_usd"))


def compare_frame(rows) -> pd.DataFrame:
    """planner.compare rows, one per cluster: the best plan, its throughput, memory, days, GPU-hours and cost (NaN
    where nothing fits or nothing was given to compute them with), and the reason where nothing fits."""
    out = []
    for r in rows:
        pr, cost = (r.plan.prediction if r.plan else None), r.cost
        out.append({"cluster": f"{cluster_label(r)} ({r.cluster.nodes}×{r.cluster.gpus_per_node})", "gpus": r.cluster.gpus,
                    "profile": r.device.label, "fits": r.fits, "plan": plan_label(r.plan) if r.plan else "",
                    "plan_id": r.plan.id if r.plan else "", "tokens_per_s": pr.tokens_per_s if pr else np.nan,
                    "mfu_pct": 100 * pr.mfu if pr else np.nan, "peak_memory_gib": pr.peak_memory_gib if pr else np.nan,
                    "days": cost.days if cost else np.nan, "gpu_hours": cost.gpu_hours if cost else np.nan,
                    "gpu_hour_price_usd": np.nan if r.gpu_hour_price_usd is None else r.gpu_hour_price_usd,
                    "cost_usd": np.nan if cost is None or cost.cost_usd is None else cost.cost_usd, "reason": r.reason})
    return pd.DataFrame(out)
