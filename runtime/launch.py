"""Run a plan: `torchrun --nproc-per-node N -m runtime.launch plan.json [--steps K] [--seed S] [--results FILE]
[--checkpoint-dir D] [--checkpoint-every K] [--data tokens.bin] [--warmup W] [--lr LR] [--lr-warmup-steps W]
[--lr-decay-steps D] [--lr-min-ratio R] [--max-grad-norm G]`.

main() reads top to bottom: load the plan, init the process group, build the mesh, build the model on meta,
split stages, apply TP, recompute, init or load weights with DP applied, train, write results. CPU ranks talk
over gloo, GPUs over NCCL; torchrun's usual flags (--nnodes, --rdzv-endpoint, ...) span nodes.

Training is what users expect of a GPT/Llama run: AdamW, a linear learning-rate warm-up then cosine decay,
gradient-norm clipping over the whole model (runtime.parallel.clip), and one log line per step (loss, grad
norm, lr, tokens/s, MFU, memory).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import math
import os
import resource
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor.parallel import loss_parallel
from torch.nn.parallel import DistributedDataParallel

from planner import __version__
from planner.errors import MeshplanError, PlanError, SpecError
from planner.cost import model_flops
from planner.plan import Plan, load_plan, plan_id, plan_to_dict
from planner.results import RunResult, append_result, median_tokens_per_s
from planner.specs import load_device
from planner.slurm import torchrun_prefix
from runtime import checkpoint, data
from runtime.mesh import build_mesh
from runtime.model import GPT, GPTConfig
from runtime.parallel.clip import clip_grad_norm_
from runtime.parallel.data import all_reduce_gradients, apply_data_parallel, needs_manual_all_reduce
from runtime.parallel.pipeline import build_schedule, build_stages, split_model
from runtime.parallel.recompute import apply_recompute
from runtime.parallel.tensor import apply_tp, cross_entropy


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m runtime.launch",
                                description="Train a GPT exactly as plan.json says and measure it.")
    p.add_argument("plan", help="plan.json (version 1), as `planner plan --out` writes it")
    p.add_argument("--steps", type=int, default=10, help="train until this many steps are done (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the data (default 0)")
    p.add_argument("--results", help="append one JSON line with the measurements to this file")
    p.add_argument("--checkpoint-dir", help="save checkpoints here; a run started again with it resumes")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save every K steps (default: only at the end)")
    p.add_argument("--data", help="flat uint16 token file (nanoGPT's train.bin); default: a seeded synthetic stream")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of tokens/s and stage timings (default 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (default 1e-3)")
    p.add_argument("--lr-warmup-steps", type=int, default=None,
                   help="steps of linear warm-up to --lr (default: a tenth of --steps, at least 1)")
    p.add_argument("--lr-decay-steps", type=int, default=None,
                   help="cosine decay from the end of warm-up to --lr-min-ratio * --lr at this step (default: --steps; give it, "
                        "and --lr-warmup-steps, when a run is stopped early by a smaller --steps and resumed)")
    p.add_argument("--lr-min-ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr (default 0.1)")
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="clip the whole model's gradient to this 2-norm (default 1.0; 0 turns clipping off)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per CPU rank (default 1)")
    return p.parse_args(argv)


def check_runnable(plan: Plan, args: argparse.Namespace, world_size: int) -> None:
    """What the runtime needs beyond load_plan's checks; raises before any process group exists."""
    if plan.cp > 1 or plan.zero > 1 or plan.precision != "bf16" or plan.compile:
        raise PlanError(f"{args.plan}: cp {plan.cp}, zero {plan.zero}, precision {plan.precision}, compile {plan.compile}: "
                        "this runtime runs cp 1, zero 0 or 1, bf16 and eager only so far")
    if world_size != plan.world_size:
        raise PlanError(f"{args.plan}: world_size: tp {plan.tp} x pp {plan.pp} x dp {plan.dp} = {plan.world_size} "
                        f"ranks, but {world_size} were started; run torchrun --nproc-per-node {plan.world_size} "
                        "(times --nnodes) or re-plan for this many devices")
    for flag, value, low in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                             ("--checkpoint-every", args.checkpoint_every, 0), ("--threads", args.threads, 1),
                             ("--lr-warmup-steps", args.lr_warmup_steps, 1), ("--lr-decay-steps", args.lr_decay_steps, 1),
                             ("--lr", args.lr, 0), ("--lr-min-ratio", args.lr_min_ratio, 0), ("--max-grad-norm", args.max_grad_norm, 0)):
        if value is not None and value < low:
            raise SpecError(flag, flag.lstrip("-").replace("-", "_"), f"must be at least {low}, got {value}")
    if args.lr_min_ratio > 1:
        raise SpecError("--lr-min-ratio", "lr_min_ratio", f"must be at most 1 (a fraction of --lr), got {args.lr_min_ratio}")
    if args.checkpoint_every and not args.checkpoint_dir:
        raise SpecError("--checkpoint-every", "checkpoint_every", "needs --checkpoint-dir to save into")
    m, pp = plan.num_microbatches, plan.pp
    if pp > 1 and plan.schedule == "1f1b" and m < pp:
        raise SpecError(args.plan, "num_microbatches", f"1F1B needs at least pp = {pp} microbatches, got {m}; use gpipe or more microbatches")
    # torch's ScheduleInterleaved1F1B runs rounds of pp microbatches (fewer if m < pp) and needs whole rounds.
    rounds = max(1, m // pp)
    if pp > 1 and plan.schedule == "interleaved" and m % rounds:
        raise SpecError(args.plan, "num_microbatches", f"interleaved 1F1B needs a multiple of pp = {pp} microbatches (or fewer than pp), got {m}")
    if plan.sequence_parallel and plan.tp > 1 and plan.model.seq_len % plan.tp:
        raise SpecError(args.plan, "sequence_parallel", f"seq_len {plan.model.seq_len} does not divide by tp {plan.tp}; sequence parallelism splits the sequence over tp")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = load_plan(args.plan)
    if "WORLD_SIZE" not in os.environ:  # python -m runtime.launch, without torchrun (which sets it, and RANK)
        raise PlanError(f"not started by torchrun (WORLD_SIZE is not set); run it as {torchrun_prefix()} "
                        f"--nproc-per-node {plan.world_size} -m runtime.launch {args.plan}")
    check_runnable(plan, args, int(os.environ.get("WORLD_SIZE", "1")))
    source = data.token_file(args.data, plan.model.vocab, plan.model.seq_len) if args.data else data.synthetic(plan.model.vocab, args.seed)

    # Process group and mesh. One thread per CPU rank: ranks share the cores.
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    mesh = build_mesh(plan.pp, plan.dp, plan.tp, device.type)
    pp_rank, dp_rank, tp_rank = (mesh[d].get_local_rank() for d in ("pp", "dp", "tp"))
    tp_mesh = mesh["tp"] if plan.tp > 1 else None

    # The model on meta, cut into this rank's pipeline chunks; then TP, recomputation, weights and DP per chunk.
    cfg = GPTConfig.from_spec(plan.model, plan.tp)
    with torch.device("meta"):
        model = GPT(cfg)
    chunks = split_model(model, plan.stages, plan.pp, pp_rank)
    for idx, chunk in chunks.items():
        if tp_mesh is not None:
            apply_tp(chunk, tp_mesh, sequence_parallel=plan.sequence_parallel, mlp=cfg.mlp)
        apply_recompute(chunk.layers, plan.stages[idx].recompute, plan.stages[idx].recompute_layers)
        # Seeded weights before DP: DDP cannot wrap meta tensors (it broadcasts at construction), and FSDP2
        # then shards the values it is given. A checkpoint, if any, overwrites them below.
        checkpoint.init_weights(chunk, cfg, args.seed, device)
        chunks[idx] = apply_data_parallel(chunk, mesh["dp"], shard_optimizer=plan.distributed_optimizer, tp=plan.tp,
                                          pipelined=plan.pp > 1)
    manual_dp = needs_manual_all_reduce(dp=plan.dp, tp=plan.tp, pipelined=plan.pp > 1,
                                        shard_optimizer=plan.distributed_optimizer)
    optimizers = {idx: build_optimizer(chunk, args.lr) for idx, chunk in chunks.items()}
    warmup_steps = args.lr_warmup_steps or max(1, args.steps // 10)
    decay_steps = args.lr_decay_steps or args.steps
    peak_tflops = device_peak_tflops(plan)
    start = 0
    if args.checkpoint_dir and (last := checkpoint.latest_step(args.checkpoint_dir)) is not None:
        start = checkpoint.load(args.checkpoint_dir, last, chunks, optimizers)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, targets, tp_mesh)

    timings = {idx: {"forward_s": [], "backward_s": []} for idx in chunks}
    if plan.pp > 1:
        stages = build_stages(chunks, len(plan.stages), mesh["pp"], device)
        schedule = build_schedule(stages, plan.schedule, plan.num_microbatches, loss_fn)
        if not cuda:
            time_stage_calls(stages, timings)

    # Train. Each step is timed between barriers; the batch of a step depends only on (seed, step).
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    # pipelining infers shapes during its first step (an extra forward/backward): always a warm-up step.
    warmup = max(args.warmup, 1 if plan.pp > 1 else 0)
    step_s, losses, grad_norms = [], [], []
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for step in range(start, args.steps):
        lr = lr_at(step, peak=args.lr, warmup_steps=warmup_steps, decay_steps=decay_steps, min_ratio=args.lr_min_ratio)
        x, y = data.get_batch(source, step=step, seed=args.seed, global_batch=plan.global_batch, seq_len=plan.model.seq_len,
                              dp_rank=dp_rank, dp=plan.dp, vocab=plan.model.vocab)
        x, y = x.to(device), y.to(device)
        synchronize(device)
        t0 = time.perf_counter()
        with autocast, (loss_parallel() if tp_mesh is not None else nullcontext()):
            if plan.pp > 1:
                loss = pipeline_step(schedule, stages, x, y)
            else:
                loss = plain_step(chunks[0], x, y, plan.num_microbatches, loss_fn, timings[0] if not cuda else None)
        if manual_dp:
            all_reduce_gradients(chunks.values(), mesh["dp"])
        grad_norm = clip_grad_norm_(chunks.values(), args.max_grad_norm, mesh)
        for opt in optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)
        synchronize(device)
        step_s.append(time.perf_counter() - t0)
        losses.append(loss)
        grad_norms.append(grad_norm)
        log_step(plan, step, args.steps, loss if tp_rank == 0 else None, grad_norm, lr, step_s[-1], peak_tflops, device)
        if step - start < warmup:  # warm-up steps (and pipelining's shape inference) stay out of the timings
            for t in timings.values():
                t["forward_s"].clear(), t["backward_s"].clear()
        if args.checkpoint_dir and ((args.checkpoint_every and (step + 1) % args.checkpoint_every == 0) or step + 1 == args.steps):
            checkpoint.save(args.checkpoint_dir, step + 1, chunks, optimizers)

    # Gather every rank's losses, memory and stage timings on rank 0; it prints and writes the results line.
    mine = {"pp": pp_rank, "dp": dp_rank, "tp": tp_rank, "losses": losses, "peak_memory_gib": peak_memory_gib(device),
            "timings": {f"stage{i}": {k: sum(v) / len(v) for k, v in t.items()} for i, t in timings.items() if all(t.values())}}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0 and step_s:
        result = make_result(plan, everyone, step_s, warmup, started_at, device, grad_norms)
        print_summary(result, start)
        if args.results:
            append_result(args.results, result)
    elif dist.get_rank() == 0:
        print(f"nothing to do: the checkpoint in {args.checkpoint_dir} is already at step {start} >= --steps {args.steps}")
    dist.destroy_process_group()
    return 0


