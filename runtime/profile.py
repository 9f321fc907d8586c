"""The profiler behind `planner profile`: times the runtime's own modules on this machine and writes a
measured device profile (profiles/devices/<name>.measured.json), which the planner prefers to the datasheet.

What it measures, on as many ranks as the machine gives (CPU: one per core, one thread each, gloo, as
runtime.launch runs them; CUDA: one per GPU, NCCL, bf16 autocast), all ranks busy at once as in training:
- one transformer block (runtime.model.Block inside a one-block GPT) forward, backward and its attention
  core (selective recomputation), for the shard of each tensor-parallel degree t (hidden, heads/t,
  ffn/t) over micro-batch sizes; for t > 1 also the block under DTensor TP (runtime.parallel.tensor.
  apply_tp) on t ranks, its collectives included;
- the embedding and the final norm + head + cross-entropy (loss_parallel under TP);
- the AdamW step of runtime.launch.build_optimizer, per parameter; GEMM rates and memory bandwidth (the
  datasheet-like fields, used where a shape was not measured);
- all-reduce, all-gather, reduce-scatter and send/recv over message and group sizes, and the links
  fitted to them (planner.measured.fit_links);
- a two-stage torch.distributed.pipelining run, whose step time beyond its stages' own forward and
  backward is the per-microbatch stage overhead (fitted with planner.schedule.simulate).
Every figure is the median of several repeats after warm-up, measured round-robin over the shapes so
that a burst of load elsewhere spreads over all of them; the spread is kept beside it.
"""

from __future__ import annotations

import datetime
import math
import os
import pickle
import platform
import resource
import socket
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from planner.errors import SpecError
from planner.io import atomic_write_json
from planner.measured import check_measured, fit_links
from planner.plan import Stage
from planner.schedule import simulate
from planner import specs
from planner.specs import ModelSpec, device_from_dict, load_model

CPU_MODELS = ("gpt-tiny",)
CUDA_MODELS = ("gpt3-125m", "gpt3-350m", "gpt3-1.3b")
MAX_CPU_RANKS = 8
BUSY_SHARE = 0.85
"""Below this share of a core per CPU rank while it times a block, the profile is flagged as measured on a busy machine."""
BUSY_OTHERS = 0.25
"""Above this many cores used on average by processes other than the ranks, likewise."""


@dataclass(frozen=True)
class Shapes:
    """What one profile measures (a model is measured at the tp degrees that divide its heads and MLP)."""

    models: tuple[ModelSpec, ...]
    tps: tuple[int, ...]
    micro_batches: tuple[int, ...]
    message_bytes: tuple[int, ...]
    gemm_sizes: tuple[int, ...]
    pipelines: tuple[tuple[str, int, int], ...]
    """(schedule, micro_batch, num_microbatches) of the two-stage pipeline runs."""
    repeats: int
    """Timed passes over the embedding/head and the collectives (more for the blocks, fewer for the rest)."""
    warmup: int
    layer_repeats: int = 0
    """Timed passes over the blocks (their DTensor timings are the noisiest and weigh the most); 0: repeats."""


def _tps(shapes: Shapes, model: ModelSpec) -> tuple[int, ...]:
    return tuple(t for t in shapes.tps if model.heads % t == 0 and model.ffn_hidden % t == 0)


def choose_shapes(device_type: str, world: int, quick: bool, models: tuple[str, ...] | None = None) -> Shapes:
    chosen = tuple(load_model(m) for m in (models or (CPU_MODELS if device_type == "cpu" else CUDA_MODELS)))
    cuda = device_type == "cuda"
    tps = tuple(t for t in (1, 2, 4, 8) if t <= world and world % t == 0)
    if quick:
        return Shapes(chosen, tps[:2], (1, 2), (1 << 12, 1 << 18, 1 << 22), (256, 512), (("1f1b", 1, 2),), repeats=2, warmup=1)
    return Shapes(chosen, tps, (1, 2, 4, 8) if cuda else (1, 2, 4, 8, 16, 32),
                  tuple(1 << k for k in range(12, 27 if cuda else 25, 2)),
                  (1024, 2048, 4096, 8192) if cuda else (128, 256, 512, 1024),
                  (("1f1b", 1, 8), ("1f1b", 4, 4), ("gpipe", 2, 4)), repeats=5, warmup=2, layer_repeats=9)


