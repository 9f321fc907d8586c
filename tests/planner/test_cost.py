"""Cost model invariants: the breakdown adds up, the bubble shrinks with microbatches, communication
follows the topology, and FLOPs follow Narayanan et al. 2021."""

from dataclasses import replace as dataclasses_replace

import pytest

from planner.cost import MEGATRON, model_flops, predict
from planner.errors import SpecError
from planner.plan import Knobs
from planner.specs import LinkSpec, cluster_from_dict, load_cluster, load_device, load_model
from planner.topology import dp_link, pp_links, tp_link

A100 = load_device("a100-sxm4-80gb")
GPT = load_model("gpt3-13b")


def price(knobs, nodes=4, batch=256, **kw):
    return predict(GPT, load_cluster("dgx-a100-80gb", nodes=nodes), A100, knobs, batch, **kw)[0].prediction


def test_breakdown_adds_up_to_the_iteration():
    p = price(Knobs(4, 2, 4, 1, "1f1b", 1, "selective", True, True))
    assert sum(vars(p.breakdown).values()) == pytest.approx(p.iteration_s, rel=1e-9)


def test_more_microbatches_shrink_the_bubble_share():
    small = price(Knobs(8, 4, 1, 4, "1f1b", 1, "full"), batch=32)   # 8 microbatches
    large = price(Knobs(8, 4, 1, 1, "1f1b", 1, "full"), batch=32)   # 32 microbatches
    assert large.breakdown.bubble_s / large.iteration_s < small.breakdown.bubble_s / small.iteration_s


def test_a_plan_without_a_pipeline_has_a_bubble_of_exactly_0_not_summation_noise():
    # predict printed "pipeline bubble 8.882e-16" for a tp x dp plan (the finish time less the busy time, summed
    # in another order).
    for knobs in (Knobs(8, 1, 4, 1, "1f1b", 1, "selective", True, True), Knobs(4, 1, 8, 2, "1f1b", 1, "full", True, 3)):
        assert price(knobs).breakdown.bubble_s == 0.0


def test_tp1_has_no_tensor_parallel_communication():
    assert price(Knobs(1, 4, 8, 1, "1f1b", 1, "full")).breakdown.tp_comm_s == 0


def test_groups_inside_a_node_use_nvlink_and_across_nodes_use_the_nics():
    c = load_cluster("dgx-a100-80gb", nodes=4)
    assert tp_link(c, 8).bandwidth_GBps == 300
    assert dp_link(c, 8, 4).bandwidth_GBps == 25          # one member per node: one NIC
    assert dp_link(c, 1, 32).bandwidth_GBps == 200        # 8 members per node: 8 NICs, under NVLink's 300
    assert pp_links(c, 8, 1, 4)[0].bandwidth_GBps == 25


def test_on_a_mesh_node_a_pair_talks_over_one_direct_link_and_a_group_over_all_its_members_links():
    # hgx-h200-4gpu: no NVSwitch, 6 NVLinks (150 GB/s) between every two GPUs. A tp 2 pair has its one link, a tp 4
    # group its three (NCCL's rings over them), as on an NVSwitch node; a pipeline send between two GPUs one link.
    mesh = load_cluster("hgx-h200-4gpu", nodes=2)
    switch = dataclasses_replace(mesh, intra_node_topology="switch", intra_node=dataclasses_replace(mesh.intra_node, bandwidth_GBps=450))
    assert (tp_link(mesh, 2).bandwidth_GBps, tp_link(mesh, 4).bandwidth_GBps) == (150, 450)
    assert (tp_link(switch, 2).bandwidth_GBps, tp_link(switch, 4).bandwidth_GBps) == (450, 450)
    assert dp_link(mesh, 2, 2).bandwidth_GBps == 150 and dp_link(mesh, 4, 2).bandwidth_GBps == 50  # across: one NIC each
    assert pp_links(mesh, 1, 1, 4)[0].bandwidth_GBps == 150 and pp_links(mesh, 1, 2, 4)[0].bandwidth_GBps == 150
    # A job on 2 of a board's GPUs keeps the pair's link (the file gives one link, not a GPU's total).
    assert tp_link(load_cluster("hgx-h200-4gpu", nodes=1, gpus_per_node=2), 2).bandwidth_GBps == 150
    with pytest.raises(SpecError, match="intra_node_topology.*'switch'.*'mesh'.*got 'ring'"):
        cluster_from_dict({"name": "x", "nodes": 1, "gpus_per_node": 4, "device": "h100-sxm5-80gb", "intra_node_topology": "ring",
                           "intra_node": {"bandwidth_GBps": 150, "latency_us": 4}, "inter_node": {"bandwidth_GBps": 50, "latency_us": 8}}, "x.yaml")


