"""Where a training step of a plan goes, phase by phase, on this machine: the microbatches (the pipeline schedule or
the plain loop), the ZeRO stage's end-of-step reduction, gradient clipping, the optimizer step (and, under zero 1,
its broadcasts) and zero_grad, beside what the planner prices for each.

    .venv/bin/python bench/step_phases.py PLAN.json [--steps 8]

It runs runtime.launch with torchrun on the plan's ranks, with those phases of runtime.launch's step wrapped in
timers (nothing else changes), and, without pipelining, the last microbatch's backward beside the others' (under DDP
the last carries the gradients' all-reduce), and prints each rank's medians over the timed steps (the first two and
the last, which counts memory, are left out) and the prediction's breakdown. This is how 2026-12-03's session found
ZeroRedundancyOptimizer's per-parameter broadcasts (47-65 ms a step, priced ~13 ms) and the float64 copies in
clipping (20-35 ms, priced ~2.5 ms) outside the stages' own times."""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("plain_step", "pipeline_step", "finish_step", "all_reduce_gradients", "clip_grad_norm_")
SKIP = 2


def rank_main(argv: list[str], out: str) -> None:
    import runtime.launch as launch

    timings = collections.defaultdict(list)

    def timed(name, fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            got = fn(*a, **k)
            timings[name].append(time.perf_counter() - t0)
            return got
        return run

    for name in PHASES:
        setattr(launch, name, timed(name, getattr(launch, name)))
    plain = launch.plain_step

    def plain_by_microbatch(model, x, y, m, loss_fn, timing):
        # The step's own per-microbatch timings (runtime.train.plain_step fills them): under DDP the last backward
        # carries the all-reduce, and its excess over the others is what the overlap cost the compute.
        got = plain(model, x, y, m, loss_fn, timing)
        if timing is not None and m > 1:
            timings["backward, last microbatch"].append(timing["backward_s"][-1])
            timings["backward, others (median)"].append(statistics.median(timing["backward_s"][-m:-1]))
        return got
    launch.plain_step = plain_by_microbatch
    build = launch.build_optimizer

    def build_timed(*a, **k):
        opt = build(*a, **k)
        if getattr(opt, "optim", None) is not None:  # ZeRO-1: the owners' AdamW apart from the broadcasts (none: owns nothing)
            opt.optim.step = timed("adamw_step", opt.optim.step)
        opt.step, opt.zero_grad = timed("optimizer_step", opt.step), timed("zero_grad", opt.zero_grad)
        return opt
    launch.build_optimizer = build_timed
    launch.main(argv)
    medians = {k: statistics.median(v[SKIP:-1]) for k, v in timings.items() if len(v) > SKIP + 1}
    Path(f"{out}.{os.environ['RANK']}").write_text(json.dumps(medians))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plan")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rank-out", help=argparse.SUPPRESS)  # set when torchrun starts this file
    args, rest = ap.parse_known_args()
    if args.rank_out:
        rank_main([args.plan, "--steps", str(args.steps), *rest], args.rank_out)
        return 0
    from planner.errors import MeshplanError
    from planner.plan import load_plan

    try:
        plan = load_plan(args.plan)
    except MeshplanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.steps < SKIP + 2:
        print(f"error: --steps: at least {SKIP + 2} (the first {SKIP} and the last are not timed)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "phases")
        results = os.path.join(tmp, "results.jsonl")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(plan.world_size),
               __file__, args.plan, "--steps", str(args.steps), "--rank-out", out, "--results", results]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if run.returncode:
            print((run.stdout + run.stderr)[-3000:], file=sys.stderr)
            return run.returncode
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(plan.world_size)]
        line = json.loads(Path(results).read_text().splitlines()[-1])
    steps = line["step_s"][SKIP:-1]
    pred = line["predicted"]
    names = [n for n in (*PHASES, "backward, last microbatch", "backward, others (median)", "adamw_step", "optimizer_step", "zero_grad")
             if any(n in r for r in ranks)]
    print(f"{plan.model.name} {plan.tp}x{plan.pp}x{plan.dp} zero {plan.zero}, micro-batch {plan.micro_batch} x "
          f"{plan.num_microbatches}, {plan.schedule}: step {statistics.median(steps):.3f} s measured (median of "
          f"{len(steps)}), {pred['iteration_s']:.3f} s predicted")
    print(f"{'phase (ms, median per step)':<28}" + "".join(f"{f'rank {r}':>10}" for r in range(len(ranks))))
    for n in names:
        print(f"{n:<28}" + "".join(f"{1e3 * r[n]:>10.1f}" if n in r else f"{'-':>10}" for r in ranks))
    print("predicted (ms): " + ", ".join(f"{k.removesuffix('_s')} {1e3 * v:.1f}" for k, v in pred["breakdown"].items())
          + " (optimizer includes clipping's norm)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