def lr_at(step: int, *, peak: float, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """The learning rate of step `step` (0-based): linear warm-up to peak over warmup_steps steps (the first step
    gets peak / warmup_steps, not 0), then cosine decay to min_ratio * peak at decay_steps, flat after it
    (Loshchilov & Hutter 2017, eq. 5, one cycle; GPT-3, Brown et al. 2020, appendix B, and Llama 2, section
    2.2, train with warm-up plus cosine decay to 10% of the peak). A function of the step alone, so a resumed run
    follows the schedule of the run it resumes."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step + 1 - warmup_steps) / max(1, decay_steps - warmup_steps))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def device_peak_tflops(plan: Plan) -> float | None:
    """Peak TFLOP/s of the plan's device (its profile: measured, or the datasheet), for MFU; None if unknown."""
    try:
        return load_device(plan.cluster.device).peak_tflops
    except MeshplanError:
        return None


def log_step(plan: Plan, step: int, steps: int, loss: float | None, grad_norm: float, lr: float, seconds: float,
             peak_tflops: float | None, device: torch.device) -> None:
    """One line per step on rank 0: the batch's loss, the gradient norm before clipping, lr, tokens/s, MFU (model
    FLOPs without recomputation, Chowdhery et al. 2022, appendix B) and the largest peak memory of any rank.
    loss: this replica's loss on the one rank per dp replica that reports it (last stage, tp rank 0), else None.
    Its two scalar all-reduces run after the step's timing."""
    mine = torch.tensor([loss / plan.dp if loss is not None else 0.0, peak_memory_gib(device)], dtype=torch.float64, device=device)
    total, peak = mine[:1].clone(), mine[1:].clone()
    dist.all_reduce(total)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if dist.get_rank() != 0:
        return
    tokens_per_s = plan.global_batch * plan.model.seq_len / seconds
    flops = model_flops(plan.model, plan.global_batch, 0.0) / seconds / plan.world_size
    mfu = f"{100 * flops / (peak_tflops * 1e12):.1f}%" if peak_tflops else "n/a"
    print(f"step {step + 1}/{steps} | loss {float(total):.4f} | grad norm {grad_norm:.3f} | lr {lr:.2e} | "
          f"{tokens_per_s:,.0f} tokens/s | MFU {mfu} | memory {float(peak):.2f} GiB", flush=True)


def build_optimizer(chunk: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW as GPT-3 and Megatron-LM train it (betas 0.9/0.95, weight decay 0.1 on matrices only)."""
    params = [p for p in chunk.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


_STEP_HAS_RETURN_OUTPUTS = None


def pipeline_step(schedule, stages, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """One schedule step over this rank's stages; the batch's mean loss on the rank holding the last stage."""
    global _STEP_HAS_RETURN_OUTPUTS
    if _STEP_HAS_RETURN_OUTPUTS is None:
        _STEP_HAS_RETURN_OUTPUTS = "return_outputs" in inspect.signature(schedule.step).parameters
    first, last = any(s.is_first for s in stages), any(s.is_last for s in stages)
    mb_losses: list[torch.Tensor] = []
    kwargs = {"target": y, "losses": mb_losses} if last else {}
    if _STEP_HAS_RETURN_OUTPUTS:
        kwargs["return_outputs"] = False  # the last stage would otherwise keep every microbatch's logits
    schedule.step(*((x,) if first else ()), **kwargs)
    return float(torch.stack(mb_losses).detach().mean()) if last else None


def plain_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_microbatches: int, loss_fn,
               timing: dict | None) -> float:
    """Gradient accumulation over microbatches without pipelining; DP reduces only after the last one."""
    total = 0.0
    for i, (xm, ym) in enumerate(zip(x.chunk(num_microbatches), y.chunk(num_microbatches))):
        last = i == num_microbatches - 1
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(last)
        no_sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()
        with no_sync:
            t0 = time.perf_counter()
            loss = loss_fn(model(xm), ym)
            t1 = time.perf_counter()
            (loss / num_microbatches).backward()
            t2 = time.perf_counter()
        if timing is not None:
            timing["forward_s"].append(t1 - t0), timing["backward_s"].append(t2 - t1)
        total = total + loss.detach()
    return float(total) / num_microbatches


def time_stage_calls(stages, timings: dict) -> None:
    """Record the wall time of each stage's forward and backward per microbatch (CPU only: on a GPU these
    calls return before the kernels finish). The send/recv waits are outside these calls."""
    for stage in stages:
        for method, key in (("forward_one_chunk", "forward_s"), ("backward_one_chunk", "backward_s")):
            def timed(*a, _call=getattr(stage, method), _into=timings[stage.stage_index][key], **kw):
                t0 = time.perf_counter()
                out = _call(*a, **kw)
                _into.append(time.perf_counter() - t0)
                return out
            setattr(stage, method, timed)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def make_result(plan: Plan, everyone: list[dict], step_s: list[float], warmup: int, started_at: str,
                device: torch.device, grad_norms: list[float]) -> RunResult:
    # A step's loss: mean over dp replicas of the loss on their last pipeline stage (identical over tp).
    holders = [r for r in everyone if r["pp"] == plan.pp - 1 and r["tp"] == 0]
    losses = [sum(r["losses"][i] for r in holders) / len(holders) for i in range(len(step_s))]
    stage_timings = {}
    for r in everyone:
        if r["dp"] == 0 and r["tp"] == 0:
            stage_timings.update(r["timings"])
    return RunResult(
        plan_id=plan.id or plan_id(plan), plan=plan_to_dict(plan),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (gloo)",
        world_size=len(everyone), steps=len(step_s), step_s=step_s,
        tokens_per_s=median_tokens_per_s(step_s, warmup, plan.global_batch * plan.model.seq_len),
        losses=losses, peak_memory_gib=[r["peak_memory_gib"] for r in everyone],
        predicted=plan_to_dict(plan)["prediction"], started_at=started_at, meshplan_version=__version__, grad_norms=grad_norms,
        stage_timings={k: stage_timings[k] for k in sorted(stage_timings, key=lambda s: int(s[5:]))} or None)


def print_summary(result: RunResult, first_step: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"plan {result.plan_id}, {result.world_size} ranks")
    table.add_column("step", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("step_s", justify="right")
    for i, (loss, s) in enumerate(zip(result.losses, result.step_s)):
        table.add_row(str(first_step + i + 1), f"{loss:.4f}", f"{s:.3f}")
    console = Console()
    console.print(table)
    console.print(f"{result.device}: {result.tokens_per_s:,.0f} tokens/s (median step after warm-up); "
                  f"peak memory per rank {', '.join(f'{m:.2f}' for m in result.peak_memory_gib)} GiB")
    if result.predicted:
        console.print(f"predicted tokens/s: {result.predicted['tokens_per_s']:,.0f}")


def cli(argv: list[str] | None = None) -> int:
    """main() with bad input turned into one line on stderr and exit code 2, no traceback."""
    try:
        return main(argv)
    except MeshplanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())
