"""The profiler behind `planner profile`: times the runtime's own modules on this machine and writes a
measured device profile (profiles/devices/<name>.measured.json), which the planner prefers to the datasheet.

What it measures, on as many ranks as the machine gives (CPU: one per core, one thread each, gloo, as
runtime.launch runs them; CUDA: one per GPU, NCCL, bf16 autocast), all ranks busy at once as in training:
- one transformer block (runtime.model.Block inside a one-block GPT) of each model family (gpt-tiny and
  llama-tiny on CPU) forward, backward and its attention core (selective recomputation), for the shard of
  each tensor-parallel degree t (hidden, heads/t, kv_heads/t, ffn/t) over micro-batch sizes; for t > 1
  also the block under DTensor TP (runtime.parallel.tensor.apply_tp) on t ranks, its collectives included;
- the embedding and the final norm + head + cross-entropy (loss_parallel under TP);
- the AdamW step of runtime.launch.build_optimizer, per parameter; GEMM rates and memory bandwidth (the
  datasheet-like fields, used where a shape was not measured);
- all-reduce, all-gather, reduce-scatter and send/recv over message and group sizes, and the links
  fitted to them (planner.measured.fit_links);
- a two-stage torch.distributed.pipelining run, whose step time beyond its stages' own forward and
  backward is the per-microbatch stage overhead (fitted with planner.schedule.simulate).
Every figure is the median of several repeats after warm-up, measured round-robin over the shapes so
that a burst of load elsewhere spreads over all of them; the spread is kept beside it.

This file runs the ranks; runtime/profile_cases.py holds what each of them times, and planner/fit.py (pure
Python) turns the samples into the profile and fits the pipeline and FSDP2 overheads.
"""

from __future__ import annotations

import datetime
import math
import os
import pickle
import platform
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from planner import specs
from planner.datasheets import datasheet_for
from planner.errors import SpecError
from planner.fit import Shapes, build_profile
from planner.io import atomic_write_json
from planner.measured import check_measured
from planner.specs import device_from_dict, load_model
from runtime import profile_cases
from runtime.machine import free_port, keep_freed_memory, leave, machine_busy_s, run_queue_wait_s, time_reference
from runtime.profile_cases import Clock

CPU_MODELS = ("gpt-tiny", "llama-tiny")
CUDA_MODELS = ("gpt3-125m", "gpt3-350m", "gpt3-1.3b")
MAX_CPU_RANKS = 8
BUSY_SHARE = 0.85
"""Below this share of a core per CPU rank while it times a block, the profile is flagged as measured on a busy machine."""
BUSY_OTHERS = 0.25
"""Above this many cores used on average by processes other than the ranks, likewise."""


def choose_shapes(device_type: str, world: int, quick: bool, models: tuple[str, ...] | None = None) -> Shapes:
    chosen = tuple(load_model(m) for m in (models or (CPU_MODELS if device_type == "cpu" else CUDA_MODELS)))
    cuda = device_type == "cuda"
    tps = tuple(t for t in (1, 2, 4, 8) if t <= world and world % t == 0)
    if quick:
        return Shapes(chosen, tps[:2], (1, 2), (1 << 12, 1 << 18, 1 << 22), (256, 512), (("1f1b", 1, 2),), repeats=2, warmup=1)
    return Shapes(chosen, tps, (1, 2, 4, 8, 16) if cuda else (1, 2, 4, 8, 16, 32),
                  tuple(1 << k for k in range(12, 27 if cuda else 25, 2)),
                  (1024, 2048, 4096, 8192) if cuda else (128, 256, 512, 1024),
                  (("1f1b", 1, 8), ("1f1b", 4, 4), ("gpipe", 2, 4)), repeats=5, warmup=2, layer_repeats=9)


