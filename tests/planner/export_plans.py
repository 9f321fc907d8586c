"""Plans to export (tests and tests/data/upstream.py): priced by the planner, with the stage splits each export
path has to handle."""

from __future__ import annotations

import dataclasses
import functools

from planner.cost import predict
from planner.plan import Knobs, Plan, Stage, with_id
from planner.specs import load_cluster, load_device, load_model


def priced(model: str, cluster: str, nodes: int, knobs: Knobs, global_batch: int, blocks: list[int] | None = None,
           recompute_layers: list[int | None] | None = None) -> Plan:
    """A plan from planner.cost.predict, with this many blocks per stage (and full-recompute counts) if given."""
    spec, c = load_model(model), load_cluster(cluster, nodes)
    stages = None
    if blocks:
        rl = recompute_layers or [None] * len(blocks)
        edges = [sum(blocks[:i]) for i in range(len(blocks) + 1)]
        stages = tuple(Stage((edges[i], edges[i + 1]), i == 0, i == len(blocks) - 1,
                             "full" if rl[i] is not None else knobs.recompute, rl[i]) for i in range(len(blocks)))
    plan, _ = predict(spec, c, load_device(c.device), knobs, global_batch, stages=stages)
    return with_id(plan)


@functools.cache
def gpt3_175b_best() -> Plan:
    """The README's plan: planner plan --model gpt3-175b --cluster dgx-a100-80gb --nodes 64 --global-batch 1536."""
    from planner.search import search

    model, cluster = load_model("gpt3-175b"), load_cluster("dgx-a100-80gb", 64)
    return search(model, cluster, load_device(cluster.device), 1536, top=1).plans[0]


def example_plans() -> dict[str, Plan]:
    return {
        "gpt3-175b-best": gpt3_175b_best(),
        # tp2 x pp2 interleaved (v=2), SP, distributed optimizer, selective recomputation: even chunks
        "tp2-pp2-interleaved": priced("gpt3-1.3b", "dgx-a100-80gb", 1, Knobs(2, 2, 2, 2, "interleaved", 2, "selective", True, True), 64),
        # uneven first and last stages (Megatron-LM: --decoder-first/last-pipeline-num-layers), partial recompute
        "pp4-uneven-first-last": priced("gpt3-1.3b", "dgx-a100-80gb", 1, Knobs(2, 4, 1, 1, "1f1b", 1, "none"), 32,
                                        blocks=[5, 7, 7, 5], recompute_layers=[2, 3, None, None]),
        # uneven inside the pipeline and interleaved: only a layout string says it
        "pp2-v2-uneven-layout": priced("gpt3-1.3b", "dgx-a100-80gb", 1, Knobs(1, 2, 4, 1, "interleaved", 2, "full"), 64,
                                       blocks=[5, 7, 6, 6]),
        # a Llama-family model (GQA, SwiGLU, RMSNorm, RoPE, untied, no biases) with context parallelism, the
        # distributed optimizer and FP8 on H100s
        "llama3-8b-tp2-cp2-fp8": priced("llama3-8b", "dgx-h100-80gb", 1, Knobs(2, 1, 2, 1, "1f1b", 1, "selective", True, 1, cp=2,
                                                                               precision="fp8"), 64),
        # rope_theta 1e6 (Mistral, Qwen2), pipelined with full recomputation: Megatron-LM's --rotary-base is an int
        "mistral-7b-tp2-pp2": priced("mistral-7b", "dgx-h100-80gb", 1, Knobs(2, 2, 2, 1, "1f1b", 1, "full", True, 1), 64),
    }


def without(plan: Plan, **changes) -> Plan:
    return with_id(dataclasses.replace(plan, **changes))
