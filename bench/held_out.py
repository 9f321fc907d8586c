"""Published runs no constant was fitted to (profiles/held_out/), predicted and compared: throughput and memory.

    .venv/bin/python bench/held_out.py [--quick]

- torchtitan's own benchmarks (Dec 2024): FSDP2, TP, PP and CP with torch.compile and Float8 on H100s, the
  building blocks meshplan's runtime is made of. Every knob is published, so each run is predicted as given
  (planner predict), with meshplan's runtime as the framework, its attention as the torch of that month ran it:
  FlashAttention-2 (TORCH_DEC_2024; planner/kernels.py). They report tokens/s per GPU and the peak memory
  reserved, and the memory is the one comparison with a GPU measurement this project has. Their H100s are 96 GB
  HBM2e parts at a 500 W limit, where the datasheet is the 700 W SXM5. So throughput is expected below the
  prediction by a device factor the page cannot give. The ratios within a table (CP against sequence length,
  interleaved against 1F1B) do not depend on that factor.
- KempnerForge's MFU report (Apr 2026): Llama 3 shapes of 8B, 15B and 70B under FSDP2 and TP on 1 to 32 H200s
  with torch.compile and torch 2.11, a trainer built like meshplan's runtime. Every knob is published; predicted
  as given on the h200-sxm-141gb datasheet, with KempnerForge's TP plan (KEMPNERFORGE). Their memory is
  max_memory_allocated, but of bf16 weights, gradients and AdamW state, which meshplan's runtime keeps in fp32:
  printed, not compared. Each run is predicted a second time with the GEMM curve scaled so that its top is
  torch.mm's measured rate on an H200 (TORCH_MM_RATE), a diagnostic and not a prediction: the datasheet's curve is
  fitted to Megatron-Core runs, and the two columns show what it absorbs. A third column adds, at that rate, what
  NCCL's kernels take from the GEMMs they overlap (sm_tax_s, NCCL_SM_SHARE): a hypothesis with a constant read
  from logs, not measured here, and not a prediction either.
- Llama 3 405B (Meta, table 4): MFU on 8,192 and 16,384 H100s, with the published degrees pinned and the rest
  searched (meshplan's runtime, and Megatron-Core as NVIDIA runs it).

Each torchtitan prediction is printed twice: with attention at FlashAttention-2's measured rate (planner/kernels.py)
and at the GEMM curve, cuDNN's rate, which torch runs on Hopper from 2.11 on. --quick skips the
Llama 3 searches."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from planner.cost import predict, stage_cost_list
from planner.frameworks import FRAMEWORKS, MESHPLAN
from planner.plan import Knobs
from planner.search import search
from planner.specs import PROFILES_DIR, load_cluster, load_device, load_model, model_from_dict
from planner.terms import CostModel

HELD_OUT = PROFILES_DIR / "held_out"
TORCH_DEC_2024 = dataclasses.replace(MESHPLAN, flash_attention=True, cp_masked_chunks=False)
"""meshplan's runtime on the torch of torchtitan's Dec 2024 runs (nightly 1963fc8), whose SDPA ran FlashAttention-2
first on an H100 (cuDNN attention opt-in since pytorch/pytorch#138522), with torch's own context parallelism
(ring attention, causal on the diagonal step: no masked rectangles)."""
KEMPNERFORGE = dataclasses.replace(MESHPLAN, tp_gathers_per_linear=True, loss_parallel=False, logit_bytes=2)
"""meshplan's runtime with KempnerForge's TP plan (kempnerforge/distributed/tensor_parallel.py at 01b461a): under
sequence parallelism q, k, v, gate and up each gather their own input (Framework.tp_gathers_per_linear), and the
head's bf16 logits are gathered to every tp rank for F.cross_entropy (Framework.loss_parallel; scripts/train.py)."""
DEVICE, CLUSTER = "h100-sxm5-80gb", "dgx-h100-80gb"
KF_CLUSTER = "hgx-h200-4gpu"
"""KempnerForge's nodes: 4 H200s on NVLink without NVSwitch (a pair at a third of the four's bandwidth) and a NIC each."""
TORCH_MM_RATE = 790.29 / 989.0
"""A bf16 torch.mm on an H200 SXM: 790.29 TFLOP/s of the 989 dense peak (zzc0721/torch-performance-test-data, cited
in the h200-sxm-141gb datasheet's notes): what the GEMMs alone reach, where the datasheet's fitted curve tops out at
0.583."""

NCCL_SM_SHARE = 32 / 132
"""Share of an H100's or H200's 132 SMs that NCCL's kernels hold while a collective runs: one CTA per channel
(NCCL src/include/device.h, MAXCHANNELS), and 32 coll channels is what NCCL_DEBUG=INFO prints on H100 clusters in
the logs users post (NCCL doubles the channels on Hopper across nodes: src/graph/connect.cc). A GEMM overlapped by
them loses those SMs (PyTorch PR #179937: 'NCCL collectives use SMs, which makes matmuls that are overlapped by
them 30-40% slower'; Calculon prices the same loss as processor_usage). Not measured for KempnerForge's
communicators: the sm-tax column is a hypothesis, docs/research/2026-12-03-multinode-loss.md."""


def sm_tax_s(plan, device, framework) -> float:
    """Seconds a step loses to NCCL_SM_SHARE of the SMs while FSDP2's gathers and reduce-scatters run beside compute
    (cost.StageCost.sharded_overlap_s): in each phase the compute beside traffic G slows by the share of the time
    they overlap, min(C, G), which lengthens the phase only past G: max(G, C + share * min(C, G)) - max(G, C), every
    microbatch. Without pipelining only (a step is then its microbatches in a row); the traffic the model leaves
    exposed (the microbatch's edges, the once-a-step gathers) has no compute beside it and is not taxed."""
    if plan.pp > 1:
        raise ValueError("sm_tax_s prices unpipelined plans only")
    (stage,) = stage_cost_list(CostModel(plan.model, plan.cluster, device, framework), plan.knobs, plan.stages)
    tax = sum(max(g, c + NCCL_SM_SHARE * min(c, g)) - max(g, c) for c, g in stage.sharded_overlap_s)
    return plan.num_microbatches * tax


def at_gemm_rate(device, rate: float):
    """`device` with its bf16 GEMM curve scaled so that its largest point is `rate` (the curve's shape kept)."""
    top = max(p.efficiency for p in device.gemm_efficiency)
    return dataclasses.replace(device, gemm_efficiency=tuple(dataclasses.replace(p, efficiency=p.efficiency * rate / top)
                                                            for p in device.gemm_efficiency))


def knobs_of(run: dict) -> Knobs:
    return Knobs(run["tp"], run["pp"], run["dp"], run["micro_batch"], run.get("schedule", "1f1b"), run.get("virtual_stages", 1),
                 run["recompute"], bool(run.get("sequence_parallel")), run["zero"], run["cp"], run["precision"], run["compile"])


def torchtitan_rows(device) -> list[dict]:
    """Every torchtitan run predicted as given, with FlashAttention-2's rate and without it."""
    data = json.loads((HELD_OUT / "torchtitan_llama3_h100_202412.json").read_text())
    gemm_only = dataclasses.replace(device, flash_attention_efficiency=())
    rows = []
    for run in data["runs"]:
        model = load_model(run["model"], run["seq_len"])
        cluster = load_cluster(CLUSTER, nodes=max(1, run["gpus"] // 8))
        knobs = knobs_of(run)
        batch = run["dp"] * run["micro_batch"] * (run["pp"] if run["pp"] > 1 else 1)
        got = {}
        for label, dev in (("fa2", device), ("gemm", gemm_only)):
            plan, _ = predict(model, cluster, dev, knobs, batch, framework=TORCH_DEC_2024)
            got[label] = plan
        rows.append({"table": run["table"], "name": run["name"], "published": run["tokens_per_s_per_gpu"],
                     "fa2": got["fa2"].prediction.tokens_per_s / run["gpus"], "gemm": got["gemm"].prediction.tokens_per_s / run["gpus"],
                     "memory": run["memory_gib"], "memory_predicted": got["fa2"].prediction.peak_memory_gib,
                     "async_tp": bool(run.get("async_tp"))})
    return rows


def kempnerforge_rows(device) -> list[dict]:
    """Every KempnerForge run predicted as given (torch 2.11: cuDNN attention, the GEMM curve's rate; its TP plan's
    gathers: KEMPNERFORGE), and again at torch.mm's rate (at_gemm_rate, TORCH_MM_RATE)."""
    data = json.loads((HELD_OUT / "kempnerforge_h200_202604.json").read_text())
    mm_rate = at_gemm_rate(device, TORCH_MM_RATE)
    rows = []
    for run in data["runs"]:
        shape = data["models"].get(run["model"])
        model = model_from_dict(shape, "kempnerforge") if shape else load_model(run["model"], run["seq_len"])
        cluster = load_cluster(KF_CLUSTER, nodes=-(-run["gpus"] // 4), gpus_per_node=min(4, run["gpus"]))
        batch = run["dp"] * run["micro_batch"] * run["grad_accum"]
        plan, _ = predict(model, cluster, device, knobs_of(run), batch, framework=KEMPNERFORGE, memory_headroom_gib=0)
        at_mm, _ = predict(model, cluster, mm_rate, knobs_of(run), batch, framework=KEMPNERFORGE, memory_headroom_gib=0)
        taxed_s = at_mm.prediction.iteration_s + sm_tax_s(at_mm, mm_rate, KEMPNERFORGE)
        rows.append({"name": run["name"], "gpus": run["gpus"], "nodes": plan.cluster.nodes, "gpus_per_node": plan.cluster.gpus_per_node,
                     "tp": run["tp"], "at_mm_rate": at_mm.prediction.tokens_per_s, "sm_tax": batch * model.seq_len / taxed_s,
                     "framework": plan.framework, "published": run["tokens_per_s"], "predicted": plan.prediction.tokens_per_s,
                     "memory": run["memory_gib"], "memory_predicted": plan.prediction.peak_memory_gib,
                     "step_s": run["step_s"], "step_predicted": plan.prediction.iteration_s})
    return rows


def causal_mfu(mfu: float, model) -> float:
    """MFU with attention's s x s products counted causally (half), where planner MFU counts them in full
    (Narayanan et al. 2021's formula): the factor between the two conventions."""
    h, s, v, n = model.hidden, model.seq_len, model.vocab, model.layers
    return mfu * (1 + s / (12 * h) + v / (16 * n * h)) / (1 + s / (6 * h) + v / (16 * n * h))


def llama3_rows(device) -> list[dict]:
    data = json.loads((HELD_OUT / "llama3_herd_2024_table4.json").read_text())
    rows = []
    for run in data["runs"]:
        model = load_model(run["model"], run["seq_len"])
        cluster = load_cluster(CLUSTER, nodes=run["gpus"] // 8)
        pins = {"tp": run["tp"], "pp": run["pp"], "dp": run["dp"], "cp": run["cp"], "zero": 2, "schedule": "interleaved", "precision": "bf16"}
        row = {"name": run["name"], "published": run["mfu"]}
        for label, fw in (("meshplan", MESHPLAN), ("megatron-core", FRAMEWORKS["megatron-core"])):
            best = search(model, cluster, device, run["global_batch"], pins, top=1, framework=fw).plans[0]
            row[label] = best.prediction.mfu
            row[label + " causal"] = causal_mfu(best.prediction.mfu, model)
            row[label + " plan"] = f"mb{best.micro_batch} v{best.virtual_stages} {best.stages[0].recompute}"
        rows.append(row)
    return rows


def pct(pred: float, pub: float) -> str:
    return f"{100 * (pred - pub) / pub:+.1f}%"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the torchtitan runs (no searches)")
    args = ap.parse_args()
    if not HELD_OUT.is_dir():
        print(f"error: no held-out runs at {HELD_OUT}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    device = load_device(DEVICE)
    rows = torchtitan_rows(device)
    print("torchtitan benchmarks (Dec 2024), predicted as given with meshplan's runtime as the framework, on the "
          f"{DEVICE} datasheet (their H100s: 96 GB HBM2e at 500 W)")
    print(f"{'table':>5}  {'run':<38} {'published':>9} {'FA2 rate':>9} {'error':>7} {'GEMM rate':>9} {'error':>7}   "
          f"{'memory':>6} {'predicted':>9} {'error':>7}")
    for r in rows:
        note = "  (AsyncTP: not priced)" if r["async_tp"] else ""
        print(f"{r['table']:>5}  {r['name']:<38} {r['published']:>9,.0f} {r['fa2']:>9,.0f} {pct(r['fa2'], r['published']):>7} "
              f"{r['gemm']:>9,.0f} {pct(r['gemm'], r['published']):>7}   {r['memory']:>6.1f} {r['memory_predicted']:>9.1f} "
              f"{pct(r['memory_predicted'], r['memory']):>7}{note}")
    for label in ("fa2", "gemm"):
        ratios = [r["published"] / r[label] for r in rows]
        print(f"published / predicted ({'FA2 rate' if label == 'fa2' else 'GEMM rate'}): median {statistics.median(ratios):.2f}, "
              f"range {min(ratios):.2f}-{max(ratios):.2f} (one device factor would make these equal)")
    mem = [abs(r["memory_predicted"] - r["memory"]) / r["memory"] for r in rows]
    print(f"memory: mean absolute error {100 * statistics.mean(mem):.1f}%, max {100 * max(mem):.1f}% over {len(rows)} runs")
    for table in sorted({r["table"] for r in rows}):
        group = [r for r in rows if r["table"] == table]
        if len(group) > 1:
            first = group[0]
            steps = ", ".join(f"{r['name'].split(', ')[-1]}: published {r['published'] / first['published']:.2f}, "
                              f"FA2 {r['fa2'] / first['fa2']:.2f}, GEMM {r['gemm'] / first['gemm']:.2f}" for r in group[1:])
            print(f"table {table}, each run over the first: {steps}")
    kf = kempnerforge_rows(load_device("h200-sxm-141gb"))
    print("\nKempnerForge (Apr 2026, torch 2.11), H200s 4 per node, predicted as given with meshplan's runtime and "
          "KempnerForge's TP plan (a gather per column-parallel linear, the logits gathered for the loss) as the "
          "framework, on 4-GPU nodes without NVSwitch (hgx-h200-4gpu) and the h200-sxm-141gb datasheet; memory: their max_memory_allocated of bf16 weights, gradients and "
          "AdamW state (8 bytes a parameter), against meshplan's fp32 (16): not comparable")
    print(f"{'run':<32} {'GPUs':>4} {'step s':>7} {'predicted':>9} {'tokens/s':>9} {'predicted':>9} {'error':>7}   {'memory':>6} {'predicted':>9}"
          f"   {'mm rate':>9} {'error':>7}  {'+ SM tax':>9} {'error':>7}")
    for r in kf:
        print(f"{r['name']:<32} {r['gpus']:>4} {r['step_s']:>7.2f} {r['step_predicted']:>9.2f} {r['published']:>9,.0f} "
              f"{r['predicted']:>9,.0f} {pct(r['predicted'], r['published']):>7}   {r['memory']:>6.1f} {r['memory_predicted']:>9.1f}"
              f"   {r['at_mm_rate']:>9,.0f} {pct(r['at_mm_rate'], r['published']):>7}  {r['sm_tax']:>9,.0f} {pct(r['sm_tax'], r['published']):>7}")
    errs = [abs(r["predicted"] - r["published"]) / r["published"] for r in kf]
    print(f"throughput: mean absolute error {100 * statistics.mean(errs):.1f}%, max {100 * max(errs):.1f}%; within a node "
          f"(runs 1-6) predicted/published {min(r['predicted'] / r['published'] for r in kf[:6]):.2f}-"
          f"{max(r['predicted'] / r['published'] for r in kf[:6]):.2f}, across nodes {min(r['predicted'] / r['published'] for r in kf[6:]):.2f}-"
          f"{max(r['predicted'] / r['published'] for r in kf[6:]):.2f}")
    for label, group in (("one node", [r for r in kf if r["nodes"] == 1]), ("across nodes", [r for r in kf if r["nodes"] > 1])):
        errs = sorted(100 * (r["at_mm_rate"] - r["published"]) / r["published"] for r in group)
        print(f"mm rate (GEMM curve topped at torch.mm's {TORCH_MM_RATE:.3f} of peak, a diagnostic): {label}, {len(group)} run{'s' if len(group) > 1 else ''}, "
              f"{errs[0]:+.1f}%" + (f" to {errs[-1]:+.1f}%" if len(errs) > 1 else ""))
        taxed = [abs(r["sm_tax"] - r["published"]) / r["published"] for r in group]
        print(f"mm rate + SM tax ({NCCL_SM_SHARE:.3f} of the SMs under hidden FSDP2 traffic, a hypothesis): {label}, "
              f"mean absolute error {100 * statistics.mean(taxed):.1f}%, max {100 * max(taxed):.1f}%")
    if not args.quick:
        print("\nLlama 3 405B (Meta, table 4): the published degrees, ZeRO-2 and an interleaved schedule pinned; micro-batch, "
              "virtual stages and recomputation searched. MFU as the planner counts it (attention s x s in full), "
              "and with attention counted causally (the paper does not say which it uses)")
        for r in llama3_rows(device):
            cells = "; ".join(f"{k} {100 * r[k]:.1f}% ({pct(r[k], r['published'])}), causal {100 * r[k + ' causal']:.1f}% "
                              f"[{r[k + ' plan']}]" for k in ("meshplan", "megatron-core"))
            print(f"  {r['name']}: published {100 * r['published']:.0f}%; {cells}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
