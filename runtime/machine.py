"""How busy this machine is, measured the way the profile was: runtime.launch times a reference block on every
rank just before training and counts what other processes ran during the timed steps, so that `planner
validate` can tell the model's error from the machine's drift since `planner profile` (RunResult.machine).

The reference is the profile's own case (runtime.profile_cases.reference_case): one block of the plan's model
family at tp 1 and micro-batch 1, forward and backward, on all ranks at once as in the profile."""

from __future__ import annotations

import errno
import os
import random
import socket
import statistics
import sys
import threading
import time

import torch

from planner.errors import MeshplanError
from planner.io import atomic_write_json
from planner.specs import ModelSpec

REFERENCE_WARMUP = 2
REFERENCE_REPEATS = 7


_HANDED_OUT: set[int] = set()


def _outside_ephemeral_range() -> list[range]:
    """The port bands the kernel never hands out as a connection's local port: above 20000 and below the
    ephemeral range (Linux /proc/sys/net/ipv4/ip_local_port_range; 32768-60999 by default), and above it."""
    low, high = 32768, 60999
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split()[:2])
    except (OSError, ValueError):
        pass
    return [b for b in (range(max(1024, min(20000, low - 5000)), low), range(high + 1, 65536)) if len(b) >= 100]


def _listenable(port: int) -> bool:
    """Nothing listens on `port` on any address (a TCPStore binds them all, IPv6 where there is one)."""
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family) as s:
                s.bind((host, port))
        except OSError as e:
            if family == socket.AF_INET6 and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):  # no IPv6: IPv4's test stands
                continue
            return False
    return True


