"""runtime.machine: what the machine's other work cost a run, measured by the scheduler; the ports groups meet on."""

import os
import socket
import subprocess
import sys
import time

from runtime.machine import free_port, run_queue_wait_s

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
            p.wait()
    # Its wall time is the time it ran plus the time it waited (a few ms of accounting slack).
    assert waited > 0.2 and abs(wall - (ran + waited)) < 0.1 * wall, (waited, ran, wall)


def test_free_port_is_below_the_ephemeral_range_listenable_and_never_repeated():
    # CI once failed 14 tests on EADDRINUSE: a port the kernel picked (an ephemeral one) was handed, before the
    # store bound it, to another socket as its local port. Ports below the range are never handed out that way.
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    # Sockets that hold many ephemeral ports meanwhile, as a running group's connections do.
    held = [socket.create_server(("127.0.0.1", 0)) for _ in range(50)]
    try:
        ports = [free_port() for _ in range(200)]
    finally:
        for s in held:
            s.close()
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p < low for p in ports), sorted(ports)[-3:]
    with socket.create_server(("127.0.0.1", ports[-1])):  # free: a store can listen on it
        pass
