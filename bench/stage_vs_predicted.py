"""Each pipeline stage's forward and backward as a run measured them (runtime.launch's per-stage-call medians, CPU
runs only) beside what the cost model prices for one microbatch of that stage, for every line of results files.

    .venv/bin/python bench/stage_vs_predicted.py results/make-run-*.jsonl [--device cpu]

The prediction is planner.cost.stage_cost_list's forward_s and backward_s + recompute_s, with today's profile of
--device (the measured one where there is one), so it reads the same cost terms as `planner validate`. The
measured forward excludes the loss (torch.distributed.pipelining computes it outside forward_one_chunk; the plain
loop's timing holds it), the predicted one of the last stage includes it. On 2026-12-04 it showed the stages of
make run's plans 2-20% slower in a run than priced (docs/measurements/2026-12-04/stage_vs_predicted-quiet-fused.txt);
standalone loops of the first pp2 stage (embedding and 5 blocks, micro-batch 4) took 33.5-35.4 ms against 33.5
priced and 35-38 ms in runs, so one process differs from the next by about as much as the bias."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.cost import CostModel, stage_cost_list  # noqa: E402
from planner.errors import MeshplanError  # noqa: E402
from planner.specs import load_device  # noqa: E402
from planner.validate import load_runs  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    try:
        device = load_device(args.device)
    except MeshplanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs, skipped = load_runs(args.results)
    for message in skipped:
        print(f"skipped: {message}", file=sys.stderr)
    if not runs:
        print("error: no results lines to compare (runtime.launch --results writes them; make run keeps them in results/)",
              file=sys.stderr)
        return 2
    print(f"profile: {device.label}")
    print(f"{'plan':<11}{'model':<11}{'tp cp pp dp mbs':<17}{'stage':>6}{'fwd pred':>10}{'meas':>8}{'err':>8}"
          f"{'bwd pred':>10}{'meas':>8}{'err':>8}   (ms per microbatch)")
    shown = 0
    for run in runs:
        plan, timings = run["plan"], run["result"].stage_timings or {}
        costs = stage_cost_list(CostModel(plan.model, plan.cluster, device), plan.knobs, plan.stages)
        for k, c in enumerate(costs):
            got = timings.get(f"stage{k}")
            if not got:
                continue
            f, b = c.forward_s, c.backward_s + c.recompute_s
            mf, mb = got["forward_s"], got["backward_s"]
            print(f"{plan.id[:10]:<11}{plan.model.name[:10]:<11}{f'{plan.tp} {plan.cp} {plan.pp} {plan.dp} {plan.micro_batch}':<17}{k:>6}"
                  f"{1e3 * f:>10.1f}{1e3 * mf:>8.1f}{100 * (f / mf - 1):>+7.1f}%{1e3 * b:>10.1f}{1e3 * mb:>8.1f}{100 * (b / mb - 1):>+7.1f}%")
            shown += 1
    if not shown:
        print("no per-stage timings in these results (GPU and compiled runs record none)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
