"""Predict every published run in ../shared/calibration/ and print the error per row.

    .venv/bin/python bench/calibration.py [--device a100-sxm4-80gb]
"""

import argparse
import sys
import time

from rich.console import Console
from rich.table import Table

from planner.calibration import calibrate, plan_quality


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="a100-sxm4-80gb")
    ap.add_argument("--quality", action="store_true", help="also search each run's own best plan (plan quality table)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = calibrate(args.device)
    if not rows:
        print("error: no calibration files found (../shared/calibration/*.json or profiles/calibration/*.json)", file=sys.stderr)
        return 2
    t = Table(title=f"Published Megatron-LM runs vs meshplan ({args.device} datasheet, framework=megatron)", title_justify="left")
    for c in ("source", "run", "GPUs", "tp×pp×dp", "assumed (not published)", "pred iter s", "published TFLOP/s", "predicted TFLOP/s", "error"):
        t.add_column(c, justify="left" if c in ("source", "run", "assumed (not published)") else "right")
    for r in rows:
        p = r.plan
        t.add_row(r.source, r.name, str(r.gpus), f"{p.tp}×{p.pp}×{p.dp}", r.assumed, f"{p.prediction.iteration_s:.2f}",
                  f"{r.published_tflops:.0f}", f"{r.predicted_tflops:.1f}", f"{r.error_pct:+.1f}%")
    console = Console(width=260)
    console.print(t)
    errs = [abs(r.error_pct) for r in rows]
    by_source = {}
    for r in rows:
        by_source.setdefault(r.source, []).append(abs(r.error_pct))
    for source, e in by_source.items():
        console.print(f"{source}: mean absolute error {sum(e) / len(e):.1f}%, max {max(e):.1f}% over {len(e)} runs")
    console.print(f"all: mean absolute error {sum(errs) / len(errs):.1f}%, max {max(errs):.1f}% over {len(rows)} runs ({time.perf_counter() - t0:.1f} s)")
    if args.quality:
        q = Table(title="Plan quality: the planner's own best plan vs the published configuration (same model, GPUs, batch, framework; both predicted)",
                  title_justify="left")
        for c in ("run", "published config", "planner's plan", "pred. published tokens/s", "pred. planner tokens/s", "speed-up",
                  "what each changed knob buys (% lost setting it back)"):
            q.add_column(c, justify="left" if c in ("run", "published config", "planner's plan", "what each changed knob buys (% lost setting it back)") else "right")
        for row in plan_quality(rows):
            def label(p):
                sched = f"int. v={p.virtual_stages}" if p.schedule == "interleaved" else p.schedule
                return (f"{p.tp}x{p.pp}x{p.dp} mbs {p.micro_batch} {sched} {p.stages[0].recompute}"
                        f"{' SP' if p.sequence_parallel else ''}{' dist-opt' if p.distributed_optimizer else ''}")
            gains = ", ".join(f"{k}: {v}" if isinstance(v, str) else f"{k}: {v:.1f}%" for k, v in row.knob_gains.items())
            q.add_row(row.name, label(row.published_plan), label(row.best_plan), f"{row.published_plan.prediction.tokens_per_s:,.0f}",
                      f"{row.best_plan.prediction.tokens_per_s:,.0f}", f"{row.speedup:.2f}x", gains or "same plan")
        console.print(q)
    return 0


if __name__ == "__main__":
    sys.exit(main())
