"""What the pins (the knobs a user gave `planner plan`) mean, and why they admit no configuration when they admit none.
planner/search.py enumerates what they allow; planner/cli.py reads them."""

from __future__ import annotations

import math

from planner.cost import check_knobs
from planner.errors import PlanError, SpecError
from planner.plan import Knobs
from planner.specs import ClusterSpec, ModelSpec, nodes_x


def zero_pins(pins: dict) -> dict:
    """The pins with distributed_optimizer (the flag of old) as the ZeRO stage it means: on is 1, off is 0."""
    if "distributed_optimizer" not in pins:
        return pins
    pins = dict(pins)
    dist_opt = pins.pop("distributed_optimizer")
    if "zero" in pins and (pins["zero"] >= 1) != dist_opt:
        raise SpecError("--distributed-optimizer", "distributed_optimizer", f"{'on' if dist_opt else 'off'} contradicts --zero "
                        f"{pins['zero']} (it means --zero 1, or --zero 0 when off); give one of them")
    pins.setdefault("zero", 1 if dist_opt else 0)
    return pins


def explain_empty(model: ModelSpec, cluster: ClusterSpec, global_batch: int, pins: dict) -> None:
    """No configuration is consistent with the pins: say which constraint rules them out."""
    pins = zero_pins(pins)
    given = {k: pins[k] for k in ("tp", "cp", "pp", "dp") if k in pins}  # named as given, none filled in
    product, every = math.prod(given.values()), len(given) == 4
    if given and (cluster.gpus % product or (every and product != cluster.gpus)):
        names = " x ".join(f"{k} {v}" for k, v in given.items()) + (f" = {product}" if len(given) > 1 else "")
        raise PlanError(f"{names} does not {'equal' if every else 'divide'} the cluster's {cluster.gpus} devices "
                        f"({nodes_x(cluster.nodes, cluster.gpus_per_node)}); pin degrees whose product {'is' if every else 'divides'} {cluster.gpus}")
    if "micro_batch" in pins and global_batch % pins["micro_batch"]:
        raise SpecError("configuration", "micro_batch", f"global batch {global_batch} is not divisible by micro_batch "
                                                        f"{pins['micro_batch']}; pick a micro-batch that divides it")
    tp, cp, pp = pins.get("tp", 1), pins.get("cp", 1), pins.get("pp", 1)
    knobs = Knobs(tp, pp, pins.get("dp", cluster.gpus // (tp * cp * pp) or 1),
                  pins.get("micro_batch", 1), pins.get("schedule", "1f1b"), pins.get("virtual_stages", 1),
                  pins.get("recompute", "none"), pins.get("sequence_parallel", False), pins.get("zero", 0), cp,
                  pins.get("precision", "bf16"), pins.get("compile", False))
    check_knobs(model, cluster, knobs, global_batch)
    raise PlanError(f"no configuration of {model.name} on {cluster.gpus} devices with global batch {global_batch} satisfies "
                    f"{', '.join(f'{k}={v}' for k, v in pins.items()) or 'the constraints'}: the global batch must divide by "
                    f"micro_batch x dp, and tp x cp x pp x dp must equal the device count")
