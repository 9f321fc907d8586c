"""Hand-written plan.json files for runtime tests (until the planner writes them)."""

from __future__ import annotations

import json
from pathlib import Path

TINY = {"name": "test-tiny", "layers": 4, "hidden": 64, "heads": 4, "ffn_hidden": 256, "seq_len": 32, "vocab": 256}
CLUSTER = {"name": "local-cpu", "nodes": 1, "gpus_per_node": 4, "device": "cpu",
           "intra_node": {"bandwidth_GBps": 2.0, "latency_us": 50.0},
           "inter_node": {"bandwidth_GBps": 1.0, "latency_us": 100.0}}


def even_stages(layers: int, n: int, recompute: str = "none") -> list[list[int]]:
    edges = [round(i * layers / n) for i in range(n + 1)]
    return [[edges[i], edges[i + 1]] for i in range(n)]


def plan_dict(*, tp=1, pp=1, dp=1, micro_batch=2, num_microbatches=4, schedule="1f1b", virtual_stages=1,
              sequence_parallel=False, distributed_optimizer=False, layers=None, recompute="none",
              recompute_layers=None, model=None) -> dict:
    """A version-1 plan; `layers` gives the [first, last) range of each stage (even split by default)."""
    model = dict(model or TINY)
    n = pp * virtual_stages
    ranges = layers or even_stages(model["layers"], n)
    stages = [{"layers": list(r), "embedding": i == 0, "head": i == n - 1, "recompute": recompute,
               "recompute_layers": recompute_layers, "memory_gib": 0.0} for i, r in enumerate(ranges)]
    return {"version": 1, "id": f"t{tp}p{pp}d{dp}", "created_by": "meshplan tests", "model": model,
            "cluster": CLUSTER, "global_batch": micro_batch * num_microbatches * dp, "micro_batch": micro_batch,
            "num_microbatches": num_microbatches, "tp": tp, "pp": pp, "dp": dp, "schedule": schedule,
            "virtual_stages": virtual_stages, "sequence_parallel": sequence_parallel,
            "distributed_optimizer": distributed_optimizer, "stages": stages, "prediction": None,
            "profile": "cpu (datasheet)"}


def write_plan(path: Path, **knobs) -> Path:
    path = Path(path)
    path.write_text(json.dumps(plan_dict(**knobs)))
    return path
