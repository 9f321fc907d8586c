"""Predict every published run in ../shared/calibration/ and print the error per row.

    .venv/bin/python bench/calibration.py [--device a100-sxm4-80gb]
"""

import argparse
import sys
import time

from rich.console import Console
from rich.table import Table

from planner.calibration import calibrate


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="a100-sxm4-80gb")
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
    console = Console(width=200)
    console.print(t)
    errs = [abs(r.error_pct) for r in rows]
    console.print(f"mean absolute error {sum(errs) / len(errs):.1f}%, max {max(errs):.1f}% over {len(rows)} runs ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
