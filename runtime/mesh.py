"""The one place process groups are made: a DeviceMesh with dims (pp, dp, tp).

tp is the innermost dim, so the ranks of a tensor-parallel group are consecutive (inside one node when
tp <= GPUs per node); dp comes next and pp is outermost: rank = (pp_rank * dp + dp_rank) * tp + tp_rank.
Everything else receives mesh["pp"], mesh["dp"] or mesh["tp"] as an argument."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp", "tp")


def build_mesh(pp: int, dp: int, tp: int, device_type: str) -> DeviceMesh:
    """A (pp, dp, tp) mesh over the default process group, which must already be initialised."""
    return init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=MESH_DIMS)
