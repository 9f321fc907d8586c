"""What the dashboard draws, as pandas DataFrames: input specs from YAML text, the search's plans and
candidates, a plan's timeline, time breakdown, memory and stages, and measured runs against predictions.

No streamlit import here: every function is plain and unit-tested (tests/dashboard/test_data.py)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from planner.compare import parse_price, parse_tokens, plan_training_cost
from planner.cost import memory_by_device, predict
from planner.errors import SpecError
from planner.frameworks import FRAMEWORKS
from planner.hf import model_from_mapping
from planner.plan import Plan, plan_to_dict
from planner.report import cluster_label, plan_label, precision_label, schedule_label, stage_summary
from planner.schedule import simulate
from planner.plan import MAX_GLOBAL_BATCH
from planner.parsing import parse_mapping_text
from planner.specs import PROFILES_DIR, ClusterSpec, DeviceProfile, ModelSpec, cluster_from_dict, load_device
from planner.validate import load_runs, validate

RESULTS_DIR_ENV = "MESHPLAN_RESULTS_DIR"
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"
# A Gantt chart stays legible (and quick in a browser) up to about this many rows and bars.
MAX_TIMELINE_DEVICES = 16
MAX_TIMELINE_EVENTS = 3000
# Past about this many bars per row a bar is narrower than a pixel and whichever op is drawn last hides the rest.
MAX_EVENTS_PER_DEVICE = 250
COMPUTE_OPS = ("forward", "backward", "recompute")


# ---------------------------------------------------------------- inputs

def presets(kind: str) -> list[str]:
    """Preset names of 'models' or 'clusters' (profiles/<kind>/*.yaml)."""
    return sorted(p.stem for p in (PROFILES_DIR / kind).glob("*.yaml"))


def device_names() -> list[str]:
    """Device profiles in profiles/devices/ (a measured NAME.measured.json counts as NAME)."""
    return sorted({p.name.removesuffix(".json").removesuffix(".measured") for p in (PROFILES_DIR / "devices").glob("*.json")})


def preset_text(kind: str, name: str) -> str:
    return (PROFILES_DIR / kind / f"{name}.yaml").read_text()


def parse_yaml(text: str, source: str) -> dict:
    """A YAML mapping (or JSON, for text that starts with '{': a pasted config.json, read as the CLI reads a .json
    file), or a SpecError that names the line (the page shows it instead of a traceback)."""
    try:
        data = parse_mapping_text(text, source, is_json=text.lstrip().startswith("{"))  # a key given twice is an error, as in the CLI
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(source, "(YAML)", f"malformed YAML{where}{f' ({problem})' if problem else ''}; fix the syntax") from None
    except json.JSONDecodeError as e:
        raise SpecError(source, "(JSON)", f"malformed JSON at line {e.lineno} ({e.msg}); fix the syntax") from None
    if not isinstance(data, dict):
        raise SpecError(source, "(top level)", "expected a mapping of field: value, e.g. 'layers: 24'")
    return data


def model_from_yaml(text: str, source: str = "model YAML") -> ModelSpec:
    """A meshplan model YAML or a Hugging Face config.json, read as `planner plan --model FILE` reads them."""
    return model_from_mapping(parse_yaml(text, source), source, "custom")


def cluster_from_yaml(text: str, nodes: int, gpus_per_node: int, device: str, source: str = "cluster YAML") -> ClusterSpec:
    """The cluster YAML with nodes, GPUs per node and device taken from the pickers (as the CLI's flags do)."""
    data = parse_yaml(text, source)
    data.setdefault("name", "custom")
    data.update(nodes=nodes, gpus_per_node=gpus_per_node, device=device)
    return cluster_from_dict(data, source)


def default_gpus_per_node(cluster_text: str) -> int:
    """The preset's GPUs per node; local-cpu's 'auto' is this machine's core count."""
    value = yaml.safe_load(cluster_text).get("gpus_per_node", 8)
    return (os.cpu_count() or 1) if value == "auto" else int(value)


def divisors(n: int) -> list[int]:
    """Divisors of n in increasing order (the degrees and micro-batches a pin can take)."""
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


NODES_RANGE, GPUS_PER_NODE_RANGE, GLOBAL_BATCH_RANGE = (1, 100_000), (1, 1024), (1, MAX_GLOBAL_BATCH)
HEADROOM_RANGE_GIB = (0.0, 1024.0)
"""The memory headroom a link or the sidebar may set, GiB."""


def pin_options(devices: int, global_batch: int) -> dict[str, list[str]]:
    """The values each knob can be pinned to (besides 'auto'), for this many devices and this batch."""
    degrees = [str(d) for d in divisors(devices)]
    return {"tp": degrees, "cp": degrees, "pp": degrees, "dp": degrees,
            "micro_batch": [str(d) for d in divisors(global_batch) if d <= 256],
            "schedule": ["1f1b", "gpipe", "interleaved"], "virtual_stages": ["2", "3", "4", "6", "8"],
            "recompute": ["none", "selective", "full"], "sequence_parallel": ["on", "off"], "zero": ["0", "1", "2", "3"],
            "precision": ["bf16", "fp8"], "compile": ["on", "off"]}


def link_errors(params: dict[str, str], views: list[str], defaults: dict[str, int]) -> list[str]:
    """What a link's query parameters ask for that the pickers cannot show, one line per parameter. (Streamlit
    would silently drop such a value and show the default.) `defaults` fills nodes, gpus_per_node and
    global_batch that the link does not give, to check its pins against."""
    errors, sizes = [], dict(defaults)
    choices = {"model": presets("models"), "cluster": presets("clusters"), "device": device_names(), "view": views,
               "framework": list(FRAMEWORKS)}
    for key, allowed in choices.items():
        if key in params and params[key] not in allowed:
            errors.append(f"{key}={params[key]!r} is not one of {', '.join(allowed)}")
    for key, (low, high) in (("nodes", NODES_RANGE), ("gpus_per_node", GPUS_PER_NODE_RANGE), ("global_batch", GLOBAL_BATCH_RANGE)):
        if key not in params:
            continue
        text = params[key]
        if not text.strip().lstrip("+-").isdigit() or not low <= int(text) <= high:
            errors.append(f"{key}={text!r} is not a whole number from {low:,} to {high:,}")
        else:
            sizes[key] = int(text)
    if "memory_headroom" in params:
        try:
            value = float(params["memory_headroom"])
        except ValueError:
            value = float("nan")
        low, high = HEADROOM_RANGE_GIB
        if not low <= value <= high:
            errors.append(f"memory_headroom={params['memory_headroom']!r} is not a number of GiB from {low:g} to {high:g}")
    for key, parse, what in (("tokens", parse_tokens, "a number of tokens such as 15e12 or 15T"),
                             ("gpu_hour_price", parse_price, "a price in US dollars per GPU-hour above 0")):
        try:
            if params.get(key, "").strip():
                parse(params[key], key)
        except SpecError:
            errors.append(f"{key}={params[key]!r} is not {what}")
    for key, allowed in pin_options(sizes["nodes"] * sizes["gpus_per_node"], sizes["global_batch"]).items():
        if key in params and params[key] not in ["auto", *allowed]:
            errors.append(f"{key}={params[key]!r} cannot be pinned here; expected auto or one of {', '.join(allowed)}")
    return errors


def pins_from_choices(choices: dict[str, str]) -> dict:
    """Sidebar choices ('auto', '8', 'on', ...) to search pins; 'auto' leaves the knob to the search."""
    pins = {}
    for knob, choice in choices.items():
        if choice == "auto":
            continue
        pins[knob] = {"on": True, "off": False}.get(choice, choice)
        if knob in ("tp", "cp", "pp", "dp", "micro_batch", "virtual_stages", "zero"):
            pins[knob] = int(choice)
    return pins


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
                     "unloaded_error_pct": r["unloaded_error_pct"]})
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
