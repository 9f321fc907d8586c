"""runtime.machine: what the machine's other work cost a run, measured by the scheduler; the ports groups meet on."""

import os
import socket
import subprocess
import sys
import time

import pytest

from runtime.machine import free_port, run_queue_wait_s, synced_waits

SPIN = "import time\nend = time.perf_counter() + {}\nwhile time.perf_counter() < end:\n    pass\n"


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_run_queue_wait_counts_the_time_this_thread_waited_for_a_core_behind_other_processes():
    # More busy processes than cores: this thread, busy too, spends part of its wall time in the run queue.
    others = [subprocess.Popen([sys.executable, "-c", SPIN.format(2.5)]) for _ in range(os.cpu_count() + 1)]
    try:
        time.sleep(0.3)  # the spinners are running
        w0, t0, c0 = run_queue_wait_s(), time.perf_counter(), time.thread_time()
        _spin(1.0)
        waited, wall, ran = run_queue_wait_s() - w0, time.perf_counter() - t0, time.thread_time() - c0
    finally:
        for p in others:
            p.kill()
            p.wait()
    # Its wall time is the time it ran plus the time it waited (a few ms of accounting slack).
    assert waited > 0.2 and abs(wall - (ran + waited)) < 0.1 * wall, (waited, ran, wall)


def test_the_profiles_cpu_clock_leaves_out_the_time_waited_for_a_core():
    # runtime.profile_cases.Clock: an interval of it is the time the work ran, however many processes compete.
    import torch

    from runtime.profile_cases import Clock

    clock = Clock(torch.device("cpu"))
    others = [subprocess.Popen([sys.executable, "-c", SPIN.format(2.5)]) for _ in range(os.cpu_count() + 1)]
    try:
        time.sleep(0.3)
        k0, t0, c0 = clock(), time.perf_counter(), time.thread_time()
        _spin(1.0)
        k1, wall, ran = clock(), time.perf_counter() - t0, time.thread_time() - c0
    finally:
        for p in others:
            p.kill()
            p.wait()
    assert wall - ran > 0.2 and abs((k1 - k0) - ran) < 0.1 * ran, (k1 - k0, ran, wall)


def test_a_forked_child_reads_its_own_wait_not_its_parents():
    # The schedstat file stays open per thread; a fork's child must not read its parent's through it.
    others = [subprocess.Popen([sys.executable, "-c", SPIN.format(0.8)]) for _ in range(os.cpu_count() + 1)]
    try:
        time.sleep(0.2)
        _spin(0.5)  # this thread waits behind them: its count is well above a fresh child's
    finally:
        for p in others:
            p.kill()
            p.wait()
    parent = run_queue_wait_s()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own thread's wait, from a file it opens itself
        with open("/proc/thread-self/schedstat") as f:
            os.write(write, f"{run_queue_wait_s()} {int(f.read().split()[1]) / 1e9}".encode())
        os._exit(0)
    os.waitpid(pid, 0)
    got, direct = (float(x) for x in os.read(read, 100).split())
    assert parent > 0.05 and abs(got - direct) < 0.005, (got, direct, parent)


def test_free_port_is_outside_the_ephemeral_range_listenable_and_never_repeated():
    # CI once failed 14 tests on EADDRINUSE: a port the kernel picked (an ephemeral one) was handed, before the
    # store bound it, to another socket as its local port. Ports outside the range are never handed out that way.
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = (int(x) for x in f.read().split()[:2])
    if low - 1024 < 100 and 65535 - high < 100:
        pytest.skip(f"the ephemeral range {low}-{high} leaves no band outside it")
    taken = socket.create_server(("127.0.0.1", 0))  # a listener: its port is never offered
    ports = [free_port() for _ in range(300)]
    try:
        assert taken.getsockname()[1] not in ports
    finally:
        taken.close()
    assert len(set(ports)) == len(ports)
    assert all(p < low or p > high for p in ports), sorted(ports)
    with socket.create_server(("127.0.0.1", ports[-1])):  # free: a store can listen on it
        pass


def test_free_port_passes_over_a_port_listened_on_another_address():
    # A TCPStore listens on every address: a port taken on IPv6's loopback only is not free for it.
    from runtime.machine import _listenable

    port = free_port()
    try:
        held = socket.create_server(("::1", port), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with held:
        assert not _listenable(port)
    assert _listenable(port)


def test_ranks_that_meet_at_every_block_lose_the_largest_wait_of_each_stretch():
    # Two tp ranks, two steps of three stretches each: rank 0 waits early, rank 1 late; each stretch lasts as long
    # as its slower rank, so the group lost 0.3 + 0.2 + 0.4, more than either rank's total (0.5, 0.6).
    stretches = [[[0.3, 0.2, 0.0], [0.1, 0.0, 0.0]], [[0.0, 0.2, 0.4], [0.0, 0.0, 0.2]]]
    assert synced_waits(stretches, [[0, 1]]) == pytest.approx([0.9, 0.3])
    # Ranks that meet once a step (data parallel: groups of one) lose the largest rank's total, as before.
    assert synced_waits(stretches, [[0], [1]]) == pytest.approx([0.6, 0.2])
    # A member with a different number of stretches: its group counts the largest total; a rank without
    # readings: nothing is claimed.
    assert synced_waits([[[0.3, 0.2]], [[0.1, 0.1, 0.1]]], [[0, 1]]) == pytest.approx([0.5])
    assert synced_waits([[[0.3]], [None]], [[0, 1]]) is None


def test_leave_flushes_what_was_printed_and_exits_with_its_code_without_finalizing_the_interpreter():
    # A rank's gloo threads outlive main(); machine.leave ends the process before the interpreter's finalization
    # (where one of them can abort it, runtime.machine.leave), and what the rank printed still arrives.
    code = ("import atexit, sys, threading, time\n"
            "from runtime.machine import leave\n"
            "atexit.register(lambda: print('finalized'))\n"
            "threading.Thread(target=time.sleep, args=(60,)).start()  # not a daemon: sys.exit would wait for it\n"
            "print('results written', end='')\n"
            "print('a warning', file=sys.stderr, end='')\n"
            "leave(3)\n")
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert (run.returncode, run.stdout, run.stderr) == (3, "results written", "a warning")
    assert time.perf_counter() - t0 < 50  # the thread sleeps 60 s: importing torch on a busy machine takes less


FAULTS = """import platform, resource, sys, torch
from runtime.machine import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():  # minor page faults of allocating, filling and freeing 40 MB ten times
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        x = torch.empty(10_000_000)
        x.fill_(1.0)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
faults()
print(kept, platform.libc_ver()[0], faults())
"""


def test_keep_freed_memory_lets_a_rank_reuse_freed_pages_without_faulting_them_in_again():
    # runtime.launch's CPU ranks (and the profiler's): what a step frees, the next allocation reuses, as on CUDA.
    pages = 10 * 40_000_000 // 4096
    env = {**os.environ, "GLIBC_TUNABLES": ""}
    got = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, env=env, check=True)
        kept, libc, faults = out.stdout.split()
        got[mode] = (kept, libc, int(faults))
    if got["keep"][1] != "glibc":  # elsewhere it says it could not and changes nothing
        assert got["keep"][0] == "False"
        return
    assert got["keep"][0] == "True"
    # glibc's default maps each 40 MB block afresh, and every page faults in again (4 KiB pages: about `pages`;
    # fewer where transparent huge pages are always on); kept, almost none does.
    assert got["default"][2] > 0.9 * pages or _huge_pages_always(), got
    assert got["keep"][2] < 0.1 * got["default"][2] and got["keep"][2] < 0.02 * pages, got


def _huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False
