"""How long the full search takes: 1.3B, 175B and 1T on DGX A100 clusters, seconds per phase.

    .venv/bin/python bench/search_speed.py [--repeats 3]

Goal: megatron-1t on 384 nodes (3,072 GPUs) in <= 10 s on a 2-core laptop-class machine. Each case
runs in a fresh process (nothing cached from the previous one); the median of the repeats is shown."""

import argparse
import json
import statistics
import subprocess
import sys

from rich.console import Console
from rich.table import Table

CASES = [("gpt3-1.3b", 8, 512), ("gpt3-175b", 64, 1536), ("megatron-1t", 384, 3072)]

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from planner.search import search
from planner.specs import load_cluster, load_device, load_model
name, nodes, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model, cluster = load_model(name), load_cluster("dgx-a100-80gb", nodes=nodes)
r = search(model, cluster, load_device(cluster.device), batch)
p = r.plans[0]
print(json.dumps({"total_s": time.perf_counter() - t0, "search_s": r.search_s, "phases": r.phases_s, "searched": r.searched,
                  "priced": sum(c.exact for c in r.candidates),
                  "plan": f"{p.tp}x{p.pp}x{p.dp} mbs {p.micro_batch} {p.schedule}{' v=' + str(p.virtual_stages) if p.virtual_stages > 1 else ''} "
                          f"{p.stages[0].recompute}{' SP' if p.sequence_parallel else ''}{' dist-opt' if p.distributed_optimizer else ''}",
                  "tflops": p.prediction.tflops_per_gpu, "iteration_s": p.prediction.iteration_s}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    t = Table(title="Full search (tp x pp x dp, micro-batch, schedule, recompute, SP, dist-opt; ILP layer split for finalists)", title_justify="left")
    for c in ("model", "GPUs", "configs evaluated", "priced (ILP + simulation)", "bound s", "ILP s", "simulate s", "search s (median)",
              "process s (with imports)", "best plan", "TFLOP/s/GPU"):
        t.add_column(c, justify="left" if c in ("model", "best plan") else "right")
    for name, nodes, batch in CASES:
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", CHILD, name, str(nodes), str(batch)], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout))
        runs.sort(key=lambda r: r["search_s"])
        r = runs[len(runs) // 2]
        t.add_row(name, str(nodes * 8), f"{r['searched']:,}", str(r["priced"]), f"{r['phases']['enumerate_and_bound']:.2f}",
                  f"{r['phases']['ilp']:.2f}", f"{r['phases']['simulate']:.2f}",
                  f"{statistics.median(x['search_s'] for x in runs):.2f} (range {runs[0]['search_s']:.2f}-{runs[-1]['search_s']:.2f})",
                  f"{r['total_s']:.2f}", r["plan"], f"{r['tflops']:.1f}")
    Console(width=220).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
