"""The cluster as a networkx graph, the rank layout, and the link a process group runs over.

Graph: each device hangs off its node's switch (NVLink/NVSwitch, shared memory for CPU ranks) and
off its own NIC, the NICs meet in one fabric. A group's bandwidth is set by the slowest link any
hop of its ring crosses, its latency by the slowest hop."""

from __future__ import annotations

from functools import lru_cache

import networkx as nx

from planner.specs import ClusterSpec, LinkSpec


@lru_cache(maxsize=16)
def cluster_graph(cluster: ClusterSpec) -> nx.Graph:
    """Devices ('gpu', n, g), node switches ('switch', n), NICs ('nic', n, g) and one ('fabric',)."""
    g = nx.Graph()
    intra, inter = cluster.intra_node, cluster.inter_node
    # Two hops device->switch->device, four device->NIC->fabric->NIC->device; the latencies split so
    # that a whole path adds up to the spec's one-way figure.
    for n in range(cluster.nodes):
        for d in range(cluster.gpus_per_node):
            g.add_edge(("gpu", n, d), ("switch", n), bandwidth_GBps=intra.bandwidth_GBps, latency_us=intra.latency_us / 2)
            if cluster.nodes > 1:
                g.add_edge(("gpu", n, d), ("nic", n, d), bandwidth_GBps=inter.bandwidth_GBps, latency_us=inter.latency_us / 4)
                g.add_edge(("nic", n, d), ("fabric",), bandwidth_GBps=inter.bandwidth_GBps, latency_us=inter.latency_us / 4)
    return g


def device_of(cluster: ClusterSpec, rank: int) -> tuple[str, int, int]:
    return ("gpu", rank // cluster.gpus_per_node, rank % cluster.gpus_per_node)


def rank_of(pp_idx: int, dp_idx: int, tp_idx: int, dp: int, tp: int) -> int:
    """Rank layout (pp, dp, tp) with tp innermost, the order of the runtime's DeviceMesh dims. With context
    parallelism the mesh is (pp, dp, cp, tp): pass dp * cp as dp and dp_i * cp + cp_i as dp_idx, so that a cp
    group is tp-strided and consecutive, and dp x cp (the ranks that share weights) is one group."""
    return (pp_idx * dp + dp_idx) * tp + tp_idx


@lru_cache(maxsize=4096)
def _hop(cluster: ClusterSpec, a: int, b: int) -> tuple[float, float]:
    """(bandwidth_GBps, latency_us) of the path between ranks a and b: min bandwidth, summed latency.

    Hops are memoised by what determines them (same node or not, and the local indices), so a
    3,072-device cluster asks networkx for a handful of paths, not thousands."""
    if a == b:
        return float("inf"), 0.0
    g = cluster_graph(cluster)
    path = nx.shortest_path(g, device_of(cluster, a), device_of(cluster, b))
    edges = [g.edges[u, v] for u, v in zip(path, path[1:])]
    return min(e["bandwidth_GBps"] for e in edges), sum(e["latency_us"] for e in edges)


def _canonical(cluster: ClusterSpec, a: int, b: int) -> tuple[int, int]:
    # By symmetry, a hop depends only on the local indices and whether the nodes differ.
    G = cluster.gpus_per_node
    na, nb = a // G, b // G
    return a % G, (b % G) + (G if na != nb else 0)


def group_link(cluster: ClusterSpec, ranks: tuple[int, ...]) -> LinkSpec:
    """The link a ring over `ranks` runs at: its slowest hop's bandwidth and latency.

    A group with k members on each node leaves a node through k NICs: NCCL runs one ring per NIC
    (channel), each carrying 1/k of the data across the node boundary, so a hop between nodes runs
    at k times one NIC (capped by the node's NIC count). Without this, a 32-way data-parallel
    all-reduce over 4 DGX nodes would be priced 8x too slow."""
    if len(ranks) < 2:
        return LinkSpec(bandwidth_GBps=float("inf"), latency_us=0.0)
    per_node: dict[int, int] = {}
    for r in ranks:
        per_node[r // cluster.gpus_per_node] = per_node.get(r // cluster.gpus_per_node, 0) + 1
    nics = min(min(per_node.values()), cluster.gpus_per_node)
    bw, lat = float("inf"), 0.0
    for a, b in zip(ranks, ranks[1:] + ranks[:1]):
        ca, cb = _canonical(cluster, a, b)
        hb, hl = _hop(cluster, ca, cb)
        if a // cluster.gpus_per_node != b // cluster.gpus_per_node:
            hb *= nics
        bw, lat = min(bw, hb), max(lat, hl)
    return LinkSpec(bandwidth_GBps=bw, latency_us=lat)


def tp_group(tp: int, dp: int) -> tuple[int, ...]:
    return tuple(rank_of(0, 0, i, dp, tp) for i in range(tp))


def dp_group(tp: int, dp: int) -> tuple[int, ...]:
    return tuple(rank_of(0, i, 0, dp, tp) for i in range(dp))


def pp_pair(stage: int, tp: int, dp: int, pp: int) -> tuple[int, int]:
    """Ranks of pipeline neighbours stage -> stage+1 (device indices mod pp)."""
    return rank_of(stage % pp, 0, 0, dp, tp), rank_of((stage + 1) % pp, 0, 0, dp, tp)


# The groups of one layout are alike up to a shift, so the first of each kind stands for all; the
# search asks for the same few thousands of times.
@lru_cache(maxsize=4096)
def tp_link(cluster: ClusterSpec, tp: int) -> LinkSpec:
    return group_link(cluster, tp_group(tp, 1))


@lru_cache(maxsize=4096)
def dp_link(cluster: ClusterSpec, tp: int, dp: int) -> LinkSpec:
    return group_link(cluster, dp_group(tp, dp))


@lru_cache(maxsize=4096)
def cp_link(cluster: ClusterSpec, tp: int, cp: int) -> LinkSpec:
    """A context-parallel group: cp ranks, tp apart (rank_of's layout)."""
    return dp_link(cluster, tp, cp)


@lru_cache(maxsize=4096)
def pp_links(cluster: ClusterSpec, tp: int, dp: int, pp: int) -> tuple[LinkSpec, ...]:
    """Link from pipeline device i to device i+1 (mod pp), for each i."""
    return tuple(group_link(cluster, pp_pair(i, tp, dp, pp)) for i in range(pp))
