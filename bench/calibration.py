"""Predict every published run in profiles/calibration/ and print the error per row, with the fitted constants
behind the predictions.

    .venv/bin/python bench/calibration.py [--quality] [--mm-rate]

Leave-one-out errors (each run predicted by a fit on the others): bench/fit_calibration.py --loo. --mm-rate prices
the H100 runs again with the bf16 GEMM curve topped at torch.mm's measured rate (bench/held_out.py's diagnostic):
what the fitted curve's ceiling absorbs, run by run."""

import argparse
import sys
import time

from rich.console import Console
from rich.table import Table

from planner.calibration import METRICS, calibrate, load_cases, plan_quality
from planner.specs import load_device
from planner.terms import FRAMEWORKS


def constants(console: Console) -> None:
    """The fitted constants the predictions rest on (bench/fit_calibration.py fits them)."""
    for name in ("a100-sxm4-80gb", "h100-sxm5-80gb"):
        d = load_device(name)
        curve = ", ".join(f"{p.efficiency:.3f} at {p.gflop:g}" for p in d.gemm_efficiency)
        fp8 = ", ".join(f"{p.efficiency:.3f} at {p.gflop:g}" for p in d.fp8_gemm_efficiency)
        console.print(f"{name}: bf16 GEMM efficiency by GFLOP {curve}" + (f"; fp8 {fp8}" if fp8 else "")
                      + f"; memory efficiency {d.memory_efficiency:.3f}; fused attention {d.fused_attention}")
    mc = FRAMEWORKS["megatron-core"]
    console.print(f"megatron-core: TP communication hidden under GEMMs {mc.tp_overlap:.3f}; FP8 casts and transposes as "
                  f"{mc.fp8_casts} makes them (weights once per step); fused elementwise kernels {mc.fused_elementwise}")


def mm_rate_table(console: Console, rows) -> None:
    """The H100 runs priced again at torch.mm's GEMM rate (bench/held_out.py: at_gemm_rate, TORCH_MM_RATE), beside
    the fitted curve's errors. The FP8 curve is left as fitted: only the bf16 GEMMs (all of a bf16 run's, an FP8
    run's attention) move."""
    from held_out import TORCH_MM_RATE, at_gemm_rate  # bench/ is on the path when this runs as a script

    device = load_device("h100-sxm5-80gb")
    cases = [c for c in load_cases() if c.device == device.name]
    mm = calibrate(devices={device.name: at_gemm_rate(device, TORCH_MM_RATE)}, cases=cases)
    fitted = {(r.source, r.name): r for r in rows}
    t = Table(title=f"H100 runs with the bf16 GEMM curve topped at torch.mm's {TORCH_MM_RATE:.3f} of peak (a diagnostic)", title_justify="left")
    for c in ("source", "run", "tp×cp×pp×dp", "precision", "fitted curve", "mm rate"):
        t.add_column(c, justify="left" if c in ("source", "run", "precision") else "right")
    for r in mm:
        p = r.plan
        t.add_row(r.source, r.name, f"{p.tp}×{p.cp}×{p.pp}×{p.dp}", p.knobs.precision, f"{fitted[(r.source, r.name)].error_pct:+.1f}%",
                  f"{r.error_pct:+.1f}%")
    console.print(t)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quality", action="store_true", help="also search each run's own best plan (plan quality table)")
    ap.add_argument("--mm-rate", action="store_true", help="also price the H100 runs with the bf16 GEMM curve topped at torch.mm's "
                                                          "measured rate (a diagnostic of what the fitted curve absorbs)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = calibrate()
    if not rows:
        print("error: no calibration files found (profiles/calibration/*.json)", file=sys.stderr)
        return 2
    console = Console(width=260)
    t = Table(title="Published runs vs meshplan (each on its own device datasheet and framework)", title_justify="left")
    for c in ("source", "run", "GPUs", "tp×cp×pp×dp", "assumed (not published)", "pred iter s", "metric", "published", "predicted", "error"):
        t.add_column(c, justify="left" if c in ("source", "run", "assumed (not published)", "metric") else "right")
    for r in rows:
        p = r.plan
        t.add_row(r.source, r.name, str(r.gpus), f"{p.tp}×{p.cp}×{p.pp}×{p.dp}", r.assumed, f"{p.prediction.iteration_s:.2f}",
                  METRICS[r.metric], f"{r.published:,.1f}", f"{r.predicted:,.1f}", f"{r.error_pct:+.1f}%")
    console.print(t)
    by_source = {}
    for r in rows:
        by_source.setdefault(r.source, []).append(abs(r.error_pct))
    for source, e in by_source.items():
        console.print(f"{source}: mean absolute error {sum(e) / len(e):.1f}%, max {max(e):.1f}% over {len(e)} runs (in-sample where fitted)")
    constants(console)
    if args.mm_rate:
        mm_rate_table(console, rows)
    console.print(f"({time.perf_counter() - t0:.1f} s)")
    if args.quality:
        q = Table(title="Plan quality: the planner's own best plan vs the published configuration (same model, GPUs, batch, framework; both predicted)",
                  title_justify="left")
        for c in ("run", "published config", "planner's plan", "pred. published tokens/s", "pred. planner tokens/s", "speed-up",
                  "what each changed knob buys (% lost setting it back)"):
            q.add_column(c, justify="left" if c in ("run", "published config", "planner's plan", "what each changed knob buys (% lost setting it back)") else "right")
        for row in plan_quality([r for r in rows if not r.source.startswith(("megatron_lm", "nemo"))]):
            def label(p):
                sched = f"int. v={p.virtual_stages}" if p.schedule == "interleaved" else p.schedule
                return (f"{p.tp}x{p.pp}x{p.dp} mbs {p.micro_batch} {sched} {p.stages[0].recompute}"
                        f"{' SP' if p.sequence_parallel else ''}{f' ZeRO-{p.zero}' if p.zero else ''}{f' cp{p.cp}' if p.cp > 1 else ''}")
            gains = ", ".join(f"{k}: {v}" if isinstance(v, str) else f"{k}: {v:.1f}%" for k, v in row.knob_gains.items())
            q.add_row(row.name, label(row.published_plan), label(row.best_plan), f"{row.published_plan.prediction.tokens_per_s:,.0f}",
                      f"{row.best_plan.prediction.tokens_per_s:,.0f}", f"{row.speedup:.2f}x", gains or "same plan")
        console.print(q)
    return 0


if __name__ == "__main__":
    sys.exit(main())
