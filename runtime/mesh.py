"""The one place process groups are made: a DeviceMesh with dims (pp, dp, cp, tp) (planner.plan.MESH_DIMS), its
1-D submeshes, and the flattened (dp, cp) mesh that data parallelism runs over.

tp is the innermost dim, so the ranks of a tensor-parallel group are consecutive (inside one node when
tp <= GPUs per node); then cp, dp, and pp outermost: rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank.
Everything else receives one of the 1-D meshes below as an argument.

Context parallelism cuts the sequence, not the weights: every weight is replicated over dp and cp alike, so the
gradient reduction and every ZeRO shard run over the dp * cp ranks of one (pp, tp) coordinate, the flattened
`replicas` mesh (torchtitan's dp_shard_cp, made by the same DeviceMesh flattening)."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from planner.plan import MESH_DIMS


@dataclass(frozen=True)
class Meshes:
    world: DeviceMesh
    """The 4-D (pp, dp, cp, tp) mesh over every rank."""
    pp: DeviceMesh
    dp: DeviceMesh
    cp: DeviceMesh
    tp: DeviceMesh
    replicas: DeviceMesh
    """dp and cp flattened into one 1-D mesh (dp * cp ranks): the ranks that hold the same weights."""


def build_mesh(*, pp: int, dp: int, cp: int = 1, tp: int, device_type: str) -> Meshes:
    """The (pp, dp, cp, tp) mesh over the default process group, which must already be initialised, and its 1-D
    submeshes. Every rank calls it once, in the same order (flattening creates a process group)."""
    world = init_device_mesh(device_type, (pp, dp, cp, tp), mesh_dim_names=MESH_DIMS)
    # Kept as the object _flatten returns: slicing a flattened dim back out of the root mesh is deprecated.
    replicas = world["dp", "cp"]._flatten("dp_cp")
    return Meshes(world, *(world[d] for d in ("pp", "dp", "cp", "tp")), replicas)
