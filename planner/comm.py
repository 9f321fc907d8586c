"""Collective and point-to-point times for a group on a link (alpha-beta model of ring algorithms).

Bytes are the full message per rank (e.g. the whole gradient for an all-reduce); bandwidth_GBps is
per device, per direction. COLLECTIVE_EFFICIENCY is the fraction of that bandwidth NCCL's rings reach
(nccl-tests report ~230 GB/s bus bandwidth for all-reduce on DGX A100's 300 GB/s NVLink, and ~20 of
25 GB/s per HDR NIC)."""

from __future__ import annotations

import math

from planner.specs import LinkSpec

COLLECTIVE_EFFICIENCY = 0.8


def _beta_s(nbytes: float, link: LinkSpec) -> float:
    return nbytes / (link.bandwidth_GBps * 1e9 * COLLECTIVE_EFFICIENCY)


# Thakur, Rabenseifner & Gropp 2005, "Optimization of Collective Communication Operations in MPICH":
# ring all-reduce sends 2(n-1)/n of the message per rank in 2(n-1) steps; all-gather and
# reduce-scatter send (n-1)/n in n-1 steps.
def all_reduce_s(nbytes: float, n: int, link: LinkSpec) -> float:
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * _beta_s(nbytes, link) + 2 * (n - 1) * link.latency_us * 1e-6


def all_gather_s(nbytes: float, n: int, link: LinkSpec) -> float:
    """nbytes is the gathered (full) size."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * _beta_s(nbytes, link) + (n - 1) * link.latency_us * 1e-6


def reduce_scatter_s(nbytes: float, n: int, link: LinkSpec) -> float:
    """nbytes is the unreduced (full) size."""
    return all_gather_s(nbytes, n, link)


def scalar_all_reduce_s(n: int, link: LinkSpec) -> float:
    """A reduction of a few bytes (the global gradient norm) over n ranks: latency-bound, and NCCL (tree) and
    gloo (recursive doubling) take about 2 log2(n) hops for it, not the ring's 2(n - 1) (Sanders, Speck and
    Traff 2009, "Two-tree algorithms for full bandwidth broadcast, reduction and scan")."""
    if n <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(n)) * link.latency_us * 1e-6


def send_recv_s(nbytes: float, link: LinkSpec) -> float:
    return nbytes / (link.bandwidth_GBps * 1e9) + link.latency_us * 1e-6


def overlapped_param_gather_exposed_s(gather_s: float, chunk_forward_s: tuple[float, ...], pp: int, m: int) -> float:
    """Seconds of the distributed optimizer's weight all-gather (gather_s for the device's weights) that its
    overlap with the step's first forward leaves exposed. Megatron-Core core_r0.8.0
    megatron/core/optimizer/distrib_optimizer.py: zero_grad() dispatches the first bucket's all-gather, and each
    bucket's forward pre-hook waits for it and only then dispatches the next one (not all at once, so as not to
    block compute under CUDA_DEVICE_MAX_CONNECTIONS=1): the gathers run one after another under the first
    forward that reaches each bucket. A device with v model chunks (chunk_forward_s, one microbatch each) runs
    chunk c's first forward after c * min(pp, m) forwards of earlier chunks (the interleaved schedule's warm-up
    takes pp microbatches through a chunk before the next); chunk c's weights, (c + 1) / v of gather_s, must
    have arrived by the end of that forward. The exposed seconds are the worst shortfall over the chunks."""
    v = len(chunk_forward_s)
    if v == 0 or gather_s <= 0.0:
        return 0.0
    f = sum(chunk_forward_s) / v
    return max(0.0, max((c + 1) * gather_s / v - (c * min(pp, m) + 1) * f for c in range(v)))
