"""Predicted vs measured: results/*.jsonl lines (runtime.launch --results) against the planner.

Each run's plan is priced again with today's profile (a measured profile wins over the datasheet),
so the error is the current model's; the report names that profile, and says once when it is not the one
the plans were made with (plan.profile, e.g. a fresh clone has no cpu.measured.json). Repeated runs of one plan are pooled: the measured step time
is their median, and their spread is reported beside the error so that a reader can tell the
model's error from the machine's noise. Bad lines are reported and skipped, never fatal."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from planner.cost import predict
from planner.errors import MeshplanError
from planner.io import read_jsonl
from planner.plan import plan_from_dict
from planner.results import result_from_dict
from planner.specs import load_device, measured_profile_path


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 points."""
    if len(xs) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else None


def _measured_step_s(line: dict) -> float:
    plan = line["plan"]
    return plan["global_batch"] * plan["model"]["seq_len"] / line["tokens_per_s"]


def not_results(path: str) -> str | None:
    """Why a file none of whose lines is a JSON object is no results file at all, in one line instead of one per line: it is
    one JSON document over many lines (a plan file, say), not text, or text of several lines none of which is JSON (a
    README, a log). None for one bad line (a torn results file: its line's own message says more)."""
    results = "a results file (one JSON line per run, as runtime.launch --results writes them)"
    try:
        text = Path(path).read_text()
        doc = json.loads(text)
    except UnicodeDecodeError:
        return f"{path}: not a text file, so not {results}"
    except OSError:
        return None
    except ValueError:
        lines = sum(1 for line in text.splitlines() if line.strip())
        return None if lines <= 1 else f"{path}: none of its {lines} lines is JSON, so it is not {results}"
    if isinstance(doc, dict) and "version" in doc and "stages" in doc:
        return (f"{path}: a plan file (plan.json), not a results file; run the plan with runtime.launch's --results FILE "
                f"(`planner launch {path} --print -- --results run.jsonl` prints the torchrun command), then validate that file")
    return f"{path}: one JSON document, not {results}"


def load_runs(paths: list[str]) -> tuple[list[dict], list[str]]:
    """Good results lines (with their parsed plan) and a message for each bad one."""
    good, skipped = [], []
    for path in paths:
        try:
            lines = list(read_jsonl(path))
        except MeshplanError as e:
            skipped.append(str(e))
            continue
        if lines and not any(isinstance(obj, dict) for _, obj, _ in lines) and (why := not_results(path)):
            skipped.append(why)
            continue
        for n, obj, err in lines:
            where = f"{path}:{n}"
            if err:
                skipped.append(f"{where}: {err}")
                continue
            try:
                result = result_from_dict(obj, where)
            except MeshplanError as e:
                skipped.append(str(e))
                continue
            try:
                plan = plan_from_dict(result.plan, f"{where} plan")
            except MeshplanError as e:
                skipped.append(f"{e} (this line's plan no longer parses with this meshplan; plan and run it again)")
                continue
            if result.tokens_per_s <= 0:
                skipped.append(f"{where}: tokens_per_s is {result.tokens_per_s}; the run measured no step")
                continue
            good.append({"where": where, "result": result, "line": obj, "plan": plan})
    return good, skipped


