"""Run a plan: `torchrun --nproc-per-node N -m runtime.launch plan.json [--steps K] [--seed S] [--results FILE]
[--checkpoint-dir D] [--checkpoint-every K] [--data tokens.bin] [--warmup W] [--lr LR] [--lr-warmup-steps W]
[--lr-decay-steps D] [--lr-min-ratio R] [--max-grad-norm G]`.

main() reads top to bottom: load the plan, init the process group, build the mesh, build the model on meta,
split stages, apply FP8, TP, CP, recompute and compile, init or load weights with the ZeRO stage applied, train,
write results. CPU ranks talk over gloo, GPUs over NCCL; torchrun's usual flags (--nnodes, --rdzv-endpoint, ...)
span nodes.

Training is what users expect of a GPT/Llama run: AdamW, a linear learning-rate warm-up then cosine decay,
gradient-norm clipping over the whole model (runtime.parallel.clip), and one log line per step (loss, grad
norm, lr, tokens/s, MFU, memory). Memory is measured as the planner defines it (runtime.memory).
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

from planner import __version__
from planner.errors import MeshplanError, PlanError, SpecError
from planner.cost import compile_problem, model_flops
from planner.frameworks import priced_elsewhere
from planner.io import check_folder, check_target
from planner.plan import Plan, degrees_text, load_plan, plan_id, plan_to_dict
from planner.results import RunResult, append_result, median_tokens_per_s, timed_steps
from planner.specs import load_device
from planner.slurm import torchrun_prefix
from planner.zero import gradient_reducer
from runtime import checkpoint, data, machine
from planner.runtime_args import parse_args
from runtime.memory import LiveTensorBytes, use_expandable_segments
from runtime.mesh import build_mesh
from runtime.model import GPT, Block, GPTConfig
from runtime.parallel.clip import clip_grad_norm_
from runtime.parallel.compile import apply_compile
from runtime.parallel.context import apply_cp
from runtime.parallel.data import all_reduce_gradients, apply_data_parallel, finish_step, zero_grad_to_none
from runtime.parallel.optimizer import build_optimizer
from runtime.parallel.pipeline import build_schedule, build_stages, split_model
from runtime.parallel.recompute import apply_recompute
from runtime.parallel.tensor import apply_tp, cross_entropy
from runtime.precision import apply_fp8, fp8_problem
from runtime.train import lr_at, pipeline_step, plain_step, synchronize, time_stage_calls


def check_runnable(plan: Plan, args: argparse.Namespace, world_size: int) -> None:
    """What the runtime needs beyond load_plan's checks; raises before any process group exists."""
    if plan.precision == "fp8" and (why := fp8_problem()) is not None:
        raise SpecError(args.plan, "precision", why)
    if plan.compile and (why := compile_problem(tp=plan.tp, sequence_parallel=plan.sequence_parallel)) is not None:
        raise SpecError(args.plan, "compile", why)
    if world_size != plan.world_size:
        raise PlanError(f"{args.plan}: world_size: {degrees_text(plan)} = "
                        f"{plan.world_size} ranks, but {world_size} {'was' if world_size == 1 else 'were'} started; run torchrun --nproc-per-node "
                        f"{plan.world_size} (times --nnodes) or re-plan for this many devices")
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
    if args.results is not None:  # refused now, not when rank 0 writes it after training
        check_target(args.results, "--results")
    if args.checkpoint_dir is not None:
        check_folder(args.checkpoint_dir, "--checkpoint-dir")
    m, pp = plan.num_microbatches, plan.pp
    if pp > 1 and plan.schedule == "1f1b" and m < pp:
        raise SpecError(args.plan, "num_microbatches", f"1F1B needs at least pp = {pp} microbatches, got {m}; use gpipe or more microbatches")
    # torch's ScheduleInterleaved1F1B runs rounds of pp microbatches (fewer if m < pp) and needs whole rounds.
    rounds = max(1, m // pp)
    if pp > 1 and plan.schedule == "interleaved" and m % rounds:
        raise SpecError(args.plan, "num_microbatches", f"interleaved 1F1B needs a multiple of pp = {pp} microbatches (or fewer than pp), got {m}")
    local = plan.model.seq_len // plan.cp  # the tokens of a sequence one cp rank holds
    if plan.sequence_parallel and plan.tp > 1 and local % plan.tp:
        raise SpecError(args.plan, "sequence_parallel", f"the {local} tokens per cp rank (seq_len {plan.model.seq_len} / cp "
                                                        f"{plan.cp}) do not divide by tp {plan.tp}; sequence parallelism splits them over tp")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_expandable_segments()  # before anything touches the GPU (runtime.memory says why)
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
        if not plan.compile:  # a compiled run's memory figure is the resident set, which kept memory would inflate
            machine.keep_freed_memory()  # freed memory stays for reuse, as CUDA's caching allocator keeps it
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    meshes = build_mesh(pp=plan.pp, dp=plan.dp, cp=plan.cp, tp=plan.tp, device_type=device.type)
    pp_rank, dp_rank, cp_rank, tp_rank = (m.get_local_rank() for m in (meshes.pp, meshes.dp, meshes.cp, meshes.tp))
    tp_mesh = meshes.tp if plan.tp > 1 else None
    # The profile's reference block, timed on every rank at once before anything else is built (runtime.machine):
    # `planner validate` compares it with the profile to tell the machine's drift from the model's error.
    dist.barrier()
    reference = machine.time_reference(plan.model, device)
    # bf16 on CUDA (runtime.precision): FSDP2's mixed precision for zero 2/3, autocast otherwise; fp32 on CPU.
    fsdp_bf16 = cuda and plan.zero >= 2 and meshes.replicas.size() > 1
    fp8 = plan.precision == "fp8"

    # The model on meta, cut into this rank's pipeline chunks; then FP8, TP, CP, recomputation, compile, weights and
    # the ZeRO stage (over the dp x cp replicas) per chunk.
    cfg = GPTConfig.from_spec(plan.model, plan.tp)
    with torch.device("meta"):
        model = GPT(cfg)
    chunks = split_model(model, plan.stages, plan.pp, pp_rank)
    for idx, chunk in chunks.items():
        if fp8:
            apply_fp8(chunk)
        if tp_mesh is not None:
            apply_tp(chunk, tp_mesh, sequence_parallel=plan.sequence_parallel, mlp=cfg.mlp, fp8=fp8)
        if plan.cp > 1:
            apply_cp(chunk, meshes.cp, seq_len=plan.model.seq_len)
        apply_recompute(chunk.layers, plan.stages[idx].recompute, plan.stages[idx].recompute_layers)
        if plan.compile:
            apply_compile(chunk.layers)
        # Seeded weights before DP: DDP cannot wrap meta tensors (it broadcasts at construction), and FSDP2
        # then shards the values it is given. A checkpoint, if any, overwrites them below.
        checkpoint.init_weights(chunk, cfg, args.seed, device)
        chunks[idx] = apply_data_parallel(chunk, meshes.replicas, zero=plan.zero, tp=plan.tp, bf16=fsdp_bf16,
                                          pipelined_microbatches=plan.num_microbatches if plan.pp > 1 else 0)
    by_hand = gradient_reducer(zero=plan.zero, replicas=meshes.replicas.size(), tp=plan.tp, pipelined=plan.pp > 1) == "by hand"
    optimizers = {idx: build_optimizer(chunk, args.lr, zero=plan.zero, mesh=meshes.replicas) for idx, chunk in chunks.items()}
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
        stages = build_stages(chunks, len(plan.stages), meshes.pp, device)
        schedule = build_schedule(stages, plan.schedule, plan.num_microbatches, loss_fn)
        if not cuda:
            time_stage_calls(stages, timings)

    # Train. Each step is timed between barriers; the batch of a step depends only on (seed, step). The autocast
    # region (zero 0/1 on CUDA) is the whole step: its cache keeps a bf16 copy of every weight until the step ends.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and not fsdp_bf16 else nullcontext()
    # Pipelining infers shapes during its first step (an extra forward/backward): always a warm-up step. On CPU the
    # last step counts live tensors (runtime.memory): slower, so it stays out of tokens/s and the stage timings.
    counter = None if cuda or plan.compile else LiveTensorBytes()
    warmup = max(args.warmup, 1 if plan.pp > 1 else 0)
    counted_step = args.steps - 1 if counter else min(start + warmup, args.steps) - 1
    step_s, waits, losses, grad_norms = [], [], [], []  # waits: per step, seconds this rank waited for a core
    stretches = machine.BlockWaits([b for c in chunks.values() for b in c.modules() if isinstance(b, Block)]) if not (cuda or plan.compile) else None
    block_waits = []  # per step, this rank's waits between block boundaries (machine.BlockWaits)
    meter, busy = machine.BusyMeter(), None  # what other processes ran during the timed steps
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for step in range(start, args.steps):
        lr = lr_at(step, peak=args.lr, warmup_steps=warmup_steps, decay_steps=decay_steps, min_ratio=args.lr_min_ratio)
        x, y = data.get_batch(source, step=step, seed=args.seed, global_batch=plan.global_batch, seq_len=plan.model.seq_len,
                              dp_rank=dp_rank, dp=plan.dp, vocab=plan.model.vocab, cp_rank=cp_rank, cp=plan.cp)
        x, y = x.to(device), y.to(device)
        counting = counter is not None and step == counted_step
        timed = {idx: {k: len(v) for k, v in t.items()} for idx, t in timings.items()}
        with counter if counting else nullcontext():
            synchronize(device)
            if step - start == warmup:
                meter.start()
            wait0, t0 = machine.run_queue_wait_s(), time.perf_counter()
            if stretches:
                stretches.start(wait0)
            with autocast, (loss_parallel() if tp_mesh is not None else nullcontext()):
                if plan.pp > 1:
                    loss = pipeline_step(schedule, stages, x, y)
                else:
                    loss = plain_step(chunks[0], x, y, plan.num_microbatches, loss_fn, timings[0] if not cuda else None)
            if by_hand:
                all_reduce_gradients(chunks.values(), meshes.replicas)
            finish_step(chunks.values())
            if counting:
                counter.label(chunks.values(), optimizers.values())
            grad_norm = clip_grad_norm_(chunks.values(), args.max_grad_norm, meshes.world)
            for idx, opt in optimizers.items():
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()
                opt.zero_grad(set_to_none=zero_grad_to_none(chunks[idx]))
            synchronize(device)
            step_s.append(time.perf_counter() - t0)
            wait1 = machine.run_queue_wait_s()
            waits.append(None if wait0 is None or wait1 is None else wait1 - wait0)
            block_waits.append(stretches.stop(wait1) if stretches else None)
        if step + 1 == args.steps and step - start >= warmup:
            busy = meter.stop()
        losses.append(loss)
        grad_norms.append(grad_norm)
        log_step(plan, step, args.steps, loss if tp_rank == 0 else None, grad_norm, lr, step_s[-1], peak_tflops,
                 device, memory_gib(device, counter, counted=step >= counted_step))
        if step - start < warmup:  # warm-up steps (and pipelining's shape inference) stay out of the timings
            for t in timings.values():
                t["forward_s"].clear(), t["backward_s"].clear()
        elif counting and step - start > warmup:  # the counted step too, unless it is the only one left to time
            for idx, t in timings.items():
                for k, v in t.items():
                    del v[timed[idx][k]:]
        if cuda and step == counted_step:
            torch.cuda.reset_peak_memory_stats(device)  # the peaks recorded are those of the steps after warm-up
        if args.checkpoint_dir and ((args.checkpoint_every and (step + 1) % args.checkpoint_every == 0) or step + 1 == args.steps):
            checkpoint.save(args.checkpoint_dir, step + 1, chunks, optimizers)

    # Gather every rank's losses, memory and stage timings on rank 0; it prints and writes the results line.
    mine = {"pp": pp_rank, "dp": dp_rank, "cp": cp_rank, "tp": tp_rank, "losses": losses, "memory": rank_memory(device, counter),
            "reference": reference, "busy": busy, "waits": waits, "block_waits": block_waits,
            "timings": {f"stage{i}": {k: sum(v) / len(v) for k, v in t.items()} for i, t in timings.items() if all(t.values())}}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0 and step_s:
        memory_step = counted_step - start if counter is not None and counted_step - start > warmup else None
        result = make_result(plan, everyone, step_s, warmup, started_at, device, grad_norms, memory_step)
        print_summary(result, start, args.plan)
        if args.results:
            append_result(args.results, result)
    elif dist.get_rank() == 0:
        print(f"nothing to do: the checkpoint in {args.checkpoint_dir} is already at step {start} >= --steps {args.steps}")
    dist.destroy_process_group()
    return 0


def device_peak_tflops(plan: Plan) -> float | None:
    """Peak TFLOP/s of the plan's device (its profile: measured, or the datasheet), for MFU; None if unknown."""
    try:
        return load_device(plan.cluster.device).peak_tflops
    except MeshplanError:
        return None


def log_step(plan: Plan, step: int, steps: int, loss: float | None, grad_norm: float, lr: float, seconds: float,
             peak_tflops: float | None, device: torch.device, memory: float | None) -> None:
    """One line per step on rank 0: the batch's loss, the gradient norm before clipping, lr, tokens/s, MFU (model
    FLOPs without recomputation, Chowdhery et al. 2022, appendix B) and the largest peak memory of any rank (None:
    not measured yet, on CPU before the counted step).
    loss: this replica's loss on the ranks that report it (last stage, tp rank 0; one per dp x cp rank), else None.
    Its two scalar all-reduces run after the step's timing."""
    mine = torch.tensor([loss / (plan.dp * plan.cp) if loss is not None else 0.0, memory if memory is not None else -1.0],
                        dtype=torch.float64, device=device)
    total, peak = mine[:1].clone(), mine[1:].clone()
    dist.all_reduce(total)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if dist.get_rank() != 0:
        return
    tokens_per_s = plan.global_batch * plan.model.seq_len / seconds
    flops = model_flops(plan.model, plan.global_batch, 0.0) / seconds / plan.world_size
    mfu = f"{100 * flops / (peak_tflops * 1e12):.1f}%" if peak_tflops else "n/a"
    gib = float(peak)
    shown = "not counted yet" if gib < 0 else memory_text([gib])
    print(f"step {step + 1}/{steps} | loss {float(total):.4f} | grad norm {grad_norm:.3f} | lr {lr:.2e} | "
          f"{tokens_per_s:,.0f} tokens/s | MFU {mfu} | memory {shown}", flush=True)


def memory_text(gibs: list[float]) -> str:
    """Amounts of memory in one unit: GiB from 1 GiB up, else MiB (a tiny model's 4 MiB is not "0.00 GiB")."""
    if max(gibs) >= 1:
        return f"{', '.join(f'{g:.2f}' for g in gibs)} GiB"
    return f"{', '.join(f'{g * 1024:.1f}' for g in gibs)} MiB"


def memory_gib(device: torch.device, counter: LiveTensorBytes | None, *, counted: bool) -> float | None:
    """This rank's peak so far, GiB: CUDA's max_memory_reserved; on CPU the counted step's live tensor bytes (None
    before that step), or the resident set's peak in a compiled run (which the counter cannot see into)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    if counter is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    return counter.peak / 2**30 if counted else None


def rank_memory(device: torch.device, counter: LiveTensorBytes | None) -> dict:
    """What this rank's results entry says about memory (RunResult's peak_memory_gib, peak_allocated_gib, memory_counter,
    memory_breakdown_bytes and memory_transient_by_op)."""
    if device.type == "cuda":
        return {"reserved": torch.cuda.max_memory_reserved(device) / 2**30, "allocated": torch.cuda.max_memory_allocated(device) / 2**30,
                "counter": "cuda max_memory_reserved / max_memory_allocated after warm-up", "breakdown": None,
                "by_op": None}
    if counter is None:  # a compiled run on CPU: inductor's kernels allocate below the dispatcher
        rss = memory_gib(device, None, counted=True)
        return {"reserved": rss, "allocated": rss, "counter": "cpu peak resident set (compiled: live tensors not counted)",
                "breakdown": None, "by_op": None}
    return {"reserved": counter.peak / 2**30, "allocated": counter.peak / 2**30, "breakdown": counter.breakdown(),
            "by_op": counter.transient_by_op(),
            "counter": "cpu peak live tensor bytes of the last step (runtime.memory.LiveTensorBytes)"}


def make_result(plan: Plan, everyone: list[dict], step_s: list[float], warmup: int, started_at: str,
                device: torch.device, grad_norms: list[float], memory_step: int | None) -> RunResult:
    # A step's loss: the mean over dp x cp of the loss on their last pipeline stage (identical over tp). Each cp rank's
    # loss is the mean over its T/cp tokens, the same count on every rank, so this is the mean over every token.
    holders = [r for r in everyone if r["pp"] == plan.pp - 1 and r["tp"] == 0]
    losses = [sum(r["losses"][i] for r in holders) / len(holders) for i in range(len(step_s))]
    stage_timings = {}
    for r in everyone:
        if r["dp"] == 0 and r["cp"] == 0 and r["tp"] == 0:
            stage_timings.update(r["timings"])
    memory = [r["memory"] for r in everyone]
    breakdowns = [m["breakdown"] for m in memory]
    return RunResult(
        plan_id=plan.id or plan_id(plan), plan=plan_to_dict(plan),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (gloo)",
        world_size=len(everyone), steps=len(step_s), step_s=step_s,
        tokens_per_s=median_tokens_per_s(step_s, warmup, plan.global_batch * plan.model.seq_len, memory_step),
        losses=losses, peak_memory_gib=[m["reserved"] for m in memory],
        predicted=plan_to_dict(plan)["prediction"], started_at=started_at, meshplan_version=__version__, grad_norms=grad_norms,
        stage_timings={k: stage_timings[k] for k in sorted(stage_timings, key=lambda s: int(s[5:]))} or None,
        peak_allocated_gib=[m["allocated"] for m in memory], memory_counter=memory[0]["counter"], memory_step=memory_step,
        memory_breakdown_bytes=breakdowns if all(b is not None for b in breakdowns) else None,
        memory_transient_by_op=[m["by_op"] for m in memory] if all(b is not None for b in breakdowns) else None,
        machine=machine.summarize([r["reference"] for r in everyone], [r["busy"] for r in everyone], device,
                                  [r["waits"] for r in everyone], timed_steps(len(step_s), warmup, memory_step),
                                  machine.synced_waits([r["block_waits"] for r in everyone], block_groups(everyone))))


def block_groups(everyone: list[dict]) -> list[list[int]]:
    """The ranks that meet at every block: those with the same pipeline stage and data-parallel replica."""
    groups: dict[tuple, list[int]] = {}
    for rank, r in enumerate(everyone):
        groups.setdefault((r["pp"], r["dp"]), []).append(rank)
    return list(groups.values())


def print_summary(result: RunResult, first_step: int, plan_file: str = "PLAN") -> None:
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
                  f"peak memory per rank {memory_text(result.peak_memory_gib)} of tensors (a plan's peak GiB "
                  "adds its device's framework overhead, which this does not count)")
    if result.predicted:
        console.print(f"predicted tokens/s: {result.predicted['tokens_per_s']:,.0f}")
        if elsewhere := priced_elsewhere(result.plan.get("framework", "meshplan"), plan_file):
            console.print(elsewhere)


def cli(argv: list[str] | None = None) -> int:
    """main() with bad input turned into one line on stderr and exit code 2, no traceback."""
    try:
        return main(argv)
    except MeshplanError as e:
        print(f"error: {e}", file=sys.stderr)
        machine.tell_torchrun(f"error: {e}")
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    # Not sys.exit: the gloo group's threads outlive main() (machine.leave says why). An error other than bad input
    # (a peer that died breaks this rank's collectives) leaves the usual way, which takes long enough that torchrun
    # sees the dead peer first and names it as the root cause; out at once, this rank would tie with it and be named.
    machine.leave(cli())
