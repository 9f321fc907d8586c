"""Does communication overlapped with the backward slow the backward on this machine? The CPU counterpart of the
SM tax (bench/held_out.py: NCCL_SM_SHARE): gloo's threads take the cores the ranks compute on.

    .venv/bin/python bench/overlap_interference.py [--model gpt-tiny] [--micro-batch 4] [--reps 12]

On 2 gloo ranks, one thread each (as meshplan's runtime runs them), it times a model's blocks (no embedding or
head) forward and backward, alternating: alone, and wrapped in DDP, whose hooks all-reduce the gradients in
buckets under the backward. It also times one all-reduce of all those gradients with nothing beside it. If DDP's
backward exceeds the plain backward by more than that all-reduce, the excess is what the overlap cost the
compute. Medians over the timed repetitions (the first 3 are warm-up); rank 0 prints the table."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rank_main(model_name: str, micro_batch: int, reps: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from planner.specs import load_model
    from runtime.machine import leave
    from runtime.profile_cases import _gpt

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model, cpu = load_model(model_name), torch.device("cpu")
    plain = _gpt(model, model.layers, 1, cpu, embed=False, head=False)
    ddp = DDP(_gpt(model, model.layers, 1, cpu, embed=False, head=False))
    grads = torch.zeros(sum(p.numel() for p in plain.parameters()))
    x = torch.randn(micro_batch, model.seq_len, model.hidden, requires_grad=True)
    got = {"alone": [], "ddp": [], "all_reduce": []}
    for rep in range(reps + 3):
        for name, net in (("alone", plain), ("ddp", ddp)):
            dist.barrier()
            t0 = time.perf_counter()
            y = net(x)
            t1 = time.perf_counter()
            y.backward(torch.ones_like(y))
            t2 = time.perf_counter()
            x.grad = None
            net.zero_grad(set_to_none=True)
            if rep >= 3:
                got[name].append((t1 - t0, t2 - t1))
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(grads)
        if rep >= 3:
            got["all_reduce"].append((0.0, time.perf_counter() - t0))
    med = {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v)) for k, v in got.items()}
    if dist.get_rank() == 0:
        (f, b), (_, b_ddp), (_, ar) = med["alone"], med["ddp"], med["all_reduce"]
        print(f"{model_name}, micro-batch {micro_batch}, {model.layers} blocks, {grads.numel() / 1e6:.1f}M fp32 gradients, "
              f"2 gloo ranks, {reps} timed repetitions (medians)")
        print(f"  forward {1e3 * f:.1f} ms; backward alone {1e3 * b:.1f} ms; backward under DDP {1e3 * b_ddp:.1f} ms "
              f"(+{1e3 * (b_ddp - b):.1f} ms)")
        print(f"  the gradients' all-reduce alone {1e3 * ar:.1f} ms; DDP's backward beyond backward + all-reduce "
              f"{1e3 * (b_ddp - b - ar):+.1f} ms ({100 * (b_ddp - b - ar) / b:+.1f}% of the backward)")
    dist.barrier()
    leave(0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt-tiny")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)  # set when torchrun starts this file
    args = ap.parse_args()
    if args.rank:
        rank_main(args.model, args.micro_batch, args.reps)
        return 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, "--rank",
           "--model", args.model, "--micro-batch", str(args.micro_batch), "--reps", str(args.reps)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    print(out.stdout, end="")
    if out.returncode:
        print(out.stderr[-2000:], file=sys.stderr)
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
