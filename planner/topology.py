"""The cluster as a networkx graph, the rank layout, and the link a process group runs over.

Graph: each device hangs off its node's switch (NVLink/NVSwitch, shared memory for CPU ranks), or on a node
without one (ClusterSpec.intra_node_topology 'mesh') has a direct link to each other device of it, and off its own
NIC; the NICs meet in one fabric. A group's bandwidth is set by the slowest link any hop of its ring crosses, its
latency by the slowest hop."""

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
    G, mesh = cluster.gpus_per_node, cluster.intra_node_topology == "mesh"
    for n in range(cluster.nodes):
        for d in range(G):
            if not mesh:
                g.add_edge(("gpu", n, d), ("switch", n), bandwidth_GBps=intra.bandwidth_GBps, latency_us=intra.latency_us / 2)
            for e in range(d + 1, G) if mesh else ():
                # One direct link to each other device (an HGX H100/H200 4-GPU board: 6 of a GPU's 18 NVLinks), one hop.
                g.add_edge(("gpu", n, d), ("gpu", n, e), bandwidth_GBps=intra.bandwidth_GBps, latency_us=intra.latency_us)
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


def group_link(cluster: ClusterSpec, ranks: tuple[int, ...]) -> LinkSpec:
    """The link a ring over `ranks` runs at: its slowest hop's bandwidth and latency.

    A group with k members on each node leaves a node through k NICs: NCCL runs one ring per NIC
    (channel), each carrying 1/k of the data across the node boundary, so a hop between nodes runs
    at k times one NIC (capped by the node's NIC count). Without this, a 32-way data-parallel
    all-reduce over 4 DGX nodes would be priced 8x too slow. Likewise on a mesh node a hop between two of its
    k members runs at k - 1 times their direct link: NCCL's rings (channels) spread over every direct link
    among the members (in K4, the six directed Hamiltonian rings at half rate each load all twelve links)."""
    if len(ranks) < 2:
        return LinkSpec(bandwidth_GBps=float("inf"), latency_us=0.0)
    per_node: dict[int, int] = {}
    for r in ranks:
        per_node[r // cluster.gpus_per_node] = per_node.get(r // cluster.gpus_per_node, 0) + 1
    nics = min(min(per_node.values()), cluster.gpus_per_node)
    direct = max(1, min(per_node.values()) - 1) if cluster.intra_node_topology == "mesh" else 1
    bw, lat = float("inf"), 0.0
    G = cluster.gpus_per_node
    # By symmetry a hop depends only on the local indices and whether the nodes differ: a dp ring of thousands
    # of ranks has a handful of kinds of hop.
    for a, b, across in {(a % G, b % G, a // G != b // G) for a, b in zip(ranks, ranks[1:] + ranks[:1])}:
        hb, hl = _hop(cluster, a, b + G * across)
        bw, lat = min(bw, hb * nics if across else hb * direct), max(lat, hl)
    return LinkSpec(bandwidth_GBps=bw, latency_us=lat)


def tp_group(tp: int, dp: int) -> tuple[int, ...]:
    return tuple(rank_of(0, 0, i, dp, tp) for i in range(tp))


def dp_group(tp: int, dp: int) -> tuple[int, ...]:
    return tuple(rank_of(0, i, 0, dp, tp) for i in range(dp))


def pp_pair(stage: int, tp: int, dp: int, pp: int) -> tuple[int, int]:
    """Ranks of pipeline neighbours stage -> stage+1 (device indices mod pp)."""
    return rank_of(stage % pp, 0, 0, dp, tp), rank_of((stage + 1) % pp, 0, 0, dp, tp)


def _slowest(cluster: ClusterSpec, group: tuple[int, ...], shifts: set[int]) -> LinkSpec:
    """The slowest of the groups `group` shifted by each of `shifts`: the groups of a kind run in step, so the
    slowest sets the pace. A shift by a whole node changes no hop, so shifts are taken modulo gpus_per_node; the
    first group alone stands for all only where the groups line up with the nodes (a tp 4 group on 6-GPU nodes,
    or a dp 3 group of tp 2 on 8, straddles two nodes in some places and not others)."""
    links = [group_link(cluster, tuple(r + s for r in group)) for s in sorted(shifts)]
    return LinkSpec(bandwidth_GBps=min(x.bandwidth_GBps for x in links), latency_us=max(x.latency_us for x in links))


def _shifts(cluster: ClusterSpec, steps: tuple[tuple[int, int], ...]) -> set[int]:
    """Every start offset sum_i j_i * step_i (j_i < count_i), modulo gpus_per_node, for (count, step) pairs."""
    G, out = cluster.gpus_per_node, {0}
    for count, step in steps:
        out = {(o + j * step) % G for o in out for j in range(min(count, G))}
    return out


# The search asks for the same links thousands of times.
@lru_cache(maxsize=4096)
def tp_link(cluster: ClusterSpec, tp: int) -> LinkSpec:
    return _slowest(cluster, tp_group(tp, 1), _shifts(cluster, ((cluster.gpus // tp, tp),)))


@lru_cache(maxsize=4096)
def dp_link(cluster: ClusterSpec, tp: int, dp: int) -> LinkSpec:
    """The ranks dp apart by tp: one group per tp rank (offset t) and per block of dp x tp ranks."""
    return _slowest(cluster, dp_group(tp, dp), _shifts(cluster, ((tp, 1), (cluster.gpus // (dp * tp), dp * tp))))


@lru_cache(maxsize=4096)
def cp_link(cluster: ClusterSpec, tp: int, cp: int) -> LinkSpec:
    """A context-parallel group: cp ranks, tp apart (rank_of's layout)."""
    return dp_link(cluster, tp, cp)


@lru_cache(maxsize=4096)
def pp_links(cluster: ClusterSpec, tp: int, dp: int, pp: int) -> tuple[LinkSpec, ...]:
    """Link from pipeline device i to device i+1 (mod pp), for each i: the slowest over the dp x tp pipelines."""
    shifts = _shifts(cluster, ((dp * tp, 1),))
    return tuple(_slowest(cluster, pp_pair(i, tp, dp, pp), shifts) for i in range(pp))
