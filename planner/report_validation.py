"""`planner validate`'s tables (and make run's): predicted against measured step time and memory per run, and the
machine's drift and waits beside them. Pure formatting, on planner.report's console."""

from __future__ import annotations

import re
import statistics

from rich.table import Table

from planner.report import console, seconds_format
from planner.validate import priced_with


def _run_labels(runs: list[dict]) -> tuple[list[str], str]:
    """The run column (file:line of each plan's runs) short enough to read: the lines alone under a title naming the
    file where every run is in one file, else file names without their folders (--json keeps the whole labels)."""
    files = {w.rsplit(":", 1)[0] for r in runs for w in re.split(r", | \(", r["run"]) if ":" in w}
    if len(files) == 1:
        file = next(iter(files))
        return [r["run"].replace(f"{file}:", "") for r in runs], f" ({file}; run: its lines)"
    return [re.sub(r"[^\s,]*/", "", r["run"]) for r in runs], ""


def print_validation(report: dict) -> None:
    labels, where = _run_labels(report["runs"])
    t = Table(title=f"Predicted vs measured{where}", title_justify="left")
    drifted = any(r.get("machine_drift") is not None for r in report["runs"])
    waited = any(r.get("unloaded_error_pct") is not None for r in report["runs"])
    cp = any(r["knobs"]["cp"] > 1 for r in report["runs"])  # a column only where some run split its sequences
    for col in ("run", "model", "plan", "tp", *(("cp",) if cp else ()), "pp", "dp", "mbs", "schedule", "pred step s", "meas step s", "spread", "error",
                *(("machine", "rescaled error") if drifted else ()), *(("waited", "error less waits") if waited else ()),
                "pred tok/s", "meas tok/s", "memory error"):
        t.add_column(col, justify="right" if col not in ("run", "model", "plan", "schedule") else "left",
                     overflow="fold" if col == "run" else "ellipsis")
    # Both step columns to one number of decimals: 4 figures of the shortest step, predicted or measured.
    step = seconds_format(min((min(r["predicted_step_s"], r["measured_step_s"]) for r in report["runs"]), default=0), 4)
    for r, label in zip(report["runs"], labels):
        k = r["knobs"]
        drift = () if not drifted else ("-", "-") if r.get("machine_drift") is None else (
            f"×{r['machine_drift']:.2f}", f"{r['rescaled_error_pct']:+.1f}%")
        waits = () if not waited else ("-", "-") if r.get("unloaded_error_pct") is None else (
            f"{r['waited_pct']:.0f}%", f"{r['unloaded_error_pct']:+.1f}%")
        t.add_row(label, r["model"], r["plan_id"], str(k["tp"]), *((str(k["cp"]),) if cp else ()), str(k["pp"]), str(k["dp"]), str(k["micro_batch"]), k["schedule"],
                  step % r["predicted_step_s"], step % r["measured_step_s"], f"±{r['spread_pct']:.0f}%",
                  f"{r['error_pct']:+.1f}%", *drift, *waits, f"{r['predicted_tokens_per_s']:,.0f}", f"{r['measured_tokens_per_s']:,.0f}",
                  "-" if r.get("memory_error_pct") is None else f"{r['memory_error_pct']:.1f}%")
    if report["runs"]:
        console.print(t)  # an empty table says nothing the line below does not
    for w in report.get("skipped", []):
        console.print(f"[yellow]skipped[/yellow] {w}")
    if report["runs"]:
        console.print(priced_with(report))
        for m in report.get("profile_mismatches", []):
            console.print(f"[yellow]warning[/yellow]: {m['message']}")

        def line(summary: dict, n: int, what: str) -> str:
            sp = summary["spearman"]
            return (f"{what}: mean absolute error of step time {summary['mape_pct']:.1f}% over {n} plan{'' if n == 1 else 's'}; Spearman rank "
                    f"correlation predicted vs measured {'n/a (fewer than 3 plans)' if sp is None else f'{sp:.2f}'}")
        by_model = report.get("by_model", {})
        if len(by_model) > 1:
            for name, summary in by_model.items():
                console.print(line(summary, sum(r["model"] == name for r in report["runs"]), name))
        console.print(line(report, len(report["runs"]), "All"))
        if drifted:
            print_drift(report)
        if waited:
            print_waits(report)
        if report.get("memory_mape_pct") is not None:
            worst = max((m for r in report["runs"] for m in r["memory"]), key=lambda m: abs(m["error_pct"]))
            console.print(f"Peak memory, every rank: mean absolute error {report['memory_mape_pct']:.1f}% "
                          f"(worst rank {worst['rank']}: predicted {worst['predicted_gib']:.3f} GiB, measured {worst['measured_gib']:.3f}). "
                          "Both count tensors: the predicted figure is the plan's peak GiB less the profile's framework "
                          "overhead (the CUDA context, or on CPU the process's own memory), which neither counter sees.")
    else:
        console.print("[red]No valid runs to compare.[/red]")