def device_name(device_type: str) -> str:
    """The profile's name: 'cpu', or the GPU's datasheet name where there is one (h100-sxm5-80gb, ...)."""
    if device_type == "cpu":
        return "cpu"
    gpu = torch.cuda.get_device_name(0).lower()
    gib = round(torch.cuda.get_device_properties(0).total_memory / 2**30)
    for family, form in (("h100", "sxm5"), ("a100", "sxm4")):
        if family in gpu:
            return f"{family}-{form}-{80 if gib > 60 else 40}gb"
    return "".join(c if c.isalnum() else "-" for c in gpu).strip("-")


def main(device: str | None = None, out: str | None = None, quick: bool = False, models: tuple[str, ...] | None = None) -> int:
    """Profile this machine into `out` (default profiles/devices/<name>.measured.json). Returns 0."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecError("--device", "device", "CUDA is not available on this machine; use --device cpu")
    device_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cpu":
        cores = os.cpu_count() or 1
        world = 1 << int(math.log2(min(cores, MAX_CPU_RANKS)))  # a power of two, so every group size divides it
    else:
        world = torch.cuda.device_count()
    shapes = choose_shapes(device_type, world, quick, models)
    name = device_name(device_type)
    path = Path(out) if out else specs.PROFILES_DIR / "devices" / f"{name}.measured.json"
    started = time.perf_counter()
    samples, facts = _spawn(world, device_type, shapes)
    facts.update(name=name, profile_s=round(time.perf_counter() - started, 1), quick=quick)
    profile = build_profile(samples, facts, shapes, device_type)
    device_from_dict(profile, str(path))  # what load_device will read back
    check_measured(profile["measured"], str(path))
    atomic_write_json(path, profile)
    print(f"Wrote {path} ({facts['profile_s']:.0f} s). The planner uses it for device {name!r}.")
    share, others = profile["measured"]["cpu_share"], profile["measured"]["background_cores"]
    if share < BUSY_SHARE or (device_type == "cpu" and others > BUSY_OTHERS):
        print(f"warning: other processes used {others:.1f} of this machine's {facts['cpu_count']} cores while it was profiled "
              f"(the ranks got {100 * share:.0f}% of a core when computing alone), so these timings are likely too slow. "
              f"Run `planner profile` again on an idle machine.")
    return 0


# ---------------------------------------------------------------- ranks

def _spawn(world: int, device_type: str, shapes: Shapes) -> tuple[dict, dict]:
    """Run _rank_main on `world` fresh processes; rank 0 pickles the pooled samples into a file here."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1" if device_type == "cpu" else (old or "1")
    try:
        with tempfile.TemporaryDirectory(prefix="meshplan-profile-") as tmp:
            out = os.path.join(tmp, "samples.pkl")
            mp.start_processes(_rank_main, args=(world, port, device_type, shapes, out), nprocs=world, start_method="spawn")
            with open(out, "rb") as f:
                return pickle.load(f)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old


class _Bar:
    """A rich progress bar on rank 0; nothing elsewhere."""

    def __init__(self, show: bool, total: int):
        self.progress = None
        if show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn())
            self.progress.start()
            self.task = self.progress.add_task("profiling", total=total)

    def phase(self, text: str) -> None:
        if self.progress:
            self.progress.update(self.task, description=text)

    def advance(self) -> None:
        if self.progress:
            self.progress.advance(self.task)

    def stop(self) -> None:
        if self.progress:
            self.progress.stop()


