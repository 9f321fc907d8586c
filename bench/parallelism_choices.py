"""What each parallelism knob buys: the plan the search picks for Llama 3 models on DGX H100 clusters with every
knob available, and with context parallelism, ZeRO stages or FP8 taken away (or added), and why: the breakdown
of the chosen plan's iteration.

    .venv/bin/python bench/parallelism_choices.py [--quick]

Predictions with the H100 datasheet profile (not yet calibrated: see the accuracy issue) for meshplan's runtime.
fp8 is a pin (it changes numerics), so 'with fp8' pins it and the others are bf16."""

import argparse
import dataclasses
import sys
import time

from rich.console import Console
from rich.table import Table

from planner.report import seconds_format
from planner.search import search
from planner.specs import load_cluster, load_device, load_model

CASES = [  # model, seq_len override, nodes, global batch (sequences)
    ("llama3-8b", None, 8, 512),
    ("llama3-8b", 131072, 8, 32),
    ("llama3-70b", None, 64, 1024),
    ("llama3-405b", None, 2048, 2048),
]
VARIANTS = {"every knob (bf16)": {}, "without cp": {"cp": 1}, "without ZeRO (stage 0)": {"zero": 0},
            "ZeRO-1 at most (dist-opt)": {"zero": 1}, "with fp8": {"precision": "fp8"}}


def label(p) -> str:
    sched = f"int v={p.virtual_stages}" if p.schedule == "interleaved" else p.schedule
    return (f"tp{p.tp} cp{p.cp} pp{p.pp} dp{p.dp} mbs{p.micro_batch} {sched} {p.stages[0].recompute}"
            f"{' SP' if p.sequence_parallel else ''} ZeRO-{p.zero}{' fp8' if p.precision == 'fp8' else ''}")


def why(p) -> str:
    b, it = p.prediction.breakdown, p.prediction.iteration_s
    parts = {"compute": b.compute_s, "TP": b.tp_comm_s, "PP": b.pp_comm_s, "DP/ZeRO": b.dp_comm_s, "bubble": b.bubble_s,
             "optimizer": b.optimizer_s}
    return ", ".join(f"{k} {100 * v / it:.0f}%" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v / it >= 0.005)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the first case only")
    args = ap.parse_args()
    device = load_device("h100-sxm5-80gb")
    t = Table(title="The plan the search picks, with each knob available or taken away (DGX H100 datasheet, meshplan's runtime)",
              title_justify="left")
    for c in ("model", "GPUs", "batch", "knobs available", "plan", "iter s", "tokens/s", "MFU", "peak GiB", "vs every knob", "where the time goes",
              "search s"):
        t.add_column(c, justify="left" if c in ("model", "knobs available", "plan", "where the time goes") else "right")
    rows = []  # (cells before iter s, prediction, cells after) per plan, None between cases: iter s is written once all are in
    for name, seq, nodes, batch in CASES[:1] if args.quick else CASES:
        model = load_model(name)
        if seq:
            model = dataclasses.replace(model, name=f"{name} (seq {seq // 1024}k)", seq_len=seq)
        cluster = load_cluster("dgx-h100-80gb", nodes=nodes)
        base = None
        for variant, pins in VARIANTS.items():
            t0 = time.perf_counter()
            r = search(model, cluster, device, batch, pins, top=1)
            took = time.perf_counter() - t0
            p = r.plans[0]
            pr = p.prediction
            base = base or pr
            rel = f"{pr.tokens_per_s / base.tokens_per_s:.2f}x" if pr.fits else "-"
            rows.append(([model.name, f"{cluster.gpus:,}", str(batch), variant, label(p) if pr.fits else f"nothing fits: {pr.reason[:60]}"],
                         pr, [f"{pr.tokens_per_s:,.0f}", f"{100 * pr.mfu:.1f}%", f"{pr.peak_memory_gib:.1f}", rel,
                              why(p) if pr.fits else "", f"{took:.1f}"]))
        rows.append(None)
    iteration = seconds_format(min(row[1].iteration_s for row in rows if row))
    for row in rows:
        if row is None:
            t.add_section()
        else:
            t.add_row(*row[0], iteration % row[1].iteration_s, *row[2])
    Console(width=260).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
