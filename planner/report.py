"""Readable terminal output (rich tables) for the CLI. Pure formatting: no planning here."""

from __future__ import annotations

import math
import os
import shlex
import shutil
import sys

from rich import box
from rich.console import Console
from rich.table import Table

from planner.frameworks import priced_elsewhere
from planner.specs import nodes_x
from planner.plan import degrees_text

# Piped output (make run, CI logs) gets a wide table instead of rich's 80-column default.
class _Console(Console):
    def on_broken_pipe(self) -> None:
        """The reader of stdout has gone (`planner plan ... | head`): rich would exit at once; raise BrokenPipeError
        instead, so that plan and predict stop printing but still write --out (planner.io.stdout_reader_may_go); the
        other commands end there (planner.cli.main)."""
        self.quiet = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as rich does: later output goes nowhere
        raise BrokenPipeError


console = _Console(highlight=False, width=None if sys.stdout.isatty() else shutil.get_terminal_size((180, 24)).columns)


def _recompute_label(plan) -> str:
    """'none', 'selective' or 'full' when every stage does the same; else how many of the model's blocks are
    recomputed in full, e.g. 'full 38/96' (the other blocks recompute nothing, or only their attention: 'sel+full')."""
    kinds = {s.recompute for s in plan.stages}
    if len(kinds) == 1 and all(s.recompute_layers is None for s in plan.stages):
        return kinds.pop()
    full = sum((s.layers[1] - s.layers[0]) if s.recompute_layers is None else s.recompute_layers
               for s in plan.stages if s.recompute == "full")
    return f"{'sel+full' if 'selective' in kinds else 'full'} {full}/{plan.model.layers}"


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


def blocks_label(plan, width: int = 12) -> str:
    """stage_summary when it is short; else the range over the stages, e.g. '1-3 on 128' (every one of the 128
    stages holds 1 to 3 blocks)."""
    text = stage_summary(plan)
    if len(text) <= width:
        return text
    counts = [s.layers[1] - s.layers[0] for s in plan.stages]
    return f"{min(counts)}-{max(counts)} on {len(counts)}"


def schedule_label(plan) -> str:
    return f"interleaved v={plan.virtual_stages}" if plan.schedule == "interleaved" else plan.schedule


def tflops_format(tflops: float) -> str:
    """The printf format of a TFLOP/s figure: one decimal, or three for a CPU's (0.045 would read 0.0)."""
    return "%.1f" if tflops >= 1 else "%.3f"


def tflops_text(tflops: float) -> str:
    return tflops_format(tflops) % tflops


def seconds_format(seconds: float, significant: int = 3) -> str:
    """The printf format of a column of seconds: one number of decimals for every row, enough for `seconds` (the
    column's smallest value, or the whole its rows are parts of) to show `significant` figures. So 17.0 stands
    beside 17.4 (not 17, as %.3g writes it) and a CPU's 2.29 beside 3.61."""
    if not 0 < seconds < float("inf"):
        return "%.0f"
    return f"%.{min(max(significant - 1 - math.floor(math.log10(seconds)), 0), 6)}f"


FLOPS_NOTE = ("TFLOP/s per GPU counts the FLOPs run, recomputation included, by Narayanan et al. 2021's formula, which "
              "counts attention's s x s products in full (a causal kernel runs about half); MFU counts model FLOPs "
              "without recomputation, over the device's bf16 peak (fp8 plans too).")
WIDE_COLUMNS = 120  # the full table needs about this many; narrower terminals get the compact one


def _count(x: float) -> str:
    return f"{x:,.0f}" if x < 1e4 else f"{x / 1e3:,.1f}k" if x < 1e6 else f"{x / 1e6:,.2f}M"


def degrees_label(plan, compact: bool = False) -> str:
    """tp×pp×dp, with the context-parallel degree where it is above 1."""
    cp = "" if plan.cp == 1 else (f"c{plan.cp}" if compact else f" cp {plan.cp}")
    return f"{plan.tp}×{plan.pp}×{plan.dp}{cp}"


def precision_label(plan) -> str:
    return plan.precision + (", compiled" if plan.compile else "")