Case = Callable[[], dict]
"""One measurement: runs once and returns {sample key: seconds}."""


def _rank_main(rank: int, world: int, port: int, device_type: str, shapes: Shapes, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    cuda = device_type == "cuda"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo")
    facts = _facts(dev, world)
    facts["suite_s"] = {}
    clock = _Clock(dev)
    few = max(2, shapes.repeats - 2)  # whole steps: long, and averaged over many microbatches already
    suites = [("GEMMs and memory", _gemm_cases(shapes, dev, clock), shapes.repeats, 1),
              ("layers", _layer_cases(shapes, dev, clock, world), shapes.layer_repeats or shapes.repeats, shapes.warmup),
              ("embedding and head", _end_cases(shapes, dev, clock, world), shapes.repeats, shapes.warmup),
              ("optimizer step", _optimizer_cases(shapes, dev, clock), shapes.repeats, 1)]
    if world > 1:
        suites.append(("collectives", _collective_cases(shapes, dev, clock, world), max(shapes.repeats, 5), 1))
        suites.append(("pipeline", _pipeline_cases(shapes, dev, clock, world), few, 1))
        suites.append(("FSDP2", _fsdp_cases(shapes, dev, clock, world), few, 1))
    bar = _Bar(rank == 0, sum(len(c) * (r + w) for _, c, r, w in suites))
    samples: dict[tuple, list[float]] = defaultdict(list)
    loop_s, cpu_s, busy_s = time.perf_counter(), time.process_time(), _machine_busy_s()
    try:
        for i, (label, cases, repeats, warmup) in enumerate(suites):
            suites[i] = None  # a finished suite's modules are freed (GPU memory for the big shapes)
            bar.phase(label)
            t0 = time.perf_counter()
            # Round-robin: each pass measures every case once, so a burst of load elsewhere on the
            # machine lands on one sample of many shapes rather than on every sample of one shape.
            for p in range(warmup + repeats):
                for case in cases:
                    got = case()
                    if p >= warmup:
                        for k, v in got.items():
                            samples[k].append(v)
                    bar.advance()
            facts["suite_s"][label] = round(time.perf_counter() - t0, 1)
            del cases
    finally:
        bar.stop()
    # What every process of this machine ran meanwhile, less what the ranks ran: other people's load.
    samples[("rank_cpu_s",)].append(time.process_time() - cpu_s)
    facts.update(loop_s=time.perf_counter() - loop_s, machine_busy_s=_machine_busy_s() - busy_s)
    everyone = [None] * world if rank == 0 else None
    dist.gather_object(dict(samples), everyone, dst=0)
    if rank == 0:
        merged: dict[tuple, list[float]] = defaultdict(list)
        for part in everyone:
            for k, v in part.items():
                merged[k].extend(v)
        with open(out, "wb") as f:
            pickle.dump((dict(merged), facts), f)
    dist.destroy_process_group()


def _facts(dev: torch.device, world: int) -> dict:
    cuda = dev.type == "cuda"
    if cuda:
        free, total = torch.cuda.mem_get_info(dev)
        overhead = (total - free) / 2**30
        name, memory = torch.cuda.get_device_name(dev), total / 2**30
    else:
        overhead = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        name = _cpu_model()
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / (os.cpu_count() or 1)
    return {"device_name": name, "torch_version": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count() or 1, "world_size": world, "backend": "nccl" if cuda else "gloo",
            "threads_per_rank": 1 if not cuda else torch.get_num_threads(), "dtype": "bf16" if cuda else "fp32",
            "memory_gib": round(memory, 2), "framework_overhead_gib": round(overhead, 3), "python": platform.python_version()}


def _machine_busy_s() -> float:
    """CPU seconds all processes of this machine have used since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _Clock:
    """perf_counter after the device has finished its queued work."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()

    def __call__(self) -> float:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        return time.perf_counter()


# ---------------------------------------------------------------- what is measured

def _gpt(model: ModelSpec, layers: int, tp: int, dev: torch.device, *, embed: bool, head: bool):
    from runtime.model import GPT, GPTConfig

    cfg = replace(GPTConfig.from_spec(model, tp), layers=layers)
    gpt = GPT(cfg)
    if not embed:
        gpt.embed = None
    if not head:
        gpt.norm, gpt.head = None, None
    return gpt.to(dev)


def _local_shard(gpt: nn.Module, model: ModelSpec, tp: int) -> nn.Module:
    """The block as one tp rank computes it, without DTensor: q/k/v and fc column shards, wo and proj
    row shards (attention reads its head count from the projection width)."""
    h, f = model.hidden, model.ffn_hidden
    for block in gpt.layers.values():
        dev = block.attn.wq.weight.device
        a, mlp = block.attn, block.mlp
        a.wq, a.wk, a.wv = (nn.Linear(h, h // tp, device=dev) for _ in range(3))
        a.wo = nn.Linear(h // tp, h, device=dev)
        mlp.fc, mlp.proj = nn.Linear(h, f // tp, device=dev), nn.Linear(f // tp, h, device=dev)
    return gpt


_MESHES: dict[int, object] = {}


def _tp_mesh(tp: int, world: int, device_type: str):
    """A 1-D submesh of tp ranks (world/tp such groups, all measuring at once)."""
    from runtime.mesh import build_mesh

    if tp not in _MESHES:
        _MESHES[tp] = build_mesh(world // tp, 1, tp, device_type)
    return _MESHES[tp]


def _layer_cases(shapes: Shapes, dev: torch.device, clock: _Clock, world: int) -> list[Case]:
    from runtime.parallel.tensor import apply_tp

    cases = []
    for model in shapes.models:
        dims = (model.hidden, model.heads, model.ffn_hidden, model.seq_len)
        for t in _tps(shapes, model):
            local = _local_shard(_gpt(model, 1, t, dev, embed=False, head=False), model, t)
            for b in shapes.micro_batches:
                cases.append(_block_case(local, model, t, b, dev, clock, ("layer", *dims, t, b), sp=False, dtensor=False))
            if t == 1:
                continue
            mesh = _tp_mesh(t, world, dev.type)["tp"]
            for sp in (False, True):
                tp_gpt = apply_tp(_gpt(model, 1, t, dev, embed=False, head=False), mesh, sequence_parallel=sp, mlp=model.mlp)
                for b in shapes.micro_batches:
                    cases.append(_block_case(tp_gpt, model, t, b, dev, clock, ("layer", *dims, t, b), sp=sp, dtensor=True))
    return cases


def _block_case(gpt: nn.Module, model: ModelSpec, tp: int, b: int, dev: torch.device, clock: _Clock, key: tuple,
                *, sp: bool, dtensor: bool) -> Case:
    s, h, hd = model.seq_len, model.hidden, model.hidden // model.heads
    # The residual stream as a pipeline stage receives it: (b, s, h), or its sequence shard with SP.
    x = torch.randn(b, s // tp if sp else s, h, device=dev, requires_grad=True)
    q = torch.randn(b, model.heads // tp, s, hd, device=dev, requires_grad=True)  # (B, nh, T, hs)

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
            return {(*key, sp, "with_comm_forward_s"): t1 - t0, (*key, sp, "with_comm_backward_s"): t2 - t1}
        # The share of a core this rank got while computing alone: about 1 on an idle machine, less when
        # other processes took the cores (then every timing of this profile is too slow).
        share = {} if dev.type == "cuda" else {("cpu_s",): time.process_time() - cpu0, ("wall_s",): t2 - t0}
        with clock.autocast:
            t3 = clock()
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
            t4 = clock()
        return {(*key, False, "forward_s"): t1 - t0, (*key, False, "backward_s"): t2 - t1,
                (*key, False, "selective_recompute_s"): t4 - t3, **share}
    return run


def _end_cases(shapes: Shapes, dev: torch.device, clock: _Clock, world: int) -> list[Case]:
    from torch.distributed.tensor.parallel import loss_parallel

    from runtime.parallel.tensor import apply_tp, cross_entropy

    cases = []
    for model in shapes.models:
        for t in _tps(shapes, model):
            mesh = _tp_mesh(t, world, dev.type)["tp"] if t > 1 else None
            emb = _gpt(model, 0, t, dev, embed=True, head=False)
            head = _gpt(model, 0, t, dev, embed=False, head=True)
            if mesh is not None:
                emb, head = (apply_tp(m, mesh, sequence_parallel=False, mlp=model.mlp) for m in (emb, head))
            key = ("end", model.hidden, model.padded_vocab(t), model.seq_len, t)

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


def _optimizer_cases(shapes: Shapes, dev: torch.device, clock: _Clock) -> list[Case]:
    from runtime.launch import build_optimizer

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


def _gemm_cases(shapes: Shapes, dev: torch.device, clock: _Clock) -> list[Case]:
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cases = []
    for n in shapes.gemm_sizes:
        a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)

        def gemm(a=a, b=b, n=n) -> dict:
            t0 = clock()
            torch.mm(a, b)
            return {("gemm", n, "s"): clock() - t0}
        cases.append(gemm)
    src = torch.randn(1 << (26 if dev.type == "cuda" else 24), device=dev)
    dst = torch.empty_like(src)

    def copy() -> dict:
        t0 = clock()
        dst.copy_(src)
        return {("copy", src.numel() * src.element_size(), "s"): clock() - t0}
    return cases + [copy]


def _collective_cases(shapes: Shapes, dev: torch.device, clock: _Clock, world: int) -> list[Case]:
    rank = dist.get_rank()
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    cases = []
    for g in (n for n in (2, 4, 8, 16) if n <= world):
        group = _tp_mesh(g, world, dev.type)["tp"].get_group()
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


def _pipeline_cases(shapes: Shapes, dev: torch.device, clock: _Clock, world: int) -> list[Case]:
    """Two stages of the first model (embedding + L blocks | L blocks + head) under runtime.parallel.pipeline,
    and each stage's own forward/backward per microbatch outside the pipeline, for the same shapes."""
    from runtime.mesh import build_mesh
    from runtime.parallel.pipeline import build_schedule, build_stages, split_model
    from runtime.parallel.tensor import cross_entropy

    model = shapes.models[0]
    half = max(1, min(model.layers // 2, 4))
    stages = (Stage((0, half), True, False, "none"), Stage((half, 2 * half), False, True, "none"))
    mesh = build_mesh(2, 1, world // 2, dev.type)
    pp_rank = mesh["pp"].get_local_rank()

    def loss_fn(logits, targets):
        return cross_entropy(logits, targets, None)

    cases = []
    for sched, b, m in shapes.pipelines:
        chunk = split_model(_gpt(model, 2 * half, 1, dev, embed=True, head=True), stages, 2, pp_rank)[pp_rank]
        schedule = build_schedule(build_stages({pp_rank: chunk}, 2, mesh["pp"], dev), sched, m, loss_fn)
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


FSDP_MICROBATCHES = (1, 3)


def _fsdp_cases(shapes: Shapes, dev: torch.device, clock: _Clock, world: int) -> list[Case]:
    """A training step of the first model without pipelining, under FSDP2 (runtime.parallel.data.apply_fsdp
    over all ranks, as a plan with distributed_optimizer runs it) and plain, for 1 and 3 microbatches of
    one sequence: the difference splits into what FSDP2 adds per step and per microbatch."""
    from runtime.mesh import build_mesh
    from runtime.parallel.data import apply_fsdp
    from runtime.parallel.tensor import cross_entropy

    model = shapes.models[0]
    dp_mesh = build_mesh(1, world, 1, dev.type)["dp"]
    layers = min(model.layers, 4)
    plain = _gpt(model, layers, 1, dev, embed=True, head=True)
    sharded = apply_fsdp(_gpt(model, layers, 1, dev, embed=True, head=True), dp_mesh, pipelined=False)
    params = sum(p.numel() for p in plain.parameters())
    x = torch.randint(0, model.vocab, (max(FSDP_MICROBATCHES), model.seq_len), device=dev)

    def step(gpt: nn.Module, m: int, name: str) -> dict:
        dist.barrier()
        t0 = clock()
        for i in range(m):
            if gpt is sharded:
                gpt.set_requires_gradient_sync(i == m - 1)  # as runtime.launch.plain_step does
            with clock.autocast:
                loss = cross_entropy(gpt(x[i:i + 1]), x[i:i + 1], None)
            (loss / m).backward()
        t = clock() - t0
        gpt.zero_grad(set_to_none=True)
        return {("fsdp", params, m, name): t}
    return [lambda gpt=gpt, m=m, name=name: step(gpt, m, name)
            for m in FSDP_MICROBATCHES for gpt, name in ((plain, "plain_s"), (sharded, "fsdp_s"))]


# ---------------------------------------------------------------- samples to a device profile

def _median(samples: dict, key: tuple) -> float:
    return statistics.median(samples[key])


def _spread_pct(values: list[float]) -> float:
    med = statistics.median(values)
    return round(100 * (max(values) - min(values)) / 2 / med, 1) if med > 0 else 0.0


def build_profile(samples: dict[tuple, list[float]], facts: dict, shapes: Shapes, device_type: str) -> dict:
    """The device profile JSON (DeviceProfile fields, raw measurements under "measured") from the samples."""
    r = lambda v: float(f"{v:.6g}")  # noqa: E731
    layers = []
    for model in shapes.models:
        dims = (model.hidden, model.heads, model.ffn_hidden, model.seq_len)
        for t in _tps(shapes, model):
            for sp in ((False,) if t == 1 else (False, True)):
                for b in shapes.micro_batches:
                    base = ("layer", *dims, t, b, False)
                    entry = {"hidden": dims[0], "heads": dims[1], "ffn_hidden": dims[2], "seq_len": dims[3], "tp": t,
                             "sequence_parallel": sp, "micro_batch": b}
                    keys = ("forward_s", "backward_s", "selective_recompute_s")
                    entry.update({k: r(_median(samples, (*base, k))) for k in keys})
                    spread = {k: _spread_pct(samples[(*base, k)]) for k in keys}
                    if t > 1:
                        wc = ("layer", *dims, t, b, sp)
                        entry["with_comm"] = {k: r(_median(samples, (*wc, f"with_comm_{k}"))) for k in ("forward_s", "backward_s")}
                        spread.update({f"with_comm_{k}": _spread_pct(samples[(*wc, f"with_comm_{k}")]) for k in ("forward_s", "backward_s")})
                    entry["spread_pct"] = spread
                    layers.append(entry)
    ends = []
    for model in shapes.models:
        for t in _tps(shapes, model):
            for b in shapes.micro_batches:
                key = ("end", model.hidden, model.padded_vocab(t), model.seq_len, t, b)
                names = ("embedding_forward_s", "embedding_backward_s", "head_forward_s", "head_backward_s")
                ends.append({"hidden": model.hidden, "vocab": model.padded_vocab(t), "seq_len": model.seq_len, "tp": t, "micro_batch": b,
                             **{k: r(_median(samples, (*key, k))) for k in names},
                             "spread_pct": {k: _spread_pct(samples[(*key, k)]) for k in names}})
    ((opt_key, opt_values),) = [(k, v) for k, v in samples.items() if k[0] == "optimizer"]
    collectives = [{"op": k[1], "ranks": k[2], "bytes": k[3], "median_s": r(statistics.median(v)), "min_s": r(min(v)), "max_s": r(max(v))}
                   for k, v in sorted(samples.items(), key=lambda kv: str(kv[0])) if k[0] == "coll"]
    links = fit_links(collectives) if collectives else {}
    gemm = []
    for n in shapes.gemm_sizes:
        s = _median(samples, ("gemm", n, "s"))
        gemm.append({"m": n, "n": n, "k": n, "gflop": r(2 * n**3 / 1e9), "tflops": r(2 * n**3 / s / 1e12)})
    peak = max(g["tflops"] for g in gemm)
    ((copy_key, copy_values),) = [(k, v) for k, v in samples.items() if k[0] == "copy"]
    bandwidth = 2 * copy_key[1] / min(copy_values) / 1e9  # read + write; the best run is the machine's
    measured = {
        "device_name": facts["device_name"], "torch_version": facts["torch_version"], "date": facts["date"],
        "cpu_count": facts["cpu_count"], "world_size": facts["world_size"], "backend": facts["backend"],
        "threads_per_rank": facts["threads_per_rank"], "dtype": facts["dtype"], "python": facts["python"],
        "profile_s": facts["profile_s"], "suite_s": facts.get("suite_s", {}), "quick": facts["quick"],
        "repeats": shapes.repeats, "layer_repeats": shapes.layer_repeats or shapes.repeats, "warmup": shapes.warmup,
        "cpu_share": round(sum(samples[("cpu_s",)]) / sum(samples[("wall_s",)]), 3) if ("cpu_s",) in samples else 1.0,
        "background_cores": round(max(0.0, facts.get("machine_busy_s", 0.0) - sum(samples.get(("rank_cpu_s",), [])))
                                  / facts["loop_s"], 2) if facts.get("loop_s") else 0.0,
        "layers": layers, "ends": ends,
        "optimizer_s_per_param": r(statistics.median(opt_values) / opt_key[1]),
        "optimizer": {"params": opt_key[1], "step_s": r(statistics.median(opt_values)), "spread_pct": _spread_pct(opt_values)},
        "gemm": gemm, "copy_GBps": r(bandwidth), "collectives": collectives, "links": links,
    }
    name = facts["name"]
    profile = {
        "version": 1, "name": name, "source": "measured", "dtype": facts["dtype"],
        "peak_tflops": r(peak),
        "memory_gib": facts["memory_gib"],
        "memory_bandwidth_GBps": r(bandwidth),
        "gemm_efficiency": [{"gflop": g["gflop"], "efficiency": r(min(1.0, g["tflops"] / peak))} for g in gemm],
        "fused_attention": True,
        "memory_efficiency": 1.0,
        "framework_overhead_gib": facts["framework_overhead_gib"],
        "notes": (f"Measured by `planner profile` on {facts['device_name']} ({facts['cpu_count']} cores, {facts['world_size']} ranks, "
                  f"{facts['backend']}, {facts['threads_per_rank']} thread(s) per rank), torch {facts['torch_version']}, {facts['dtype']}, "
                  f"{facts['date']}{' (--quick)' if facts['quick'] else ''}. peak_tflops is the best GEMM rate seen and "
                  "memory_bandwidth_GBps the best copy rate (hence memory_efficiency 1); they serve shapes not in 'measured'."),
        "measured": measured,
    }
    if any(k[0] == "pipe" for k in samples):
        measured["pipeline"], measured["stage_overhead_s"] = _stage_overhead(samples, shapes, profile)
    if any(k[0] == "fsdp" for k in samples):
        measured["fsdp"] = _fsdp_overhead(samples)
    return profile


def _stage_overhead(samples: dict, shapes: Shapes, profile: dict) -> tuple[list, dict]:
    """Per-microbatch seconds that a pipeline stage costs beyond what the cost model prices from this
    profile's layer and end times: the o that, added to every stage's forward and backward, makes
    planner.schedule.simulate of planner.cost's stage costs give the measured pipeline step."""
    from planner.cost import MESHPLAN, p2p_seconds, stage_costs
    from planner.plan import Knobs
    from planner.specs import ClusterSpec, LinkSpec

    device = device_from_dict(profile, "profile")
    link = LinkSpec(**profile["measured"]["links"].get("send_recv", {"bandwidth_GBps": 1e3, "latency_us": 0.0}))
    cluster = ClusterSpec("profile", 1, 2, device.name, link, link)
    model = shapes.models[0]
    half = max(1, min(model.layers // 2, 4))
    model = replace(model, layers=2 * half)
    stages = (Stage((0, half), True, False, "none"), Stage((half, 2 * half), False, True, "none"))
    runs, fits = [], []
    for sched, b, m in shapes.pipelines:
        key = ("pipe", sched, b, m)
        step = _median(samples, (*key, "step_s"))
        knobs = Knobs(tp=1, pp=2, dp=1, micro_batch=b, schedule=sched)
        costs = stage_costs(model, cluster, device, knobs, stages)
        f, bw = [c.forward_s for c in costs], [c.backward_s for c in costs]
        p2p = p2p_seconds(model, cluster, device, knobs, MESHPLAN)

        def sim(o: float) -> float:
            return simulate(sched, 2, m, 1, [x + o for x in f], [x + o for x in bw], p2p_s=p2p, with_timeline=False).iteration_s
        lo, hi = -min(f + bw), step
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if sim(mid) < step else (lo, mid)
        fits.append((lo + hi) / 2)
        r = lambda v: float(f"{v:.6g}")  # noqa: E731
        runs.append({"schedule": sched, "micro_batch": b, "num_microbatches": m, "step_s": r(step),
                     "spread_pct": _spread_pct(samples[(*key, "step_s")]),
                     "stage_forward_s": [r(_median(samples, (*key, f"stage{k}_forward_s"))) for k in (0, 1)],
                     "stage_backward_s": [r(_median(samples, (*key, f"stage{k}_backward_s"))) for k in (0, 1)],
                     "model_stage_forward_s": [r(x) for x in f], "model_stage_backward_s": [r(x) for x in bw],
                     "simulated_step_s": r(sim(0.0)), "overhead_s": r(fits[-1])})
    # Never negative: a stage cannot run faster inside the pipeline than on its own; a negative fit
    # means the layer and end times came out a little high, which is kept as measured.
    o = max(0.0, statistics.median(fits))
    return runs, {"forward_s": float(f"{o:.6g}"), "backward_s": float(f"{o:.6g}")}


def _fsdp_overhead(samples: dict) -> dict:
    """What FSDP2 adds to a step of P parameters: per_step_s + m * per_microbatch_s for m microbatches
    (plain_step reshards after forward, so it all-gathers twice per microbatch and reduce-scatters once)."""
    params = next(k[1] for k in samples if k[0] == "fsdp")
    m1, m2 = FSDP_MICROBATCHES
    extra = {m: _median(samples, ("fsdp", params, m, "fsdp_s")) - _median(samples, ("fsdp", params, m, "plain_s")) for m in (m1, m2)}
    per_mb = max(0.0, (extra[m2] - extra[m1]) / (m2 - m1))
    per_step = max(0.0, extra[m1] - m1 * per_mb)
    r = lambda v: float(f"{v:.6g}")  # noqa: E731
    return {"params": params, "microbatches": list(FSDP_MICROBATCHES),
            "fsdp_step_s": [r(_median(samples, ("fsdp", params, m, "fsdp_s"))) for m in (m1, m2)],
            "plain_step_s": [r(_median(samples, ("fsdp", params, m, "plain_s"))) for m in (m1, m2)],
            "per_step_s_per_param": r(per_step / params), "per_microbatch_s_per_param": r(per_mb / params)}