def validate(paths: list[str]) -> dict:
    runs, skipped = load_runs(paths)
    by_plan: dict[str, list[dict]] = {}
    for r in runs:
        by_plan.setdefault(r["plan"].id or r["result"].plan_id, []).append(r)
    rows = []
    devices: dict[str, object] = {}
    mismatched: dict[tuple[str, str], list] = {}  # (planned, priced) profile labels -> [plans, the profile priced with]
    for pid, group in by_plan.items():
        plan = group[0]["plan"]
        name = plan.cluster.device
        if name not in devices:
            try:
                devices[name] = load_device(name)
            except MeshplanError as e:
                devices[name] = e
        device = devices[name]
        if isinstance(device, MeshplanError):
            skipped.extend(f"{g['where']}: its device {name!r} has no profile here ({device}); profile it or copy its profile" for g in group)
            continue
        try:
            priced, _ = predict(plan.model, plan.cluster, device, plan.knobs, plan.global_batch, plan.stages)
        except MeshplanError as e:  # a plan an older meshplan wrote and ran, which this one no longer prices
            skipped.extend(f"{g['where']}: this meshplan does not price its plan: {e}" for g in group)
            continue
        if plan.profile and plan.profile != device.label:
            mismatched.setdefault((plan.profile, device.label), [0, device, name])[0] += 1
        measured = [_measured_step_s(g["line"]) for g in group]
        med = statistics.median(measured)
        if len(measured) > 1:
            spread = 100 * (max(measured) - min(measured)) / 2 / med
        else:
            steps = group[0]["result"].step_s[1:] or group[0]["result"].step_s
            steps = sorted(steps)
            spread = 100 * (steps[-1] - steps[0]) / 2 / statistics.median(steps) if len(steps) > 1 else 0.0
        pred = priced.prediction.iteration_s
        k = plan.knobs
        memory = _memory_rows(priced, device, [g["result"] for g in group])
        drift, background = machine_drift(plan, device, [g["result"] for g in group])
        unloaded = [u for u in (less_waits(g["result"]) for g in group) if u is not None]
        unloaded_s = statistics.median(u[0] for u in unloaded) if len(unloaded) == len(group) else None
        rows.append({
            "run": ", ".join(g["where"] for g in group[:2]) + (f" (+{len(group) - 2})" if len(group) > 2 else ""),
            "plan_id": pid, "repeats": len(group),
            "knobs": {"tp": k.tp, "pp": k.pp, "dp": k.dp, "micro_batch": k.micro_batch, "schedule": k.schedule,
                      "virtual_stages": k.virtual_stages, "recompute": k.recompute, "cp": k.cp, "zero": k.zero,
                      "precision": k.precision, "compile": k.compile},
            "model": plan.model.name, "device": group[0]["result"].device, "profile": device.label,
            "planned_profile": plan.profile, "predicted_step_s": pred, "measured_step_s": med, "measured_step_s_all": measured,
            "spread_pct": spread, "error_pct": 100 * (pred - med) / med,
            "predicted_tokens_per_s": priced.prediction.tokens_per_s,
            "measured_tokens_per_s": plan.global_batch * plan.model.seq_len / med,
            "stage_timings": group[0]["result"].stage_timings,
            "memory": memory,
            "memory_error_pct": statistics.fmean(abs(m["error_pct"]) for m in memory) if memory else None,
            "machine_drift": drift, "background_cores": background,
            "rescaled_error_pct": None if drift is None else 100 * (pred * drift - med) / med,
            "unloaded_step_s": unloaded_s,
            "waited_pct": None if unloaded_s is None else 100 * statistics.median(u[1] / (u[0] + u[1]) for u in unloaded),
            "unloaded_error_pct": None if unloaded_s is None else 100 * (pred - unloaded_s) / unloaded_s,
            # Both corrections at once (less_waits says why they compose): the waits out of the step, and the
            # prediction slowed as the reference block, timed less its own waits, was slowed.
            "unloaded_rescaled_error_pct": None if unloaded_s is None or drift is None
            else 100 * (pred * drift - unloaded_s) / unloaded_s,
        })
    rows.sort(key=lambda r: r["measured_step_s"])
    by_model = {name: _summary([r for r in rows if r["model"] == name]) for name in sorted({r["model"] for r in rows})}
    mismatches = [{"planned": planned, "priced": priced, "plans": n, "message": profile_mismatch(planned, device, n, name)}
                  for (planned, priced), (n, device, name) in mismatched.items()]
    return {"runs": rows, **_summary(rows), "by_model": by_model, "skipped": skipped,
            "profiles": sorted({r["profile"] for r in rows}), "profile_mismatches": mismatches}


def priced_with(report: dict) -> str:
    """The sentence naming the device profile(s) a report priced its runs with (validate's "profiles")."""
    return f"Priced with this machine's device profile: {', '.join(report['profiles'])}."


def profile_mismatch(planned: str, device, plans: int, where: str = "") -> str:
    """The warning for `plans` plans made with profile `planned` (their plan.profile) but priced with `device`, the
    profile of that name this machine has now: their error is that profile's, and how to price them as planned."""
    said = f"{plans} plan(s) were planned with the profile '{planned}' but are priced with '{device.label}'"
    if where.endswith(".json"):  # the plan's cluster names a device file: that file is what prices it, wherever it is
        return (f"{said}, read from the device file {where} that the plan names, so these errors are not the ones they "
                "were planned with; put the profile they were planned with in that file to price them as planned")
    path = measured_profile_path(device.name)
    if device.source == "measured":
        return (f"{said}: this machine's measured profile, {path}, wins over the datasheet, so these errors are not the "
                "ones they were planned with; move that file aside to price them as planned")
    return (f"{said}, the only {device.name} profile on this machine, so these errors are not the ones they were planned "
            f"with (the README's numbers use the measured profile); to price them as planned, copy the measured profile "
            f"of the machine that ran them to {path}, or measure this one's with `planner profile --device "
            f"{'cpu' if device.name == 'cpu' else 'cuda'}`")


def _summary(rows: list[dict]) -> dict:
    """Mean absolute % error and rank correlation of step time over `rows`, and the mean absolute % error of
    every rank's peak memory."""
    ranks = [abs(m["error_pct"]) for r in rows for m in r["memory"]]
    rescaled = [abs(r["rescaled_error_pct"]) for r in rows if r["rescaled_error_pct"] is not None]
    unloaded = [abs(r["unloaded_error_pct"]) for r in rows if r["unloaded_error_pct"] is not None]
    both = [abs(r["unloaded_rescaled_error_pct"]) for r in rows if r["unloaded_rescaled_error_pct"] is not None]
    return {"mape_pct": statistics.fmean(abs(r["error_pct"]) for r in rows) if rows else None,
            "rescaled_mape_pct": statistics.fmean(rescaled) if rows and len(rescaled) == len(rows) else None,
            "unloaded_mape_pct": statistics.fmean(unloaded) if rows and len(unloaded) == len(rows) else None,
            "unloaded_rescaled_mape_pct": statistics.fmean(both) if rows and len(both) == len(rows) else None,
            "unloaded_spearman": spearman([r["predicted_step_s"] for r in rows], [r["unloaded_step_s"] for r in rows])
            if rows and len(unloaded) == len(rows) else None,
            "spearman": spearman([r["predicted_step_s"] for r in rows], [r["measured_step_s"] for r in rows]),
            "memory_mape_pct": statistics.fmean(ranks) if ranks else None}