def test_a_mesh_board_refuses_more_gpus_per_node_than_its_pair_link_is_for():
    # hgx-h200-4gpu's 150 GB/s is a GPU's links split three ways; at 8 a node it would price tp 8 at 7 x 150.
    with pytest.raises(SpecError, match="--gpus-per-node.*8 is more than the 4 GPUs"):
        load_cluster("hgx-h200-4gpu", gpus_per_node=8)


def test_a_measured_link_on_a_mesh_board_is_not_multiplied_by_its_direct_links(monkeypatch):
    # planner profile fits its link to collectives over all ranks: that is already the group's figure.
    measured = LinkSpec(bandwidth_GBps=380.0, latency_us=9.0)
    monkeypatch.setattr("planner.measured.intra_node_link", lambda device: measured)
    c = load_cluster("hgx-h200-4gpu", nodes=1)
    assert c.intra_node == measured and tp_link(c, 4).bandwidth_GBps == 380 and tp_link(c, 2).bandwidth_GBps == 380


def test_a_group_that_straddles_two_nodes_somewhere_is_priced_at_the_nics_everywhere():
    # The first group of a kind stood for all: tp 4 on 6-GPU nodes (ranks 4-7 cross nodes) was priced all on
    # NVLink, and so was a dp 3 group of tp 2 on DGX nodes (ranks 6, 8, 10 cross). The slowest group sets the pace.
    six = cluster_from_dict({"name": "six", "nodes": 2, "gpus_per_node": 6, "device": "h100-sxm5-80gb",
                             "intra_node": {"bandwidth_GBps": 450, "latency_us": 4},
                             "inter_node": {"bandwidth_GBps": 50, "latency_us": 8}}, "test")
    assert tp_link(six, 4).bandwidth_GBps < 450 and tp_link(six, 3).bandwidth_GBps == 450
    dgx = load_cluster("dgx-a100-80gb", nodes=3)
    assert dp_link(dgx, 2, 3).bandwidth_GBps < 300 and dp_link(dgx, 2, 4).bandwidth_GBps == 300
    # Pipeline devices 3 dp ranks apart: stage 1 -> 2 is ranks 3 -> 6 (one node) in the first pipeline, 5 -> 8 in the third.
    assert pp_links(dgx, 1, 3, 8)[1].bandwidth_GBps < 300
    assert pp_links(load_cluster("dgx-a100-80gb", nodes=2), 1, 2, 8)[0].bandwidth_GBps == 300  # 0 -> 2, 1 -> 3


def test_meshplans_runtime_prices_attention_fused_on_the_a100_as_its_sdpa_runs_it_and_megatron_2021_does_not():
    # The A100 datasheet says fused_attention false: its curves were fitted to Megatron-LM 2021, which had no
    # FlashAttention. meshplan's runtime calls scaled_dot_product_attention, FlashAttention on an A100: priced
    # unfused, llama2-7b under ZeRO-3 on 8 GPUs read 68.8 GiB and 10.2 s, where fused gives 36.8 GiB and 7.4 s.
    assert not A100.fused_attention
    cluster, knobs = load_cluster("dgx-a100-80gb", nodes=1), Knobs(1, 1, 8, 1, "1f1b", 1, "none", False, 3)
    llama = load_model("llama2-7b")
    ours = predict(llama, cluster, A100, knobs, 64)[0].prediction
    as_fused = predict(llama, cluster, dataclasses_replace(A100, fused_attention=True), knobs, 64)[0].prediction
    megatron_2021 = predict(llama, cluster, A100, knobs, 64, framework=MEGATRON)[0].prediction
    assert (ours.iteration_s, ours.peak_memory_gib) == (as_fused.iteration_s, as_fused.peak_memory_gib)
    assert megatron_2021.peak_memory_gib > ours.peak_memory_gib + 20  # the s x s scores, kept per block