def free_port() -> int:
    """A TCP port that nothing listens on, for a process group's store, chosen outside the kernel's ephemeral
    range and never the same twice in this process.

    Why not the kernel's pick (bind to port 0): that is an ephemeral port, and between the pick and the store's
    bind any connection on the machine (a gloo pair socket of a running group, a store client) may be given it as
    its own local port: CI saw EADDRINUSE on a port picked a few layouts earlier. Ports outside the range are
    only ever taken by someone who asks for them by number. Where the range leaves no band, the kernel's pick."""
    bands = _outside_ephemeral_range()
    rng = random.Random()  # seeded from os.urandom: forked ranks do not share a sequence
    for _ in range(200 if bands else 0):
        band = rng.choice(bands)
        port = rng.randrange(band.start, band.stop)
        if port not in _HANDED_OUT and _listenable(port):
            _HANDED_OUT.add(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# <malloc.h>: mallopt's parameters.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """On a CPU rank, keep freed memory in the process for the next allocation, as CUDA's caching allocator keeps
    it on a GPU (which the device profile and the cost model assume): glibc's mallopt with no mmap for large
    blocks (M_MMAP_MAX 0) and no trimming of the heap (M_TRIM_THRESHOLD -1, malloc(3)). Returns whether it could
    (False off glibc, where the allocator is left as it is).

    By default glibc maps every block over its mmap threshold (128 KiB, rising to at most 32 MiB) afresh, unmaps it
    when freed and trims the heap's free top, so a step that frees and re-allocates its activations and gradients
    faults each 4 KiB page in again: 9,766 faults and 7.7 ms to allocate and fill 40 MB, 0.8 ms with this
    (2026-12-04). A training step does that every microbatch: make run's plans ran 3% (dp 2), 6% (pp 2) and 18%
    (tp 2, whose DTensor collectives allocate most) faster with it, alternating A/B, 4 runs each. The price is the
    resident set, which keeps what fragmentation leaves: the tp-2 plan's peak rose from 1,112 MiB to 1,342 MiB at 6
    steps, 1,393 at 30 and 1,415 at 90 (the tensors counted are the same; only freed memory is kept)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library to load, or one without mallopt (macOS)
        return False
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1


def leave(code: int) -> None:
    """End this rank's process with `code` once its work is written and its process groups destroyed, without
    the interpreter's finalization.

    After a complete run, a rank sometimes aborted on its way out ("terminate called without an active
    exception", exit -6: once in CI, and 2 of 77 runs of llama-tiny pp2 here beside two spinning processes).
    Python's fault handler, asked to list the threads at that moment, crashed itself: the threads' states were
    being torn down, so the abort happens during finalization. destroy_process_group drops torch.distributed's
    references, but a device mesh or a pipeline stage still holds the gloo group, so its C++ worker threads
    outlive main(); a worker that frees a tensor's Python object then needs the GIL while the interpreter
    finalizes (as pytorch/pytorch#179291 describes for gloo). os._exit ends every thread at once instead."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach the reader anyway
            pass
    os._exit(code)


def tell_torchrun(line: str) -> None:
    """Put a refusal where torchrun's summary of the failed ranks reads it: the rank's error file
    (TORCHELASTIC_ERROR_FILE, which torchrun's agent sets for every rank it starts). Without it the summary
    says 'traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html' for a rank
    that has no traceback; with it, 'traceback : ' and the line. torchrun prints that summary, under a
    traceback of its own (launch_agent raises ChildFailedError), for a rank that exits nonzero whichever way it
    exits (sys.exit(2), os._exit(2) or an exception alike), and no exit of ours, short of 0, changes that."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:  # not under torchrun
        return
    # ErrorHandler.record_exception's schema less its py_callstack (a refusal has none): the summary shows the message.
    try:
        atomic_write_json(path, {"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}})
    except MeshplanError:  # an agent that gave no writable file learns of the exit code only, as before
        pass


def machine_busy_s() -> float:
    """CPU seconds all processes of this machine have used since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


_SCHEDSTAT = threading.local()


def run_queue_wait_s() -> float | None:
    """Seconds the calling thread (the rank's training loop) has spent runnable but waiting for a core: the
    scheduler's own run-delay accounting, the second field of /proc/thread-self/schedstat (Linux); None
    elsewhere. Taken around each step, it is the time the rank lost to other processes on a shared machine.
    gloo's worker threads are left out: a rank waits for them asleep, not runnable, and on a quiet machine they
    queue behind the other rank's compute (measured: 5-14% of a step summed over every thread, 1-3% for the
    training thread alone).

    The file stays open per thread and process (a fork's child opens its own: the inherited one is the
    parent's thread): 3 us a reading instead of 20-45 us to open it each time, so the profile's clock can read
    it around every timing (runtime.profile_cases.Clock)."""
    pid, fd = getattr(_SCHEDSTAT, "fd", (None, None))
    if pid != os.getpid():
        try:
            fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            fd = None
        _SCHEDSTAT.fd = (os.getpid(), fd)
    if fd is None:
        return None
    try:
        return int(os.pread(fd, 128, 0).split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def warm_gpu(dev: torch.device, seconds: float = 0.5) -> None:
    """Matmuls for `seconds`: an idle GPU's clocks take a fraction of a second to rise to their loaded speed (an
    H200's SM clock idles at 345 MHz and runs at 1,980 MHz under load), and the reference block, timed first in a
    run and in a profile, takes milliseconds."""
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize(dev)


def time_reference(model: ModelSpec, dev: torch.device) -> tuple[float, float | None]:
    """(median forward + backward seconds of the reference block, share of a core this rank got meanwhile;
    None on GPU). Builds the block, times it, frees it: a few tenths of a second for the tiny models."""
    from runtime.profile_cases import Clock, reference_case

    if dev.type == "cuda":
        warm_gpu(dev)
    case = reference_case(model, dev, Clock(dev))
    times, cpu0, wall0 = [], time.process_time(), time.perf_counter()
    for i in range(REFERENCE_WARMUP + REFERENCE_REPEATS):
        if i == REFERENCE_WARMUP:
            cpu0, wall0 = time.process_time(), time.perf_counter()
        got = case()
        if i >= REFERENCE_WARMUP:
            times.append(got["forward_s"] + got["backward_s"])
    share = None if dev.type == "cuda" else (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    return statistics.median(times), share


class BusyMeter:
    """Cores that other processes used between start() and stop(): the machine's busy CPU seconds less this
    job's own (every rank's process time, summed by the caller), over the wall time."""

    def start(self) -> None:
        self.busy, self.cpu, self.wall = machine_busy_s(), time.process_time(), time.perf_counter()

    def stop(self) -> tuple[float, float, float]:
        """(machine busy seconds, this process's CPU seconds, wall seconds) since start()."""
        return machine_busy_s() - self.busy, time.process_time() - self.cpu, time.perf_counter() - self.wall


class BlockWaits:
    """This rank's run-queue wait (run_queue_wait_s) in each stretch of a step between its blocks' boundaries: a
    reading as each block's forward starts and as its output's gradient arrives (its backward starts), so that
    the ranks of a tensor- or context-parallel group, which meet at every block, can be compared stretch by
    stretch (synced_waits). Hooks only; CPU runs without torch.compile (a hook that reads a file would break its
    graphs)."""

    def __init__(self, blocks: list[torch.nn.Module]):
        self.marks: list[float] = []
        for block in blocks:
            block.register_forward_pre_hook(lambda module, args: self._mark())
            block.register_forward_hook(self._on_output)

    def _mark(self) -> None:
        wait = run_queue_wait_s()
        if wait is not None and self.marks:
            self.marks.append(wait)

    def _on_output(self, module, args, out) -> None:
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad: self._mark())  # returns None: the gradient passes unchanged

    def start(self, wait: float | None) -> None:
        """A step starts: `wait` is the reading the step's own wait starts from."""
        self.marks = [] if wait is None else [wait]

    def stop(self, wait: float | None) -> list[float] | None:
        """The step's waits stretch by stretch, from start()'s reading to `wait` (the step's last): they sum to the
        step's wait. None where none could be read."""
        marks, self.marks = self.marks, []
        if wait is not None and marks:
            marks.append(wait)
        return [b - a for a, b in zip(marks, marks[1:])] if len(marks) > 1 else None


def synced_waits(stretches: list[list[list[float] | None]], groups: list[list[int]]) -> list[float] | None:
    """Per step, what the ranks' waits for a core added to it, from each rank's BlockWaits per step
    (stretches[rank][step]) and the groups of ranks that meet at every block (same pp and dp coordinates: the tp
    and cp ranks). Within a group a stretch lasts as long as its slowest member: the group lost the sum over
    stretches of the largest member's wait in each (more than the largest member's total, at most the sum of
    all). Between groups, which meet once a step or once a microbatch, the largest group's counts. A group
    whose members saw different numbers of stretches (a schedule that differs by rank) counts its largest
    member's total. None where a rank has no stretches."""
    if not stretches or any(s is None for r in stretches for s in r):
        return None
    out = []
    for step in range(len(stretches[0])):
        lost = []
        for members in groups:
            rows = [stretches[r][step] for r in members]
            if len({len(x) for x in rows}) == 1:
                lost.append(sum(max(col) for col in zip(*rows)))
            else:
                lost.append(max(sum(x) for x in rows))
        out.append(round(max(lost), 6))
    return out


def summarize(references: list[tuple[float, float | None]], busy: list[tuple[float, float, float] | None],
              dev: torch.device, waits: list[list[float | None]] | None = None, timed: list[int] | None = None,
              synced: list[float] | None = None) -> dict:
    """RunResult.machine from every rank's time_reference(), BusyMeter.stop() (None where no step was timed), every
    rank's run_queue_wait_s() per step, the indices of the steps tokens/s counts and synced_waits' per step.
    background_cores is counted on CPU only, where all ranks share this machine: the machine's busy seconds (rank
    0's reading) less every rank's own CPU seconds, over the wall time; a GPU job's ranks span nodes."""
    shares = [s for _, s in references if s is not None]
    background = None
    if dev.type == "cpu" and all(b is not None for b in busy) and busy and busy[0][2] > 0:
        machine_s, _, wall = busy[0]
        background = max(0.0, (machine_s - sum(b[1] for b in busy)) / wall)
    return {"reference_s": statistics.median(t for t, _ in references),
            "cpu_share": statistics.median(shares) if shares else None,
            "background_cores": background, "cpu_count": os.cpu_count(),
            "step_wait_s": per_step_waits(waits) if dev.type == "cpu" else None, "timed_steps": timed,
            "step_synced_wait_s": synced if dev.type == "cpu" else None}


def per_step_waits(waits: list[list[float | None]] | None) -> list[list[float]] | None:
    """Every rank's run-queue wait (run_queue_wait_s) per step, transposed to [step][rank]; None where a rank
    could not read it."""
    if not waits or any(w is None for r in waits for w in r):
        return None
    return [[round(r[i], 6) for r in waits] for i in range(len(waits[0]))]