def plans_table(plans, title: str) -> Table:
    if console.width < WIDE_COLUMNS:
        return compact_plans_table(plans, title)
    extras = any(p.precision != "bf16" or p.compile for p in plans)
    t = Table(title=title, title_justify="left", caption=FLOPS_NOTE + (" cp N: context parallel over N ranks." if any(p.cp > 1 for p in plans) else ""),
              caption_justify="left")
    for col in ("#", "tp×pp×dp", "mbs", "schedule", "recompute", "SP", "ZeRO", *(("precision",) if extras else ()), "blocks/stage",
                "iter s", "tokens/s", "TFLOP/s/GPU", "MFU", "peak GiB", "fits"):
        t.add_column(col, justify="right" if col not in ("schedule", "recompute", "blocks/stage", "fits", "precision") else "left")
    iteration = seconds_format(min(p.prediction.iteration_s for p in plans))
    for i, p in enumerate(plans, 1):
        pr = p.prediction
        t.add_row(str(i), degrees_label(p), str(p.micro_batch), schedule_label(p), _recompute_label(p),
                  "yes" if p.sequence_parallel else "no", str(p.zero), *((precision_label(p),) if extras else ()), blocks_label(p, 24),
                  iteration % pr.iteration_s, f"{pr.tokens_per_s:,.0f}", tflops_text(pr.tflops_per_gpu),
                  f"{100 * pr.mfu:.1f}%", f"{pr.peak_memory_gib:.1f}", "yes" if pr.fits else "[red]no[/red]")
    return t


def compact_plans_table(plans, title: str) -> Table:
    """The ranked plans in 80 columns: SP and the distributed optimizer in one column, short numbers, and a
    peak memory in red (with '!') for a plan that does not fit."""
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=0,
              caption=FLOPS_NOTE + " SP/Zn: sequence parallel / ZeRO stage n; fp8, cc: Float8 linears, compiled; "
                                   "cN: context parallel over N ranks.", caption_justify="left")
    for col in ("#", "tp×pp×dp", "mbs", "sched", "recompute", "SP/Zn", "blocks", "iter s", "tok/s", "TF/s", "MFU", "GiB"):
        t.add_column(col, justify="left" if col in ("sched", "recompute", "SP/Zn", "blocks") else "right", no_wrap=True)
    iteration = seconds_format(min(p.prediction.iteration_s for p in plans))
    for i, p in enumerate(plans, 1):
        pr = p.prediction
        sched = f"int v={p.virtual_stages}" if p.schedule == "interleaved" else p.schedule
        knobs = "/".join(k for k, on in (("SP", p.sequence_parallel), (f"Z{p.zero}", p.zero > 0), ("fp8", p.precision == "fp8"),
                                         ("cc", p.compile)) if on) or "-"
        gib = f"{pr.peak_memory_gib:.0f}" if pr.peak_memory_gib >= 100 else f"{pr.peak_memory_gib:.1f}"
        t.add_row(str(i), degrees_label(p, compact=True), str(p.micro_batch), sched, _recompute_label(p).replace("selective", "sel"), knobs,
                  blocks_label(p, 10), iteration % pr.iteration_s, _count(pr.tokens_per_s), tflops_text(pr.tflops_per_gpu),
                  f"{100 * pr.mfu:.1f}%", gib if pr.fits else f"[red]{gib}![/red]")
    return t


def breakdown_table(plan) -> Table:
    pr = plan.prediction
    t = Table(title=f"Where the {seconds_format(pr.iteration_s) % pr.iteration_s} s of an iteration go (slowest pipeline device)",
              title_justify="left")
    t.add_column("part")
    t.add_column("seconds", justify="right")
    t.add_column("share", justify="right")
    labels = {"compute_s": "compute (forward, backward, recompute)", "tp_comm_s": "tensor-parallel collectives",
              "pp_comm_s": "pipeline send/recv on the critical path", "dp_comm_s": "data-parallel gradient reduction (exposed)",
              "bubble_s": "pipeline bubble", "optimizer_s": "optimizer step"}
    seconds = seconds_format(pr.iteration_s, 4)  # every part to the same decimals: 4 figures of the whole
    for k, label in labels.items():
        v = getattr(pr.breakdown, k)
        t.add_row(label, seconds % v, f"{100 * v / pr.iteration_s:.1f}%")
    return t


COST_NOTE = ("days = tokens / tokens/s / 86,400; GPU-hours = days x 24 x GPUs; cost = GPU-hours x price; no time for "
             "restarts, checkpoints or evaluation.")


