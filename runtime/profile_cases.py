"""What `planner profile`'s ranks time (runtime/profile.py runs them): each *_cases function builds its modules once
and returns Cases, callables that run one measurement and return {sample key: seconds} (planner/fit.py documents
the keys). The blocks and ends are the runtime's own (runtime.model, runtime.parallel.*), in both model families."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import replace
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from planner.fit import FSDP_LAYERS, FSDP_MICROBATCHES, Shapes, cp_for, end_shape, layer_shape, tps_for
from planner.plan import Stage
from planner.specs import ModelSpec
from runtime.machine import run_queue_wait_s
from runtime.model import GPT, CausalAttention, GPTConfig

Case = Callable[[], dict]
"""One measurement: runs once and returns {sample key: seconds}."""


class Clock:
    """perf_counter after the device has finished its queued work; on CPU less the time this thread has waited
    for a core (runtime.machine.run_queue_wait_s), so that a difference of two readings is what the work took
    while it had a core. Another job on the machine then does not slow the profile down, and the profile is
    the figure `planner validate` compares a step less its waits with. What the wait does not cover, it leaves
    in: a peer rank's wait that this one sleeps through inside a collective, and caches or memory bandwidth
    the other job takes."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()

    def __call__(self) -> float:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            return time.perf_counter()
        waited = run_queue_wait_s() or 0.0  # read before the time: of the two readings only the end's 3 us are inside
        return time.perf_counter() - waited




def _gpt(model: ModelSpec, layers: int, tp: int, dev: torch.device, *, embed: bool, head: bool):
    cfg = replace(GPTConfig.from_spec(model, tp), layers=layers)
    gpt = GPT(cfg)
    if not embed:
        gpt.embed = None
    if not head:
        gpt.norm, gpt.head = None, None
    return gpt.to(dev)


def _local_shard(gpt: nn.Module, model: ModelSpec, tp: int) -> nn.Module:
    """The blocks as one tp rank computes them, without DTensor: every Linear that the TP plan makes
    column-parallel keeps out_features/tp outputs, every row-parallel one in_features/tp inputs (attention
    reads its head counts from the projection widths), for either MLP."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from runtime.parallel.tensor import matching_modules, tp_plan

    for pattern, style in tp_plan(sequence_parallel=False, mlp=model.mlp).items():
        if not isinstance(style, (ColwiseParallel, RowwiseParallel)):
            continue
        for name in matching_modules(gpt, pattern):
            old = gpt.get_submodule(name)
            cols = isinstance(style, ColwiseParallel)
            new = nn.Linear(old.in_features // (1 if cols else tp), old.out_features // (tp if cols else 1),
                            bias=old.bias is not None, device=old.weight.device)
            parent, leaf = name.rsplit(".", 1)
            setattr(gpt.get_submodule(parent), leaf, new)
    return gpt


_MESHES: dict[tuple, object] = {}


def _tp_mesh(tp: int, world: int, device_type: str, cp: int = 1):
    """The meshes with a 1-D submesh of tp (or, given cp, of cp) ranks: world/tp (world/cp) such groups, all
    measuring at once."""
    from runtime.mesh import build_mesh

    if (tp, cp) not in _MESHES:
        _MESHES[(tp, cp)] = build_mesh(pp=world // (tp * cp), dp=1, cp=cp, tp=tp, device_type=device_type)
    return _MESHES[(tp, cp)]


def layer_cases(shapes: Shapes, dev: torch.device, clock: Clock, world: int) -> list[Case]:
    from runtime.parallel.context import apply_cp
    from runtime.parallel.tensor import apply_tp

    cases = []
    for model in shapes.models:
        dims = layer_shape(model)
        for t in tps_for(shapes, model):
            local = _local_shard(_gpt(model, 1, t, dev, embed=False, head=False), model, t)
            for b in shapes.micro_batches:
                cases.append(_block_case(local, model, t, b, dev, clock, ("layer", *dims, t, b), sp=False, dtensor=False))
            if t == 1:
                continue
            mesh = _tp_mesh(t, world, dev.type).tp
            for sp in (False, True):
                tp_gpt = apply_tp(_gpt(model, 1, t, dev, embed=False, head=False), mesh, sequence_parallel=sp, mlp=model.mlp)
                for b in shapes.micro_batches:
                    cases.append(_block_case(tp_gpt, model, t, b, dev, clock, ("layer", *dims, t, b), sp=sp, dtensor=True))
        if cp_for(world, model) > 1:  # the block as runtime.parallel.context runs it, its collectives included
            cp = cp_for(world, model)
            cp_gpt = apply_cp(_gpt(model, 1, 1, dev, embed=False, head=False), _tp_mesh(1, world, dev.type, cp).cp, seq_len=model.seq_len)
            for b in shapes.micro_batches:
                cases.append(_block_case(cp_gpt, model, 1, b, dev, clock, ("layer", *dims, 1, b), sp=False, dtensor=True, cp=cp))
    return cases


def reference_case(model: ModelSpec, dev: torch.device, clock: Clock) -> Case:
    """The layer case at tp 1 and micro-batch 1, returning {forward_s, backward_s}: what runtime.machine re-times
    before each run, to compare with the profile's figure for the same block."""
    run = _block_case(_gpt(model, 1, 1, dev, embed=False, head=False), model, 1, 1, dev, clock, ("reference",), sp=False, dtensor=False)

    def timed() -> dict:
        got = run()
        return {"forward_s": got[("reference", False, "forward_s")], "backward_s": got[("reference", False, "backward_s")]}
    return timed


