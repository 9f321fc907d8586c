"""Memory per rank, measured the way the planner defines it.

On CUDA: torch.cuda.max_memory_reserved (what the caching allocator holds at the peak: what an OOM is decided on)
and max_memory_allocated, both from the steps after warm-up.

On CPU there is no allocator that keeps statistics, so LiveTensorBytes counts: the peak, over the op boundaries of
the training thread, of the bytes of every live tensor storage. On entry it takes every tensor Python can reach
(weights, gradients, optimizer state, DDP's buckets, a pipeline stage's buffers); then a TorchDispatchMode sees
each op's inputs and outputs and counts every storage from the moment the training thread first holds it until it
is freed (a weak reference on the storage, which torch keeps alive exactly as long as the memory), at its current
size (FSDP2 allocates and frees the gathered weights by resizing their storages: UntypedStorage.resize_ is watched
while counting). Chosen over torch.profiler's memory profile because it is deterministic and can say what each
byte at the peak is: the profiler counts allocations on the profiled thread only, and a buffer that a gloo worker
frees would stay in its count forever.

What it does not see: memory inside one op (a kernel's workspace, DTensor's internal buffers, freed before the op
returns); buffers that a gloo worker thread makes and frees (gloo's reduce-scatter reduces a whole copy of its input
on the worker and splits it on the training thread: counting it would make the count depend on when the worker lets
go of it, which varies from run to run); and the inside of compiled code (inductor's kernels allocate below the
dispatcher): a --compile run on CPU is not counted (runtime.launch records the resident set instead and says so in
RunResult.memory_counter).
It costs about half a step's time more, so runtime.launch counts the last step of a CPU run and leaves it out of
tokens/s. The count is the steady state from the third step on: the first allocates the optimizer state (and,
under pipelining, infers shapes), and DDP rebuilds its buckets in the second. Repeated runs give the same count to
the byte, except that a gloo worker may drop the last reference to an FSDP2 communication buffer a moment after the
training thread does: seen once in two runs of llama-tiny tp2 x dp2 zero 3 (one block's 1.4 MB all-gather buffer
more at the peak of one rank, 1.6%).

measure_memory runs a plan on CPU ranks with torchrun for a few steps and returns each rank's peak, broken down.

On CUDA the runtime asks the caching allocator for expandable segments (use_expandable_segments), as torchtitan's
run_train.sh does: a segment then grows in place rather than a new one being reserved beside the old, so what is
reserved at the peak stays near what is allocated, which is what the planner's tensor counts price."""

from __future__ import annotations

import gc
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

ALLOCATOR_SETTING = "expandable_segments:True"
"""What runtime.launch gives CUDA's caching allocator (torch reads PYTORCH_ALLOC_CONF, or its older name
PYTORCH_CUDA_ALLOC_CONF, when CUDA first allocates)."""


def use_expandable_segments(environ=os.environ) -> bool:
    """Set PYTORCH_ALLOC_CONF to ALLOCATOR_SETTING unless the user configured the allocator under either name
    (theirs wins, unmerged); call before anything touches the GPU. Returns whether it set it. CPU ranks have no
    caching allocator, and torch reads nothing of it there."""
    if "PYTORCH_ALLOC_CONF" in environ or "PYTORCH_CUDA_ALLOC_CONF" in environ:
        return False
    environ["PYTORCH_ALLOC_CONF"] = ALLOCATOR_SETTING
    return True


CATEGORIES = ("parameters", "gradients", "optimizer_state", "gathered_weights", "activations_and_transient")
"""What each byte at the peak is (LiveTensorBytes.breakdown): this rank's persistent weights (FSDP2: its shards),
gradients, AdamW state, the whole weights FSDP2 all-gathers for a block (zero 2 and 3), and everything else
(activations kept for backward, recomputation, gradients of activations, communication buffers, temporaries)."""


FOREIGN = "made out of sight"