def tokens_label(tokens: float) -> str:
    """15e12 -> '15T', 3e11 -> '300B' (decimal suffixes, as token counts are quoted)."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if tokens >= scale:
            return f"{tokens / scale:.4g}{suffix}"
    return f"{tokens:,.0f}"


def _days(days: float) -> str:
    return f"{days:,.0f}" if days >= 1000 else f"{days:.1f}" if days >= 1 else f"{days:.2g}"


def _usd(usd: float | None) -> str:
    return "-" if usd is None else f"${usd:,.0f}" if usd < 1e4 else f"${_count(usd)}"


def training_title(tokens: int, price: float | None) -> str:
    return f"Time and cost to train {tokens_label(tokens)} tokens" + (f" at ${price:g} per GPU-hour" if price is not None else "")


def print_training(plans, costs) -> None:
    """Days, GPU-hours and cost beside each plan's tokens/s (costs: planner.compare.training_cost of each), under a
    title line and over the line that says how they follow from tokens/s (a table this narrow would wrap both)."""
    t = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for col in ("#", "tp×pp×dp", "tokens/s", "days", "GPU-hours", "cost"):
        t.add_column(col, justify="right", no_wrap=True)
    for i, (p, c) in enumerate(zip(plans, costs), 1):
        t.add_row(str(i), degrees_label(p), f"{c.tokens_per_s:,.0f}", _days(c.days), _count(c.gpu_hours), _usd(c.cost_usd))
    console.print(training_title(costs[0].tokens, costs[0].gpu_hour_price_usd))
    console.print(t)
    console.print(COST_NOTE)


def time_limit_note(result) -> str:
    """What a search cut short by its time limit did not prove (planner.search.SearchResult with complete False)."""
    fitting = sum(p.prediction.fits for p in result.plans)
    if result.gap_pct > 0:
        text = (f"The time limit stopped the search before its ranking was proven: the best plan may be up to "
                f"{result.gap_pct:.1f}% faster than the one shown.")
    else:
        more = (f"{fitting - 1} more of the {result.top} asked for were priced in time, not proven the next fastest"
                if fitting > 1 else f"no more of the {result.top} asked for were priced in time")
        text = (f"The time limit stopped the search early. The first plan is proven the fastest (no configuration left "
                f"unpriced can beat it); {more}.")
    limit, bound = result.time_limit_s, result.phases_s["bound"]
    if limit is not None and bound > limit:
        text += (f" Every configuration is bounded first, whatever the limit (that took {bound:.1f} s here, over the "
                 f"{limit:g} s limit); the limit cuts the layer splits and simulations after it.")
    return text


def print_plans(result, out: str | None, training: tuple[int, float | None] | None = None, device_name: str | None = None) -> None:
    """The search's ranked plans under a header; device_name (the profile's name) stands in for the cluster's device,
    which may be a file's path."""
    plans = result.plans
    best = plans[0]
    c = best.cluster
    ph = result.phases_s
    console.print(f"{best.model.name} (seq {best.model.seq_len:,}) on {c.gpus} x {device_name or c.device} ({nodes_x(c.nodes, c.gpus_per_node)}), "
                  f"global batch {best.global_batch}: "
                  f"searched {result.searched:,} configurations in {result.search_s:.2f} s: every one bounded, "
                  f"{result.split:,} layer splits solved, {result.priced:,} priced by simulation "
                  f"(bounds {ph['bound']:.2f} s, splits {ph['split']:.2f} s, simulation {ph['simulate']:.2f} s); profile: {best.profile}")
    if not result.complete:
        console.print(f"[yellow]{time_limit_note(result)}[/yellow]")
    fitting = [p for p in plans if p.prediction.fits]
    console.print(plans_table(plans, "Ranked plans (fastest first)" if fitting else "No plan fits; the closest configurations"))
    if not fitting:
        for i, p in enumerate(plans, 1):
            console.print(f"  #{i} {degrees_text(p)} mbs {p.micro_batch} "
                          f"recompute {_recompute_label(p)}: {p.prediction.reason}")
        return
    if training:
        from planner.compare import plan_training_cost

        print_training(fitting, [plan_training_cost(p, *training) for p in fitting])
    console.print(breakdown_table(best))
    console.print(f"Best plan {best.id}: stages (blocks) {stage_summary(best)}; memory per pipeline device "
                  f"{', '.join(f'{s.memory_gib:.1f}' for s in best.stages[:best.pp])} GiB")
    if not out:
        console.print("Write the best plan with --out plan.json to run it.")


def print_written(plan, out: str) -> None:
    from planner.slurm import torchrun_argv, torchrun_prefix

    if plan.cluster.nodes > 1:
        console.print(f"Wrote {out}. Start it on its {plan.cluster.nodes} nodes with: planner launch {out} --slurm "
                      "(an sbatch script), or --print (the torchrun command for each node)")
    else:
        argv = torchrun_argv(plan, out, 1, plan.world_size, "", "", [])  # planner launch --print's command, one node
        console.print(f"Wrote {out}. Run it with:\n  {torchrun_prefix()} {shlex.join(argv)}", soft_wrap=True)
    if elsewhere := priced_elsewhere(plan.framework, out):
        console.print(elsewhere)


