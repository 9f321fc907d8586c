"""Is the search's answer the best plan under its own cost model? For each case: the unpinned search against
the best of the searches with tp pinned to each value it can take, and, where affordable, against pricing
every candidate (planner.search.exhaustive_search). The gap must be zero.

    .venv/bin/python bench/search_optimality.py [--exhaustive-up-to 8000]

Cases: the README's (gpt3-1.3b on 8 DGX A100 nodes, gpt3-175b on 64, megatron-1t on 384), the two of issue 10
(a Llama-3-70B-shaped dense model on 8 DGX H100 nodes, global batch 512, unpinned and with tp 2 pinned), and a
405B model (Llama 3 405B's shape) on 2,048 DGX H100 nodes. The Llama-shaped models are given as plain GPT
shapes (multi-head attention, GELU MLP) here, as in the issue."""

import argparse
import sys
import time

from rich.console import Console
from rich.table import Table

from planner.report import plan_label
from planner.search import exhaustive_search, search
from planner.specs import load_cluster, load_device, load_model, model_from_dict

SHAPES = {
    "llama3-70b-shape": dict(layers=80, hidden=8192, heads=64, ffn_hidden=28672, seq_len=8192, vocab=128256),
    "llama3-405b-shape": dict(layers=126, hidden=16384, heads=128, ffn_hidden=53248, seq_len=8192, vocab=128256),
}
CASES = [  # model, cluster, nodes, global batch, pins
    ("gpt3-1.3b", "dgx-a100-80gb", 8, 512, {}),
    ("gpt3-175b", "dgx-a100-80gb", 64, 1536, {}),
    ("megatron-1t", "dgx-a100-80gb", 384, 3072, {}),
    ("llama3-70b-shape", "dgx-h100-80gb", 8, 512, {}),
    ("llama3-70b-shape", "dgx-h100-80gb", 8, 512, {"tp": 2}),
    ("llama3-405b-shape", "dgx-h100-80gb", 2048, 2048, {}),
]


def model_of(name: str):
    return model_from_dict({"name": name, **SHAPES[name]}, "bench") if name in SHAPES else load_model(name)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--exhaustive-up-to", type=int, default=8000, help="price every candidate when there are at most this many")
    args = ap.parse_args()
    t = Table(title="Search vs best-over-pinned-tp vs exhaustive pricing (iteration s; gap must be 0)", title_justify="left")
    for c in ("model", "GPUs", "batch", "pins", "bounded", "splits solved", "priced", "search s", "best plan", "search iter s",
              "best pinned-tp iter s", "exhaustive iter s (s)", "gap"):
        t.add_column(c, justify="left" if c in ("model", "pins", "best plan") else "right")
    worst = 0.0
    for name, cluster_name, nodes, batch, pins in CASES:
        model, cluster = model_of(name), load_cluster(cluster_name, nodes=nodes)
        device = load_device(cluster.device)
        t0 = time.perf_counter()
        r = search(model, cluster, device, batch, pins, top=1)
        took = time.perf_counter() - t0
        best = r.plans[0]
        tps = [pins["tp"]] if "tp" in pins else [x for x in (1, 2, 4, 8) if model.heads % x == 0 and model.ffn_hidden % x == 0]
        pinned = [search(model, cluster, device, batch, {**pins, "tp": x}, top=1).plans[0] for x in tps]
        pinned = min((p for p in pinned if p.prediction.fits), key=lambda p: p.prediction.iteration_s)
        exhaustive = "-"
        gaps = [best.prediction.iteration_s - pinned.prediction.iteration_s]
        if r.searched <= args.exhaustive_up_to:
            t1 = time.perf_counter()
            ranked = exhaustive_search(model, cluster, device, batch, pins)
            exhaustive = f"{ranked[0][1].prediction.iteration_s:.4f} ({time.perf_counter() - t1:.0f})"
            gaps.append(best.prediction.iteration_s - ranked[0][1].prediction.iteration_s)
        gap = max(gaps)
        worst = max(worst, gap)
        t.add_row(name, f"{cluster.gpus:,}", str(batch), ", ".join(f"{k}={v}" for k, v in pins.items()) or "-", f"{r.bounded:,}",
                  f"{r.split:,}", str(r.priced), f"{took:.2f}", f"{plan_label(best)}",
                  f"{best.prediction.iteration_s:.4f}", f"{pinned.prediction.iteration_s:.4f}", exhaustive, f"{gap:+.2g} s")
    Console(width=240).print(t)
    print(f"largest gap: {worst:+.3g} s ({'none: the search returned the best plan every time' if worst <= 1e-9 else 'THE SEARCH MISSED A BETTER PLAN'})")
    return 0 if worst <= 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