class LiveTensorBytes(TorchDispatchMode):
    """Counts live tensor storage bytes while active (see the module docstring); `peak` is the most seen at once.

    Use: `with counter:` around the steps to count; call `label(chunks, optimizers)` once inside, when the weights,
    gradients and optimizer state all exist (after the step's backward and gradient reduction), for `breakdown()`."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._lock = threading.RLock()  # a storage may be freed on another thread (a gloo worker's last reference)
        self._uid = itertools.count()
        self._keys: dict[int, int] = {}  # id(storage) -> uid, while the storage lives
        self._bytes: dict[int, int] = {}  # uid -> bytes now
        self._refs: dict[int, weakref.ref] = {}
        self._before: dict[int, int] = {}  # uid -> bytes of the storages alive when counting began
        self._events: list[tuple[int, int]] = []  # (uid, bytes added or removed), in order
        self._peak_at = 0  # len(_events) at the peak
        self._labels: dict[int, str] = {}
        self._resized: set[int] = set()
        self._origin: dict[int, str] = {}  # uid -> the op whose output it was, or where it was first seen
        self._op = "before counting"
        self._resize = None

    # ---- counting
    def _uid_of(self, st: torch.UntypedStorage) -> int:
        """The storage's uid; a storage not seen before starts counting now."""
        key = id(st)
        uid = self._keys.get(key)
        if uid is not None:
            return uid
        uid = next(self._uid)
        self._keys[key] = uid
        self._refs[uid] = weakref.ref(st, lambda _, uid=uid, key=key: self._freed(uid, key))
        # A storage first met as an input was made where the counter cannot see (a gloo worker thread) and is freed
        # there too, at a moment that varies from run to run: it is left out, so that the count stays the same.
        n = 0 if self._op == FOREIGN else st.nbytes()
        self._bytes[uid] = n
        self.live += n
        self._origin[uid] = self._op
        if self._op == "before counting":
            self._before[uid] = n
            self.peak = self.live
        else:
            self._add_event(uid, n)
        return uid

    def _add_event(self, uid: int, n: int) -> None:
        self._events.append((uid, n))
        if self.live > self.peak:
            self.peak, self._peak_at = self.live, len(self._events)

    def _freed(self, uid: int, key: int) -> None:
        with self._lock:
            n = self._bytes.pop(uid)
            self._keys.pop(key, None)
            self._refs.pop(uid, None)
            self.live -= n
            self._events.append((uid, -n))

    def _see(self, tensors) -> None:
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            if is_traceable_wrapper_subclass(t):  # a DTensor (or Float8Tensor): count what it wraps
                self._see([getattr(t, a) for a in t.__tensor_flatten__()[0]])
            elif t.device.type != "meta" and t.layout == torch.strided:
                self._uid_of(t.untyped_storage())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        with self._lock:
            self._op = FOREIGN
            self._see(tree_leaves((args, kwargs)))
        out = func(*args, **(kwargs or {}))
        with self._lock:
            self._op = str(func.overloadpacket)
            self._see(tree_leaves(out))
        return out

    def _resized_storage(self, st: torch.UntypedStorage, size: int):
        with self._lock:
            self._op = "UntypedStorage.resize_"
            uid = self._uid_of(st)
        self._resize(st, size)
        with self._lock:
            n = st.nbytes()
            delta, self._bytes[uid] = n - self._bytes[uid], n
            self.live += delta
            self._resized.add(uid)
            self._add_event(uid, delta)
        return st

    def __enter__(self):
        # What is alive now: every tensor Python can reach (weights, gradients, optimizer state, DDP's buckets, which
        # the gradients view, a pipeline stage's buffers). Between steps no storage lives in C++ alone. Garbage held
        # by reference cycles is collected first: it would otherwise be freed whenever the collector next runs, which
        # depends on what ran before (an earlier run in the same process, say), and the count would too.
        gc.collect()
        with self._lock, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance() on deprecated torch objects (torch.distributed.reduce_op) warns
            self._op = "before counting"
            self._see([o for o in gc.get_objects() if isinstance(o, torch.Tensor)])
        self._resize = torch.UntypedStorage.resize_
        counter = self
        torch.UntypedStorage.resize_ = lambda st, size: counter._resized_storage(st, size)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    # ---- what the peak is made of
    def label(self, chunks, optimizers) -> None:
        """Name the storages that are weights, gradients and optimizer state now (call while counting)."""
        from runtime.parallel.optimizer import local_optimizer

        def uids(tensors):
            found = []
            for t in tensors:
                if is_traceable_wrapper_subclass(t):
                    found += uids(getattr(t, a) for a in t.__tensor_flatten__()[0])
                elif isinstance(t, torch.Tensor) and t.layout == torch.strided:
                    found.append(self._uid_of(t.untyped_storage()))
            return found

        params = [p for c in chunks for p in c.parameters()]
        states = [v for opt in optimizers for o in local_optimizer(opt) for s in o.state.values() for v in s.values()]
        with self._lock:
            for name, tensors in (("parameters", params), ("gradients", [p.grad for p in params if p.grad is not None]),
                                  ("optimizer_state", [v for v in states if isinstance(v, torch.Tensor)])):
                for uid in uids(tensors):
                    self._labels.setdefault(uid, name)

    def _at_peak(self) -> dict[int, int]:
        live = dict(self._before)
        for uid, n in self._events[:self._peak_at]:
            live[uid] = live.get(uid, 0) + n
        return live

    def _category(self, uid: int) -> str:
        return self._labels.get(uid) or ("gathered_weights" if uid in self._resized else "activations_and_transient")

    def breakdown(self) -> dict[str, int]:
        """Bytes per CATEGORIES entry of the storages live at the peak; they sum to `peak`."""
        out = dict.fromkeys(CATEGORIES, 0)
        for uid, n in self._at_peak().items():
            out[self._category(uid)] += n
        return out

    def transient_by_op(self) -> dict[str, int]:
        """The activations_and_transient bytes at the peak by the op that made them (largest first)."""
        out: dict[str, int] = {}
        for uid, n in self._at_peak().items():
            if n and self._category(uid) == "activations_and_transient":
                op = self._origin[uid]
                out[op] = out.get(op, 0) + n
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@dataclass(frozen=True)
class RankMemory:
    rank: int
    peak_bytes: int
    """The peak of live tensor bytes of the counted step (LiveTensorBytes.peak)."""
    breakdown_bytes: dict
    """CATEGORIES -> bytes at that peak, summing to peak_bytes."""


def rank_memory(result: dict) -> list[RankMemory]:
    """Each rank's counted peak from a CPU run's results line (planner.results.RunResult as a dict)."""
    return [RankMemory(r, sum(b.values()), b) for r, b in enumerate(result["memory_breakdown_bytes"])]


def measure_memory(plan_path: str | Path, *, steps: int = 2, extra: tuple[str, ...] = (), timeout_s: float = 600) -> list[RankMemory]:
    """Run plan.json on as many CPU ranks as it needs (torchrun, this interpreter) for `steps` steps and return
    each rank's peak live tensor bytes in the counted step (the second, or the last warm-up step) and what they are.
    extra: more runtime.launch flags (--data, --seed, ...). Raises RuntimeError with torchrun's output if it fails."""
    from planner.plan import load_plan

    plan = load_plan(str(plan_path))
    with tempfile.TemporaryDirectory(prefix="meshplan-memory-") as tmp:
        results = Path(tmp) / "results.jsonl"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(plan.world_size),
               "-m", "runtime.launch", str(plan_path), "--steps", str(steps), "--results", str(results), *extra]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        return rank_memory(json.loads(results.read_text().splitlines()[-1]))
