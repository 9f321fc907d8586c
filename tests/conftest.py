"""Shared test helpers. run_on_ranks spawns N CPU ranks (gloo) for multi-rank tests of any package."""

from __future__ import annotations

import os
import pickle
import queue
import runpy
import sys
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def free_port() -> int:
    """runtime.machine.free_port: below the ephemeral range, so no running group's sockets can take it first."""
    from runtime.machine import free_port as pick

    return pick()


def _rank_main(rank: int, world_size: int, port: int, out, fn, args) -> None:
    """A rank's body. It reaches the child as this file run by path (see run_on_ranks), not by module name:
    several directories under tests/ hold a conftest.py, and which one `import conftest` finds depends on
    sys.path order."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        # Pickled here, with plain pickle: a tensor then travels by value, not as a shared-memory handle that
        # dies with this process.
        out.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:
        out.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.tensor.parallel",
           "torch.distributed.pipelining", "torch.distributed.fsdp", "torch.distributed.checkpoint", "numpy"]
"""Imported once by the fork server, so a rank starts in milliseconds instead of importing torch again."""


def _context():
    # forkserver: ranks fork from one server process that imported torch but never ran an op (so no OpenMP
    # pool is copied into them, unlike forking pytest itself), and it starts once per test session.
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_on_ranks(fn, world_size: int, *args, timeout_s: float = 180.0) -> list:
    """Run fn(*args) on `world_size` fresh CPU processes and return their return values in rank order.

    Each process has RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and a free MASTER_PORT set, and one torch
    thread, so `dist.init_process_group("gloo")` (or runtime.launch.main) joins the group with no arguments.
    fn must be importable (a module-level function of a uniquely named module: from a test helper, import
    it as tests.<dir>.<module>) and its return value picklable. If a rank raises,
    the others are stopped and this raises with that rank's traceback; the same after timeout_s."""
    ctx = _context()
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=runpy.run_path, daemon=True,
                         args=(__file__, {"RANK_ARGS": (r, world_size, port, out, fn, args)}, "__meshplan_rank__"))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        while len(results) < world_size:
            try:
                rank, ok, value = out.get(timeout=timeout_s)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(results))
                raise RuntimeError(f"ranks {missing} of {world_size} gave no result within {timeout_s:.0f} s") from None
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10 if len(results) == world_size else 0.1)
            if p.is_alive():
                p.terminate()
                p.join(5)
    return [results[r] for r in range(world_size)]


if __name__ == "__meshplan_rank__":  # a rank started by run_on_ranks
    _rank_main(*globals()["RANK_ARGS"])  # given by run_on_ranks through runpy's init_globals


@pytest.fixture
def ranks():
    """The run_on_ranks function, for tests that prefer a fixture to an import."""
    return run_on_ranks


@pytest.fixture(autouse=True)
def allocator_setting_stays_in_its_test():
    """runtime.launch.main sets PYTORCH_ALLOC_CONF in os.environ (runtime.memory.use_expandable_segments); a test
    that calls it in-process must not hand that setting to every later test and the torchrun runs they start."""
    names = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
    saved = {name: os.environ.get(name) for name in names}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