def print_prediction(plan, cost=None) -> None:
    """The priced plan; with cost (a planner.compare.TrainingCost), also the days, GPU-hours and cost to train."""
    pr = plan.prediction
    console.print(plans_table([plan], f"{plan.model.name} (seq {plan.model.seq_len:,}): predicted with {plan.profile}"))
    if cost is not None:
        print_training([plan], [cost])
    console.print(breakdown_table(plan))
    console.print(f"Memory per pipeline device (GiB): {', '.join(f'{s.memory_gib:.1f}' for s in plan.stages[:plan.pp])}")
    if not pr.fits:
        console.print(f"[red]Does not fit:[/red] {pr.reason}")


def plan_label(plan) -> str:
    """A plan's knobs in a few characters: '4×4×64 mb1 1f1b full 2/80 Z1' (cN for context parallelism, Zn for the
    ZeRO stage, fp8; sequence parallelism left out)."""
    sched = f"int v={plan.virtual_stages}" if plan.schedule == "interleaved" else plan.schedule
    extra = (f" Z{plan.zero}" if plan.zero else "") + (" fp8" if plan.precision == "fp8" else "") + (" cc" if plan.compile else "")
    return f"{degrees_label(plan, compact=True)} mb{plan.micro_batch} {sched} {_recompute_label(plan).replace('selective', 'sel')}{extra}"


def cluster_label(row) -> str:
    """A compare row's cluster: its name, and the device where one was given instead of the cluster file's."""
    c = row.cluster
    return c.name if row.device.name == c.device else f"{c.name} ({row.device.name})"


def _compare_cells(row, exact: bool) -> list[str]:
    """One compare row's cells after cluster and GPUs: the plan, tokens/s, MFU, GiB, days, GPU-hours, price, cost."""
    price = "-" if row.gpu_hour_price_usd is None else f"{row.gpu_hour_price_usd:.2f}"
    if not row.fits:
        return ["nothing fits", "-", "-", "-", "-", "-", price, "-"]
    pr, cost = row.plan.prediction, row.cost
    cells = [plan_label(row.plan), f"{pr.tokens_per_s:,.0f}" if exact else _count(pr.tokens_per_s), f"{100 * pr.mfu:.1f}%",
             f"{pr.peak_memory_gib:.1f}"]
    if cost is None:  # no tokens given
        return cells + ["-", "-", price, "-"]
    usd = "-" if cost.cost_usd is None else (f"${cost.cost_usd:,.0f}" if exact else _usd(cost.cost_usd))
    return cells + [_days(cost.days), f"{cost.gpu_hours:,.0f}" if exact else _count(cost.gpu_hours), price, usd]


def print_compare(model, global_batch: int, tokens: int, rows) -> None:
    """planner compare: one row per cluster (planner.compare.CompareRow), and why nothing fits where it does not."""
    console.print(f"{model.name} (seq {model.seq_len:,}), global batch {global_batch} ({global_batch * model.seq_len:,} tokens an iteration), "
                  f"{tokens_label(tokens)} tokens: the fastest plan on each cluster")
    t = Table(title="Time and cost to train, per cluster", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=0,
              caption=COST_NOTE + " Predictions from each device's profile. GPUs: nodes×GPUs per node; mb: micro-batch; "
                                  "$/h: per GPU-hour.", caption_justify="left")
    # In 80 columns the cluster and plan cells wrap (at hyphens and spaces); the numbers never do.
    for col in ("cluster", "GPUs", "best plan", "tok/s", "MFU", "GiB", "days", "GPU-h", "$/h", "cost"):
        t.add_column(col, justify="left" if col in ("cluster", "best plan") else "right", no_wrap=col not in ("cluster", "best plan"),
                     overflow="fold")
    for row in rows:
        cells = _compare_cells(row, exact=False)
        t.add_row(cluster_label(row), f"{row.cluster.nodes}×{row.cluster.gpus_per_node}",
                  *([f"[red]{cells[0]}[/red]"] + cells[1:] if not row.fits else cells))
    console.print(t)
    for row in rows:
        if not row.fits:
            console.print(f"[red]{cluster_label(row)}[/red] ({row.cluster.nodes}×{row.cluster.gpus_per_node}): {row.reason}")


def compare_markdown(rows) -> str:
    """The compare rows as a Markdown table with whole numbers (the README's)."""
    head = ["cluster", "GPUs", "profile", "best plan (tp×pp×dp, micro-batch, schedule, recompute)", "tokens/s", "MFU",
            "peak GiB", "days", "GPU-hours", "$/GPU-hour", "cost"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = _compare_cells(row, exact=True)
        if not row.fits:
            cells[0] = f"nothing fits: {row.reason.removeprefix('nothing fits: ')}"
        lines.append("| " + " | ".join([cluster_label(row), f"{row.cluster.gpus:,}", row.device.label, *cells]) + " |")
    return "\n".join(lines) + "\n"
