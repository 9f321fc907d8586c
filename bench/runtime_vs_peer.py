"""Our runtime against a bare torch.distributed.pipelining script: the same GPT (runtime.model, gpt-tiny) and
the same config (pp2, Schedule1F1B, 8 microbatches of 4 sequences of 128 tokens), on 2 CPU ranks.

    python bench/runtime_vs_peer.py [--steps 20] [--warmup 2]

Both sides live in the same two processes and take turns step by step (who goes first alternates too), so
the load of a shared machine hits them alike; measured one process pair after another, the ratio swung from
0.4 to 1.8 here. The runtime side is built and stepped by the functions runtime.launch.main calls
(split_model, init_weights, apply_data_parallel, build_stages, build_schedule, pipeline_step, AdamW step), on
the (pp, dp, cp, tp) mesh; the bare side builds the model, deletes layers by hand and drives one PipelineStage
with Schedule1F1B on the default group. Each step (forward, backward, optimizer) is timed between barriers,
warm-up steps are left out (pipelining infers shapes in step one), and the table quotes medians.
Target: runtime / bare >= 0.95.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL, PP, MICRO_BATCH, MICROBATCHES, SEED = "gpt-tiny", 2, 4, 8, 0


def make_plan():
    from planner.plan import Plan, Stage, with_id
    from planner.specs import load_cluster, load_model

    model = load_model(MODEL)
    half = model.layers // 2
    stages = (Stage((0, half), True, False), Stage((half, model.layers), False, True))
    return with_id(Plan(model=model, cluster=load_cluster("local-cpu", gpus_per_node=PP), global_batch=MICRO_BATCH * MICROBATCHES,
                        micro_batch=MICRO_BATCH, num_microbatches=MICROBATCHES, tp=1, pp=PP, dp=1, schedule="1f1b",
                        virtual_stages=1, sequence_parallel=False, zero=0, stages=stages))


def runtime_side(plan, device):
    """A step function built the way runtime.launch.main builds a run (tp = dp = 1 here)."""
    import torch

    from runtime import checkpoint, data
    from runtime.parallel.optimizer import build_optimizer
    from runtime.train import pipeline_step, time_stage_calls
    from runtime.mesh import build_mesh
    from runtime.model import GPT, GPTConfig
    from runtime.parallel.data import apply_data_parallel
    from runtime.parallel.pipeline import build_schedule, build_stages, split_model
    from runtime.parallel.recompute import apply_recompute
    from runtime.parallel.tensor import cross_entropy

    mesh = build_mesh(pp=plan.pp, dp=plan.dp, tp=plan.tp, device_type=device.type)
    cfg = GPTConfig.from_spec(plan.model, plan.tp)
    with torch.device("meta"):
        model = GPT(cfg)
    chunks = split_model(model, plan.stages, plan.pp, mesh.pp.get_local_rank())
    for idx, chunk in chunks.items():
        apply_recompute(chunk.layers, plan.stages[idx].recompute, plan.stages[idx].recompute_layers)
        checkpoint.init_weights(chunk, cfg, SEED, device)
        chunks[idx] = apply_data_parallel(chunk, mesh.replicas, zero=0, tp=1, pipelined_microbatches=plan.num_microbatches)
    optimizers = {idx: build_optimizer(chunk, 1e-3) for idx, chunk in chunks.items()}
    stages = build_stages(chunks, len(plan.stages), mesh.pp, device)
    schedule = build_schedule(stages, plan.schedule, plan.num_microbatches, lambda out, y: cross_entropy(out, y, None))
    time_stage_calls(stages, {idx: {"forward_s": [], "backward_s": []} for idx in chunks})
    source = data.synthetic(plan.model.vocab, SEED)

    def batch(step):
        return data.get_batch(source, step=step, seed=SEED, global_batch=plan.global_batch, seq_len=plan.model.seq_len,
                              dp_rank=0, dp=1, vocab=plan.model.vocab)

    def step(x, y):
        pipeline_step(schedule, stages, x, y)
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)

    return batch, step


def bare_side(rank):
    """The bare script: the whole GPT on each rank, layers removed by hand, one PipelineStage, 1F1B, AdamW."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from planner.specs import load_model
    from runtime.model import GPT, GPTConfig

    spec = load_model(MODEL)
    cfg = GPTConfig.from_spec(spec, 1)
    torch.manual_seed(SEED)
    model = GPT(cfg)
    half = cfg.layers // 2
    for name in list(model.layers.keys()):
        if (int(name) < half) != (rank == 0):
            del model.layers[name]
    if rank == 0:
        model.norm, model.head = None, None
    else:
        model.embed = None
    stage = PipelineStage(model, rank, PP, torch.device("cpu"))

    def loss_fn(logits, targets):
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))

    schedule = Schedule1F1B(stage, n_microbatches=MICROBATCHES, loss_fn=loss_fn)
    # fused, as runtime.parallel.optimizer.adamw steps: the comparison is of the pipelines, not of AdamW's kernels.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step(x, y):
        # return_outputs=False, as the runtime does: the default keeps and concatenates every microbatch's logits.
        if rank == 0:
            schedule.step(x, return_outputs=False)
        else:
            schedule.step(target=y, losses=[], return_outputs=False)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def rank_main(rank: int, port: int, steps: int, warmup: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(PP), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    plan = make_plan()
    batch, ours = runtime_side(plan, torch.device("cpu"))
    theirs = bare_side(rank)
    times = {"runtime": [], "bare": []}
    for i in range(warmup + steps):
        x, y = batch(i)
        sides = [("runtime", ours), ("bare", theirs)]
        for name, step in sides if i % 2 == 0 else sides[::-1]:
            dist.barrier()
            t0 = time.perf_counter()
            step(x, y)
            dist.barrier()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    args = p.parse_args()

    import torch.multiprocessing as mp
    from rich.console import Console
    from rich.table import Table

    from runtime.machine import free_port

    port = free_port()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, port, args.steps, args.warmup, out)) for r in range(PP)]
    for proc in procs:
        proc.start()
    times = out.get()
    for proc in procs:
        proc.join()

    plan = make_plan()
    tokens = plan.global_batch * plan.model.seq_len
    table = Table(title=f"{MODEL}: pp{PP} 1F1B, {MICROBATCHES} microbatches of {MICRO_BATCH}, 2 CPU ranks (gloo)")
    for col in ("side", "median step s", "tokens/s (median)", "min step s", "max step s"):
        table.add_column(col, justify="right")
    tps = {}
    for name, ts in times.items():
        tps[name] = tokens / statistics.median(ts)
        table.add_row(name, f"{statistics.median(ts):.3f}", f"{tps[name]:,.0f}", f"{min(ts):.3f}", f"{max(ts):.3f}")
    pairs = [a / b for a, b in zip(times["bare"], times["runtime"])]
    console = Console()
    console.print(table)
    ratio = tps["runtime"] / tps["bare"]
    console.print(f"runtime / bare tokens/s = {ratio:.3f} (median of per-step pairs {statistics.median(pairs):.3f}) over "
                  f"{args.steps} timed steps each; target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'}")


if __name__ == "__main__":
    main()
