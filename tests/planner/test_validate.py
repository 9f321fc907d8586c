"""planner validate: each measured plan priced again, per model and over all."""

import json

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
