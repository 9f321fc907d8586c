"""Does the reference block that runtime.launch times before a run follow this machine's speed step by step?

    python bench/reference_tracking.py [--model gpt-tiny --model llama-tiny] [--steps 30] [--micro-batch 4]

One process, one thread. Each of --steps rounds times the reference block as runtime.launch does
(runtime.machine.time_reference: 2 warm-up and 7 timed forward + backward passes of one block, on the profile's
wait-free clock) and then one training step of the whole model (2 microbatches and AdamW), less the time the
thread waited for a core. If the machine's speed drifts while the reference stays a fixed share of a step, the
step over its neighbouring reference is steady even though both move: then scaling each step by a reference
read beside it takes the drift out, where one reading before the run (what `planner validate`'s machine drift
divides by) only can if the machine holds still for the run.

Per model: the spread (coefficient of variation) of the reference, of the step and of their ratio, their
correlation, and the mean error of predicting each step from the median ratio times its own reference, against
the median ratio times the median reference (one reading for the whole run). Run it quietly and beside another
job (say which); the machines are shared, so quote the ratios of one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from planner.report import console  # noqa: E402
from planner.specs import load_model  # noqa: E402
from runtime.machine import run_queue_wait_s, time_reference  # noqa: E402
from runtime.model import GPT, GPTConfig  # noqa: E402


def rounds(name: str, steps: int, micro_batch: int) -> list[tuple[float, float, float, float]]:
    """(reference s, step less its wait s, the wait s, the step's wall s) per round, after two warm-up steps."""
    spec, dev = load_model(name), torch.device("cpu")
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.from_spec(spec, 1))
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-4)
    x, y = (torch.randint(0, spec.vocab, (micro_batch, spec.seq_len)) for _ in range(2))

    def step() -> tuple[float, float, float]:
        w0, t0 = run_queue_wait_s() or 0.0, time.perf_counter()
        for _ in range(2):
            logits = gpt(x)
            F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        wall, waited = time.perf_counter() - t0, (run_queue_wait_s() or 0.0) - w0
        return wall - waited, waited, wall

    for _ in range(2):
        step()
    return [(time_reference(spec, dev)[0], *step()) for _ in range(steps)]


def summary(rows: list[tuple[float, float, float, float]]) -> dict:
    refs, steps = [r[0] for r in rows], [r[1] for r in rows]
    ratio = [s / r for r, s in zip(refs, steps)]

    def cv(v):
        return 100 * statistics.pstdev(v) / statistics.fmean(v)

    k, med_ref = statistics.median(ratio), statistics.median(refs)
    return {"ref_ms": 1e3 * med_ref, "ref_cv": cv(refs), "step_ms": 1e3 * statistics.median(steps), "step_cv": cv(steps),
            "ratio_cv": cv(ratio), "corr": statistics.correlation(refs, steps),
            "own_err": 100 * statistics.fmean(abs(s / (k * r) - 1) for r, s in zip(refs, steps)),
            "one_err": 100 * statistics.fmean(abs(s / (k * med_ref) - 1) for s in steps),
            "waited": 100 * sum(r[2] for r in rows) / sum(r[3] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="model preset (repeatable; default gpt-tiny and llama-tiny)")
    p.add_argument("--steps", type=int, default=30, help="rounds of reference + step per model (default 30)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per microbatch (default 4)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from rich.table import Table

    table = Table(title=f"reference block vs training step, {args.steps} rounds, one thread")
    for col in ("model", "ref ms", "ref cv", "step ms", "step cv", "step/ref cv", "corr", "err, own ref", "err, one ref", "waited"):
        table.add_column(col, justify="right")
    for name in args.model or ["gpt-tiny", "llama-tiny"]:
        s = summary(rounds(name, args.steps, args.micro_batch))
        table.add_row(name, f"{s['ref_ms']:.1f}", f"{s['ref_cv']:.1f}%", f"{s['step_ms']:.0f}", f"{s['step_cv']:.1f}%",
                      f"{s['ratio_cv']:.1f}%", f"{s['corr']:+.2f}", f"{s['own_err']:.1f}%", f"{s['one_err']:.1f}%", f"{s['waited']:.0f}%")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