def device_name(device_type: str) -> str:
    """The profile's name: 'cpu', or this GPU's datasheet name (planner.datasheets: h200-sxm-141gb, ...), so
    that the cluster presets use the measured profile; for a GPU with no datasheet, its own name."""
    if device_type == "cpu":
        return "cpu"
    gpu = torch.cuda.get_device_name(0)
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    return datasheet_for(gpu, gib) or "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")


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
    path = Path(out) if out else specs.measured_profile_path(name)
    started = time.perf_counter()
    samples, facts = _spawn(world, device_type, shapes)
    facts.update(name=name, profile_s=round(time.perf_counter() - started, 1), quick=quick)
    profile = build_profile(samples, facts, shapes, device_type)
    device_from_dict(profile, str(path))  # what load_device will read back
    check_measured(profile["measured"], str(path))
    atomic_write_json(path, profile)
    print(f"Wrote {path} ({facts['profile_s']:.0f} s). The planner uses it for device {name!r}.")
    share, others = profile["measured"]["cpu_share"], profile["measured"]["background_cores"]
    waited = profile["measured"].get("waited_share")
    if share < BUSY_SHARE or (device_type == "cpu" and others > BUSY_OTHERS):
        taken = (f" The {100 * waited:.0f}% of the time the ranks waited for a core is taken out of every timing, not what "
                 "the other processes did to the ranks' collectives, caches and memory bandwidth, so some timings are "
                 "likely too slow." if waited is not None else " So these timings are likely too slow.")
        print(f"warning: other processes used {others:.1f} of this machine's {facts['cpu_count']} cores while it was profiled "
              f"(the ranks got {100 * share:.0f}% of a core when computing alone).{taken} "
              f"Run `planner profile` again on an idle machine.")
    return 0


# ---------------------------------------------------------------- ranks

def _spawn(world: int, device_type: str, shapes: Shapes) -> tuple[dict, dict]:
    """Run _rank_main on `world` fresh processes; rank 0 pickles the pooled samples into a file here."""
    port = free_port()
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


def _rank_main(rank: int, world: int, port: int, device_type: str, shapes: Shapes, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    cuda = device_type == "cuda"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(1)
        keep_freed_memory()  # as runtime.launch runs its ranks
    dist.init_process_group("nccl" if cuda else "gloo")
    facts = _facts(dev, world)
    facts["suite_s"] = {}
    # The reference block of each model, timed as runtime.launch times it before a run (runtime.machine, all
    # ranks at once, the median over ranks): `planner validate` divides a run's figure by this one.
    dist.barrier()
    mine = {m.name: time_reference(m, dev)[0] for m in shapes.models}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    facts["reference_s"] = {name: statistics.median(r[name] for r in everyone) for name in mine}
    clock = Clock(dev)
    few = max(2, shapes.repeats - 2)  # whole steps: long, and averaged over many microbatches already
    suites = [("GEMMs and memory", profile_cases.gemm_cases(shapes, dev, clock), shapes.repeats, 1),
              ("layers", profile_cases.layer_cases(shapes, dev, clock, world), shapes.layer_repeats or shapes.repeats, shapes.warmup),
              ("embedding and head", profile_cases.end_cases(shapes, dev, clock, world), shapes.repeats, shapes.warmup),
              ("optimizer step", profile_cases.optimizer_cases(shapes, dev, clock), shapes.repeats, 1)]
    if world > 1:
        suites.append(("collectives", profile_cases.collective_cases(shapes, dev, clock, world), max(shapes.repeats, 5), 1))
        suites.append(("pipeline", profile_cases.pipeline_cases(shapes, dev, clock, world), few, 1))
        suites.append(("FSDP2", profile_cases.fsdp_cases(shapes, dev, clock, world), few, 1))
    bar = _Bar(rank == 0, sum(len(c) * (r + w) for _, c, r, w in suites))
    samples: dict[tuple, list[float]] = defaultdict(list)
    loop_s, cpu_s, busy_s, wait_s = time.perf_counter(), time.process_time(), machine_busy_s(), run_queue_wait_s()
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
    if wait_s is not None:  # what Clock took out of this rank's timings
        samples[("rank_wait_s",)].append(run_queue_wait_s() - wait_s)
    facts.update(loop_s=time.perf_counter() - loop_s, machine_busy_s=machine_busy_s() - busy_s)
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
    leave(0)  # not a return into multiprocessing's exit: the gloo group's threads outlive it (machine.leave)


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


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


