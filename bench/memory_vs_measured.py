"""Peak memory per rank, predicted against measured, for gpt-tiny and llama-tiny plans on this machine's CPU ranks.

    python bench/memory_vs_measured.py [--model gpt-tiny --model llama-tiny] [--steps 3] [--json]

Each layout (tp, pp, dp with each ZeRO stage, cp, recomputation, interleaving) is planned for local-cpu with
`planner.search` pinned to it, run with torchrun (runtime.launch counts the live tensor bytes of its last step,
runtime.memory), and read back through `planner validate`, so the figure is the one `make run` reports. Per
rank: predicted and measured GiB with the error, and the breakdown beside it (the planner's weights, gradients,
optimizer state, ZeRO's gathered weights, activations against the counter's categories), which says which
term is off when one is. memory_mape_pct over all ranks is the last line. No timing: load does not change it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.cost import memory_by_device  # noqa: E402
from planner.plan import load_plan, write_plan  # noqa: E402
from planner.report import console  # noqa: E402
from planner.search import search  # noqa: E402
from planner.specs import load_cluster, load_device, load_model  # noqa: E402
from planner.validate import validate  # noqa: E402

GLOBAL_BATCH = 8
LAYOUTS = (
    ("one rank", {"tp": 1, "pp": 1, "dp": 1, "micro_batch": 8}),
    ("one rank, 4 microbatches", {"tp": 1, "pp": 1, "dp": 1, "micro_batch": 2}),
    ("tp2", {"tp": 2, "pp": 1, "dp": 1, "micro_batch": 4}),
    ("tp2 sequence parallel", {"tp": 2, "pp": 1, "dp": 1, "micro_batch": 4, "sequence_parallel": True}),
    ("pp2 1f1b", {"tp": 1, "pp": 2, "dp": 1, "micro_batch": 2, "schedule": "1f1b"}),
    ("pp2 gpipe", {"tp": 1, "pp": 2, "dp": 1, "micro_batch": 2, "schedule": "gpipe"}),
    ("pp2 interleaved v2", {"tp": 1, "pp": 2, "dp": 1, "micro_batch": 2, "schedule": "interleaved", "virtual_stages": 2}),
    ("dp2 zero 0", {"tp": 1, "pp": 1, "dp": 2, "micro_batch": 4, "zero": 0}),
    ("dp2 zero 1", {"tp": 1, "pp": 1, "dp": 2, "micro_batch": 4, "zero": 1}),
    ("dp2 zero 2", {"tp": 1, "pp": 1, "dp": 2, "micro_batch": 4, "zero": 2}),
    ("dp2 zero 3", {"tp": 1, "pp": 1, "dp": 2, "micro_batch": 4, "zero": 3}),
    ("cp2", {"tp": 1, "pp": 1, "dp": 1, "cp": 2, "micro_batch": 4}),
    ("selective recompute", {"tp": 1, "pp": 1, "dp": 1, "micro_batch": 8, "recompute": "selective"}),
    ("full recompute", {"tp": 1, "pp": 1, "dp": 1, "micro_batch": 8, "recompute": "full"}),
)


def run(plan_path: Path, world: int, steps: int, results: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), "-m", "runtime.launch",
           str(plan_path), "--steps", str(steps), "--results", str(results)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")


def predicted_breakdown(plan_path: Path, device) -> list[dict]:
    plan = load_plan(str(plan_path))
    return [{"parameters": m.weights_gib, "gradients": m.grads_gib, "optimizer_state": m.optimizer_gib,
             "gathered_weights": m.sharding_gib, "activations_and_transient": max(m.activations_gib, m.step_gib)}
            for m in memory_by_device(plan, device)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="gpt-tiny and llama-tiny unless given")
    ap.add_argument("--steps", type=int, default=3, help="steps per run; the last counts memory (default 3)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    cluster, device = load_cluster("local-cpu"), load_device("cpu")
    rows = []
    with tempfile.TemporaryDirectory(prefix="meshplan-memory-bench-") as tmp:
        for name in args.model or ["gpt-tiny", "llama-tiny"]:
            model = load_model(name)
            for label, pins in LAYOUTS:
                ranks = pins["tp"] * pins["pp"] * pins["dp"] * pins.get("cp", 1)
                found = search(model, dataclasses.replace(cluster, nodes=1, gpus_per_node=ranks), device, GLOBAL_BATCH, dict(pins), top=1)
                if not found.plans:
                    console.print(f"{name} {label}: nothing fits")
                    continue
                plan_path = Path(tmp) / f"{name}-{len(rows)}.json"
                results = Path(tmp) / f"{name}-{len(rows)}.jsonl"
                write_plan(plan_path, found.plans[0])
                world = load_plan(str(plan_path)).world_size
                run(plan_path, world, args.steps, results)
                report = validate([str(results)])
                line = json.loads(results.read_text().splitlines()[-1])
                pred = predicted_breakdown(plan_path, device)
                group = world // load_plan(str(plan_path)).pp
                for m, measured in zip(report["runs"][0]["memory"], line["memory_breakdown_bytes"] or [None] * world):
                    rows.append({"model": name, "layout": label, **m,
                                 "predicted_breakdown_gib": pred[m["rank"] // group],
                                 "measured_breakdown_gib": {k: v / 2**30 for k, v in measured.items()} if measured else None})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from rich.table import Table

    table = Table(title="Peak memory per rank: planner vs runtime.memory's live tensor count (MiB; weights, grads, "
                        "optimizer, gathered, activations: predicted / measured)")
    for col in ("model", "layout", "rank", "pred MiB", "meas MiB", "error", "W", "G", "O", "gathered", "activations"):
        table.add_column(col, justify="left" if col in ("model", "layout") else "right")
    for r in rows:
        p, m = r["predicted_breakdown_gib"], r["measured_breakdown_gib"] or {}
        cells = [f"{1024 * p[k]:.2f}/{1024 * m.get(k, float('nan')):.2f}" for k in
                 ("parameters", "gradients", "optimizer_state", "gathered_weights", "activations_and_transient")]
        table.add_row(r["model"], r["layout"], str(r["rank"]), f"{1024 * r['predicted_gib']:.2f}", f"{1024 * r['measured_gib']:.2f}",
                      f"{r['error_pct']:+.1f}%", *cells)
    console.print(table)
    for name in sorted({r["model"] for r in rows}):
        errs = [abs(r["error_pct"]) for r in rows if r["model"] == name]
        console.print(f"{name}: memory_mape_pct {sum(errs) / len(errs):.1f}% (max {max(errs):.1f}%) over {len(errs)} ranks")
    errs = [abs(r["error_pct"]) for r in rows]
    console.print(f"all: memory_mape_pct {sum(errs) / len(errs):.1f}% (max {max(errs):.1f}%) over {len(errs)} ranks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
