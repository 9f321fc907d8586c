"""Hand-written plan.json files for runtime tests (until the planner writes them)."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

TINY = {"name": "test-tiny", "layers": 4, "hidden": 64, "heads": 4, "ffn_hidden": 256, "seq_len": 32, "vocab": 256}
CLUSTER = {"name": "local-cpu", "nodes": 1, "gpus_per_node": 4, "device": "cpu",
           "intra_node": {"bandwidth_GBps": 2.0, "latency_us": 50.0},
           "inter_node": {"bandwidth_GBps": 1.0, "latency_us": 100.0}}


def even_stages(layers: int, n: int) -> list[list[int]]:
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
    return {"version": 1, "id": "", "created_by": "meshplan tests", "model": model,
            "cluster": CLUSTER, "global_batch": micro_batch * num_microbatches * dp, "micro_batch": micro_batch,
            "num_microbatches": num_microbatches, "tp": tp, "pp": pp, "dp": dp, "schedule": schedule,
            "virtual_stages": virtual_stages, "sequence_parallel": sequence_parallel,
            "distributed_optimizer": distributed_optimizer, "stages": stages, "prediction": None,
            "profile": "cpu (datasheet)"}


def write_plan(path: Path, **knobs) -> Path:
    path = Path(path)
    path.write_text(json.dumps(plan_dict(**knobs)))
    return path


# ---------------------------------------------------------------- running plans on spawned ranks

PARITY_STEPS = 4
"""Steps each parallel layout runs in the parity tests."""
REFERENCE_STEPS = 30
"""Steps of the single-process reference run (its first PARITY_STEPS losses are the parity reference)."""


def launch(*argv) -> int:
    """Runs on each spawned rank: the real front door, runtime.launch.cli, with these arguments."""
    from runtime.launch import cli

    return cli([str(a) for a in argv])


def last_result(path: Path) -> dict:
    return json.loads(Path(path).read_text().splitlines()[-1])


def run_layout(tmp: Path, steps: int = PARITY_STEPS, extra: tuple = (), **knobs) -> dict:
    """Write a plan with these knobs, run it on tp*pp*dp spawned ranks, return its results line."""
    from tests.conftest import run_on_ranks

    tmp = Path(tmp)
    plan = write_plan(tmp / "plan.json", **knobs)
    results = tmp / "results.jsonl"
    world = knobs.get("tp", 1) * knobs.get("pp", 1) * knobs.get("dp", 1)
    codes = run_on_ranks(launch, world, plan, "--steps", steps, "--results", results, *extra)
    assert codes == [0] * world, codes
    return last_result(results)


@functools.lru_cache(maxsize=None)
def reference_losses() -> tuple[float, ...]:
    """The single-process run of the test model (global batch 8), computed once per test session."""
    return tuple(run_layout(Path(tempfile.mkdtemp(prefix="meshplan-ref-")), steps=REFERENCE_STEPS)["losses"])


def max_relative_difference(a, b) -> float:
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))
