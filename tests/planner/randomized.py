"""Random planning problems small enough to price every candidate: for the search's exactness tests."""

from __future__ import annotations

import dataclasses
import random

from planner.cost import FRAMEWORKS
from planner.terms import MEGATRON_CORE
from planner.specs import ClusterSpec, LinkSpec, load_device, model_from_dict

DEVICES = ("a100-sxm4-80gb", "h100-sxm5-80gb", "cpu")


def random_problem(seed: int) -> dict:
    """Model, cluster, device (its memory from ample to too small for anything), batch, pins, framework,
    headroom and top-k, drawn from one seed."""
    rng = random.Random(seed)
    heads = rng.choice([1, 2, 4, 8, 16])
    hidden = heads * rng.choice([16, 32, 64, 128])
    model = model_from_dict({"name": f"random-{seed}", "layers": rng.randint(2, 12), "hidden": hidden, "heads": heads,
                             "ffn_hidden": hidden * rng.choice([1, 2, 4]), "seq_len": rng.choice([64, 256, 1024, 2048]),
                             "vocab": rng.choice([500, 8192, 50257])}, "random")
    device = load_device(rng.choice(DEVICES))
    nodes, per_node = rng.choice([(1, 1), (1, 2), (1, 4), (1, 8), (2, 1), (2, 2), (2, 4), (3, 2)])
    cluster = ClusterSpec("random", nodes, per_node, device.name,
                          LinkSpec(rng.choice([10.0, 100.0, 300.0]), rng.choice([1.0, 5.0, 20.0])),
                          LinkSpec(rng.choice([1.0, 12.5, 25.0]), rng.choice([5.0, 10.0, 50.0])))
    # Memory from ample to too small for anything: around what the model's state and one sequence's
    # activations per device take, beyond the framework's overhead and the headroom.
    gpus, batch = nodes * per_node, rng.choice([1, 2, 4, 6, 8, 12, 16, 24, 32, 64])
    need_gib = (model.params() * 16 + model.layers * 34 * model.seq_len * hidden * 2 * max(1, batch // gpus)) / gpus / 2**30
    headroom = rng.choice([0.0, 0.1, 1.0])
    memory = device.framework_overhead_gib + headroom + need_gib * rng.choice([0.2, 0.5, 1.0, 2.0, 100.0])
    device = dataclasses.replace(device, memory_gib=round(memory, 4))
    pins = {}
    if rng.random() < 0.3:
        pins["recompute"] = rng.choice(["none", "selective", "full"])
    if rng.random() < 0.2:
        pins["schedule"] = rng.choice(["1f1b", "gpipe", "interleaved"])
    if rng.random() < 0.2 and heads % 2 == 0:
        pins["tp"] = rng.choice([1, 2])
    framework, top = FRAMEWORKS[rng.choice(["meshplan", "meshplan", "megatron", "deepspeed"])], rng.choice([1, 3, 5])
    # Drawn last, so that the problems above stay those of their seeds: FP8 on an FP8 device, under meshplan's
    # runtime or Megatron-Core (its FP8 weights primary, or bf16 weights beside Transformer Engine's FP8 copies).
    if device.fp8_peak_tflops and rng.random() < 0.4:
        pins["precision"] = "fp8"
        framework = rng.choice([framework, MEGATRON_CORE, dataclasses.replace(MEGATRON_CORE, fp8_primary_weights=False)])
    return {"model": model, "cluster": cluster, "device": device, "global_batch": batch,
            "pins": pins, "framework": framework, "memory_headroom_gib": headroom, "top": top}
