"""planner validate: each measured plan priced again, per model and over all."""

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
        assert summary["mape_pct"] == sum(errs[name]) / len(errs[name])
    assert report["mape_pct"] == sum(sum(e) for e in errs.values()) / 4


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