def test_model_flops_match_narayanan_formula_for_ffn_4h():
    m = load_model("gpt-1008.0b")
    B, s, l, h, V = 3072, 2048, 128, 25600, 51200
    assert model_flops(m, B, 1.0) == pytest.approx(96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h)), rel=1e-12)
    assert model_flops(m, B, 0.0) == pytest.approx(72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h)), rel=1e-12)


def test_full_recompute_costs_time_and_saves_memory():
    none = price(Knobs(8, 4, 1, 1, "1f1b", 1, "none"), batch=32)
    full = price(Knobs(8, 4, 1, 1, "1f1b", 1, "full"), batch=32)
    assert full.iteration_s > none.iteration_s and full.peak_memory_gib < none.peak_memory_gib


def test_interleaving_shortens_a_bubble_bound_pipeline():
    plain = price(Knobs(8, 4, 1, 1, "1f1b", 1, "full"), batch=8)
    inter = price(Knobs(8, 4, 1, 1, "interleaved", 2, "full"), batch=8)
    assert inter.breakdown.bubble_s < plain.breakdown.bubble_s


def test_megatron_blocking_sends_count_as_pipeline_communication():
    p = price(Knobs(8, 4, 1, 1, "1f1b", 1, "full"), batch=32, framework=MEGATRON)
    assert p.breakdown.pp_comm_s > 0


def test_predict_carries_the_exact_parameter_count_of_a_llama_model():
    from planner.specs import load_cluster

    for name, params in (("llama3-8b", 8_030_261_248), ("llama3-70b", 70_553_706_496)):
        plan, _ = predict(load_model(name), load_cluster("dgx-h100-80gb", nodes=2), load_device("h100-sxm5-80gb"),
                          Knobs(8, 2, 1, 1, "1f1b", 1, "full", True, False), 16)
        assert plan.prediction.params == params


def test_grouped_query_attention_and_swiglu_change_the_datasheet_block_time():
    import dataclasses

    from planner.compute import datasheet_layer_times

    h100 = load_device("h100-sxm5-80gb")
    llama = load_model("llama3-8b")
    mha = dataclasses.replace(llama, kv_heads=llama.heads)
    gelu = dataclasses.replace(llama, mlp="gelu")
    t = lambda m: datasheet_layer_times(m, h100, 1, 1, False).forward_s  # noqa: E731
    assert t(mha) > t(llama)    # k and v are 4x narrower with 8 of 32 heads
    assert t(llama) > t(gelu)   # a third h x f matrix


def test_tp_must_divide_the_kv_heads_and_tied_models_stay_on_one_stage():
    from planner.search import enumerate_knobs
    from planner.specs import load_cluster, model_from_dict

    gqa = model_from_dict({"name": "g", "layers": 4, "hidden": 512, "heads": 8, "kv_heads": 2, "ffn_hidden": 1024,
                           "seq_len": 128, "vocab": 1000, "mlp": "swiglu", "norm": "rmsnorm", "position": "rope", "bias": False}, "t")
    c = load_cluster("dgx-a100-80gb", nodes=1)
    assert {k.tp for k in enumerate_knobs(gqa, c, 32, {})} == {1, 2}
    tied = dataclasses_replace(gqa, tie_embeddings=True)
    assert {k.pp for k in enumerate_knobs(tied, c, 32, {})} == {1}
    with pytest.raises(SpecError, match="tie"):
        predict(tied, c, A100, Knobs(1, 2, 4, 1), 32)
    with pytest.raises(SpecError, match="kv_heads 2 are not divisible by tp 4"):
        predict(gqa, c, A100, Knobs(4, 1, 2, 1), 32)


def test_overlapped_weight_gather_hides_under_the_first_forward_only():
    from planner.comm import overlapped_param_gather_exposed_s as exposed
    # One chunk: a 0.3 s gather under a 0.1 s first forward leaves 0.2 s; a longer forward hides it all.
    assert exposed(0.3, (0.1,), pp=1, m=8) == pytest.approx(0.2)
    assert exposed(0.3, (0.5,), pp=1, m=8) == 0.0
    # Four chunks on pp 4: chunk c's quarter must arrive by its first forward, after 4c forwards of earlier
    # chunks; the first chunk's quarter (0.075 s) under one 0.05 s forward is the worst shortfall.
    assert exposed(0.3, (0.05,) * 4, pp=4, m=8) == pytest.approx(0.025)
    # The search's bound passes no forwards: nothing exposed.
    assert exposed(0.3, (), pp=4, m=8) == 0.0
