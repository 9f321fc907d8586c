"""AdamW's step on this machine's CPU, per implementation: torch's default (on CPU a loop over the tensors) against fused, over plain
tensors and over DTensors, for one tp2 rank of gpt-tiny's shapes (7.6M parameters in 82 tensors).

    .venv/bin/python bench/optimizer_step.py [--repeats 8]

runtime.parallel.optimizer.adamw takes the fused one; this is the measurement behind it. One thread, as a CPU
rank runs (OMP_NUM_THREADS=1); medians of the steps after the first two; the two kinds alternate, twice."""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

SHAPES = [(8192, 256)] + [(384, 256), (128, 256), (256, 128), (512, 256), (256, 512)] * 8 + [(256,)] * 40 + [(8192, 256)]


def _params(dtensor: bool, mesh) -> list[torch.nn.Parameter]:
    from torch.distributed.tensor import Shard, distribute_tensor

    return [torch.nn.Parameter(distribute_tensor(torch.randn(s), mesh, [Shard(0)]) if dtensor else torch.randn(s))
            for s in SHAPES]


def step_ms(dtensor: bool, fused: bool, mesh, repeats: int) -> float:
    params = _params(dtensor, mesh)
    opt = torch.optim.AdamW(params, lr=1e-3, fused=fused or None)
    times = []
    for _ in range(repeats):
        for p in params:
            p.grad = torch.randn_like(p)
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[2:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    if args.repeats < 3:
        print("error: --repeats: at least 3 (the first two are not timed)")
        return 2
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="torch.distributed")  # distribute_tensor's note on its RNG tracker
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29761")
    dist.init_process_group("gloo", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    n = sum(torch.Size(s).numel() for s in SHAPES)
    rows = {}
    for _ in range(2):
        for dtensor in (False, True):
            for fused in (False, True):
                rows.setdefault((dtensor, fused), []).append(step_ms(dtensor, fused, mesh, args.repeats))
    print(f"AdamW step, {n / 1e6:.1f}M parameters in {len(SHAPES)} tensors, torch {torch.__version__}, 1 thread")
    print(f"{'tensors':<10}{'default (ms)':>14}{'fused (ms)':>12}{'ratio':>8}")
    for dtensor in (False, True):
        f, u = statistics.median(rows[dtensor, False]), statistics.median(rows[dtensor, True])
        print(f"{'DTensor' if dtensor else 'plain':<10}{f:>14.1f}{u:>12.1f}{f / u:>8.2f}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