def print_drift(report: dict) -> None:
    """What the machine did between profiling and these runs (validate.machine_drift), and the error once the
    predictions are scaled by it; what the scaling cannot correct, said."""
    runs = report["runs"]
    drifts = [r["machine_drift"] for r in runs if r.get("machine_drift") is not None]
    others = [r["background_cores"] for r in runs if r.get("background_cores") is not None]
    load = f"; other processes used {max(others):.1f} cores at most during the timed steps" if others else ""
    med = statistics.median(drifts)
    console.print(f"Machine: the reference block ran ×{min(drifts):.2f} to ×{max(drifts):.2f} (median ×{med:.2f}) the time "
                  f"it took when the profile was taken{load}; one run's reading varies by about ±10% on a quiet machine.")
    if report.get("rescaled_mape_pct") is not None:
        console.print(f"With each prediction scaled by its run's factor: mean absolute error {report['rescaled_mape_pct']:.1f}% "
                      f"(the scaling corrects compute slowed by other processes, not their effect on communication "
                      f"or memory traffic).")
    if med > 1.15 or med < 0.87 or (others and max(others) > 0.5):
        console.print("[yellow]warning[/yellow]: this machine was not as it was when profiled; the unscaled error is part "
                      "machine, not model. Profile again on an idle machine (`planner profile --device cpu`) for the "
                      "model's own error.")


def print_waits(report: dict) -> None:
    """The error once each measured step is taken less the time its ranks waited for a core
    (validate.less_waits), and what that cannot correct."""
    runs = [r for r in report["runs"] if r.get("waited_pct") is not None]
    least, most = min(r["waited_pct"] for r in runs), max(r["waited_pct"] for r in runs)
    span = f"{most:.0f}%" if f"{least:.0f}" == f"{most:.0f}" else f"{least:.0f}% to {most:.0f}%"
    console.print(f"Waiting for a core (Linux run-queue delay of each rank's training thread): {span} "
                  f"of a step (the slowest rank's wait; where ranks meet at every block, under tensor or "
                  f"context parallelism, the largest wait of each stretch between blocks, summed).")
    if report.get("unloaded_mape_pct") is not None:
        sp = report.get("unloaded_spearman")
        console.print(f"With each step taken less that wait: mean absolute error {report['unloaded_mape_pct']:.1f}%"
                      f"{'' if sp is None else f', Spearman {sp:.2f}'} (this removes the time other processes held the cores, "
                      f"not their effect on caches and memory bandwidth).")
    if report.get("unloaded_rescaled_mape_pct") is not None:
        console.print(f"Less that wait, with each prediction scaled by its run's factor as well: mean absolute error "
                      f"{report['unloaded_rescaled_mape_pct']:.1f}% (the reference block is timed less its own waits, so its factor "
                      f"is what other processes did to a second of compute through the caches and memory bandwidth; left in: "
                      f"collectives that wait for a peer another process holds off its core).")
    if most > 10:
        console.print("[yellow]warning[/yellow]: other processes took this machine's cores during the runs; the raw error "
                      "is part machine; the error less waits and scaled is the model's.")