def _block_case(gpt: nn.Module, model: ModelSpec, tp: int, b: int, dev: torch.device, clock: Clock, key: tuple,
                *, sp: bool, dtensor: bool, cp: int = 1) -> Case:
    s, h, hd = model.seq_len, model.hidden, model.hidden // model.heads
    # The residual stream as a pipeline stage receives it: (b, s, h), or its sequence shard with SP; under cp,
    # b*cp sequences' s/cp tokens on each rank, the b*s tokens of the plain case.
    x = torch.randn(b * cp, s // cp if cp > 1 else s // tp if sp else s, h, device=dev, requires_grad=True)
    q = torch.randn(b, model.heads // tp, s, hd, device=dev, requires_grad=True)  # (B, nh, T, hs)
    kv = torch.randn(b, model.kv_heads // tp, s, hd, device=dev, requires_grad=True)  # (B, nkv, T, hs)
    core = CausalAttention()  # the module selective recomputation reruns

    def run() -> dict:
        if dtensor:
            dist.barrier()  # the collectives inside would otherwise time the other rank's lateness
        cpu0 = time.process_time()
        t0 = clock()
        with clock.autocast:
            y = gpt(x)
        t1 = clock()
        y.backward(torch.ones_like(y))
        t2 = clock()
        x.grad = None
        if dtensor:
            name = f"cp{cp}" if cp > 1 else "with_comm"
            return {(*key, sp, f"{name}_forward_s"): t1 - t0, (*key, sp, f"{name}_backward_s"): t2 - t1}
        # The share of a core this rank got while computing alone: about 1 on an idle machine, less when
        # other processes took the cores (then every timing of this profile is too slow).
        share = {} if dev.type == "cuda" else {("cpu_s",): time.process_time() - cpu0, ("wall_s",): t2 - t0}
        with clock.autocast:
            t3 = clock()
            core(q, kv, kv)
            t4 = clock()
        return {(*key, False, "forward_s"): t1 - t0, (*key, False, "backward_s"): t2 - t1,
                (*key, False, "selective_recompute_s"): t4 - t3, **share}
    return run


def end_cases(shapes: Shapes, dev: torch.device, clock: Clock, world: int) -> list[Case]:
    from torch.distributed.tensor.parallel import loss_parallel

    from runtime.parallel.tensor import apply_tp, cross_entropy

    cases = []
    for model in shapes.models:
        for t in tps_for(shapes, model):
            mesh = _tp_mesh(t, world, dev.type).tp if t > 1 else None
            emb = _gpt(model, 0, t, dev, embed=True, head=False)
            head = _gpt(model, 0, t, dev, embed=False, head=True)
            if mesh is not None:
                emb, head = (apply_tp(m, mesh, sequence_parallel=False, mlp=model.mlp) for m in (emb, head))
            key = ("end", *end_shape(model, t), t)

            def run(b: int, emb=emb, head=head, mesh=mesh, key=key) -> dict:
                idx = torch.randint(0, model.vocab, (b, model.seq_len), device=dev)
                x = torch.randn(b, model.seq_len, model.hidden, device=dev, requires_grad=True)
                if mesh is not None:
                    dist.barrier()
                t0 = clock()
                with clock.autocast:
                    e = emb(idx)
                t1 = clock()
                e.backward(torch.ones_like(e))
                t2 = clock()
                with loss_parallel() if mesh is not None else nullcontext():
                    t3 = clock()
                    with clock.autocast:
                        loss = cross_entropy(head(x), idx, mesh)
                    t4 = clock()
                    loss.backward()
                    t5 = clock()
                return {(*key, b, "embedding_forward_s"): t1 - t0, (*key, b, "embedding_backward_s"): t2 - t1,
                        (*key, b, "head_forward_s"): t4 - t3, (*key, b, "head_backward_s"): t5 - t4}
            cases += [lambda b=b, run=run: run(b) for b in shapes.micro_batches]
    return cases


def optimizer_cases(shapes: Shapes, dev: torch.device, clock: Clock) -> list[Case]:
    from runtime.parallel.optimizer import build_optimizer

    model = shapes.models[0]
    # The smallest model's embedding, head and up to 4 blocks: a realistic mix of tensor sizes.
    gpt = _gpt(model, min(model.layers, 4), 1, dev, embed=True, head=True)
    opt = build_optimizer(gpt, 1e-3)
    params = [p for p in gpt.parameters()]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    n = sum(p.numel() for p in params)

    def run() -> dict:
        for p, g in zip(params, grads):
            p.grad = g
        t0 = clock()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {("optimizer", n, "step_s"): clock() - t0}
    return [run]


GPU_TIMED_FLOP = 1e12
"""On a GPU a GEMM is run back to back until this much work lies between two clock readings (about 1.5 ms on an
H200): one 1024^3 GEMM is a few microseconds, less than the synchronisation around it, and alone would read as a
fraction of its rate. On CPU one GEMM is milliseconds already, and the profile stays as it was."""


def timed_repeats(cuda: bool, flop: float) -> int:
    """How many GEMMs of `flop` one reading times (GPU_TIMED_FLOP)."""
    return max(1, round(GPU_TIMED_FLOP / flop)) if cuda else 1


def gemm_cases(shapes: Shapes, dev: torch.device, clock: Clock) -> list[Case]:
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    cases = []
    for n in shapes.gemm_sizes:
        a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        reps = timed_repeats(cuda, 2 * n**3)

        def gemm(a=a, b=b, n=n, reps=reps) -> dict:
            t0 = clock()
            for _ in range(reps):
                torch.mm(a, b)
            return {("gemm", n, "s"): (clock() - t0) / reps}
        cases.append(gemm)
    src = torch.randn(1 << (26 if cuda else 24), device=dev)
    dst = torch.empty_like(src)
    copies = 10 if cuda else 1  # 0.1 ms a copy on an H200: likewise

    def copy() -> dict:
        t0 = clock()
        for _ in range(copies):
            dst.copy_(src)
        return {("copy", src.numel() * src.element_size(), "s"): (clock() - t0) / copies}
    return cases + [copy]


def collective_cases(shapes: Shapes, dev: torch.device, clock: Clock, world: int) -> list[Case]:
    rank = dist.get_rank()
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    cases = []
    for g in (n for n in (2, 4, 8, 16) if n <= world):
        group = _tp_mesh(g, world, dev.type).tp.get_group()
        for nbytes in shapes.message_bytes:
            full = torch.randn(nbytes // 4, device=dev)
            part = torch.randn(nbytes // 4 // g, device=dev)
            ops = {"all_reduce": lambda full=full, group=group: dist.all_reduce(full, group=group),
                   "all_gather": lambda full=full, part=part, group=group: all_gather(full, part, group=group),
                   "reduce_scatter": lambda full=full, part=part, group=group: reduce_scatter(part, full, group=group)}
            for op, fn in ops.items():
                def run(fn=fn, key=("coll", op, g, nbytes)) -> dict:
                    dist.barrier()
                    t0 = clock()
                    fn()
                    return {key: clock() - t0}
                cases.append(run)
    peer = rank ^ 1
    for nbytes in shapes.message_bytes:
        buf = torch.randn(nbytes // 4, device=dev)

        def ping_pong(buf=buf, key=("coll", "send_recv", 2, nbytes)) -> dict:
            # One message each way; half the round trip is one send/recv.
            dist.barrier()
            t0 = clock()
            if rank % 2 == 0:
                dist.send(buf, peer), dist.recv(buf, peer)
            else:
                dist.recv(buf, peer), dist.send(buf, peer)
            return {key: (clock() - t0) / 2}
        cases.append(ping_pong)
    return cases


def pipeline_cases(shapes: Shapes, dev: torch.device, clock: Clock, world: int) -> list[Case]:
    """Two stages of the first model (embedding + L blocks | L blocks + head) under runtime.parallel.pipeline,
    and each stage's own forward/backward per microbatch outside the pipeline, for the same shapes."""
    from runtime.mesh import build_mesh
    from runtime.parallel.pipeline import build_schedule, build_stages, split_model
    from runtime.parallel.tensor import cross_entropy

    model = shapes.models[0]
    half = max(1, min(model.layers // 2, 4))
    stages = (Stage((0, half), True, False, "none"), Stage((half, 2 * half), False, True, "none"))
    mesh = build_mesh(pp=2, dp=1, tp=world // 2, device_type=dev.type)
    pp_rank = mesh.pp.get_local_rank()

    def loss_fn(logits, targets):
        return cross_entropy(logits, targets, None)

    cases = []
    for sched, b, m in shapes.pipelines:
        chunk = split_model(_gpt(model, 2 * half, 1, dev, embed=True, head=True), stages, 2, pp_rank)[pp_rank]
        schedule = build_schedule(build_stages({pp_rank: chunk}, 2, mesh.pp, dev), sched, m, loss_fn)
        x = torch.randint(0, model.vocab, (b * m, model.seq_len), device=dev)
        key = ("pipe", sched, b, m)
        first = [True]

        def step(schedule=schedule, x=x, key=key, first=first) -> dict:
            kwargs = {"return_outputs": False} if pp_rank == 0 else {"target": x, "losses": [], "return_outputs": False}
            if first[0]:  # the first step infers shapes (an extra forward/backward): never timed
                with clock.autocast:
                    schedule.step(*((x,) if pp_rank == 0 else ()), **kwargs)
                first[0] = False
            dist.barrier()
            t0 = clock()
            with clock.autocast:
                schedule.step(*((x,) if pp_rank == 0 else ()), **kwargs)
            dist.barrier()
            return {(*key, "step_s"): clock() - t0}

        def alone(chunk=chunk, x=x, b=b, key=key) -> dict:
            inp = x[:b] if pp_rank == 0 else torch.randn(b, model.seq_len, model.hidden, device=dev, requires_grad=True)
            t0 = clock()
            with clock.autocast:
                out = chunk(inp)
                if pp_rank == 1:
                    out = loss_fn(out, x[:b])
            t1 = clock()
            out.backward(torch.ones_like(out) if pp_rank == 0 else None)
            t2 = clock()
            chunk.zero_grad(set_to_none=True)
            return {(*key, f"stage{pp_rank}_forward_s"): t1 - t0, (*key, f"stage{pp_rank}_backward_s"): t2 - t1}
        cases += [step, alone]
    return cases


def fsdp_cases(shapes: Shapes, dev: torch.device, clock: Clock, world: int) -> list[Case]:
    """A training step of the first model without pipelining, under FSDP2 (runtime.parallel.data.apply_fsdp
    over all ranks, as a plan with zero 3 runs it: weights gathered for every forward and backward, gradients
    reduce-scattered after every microbatch) and plain, for 1 and 3 microbatches of one sequence: the difference
    splits into what FSDP2 adds per step and per microbatch. Also under DDP (zero 0 and 1 without tp, cp or pp),
    which all-reduces the gradients during the last microbatch's backward: what that overlap costs the step."""
    from runtime.mesh import build_mesh
    from runtime.parallel.data import apply_ddp, apply_fsdp, finish_step
    from runtime.parallel.tensor import cross_entropy

    model = shapes.models[0]
    dp_mesh = build_mesh(pp=1, dp=world, tp=1, device_type=dev.type).replicas
    layers = min(model.layers, FSDP_LAYERS)
    plain = _gpt(model, layers, 1, dev, embed=True, head=True)
    sharded = apply_fsdp(_gpt(model, layers, 1, dev, embed=True, head=True), dp_mesh, zero=3)
    ddp = apply_ddp(_gpt(model, layers, 1, dev, embed=True, head=True), dp_mesh)
    params = sum(p.numel() for p in plain.parameters())
    x = torch.randint(0, model.vocab, (max(FSDP_MICROBATCHES), model.seq_len), device=dev)

    def step(gpt: nn.Module, m: int, kind: str, name: str) -> dict:
        dist.barrier()
        t0 = clock()
        for i in range(m):  # as runtime.train.plain_step steps it: DDP reduces in the last backward only
            with gpt.no_sync() if gpt is ddp and i < m - 1 else nullcontext():
                with clock.autocast:
                    loss = cross_entropy(gpt(x[i:i + 1]), x[i:i + 1], None)
                (loss / m).backward()
        finish_step([gpt])
        t = clock() - t0
        gpt.zero_grad(set_to_none=gpt is not ddp)  # DDP's gradients are views into its buckets (zero_grad_to_none)
        return {(kind, params, m, name): t}
    return [lambda gpt=gpt, m=m, kind=kind, name=name: step(gpt, m, kind, name)
            for m in FSDP_MICROBATCHES
            for gpt, kind, name in ((plain, "fsdp", "plain_s"), (sharded, "fsdp", "fsdp_s"), (ddp, "ddp", "ddp_s"))]

