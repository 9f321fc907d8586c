"""DeepSpeed's engine terms (planner/deepspeed.py): each is the size its source says, where its source says, and
none of them ever shortens a prediction (so the search's bounds stay lower bounds)."""

import dataclasses
import random

import pytest

from planner import comm
from planner.compute import memory_s
from planner.cost import DEEPSPEED, MEGATRON, CostModel, predict, stage_cost_list, uniform_stages
from planner.deepspeed import REGATHER_PASSES, deepspeed_extras
from planner.plan import Knobs
from planner.search import enumerate_knobs
from planner.specs import load_cluster, load_device, load_model
from planner.topology import dp_link, pp_links, tp_link
from tests.planner.randomized import random_problem

A100 = load_device("a100-sxm4-80gb")
MTNLG = load_model("mt-nlg-530b")
# MT-NLG on 280 DGX A100 nodes as published (Smith et al. 2022, section 2.4).
CLUSTER = load_cluster("dgx-a100-80gb", nodes=280)
KNOBS = Knobs(8, 35, 8, 1, "1f1b", 1, "full", False, True)
WITHOUT = dataclasses.replace(DEEPSPEED, grad_accumulate_bytes=0.0, deepspeed_pipe=False)


def extras(framework=DEEPSPEED, knobs=KNOBS, cluster=CLUSTER):
    cm = CostModel(MTNLG, cluster, A100, framework)
    costs = stage_cost_list(cm, knobs, uniform_stages(MTNLG, knobs.pp, knobs.recompute))
    return cm, costs, deepspeed_extras(cm, knobs, costs)


def test_each_tp_rank_sends_one_tp_slice_of_the_activation_across_nodes():
    cm, _, _ = extras()
    activation = 2048 * MTNLG.hidden * A100.dtype_bytes  # (s, b=1, h) in bf16
    assert cm.p2p_s(KNOBS)[0] == pytest.approx(comm.send_recv_s(activation / 8, CLUSTER.inter_node), rel=1e-12)


def test_interior_stages_regather_three_messages_and_the_ends_fewer():
    cm, _, ex = extras()
    activation = 2048 * MTNLG.hidden * A100.dtype_bytes
    gather = comm.all_gather_s(activation, 8, tp_link(CLUSTER, 8)) + memory_s(A100, REGATHER_PASSES * activation / 2)
    meta = comm.send_recv_s(128, pp_links(CLUSTER, 8, 8, 35)[0])
    # Forward: the received input; backward: the stage's own output and the received gradient. A metadata
    # message before each of the four sends of an interior stage, two at either end.
    assert ex.regather_s[17] == pytest.approx(3 * gather + 4 * meta, rel=1e-9)
    assert ex.regather_s[0] == pytest.approx(2 * gather + 2 * meta, rel=1e-9)
    assert ex.regather_s[-1] == pytest.approx(gather + 2 * meta, rel=1e-9)


def test_fp32_accumulation_adds_12_bytes_per_parameter_to_every_backward():
    _, costs, ex = extras()
    for c, with_terms, acc in zip(costs, ex.stage_costs, ex.accumulate_s):
        assert acc == pytest.approx(12 * c.params / (A100.memory_bandwidth_GBps * 1e9 * A100.memory_efficiency), rel=1e-12)
    for c, with_terms, acc, regather in zip(costs, ex.stage_costs, ex.accumulate_s, ex.regather_s):
        added = with_terms.forward_s + with_terms.backward_s - c.forward_s - c.backward_s
        assert added == pytest.approx(acc + regather, rel=1e-12)
        assert with_terms.backward_s - c.backward_s >= acc
    # About 14 ms per microbatch for a stage of three 530B blocks (1.9e9 parameters on each tp rank).
    assert 0.012 < ex.accumulate_s[17] < 0.016


def test_zero1_all_reduces_where_megatron_reduce_scatters_and_the_ends_reduce_the_tied_embedding():
    cm, costs, ex = extras()
    n, link = 8, dp_link(CLUSTER, 8, 8)
    g = costs[17].params * 4
    assert ex.tail_s[17] == pytest.approx(comm.all_reduce_s(g, n, link) - comm.reduce_scatter_s(g, n, link), rel=1e-12)
    table = MTNLG.padded_vocab(8) * MTNLG.hidden / 8 * 4
    tied = comm.all_reduce_s(table, 2, pp_links(CLUSTER, 8, 8, 35)[34])
    g0 = costs[0].params * 4
    assert ex.tail_s[0] == pytest.approx(comm.all_reduce_s(g0, n, link) - comm.reduce_scatter_s(g0, n, link) + tied, rel=1e-12)


def test_without_pipeline_or_tensor_parallelism_nothing_is_regathered():
    one_node = load_cluster("dgx-a100-80gb", nodes=1)
    _, _, ex = extras(knobs=Knobs(1, 8, 1, 1, "1f1b", 1, "full"), cluster=one_node)
    assert not any(ex.regather_s)
    _, _, ex = extras(knobs=Knobs(8, 1, 1, 1, "1f1b", 1, "full"), cluster=one_node)
    assert not any(ex.regather_s) and not any(ex.tail_s) and ex.accumulate_s[0] > 0


def test_the_breakdown_still_adds_up_to_the_iteration():
    p = predict(MTNLG, CLUSTER, A100, KNOBS, 1920, framework=DEEPSPEED)[0].prediction
    assert sum(vars(p.breakdown).values()) == pytest.approx(p.iteration_s, rel=1e-9)


def test_megatron_is_not_priced_with_deepspeed_terms():
    assert not MEGATRON.deepspeed_pipe and MEGATRON.grad_accumulate_bytes == 0


def test_deepspeed_terms_never_shorten_a_prediction():
    """30 random problems, every candidate: predict with the terms is at least predict without them."""
    checked = 0
    for seed in range(30):
        pr = random_problem(seed)
        model, cluster, device, B = pr["model"], pr["cluster"], pr["device"], pr["global_batch"]
        knobs = enumerate_knobs(model, cluster, B, pr["pins"])
        for k in random.Random(seed).sample(knobs, min(20, len(knobs))):
            a = predict(model, cluster, device, k, B, framework=DEEPSPEED, exact_pp_comm=False)[0].prediction
            b = predict(model, cluster, device, k, B, framework=dataclasses.replace(WITHOUT, p2p_scatter_gather=True),
                        exact_pp_comm=False)[0].prediction
            assert a.iteration_s >= b.iteration_s * (1 - 1e-12), (seed, k)
            checked += 1
    assert checked > 200