def machine_drift(plan, device, results: list) -> tuple[float | None, float | None]:
    """How much slower this machine ran than when it was profiled, and how many cores other processes used.

    The drift is the reference block each run timed just before training (RunResult.machine) over the same
    block timed the same way (runtime.machine.time_reference, every rank at once) when the profile was taken
    (its measured.reference_s, by model): 1.0 on an unchanged machine, 1.3 when it ran 30% slower. The median
    over repeats; None when the runs did not record it or the profile has no reference for the plan's model
    (an older profile, or another model: the profile's layer curves are fitted over passes of many shapes, and
    a quiet machine timed ×0.81 to ×1.00 against them, so they are no reference). Scaling a prediction by it
    corrects compute that other processes slowed; it cannot correct what contention does to communication or to
    the ranks' memory traffic."""
    machines = [r.machine for r in results if r.machine]
    cores = [m["background_cores"] for m in machines if m.get("background_cores") is not None]
    background = statistics.median(cores) if cores else None
    refs = [m["reference_s"] for m in machines if m.get("reference_s")]
    profiled = (device.measured or {}).get("reference_s", {}).get(plan.model.name) if device.source == "measured" else None
    if not refs or not profiled:
        return None, background
    return statistics.median(refs) / profiled, background


def less_waits(result) -> tuple[float, float] | None:
    """(the median timed step less the time its slowest rank waited for a core, the median of that wait) from
    the run's per-step run-queue delays (RunResult.machine step_wait_s, runtime.machine.run_queue_wait_s); None
    for runs that did not record them (GPU runs, older results, non-Linux).

    A rank's step is the time it ran, the time it waited for a core and the time it waited for its peers. What
    another job costs a rank is the middle term; while one rank waits, its peers soon stop at their next
    collective and wait asleep, so the step grows by about the largest rank's wait, not the ranks' mean or sum
    (measured on this 2-core machine beside a 2-process training job, 4 plans' steps +50% to +96% over their
    quiet medians: less the largest wait, -4% to +7%; less the mean wait, +8% to +18%). Ranks that meet at every
    block (tensor and context parallelism) lose more: the largest wait in each stretch between blocks, summed
    (machine step_synced_wait_s, runtime.machine.synced_waits), which is the largest rank's wait where no group
    meets that often; results without it take the largest rank's wait.

    What the wait leaves in is the other job's share of the caches and memory bandwidth, which slows each second a
    rank does run. The reference block (machine_drift) is timed less its own waits (runtime.profile_cases.Clock),
    so its factor is that slowdown: a prediction scaled by it compares with the step less waits (validate's
    unloaded_rescaled_error_pct). Beside a 2-process training job on this 2-core machine (2026-12-03, 8 plans) the
    steps ran 2.2-2.4x their predictions: less waits -1% to -28% (mean 22.7%), less waits and scaled -0% to -16%
    (mean 7.2%); on the quiet machine the same day 3.7% and 4.5% (the factor's own noise, about +-5%)."""
    m = result.machine or {}
    waits, timed, synced = m.get("step_wait_s"), m.get("timed_steps"), m.get("step_synced_wait_s")
    if waits is None or timed is None:  # their shapes were checked when the line was read (results.result_from_dict)
        return None
    worst = [synced[i] if synced is not None else max(waits[i]) for i in timed]
    return statistics.median(result.step_s[i] - w for i, w in zip(timed, worst)), statistics.median(worst)


def _memory_rows(plan, device, results: list) -> list[dict]:
    """Each rank's measured peak memory (the median over repeats) against the planner's for its pipeline device.
    Both count tensors only: what the runtime records (on CUDA the allocator's reserved peak, on CPU the peak of
    live tensor bytes) against the prediction less the framework overhead (the CUDA context, which neither
    counts). Ranks are laid out as the mesh (pp, dp, cp, tp): rank r is on pipeline device r // (dp cp tp)."""
    from planner.cost import MESHPLAN, memory_by_device

    per_rank = [statistics.median(x) for x in zip(*(r.peak_memory_gib for r in results))]
    if not per_rank or not all(v > 0 for v in per_rank):
        return []
    devices = memory_by_device(plan, device, framework=MESHPLAN)  # what ran: meshplan's runtime, as predict above
    group = plan.world_size // plan.pp
    out = []
    for rank, measured in enumerate(per_rank):
        m = devices[rank // group]
        predicted = m.total_gib - m.overhead_gib
        out.append({"rank": rank, "pipeline_device": rank // group, "predicted_gib": predicted, "measured_gib": measured,
                    "error_pct": 100 * (predicted - measured) / measured})
    return out
