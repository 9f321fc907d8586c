"""Readable terminal output (rich tables) for the CLI. Pure formatting: no planning here."""

from __future__ import annotations

import shutil
import sys

from rich.console import Console
from rich.table import Table

# Piped output (make run, CI logs) gets a wide table instead of rich's 80-column default.
console = Console(highlight=False, width=None if sys.stdout.isatty() else shutil.get_terminal_size((180, 24)).columns)


def _recompute_label(plan) -> str:
    kinds = {(s.recompute, s.recompute_layers) for s in plan.stages}
    if len(kinds) == 1:
        rc, n = next(iter(kinds))
        return rc if n is None else f"full x{n}"
    parts = []
    for s in plan.stages:
        n = s.layers[1] - s.layers[0]
        parts.append(f"{s.recompute_layers}/{n}" if s.recompute == "full" and s.recompute_layers else ("all" if s.recompute == "full" else "0"))
    return "mixed (full per stage: " + " ".join(parts[:8]) + (" ..." if len(parts) > 8 else "") + ")"


def stage_summary(plan) -> str:
    """Blocks per stage, e.g. '11+12x6+13' for uneven splits."""
    counts = [s.layers[1] - s.layers[0] for s in plan.stages]
    out, i = [], 0
    while i < len(counts):
        j = i
        while j < len(counts) and counts[j] == counts[i]:
            j += 1
        out.append(f"{counts[i]}" + (f"x{j - i}" if j - i > 1 else ""))
        i = j
    return "+".join(out)


def schedule_label(plan) -> str:
    return f"interleaved v={plan.virtual_stages}" if plan.schedule == "interleaved" else plan.schedule


def torchrun_command(plan, path: str) -> str:
    c = plan.cluster
    if c.nodes > 1:
        return f"torchrun --nnodes {c.nodes} --nproc-per-node {c.gpus_per_node} --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m runtime.launch {path}"
    return f"torchrun --nproc-per-node {plan.world_size} -m runtime.launch {path}"


def plans_table(plans, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("#", "tp×pp×dp", "mbs", "schedule", "recompute", "SP", "dist-opt", "blocks/stage",
                "iter s", "tokens/s", "TFLOP/s/GPU", "MFU", "peak GiB", "fits"):
        t.add_column(col, justify="right" if col not in ("schedule", "recompute", "blocks/stage", "fits") else "left")
    for i, p in enumerate(plans, 1):
        pr = p.prediction
        t.add_row(str(i), f"{p.tp}×{p.pp}×{p.dp}", str(p.micro_batch), schedule_label(p), _recompute_label(p),
                  "yes" if p.sequence_parallel else "no", "yes" if p.distributed_optimizer else "no", stage_summary(p),
                  f"{pr.iteration_s:.3g}", f"{pr.tokens_per_s:,.0f}", f"{pr.tflops_per_gpu:.1f}" if pr.tflops_per_gpu >= 1 else f"{pr.tflops_per_gpu:.3f}",
                  f"{100 * pr.mfu:.1f}%", f"{pr.peak_memory_gib:.1f}", "yes" if pr.fits else "[red]no[/red]")
    return t


def breakdown_table(plan) -> Table:
    pr = plan.prediction
    t = Table(title=f"Where the {pr.iteration_s:.3g} s of an iteration go (slowest pipeline device)", title_justify="left")
    t.add_column("part")
    t.add_column("seconds", justify="right")
    t.add_column("share", justify="right")
    labels = {"compute_s": "compute (forward, backward, recompute)", "tp_comm_s": "tensor-parallel collectives",
              "pp_comm_s": "pipeline send/recv on the critical path", "dp_comm_s": "data-parallel gradient reduction (exposed)",
              "bubble_s": "pipeline bubble", "optimizer_s": "optimizer step"}
    for k, label in labels.items():
        v = getattr(pr.breakdown, k)
        t.add_row(label, f"{v:.4g}", f"{100 * v / pr.iteration_s:.1f}%")
    return t


def print_plans(result, out: str | None) -> None:
    plans = result.plans
    best = plans[0]
    c = best.cluster
    ph = result.phases_s
    console.print(f"{best.model.name} on {c.gpus} x {c.device} ({c.nodes} nodes x {c.gpus_per_node}), global batch {best.global_batch}: "
                  f"searched {result.searched:,} configurations in {result.search_s:.2f} s "
                  f"(bounds {ph['enumerate_and_bound']:.2f} s, ILP {ph['ilp']:.2f} s, simulation {ph['simulate']:.2f} s); profile: {best.profile}")
    fitting = [p for p in plans if p.prediction.fits]
    console.print(plans_table(plans, "Ranked plans (fastest first)" if fitting else "No plan fits; the closest configurations"))
    if not fitting:
        for p in plans:
            console.print(f"  tp {p.tp} pp {p.pp} dp {p.dp} mbs {p.micro_batch}: {p.prediction.reason}")
        return
    console.print(breakdown_table(best))
    console.print(f"Best plan {best.id}: stages (blocks) {stage_summary(best)}; memory per pipeline device "
                  f"{', '.join(f'{s.memory_gib:.1f}' for s in best.stages[:best.pp])} GiB")
    if not out:
        console.print("Write the best plan with --out plan.json to run it.")


def print_written(plan, out: str) -> None:
    console.print(f"Wrote {out}. Run it with:\n  {torchrun_command(plan, out)}")


def print_prediction(plan) -> None:
    pr = plan.prediction
    console.print(plans_table([plan], f"{plan.model.name}: predicted with {plan.profile}"))
    console.print(breakdown_table(plan))
    console.print(f"Memory per pipeline device (GiB): {', '.join(f'{s.memory_gib:.1f}' for s in plan.stages[:plan.pp])}")
    if not pr.fits:
        console.print(f"[red]Does not fit:[/red] {pr.reason}")


def print_validation(report: dict) -> None:
    t = Table(title="Predicted vs measured", title_justify="left")
    for col in ("run", "plan", "tp", "pp", "dp", "mbs", "schedule", "pred step s", "meas step s", "spread", "error", "pred tok/s", "meas tok/s"):
        t.add_column(col, justify="right" if col not in ("run", "plan", "schedule") else "left")
    for r in report["runs"]:
        k = r["knobs"]
        t.add_row(r["run"], r["plan_id"], str(k["tp"]), str(k["pp"]), str(k["dp"]), str(k["micro_batch"]), k["schedule"],
                  f"{r['predicted_step_s']:.4g}", f"{r['measured_step_s']:.4g}", f"±{r['spread_pct']:.0f}%",
                  f"{r['error_pct']:+.1f}%", f"{r['predicted_tokens_per_s']:,.0f}", f"{r['measured_tokens_per_s']:,.0f}")
    console.print(t)
    for w in report.get("skipped", []):
        console.print(f"[yellow]skipped[/yellow] {w}")
    if report["runs"]:
        sp = report["spearman"]
        console.print(f"Mean absolute error of step time: {report['mape_pct']:.1f}% over {len(report['runs'])} runs; "
                      f"Spearman rank correlation predicted vs measured: {'n/a (fewer than 3 runs)' if sp is None else f'{sp:.2f}'}")
    else:
        console.print("[red]No valid runs to compare.[/red]")
