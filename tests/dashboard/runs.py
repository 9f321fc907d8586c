"""Small real plans and results files for the dashboard tests, written the way runtime.launch writes them
(RunResult lines around a plan priced by planner.cost.predict)."""

from __future__ import annotations

import json
from pathlib import Path

from planner.cost import predict
from planner.plan import Knobs, plan_to_dict
from planner.specs import load_cluster, load_device, load_model
from planner.results import RunResult, result_to_dict


def tiny_plan(pp: int, dp: int, micro_batch: int, global_batch: int = 16):
    """gpt-tiny on two CPU ranks, priced by the planner."""
    model, cluster = load_model("gpt-tiny"), load_cluster("local-cpu", gpus_per_node=2)
    plan, _ = predict(model, cluster, load_device("cpu"), Knobs(1, pp, dp, micro_batch), global_batch)
    return plan


def run_line(plan, step_s: list[float], stage_timings: dict | None) -> dict:
    tokens = plan.global_batch * plan.model.seq_len
    return result_to_dict(RunResult(
        plan_id=plan.id, plan=plan_to_dict(plan), device="cpu (gloo)", world_size=plan.world_size, steps=len(step_s),
        step_s=step_s, tokens_per_s=tokens / sorted(step_s)[len(step_s) // 2], losses=[9.0] * len(step_s),
        peak_memory_gib=[0.5] * plan.world_size, predicted=plan_to_dict(plan)["prediction"],
        started_at="2026-01-01T00:00:00Z", meshplan_version="0.1.0", stage_timings=stage_timings))


def write_results(folder: Path) -> Path:
    """Two measured plans (one pipelined with per-stage timings, one data-parallel without) and a torn line."""
    pipelined, replicated = tiny_plan(pp=2, dp=1, micro_batch=1), tiny_plan(pp=1, dp=2, micro_batch=8)
    timings = {"stage0": {"forward_s": 0.054, "backward_s": 0.112}, "stage1": {"forward_s": 0.052, "backward_s": 0.112}}
    lines = [run_line(pipelined, [3.1, 2.8, 2.7, 2.9], timings), run_line(replicated, [3.9, 3.3, 3.4, 3.7], None)]
    for line in lines:  # each rank's wait for a core per step, as runtime.launch records it on CPU
        line["machine"] = {"reference_s": None, "cpu_share": None, "background_cores": 0.0, "cpu_count": 2,
                           "step_wait_s": [[0.1] * line["world_size"]] * 4, "timed_steps": [1, 2]}
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"plan_id": "torn'
    (folder / "runs.jsonl").write_text(text)
    return folder


def compare_rows(price: float | None = 2.0, tokens: int | None = 10**12):
    """gpt3-13b on one DGX A100 node (it fits) and on the 4x RTX 4090 workstation (nothing fits), by planner.compare."""
    from planner.compare import CompareTarget, compare

    targets = [CompareTarget(c, load_device(c.device), price) for c in (load_cluster("dgx-a100-80gb", nodes=1),
                                                                        load_cluster("workstation-4x-rtx4090"))]
    return compare(load_model("gpt3-13b"), 64, tokens, targets)
