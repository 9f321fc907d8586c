"""The knobs of the parallelism issue as the planner prices and sizes them: ZeRO stages, context parallelism,
FP8 and compile."""

import dataclasses

import pytest

from planner.cost import MESHPLAN, CostModel, predict
from planner.errors import SpecError
from planner.memory import cp_gathered_kv_bytes
from planner.plan import Knobs
from planner.search import search
from planner.specs import load_cluster, load_device, load_model
from planner.zero import gradient_reducer

from tests.planner.refusals import refused

H100, A100 = load_device("h100-sxm5-80gb"), load_device("a100-sxm4-80gb")
LLAMA70, LLAMA8 = load_model("llama3-70b"), load_model("llama3-8b")


def price(model, knobs, nodes=8, batch=64, device=H100):
    return predict(model, load_cluster("dgx-h100-80gb", nodes=nodes), device, knobs, batch)[0].prediction


def test_each_zero_stage_needs_less_memory_and_zero3_pays_in_gathers():
    peaks, dp = [], []
    for zero in (0, 1, 2, 3):
        p = price(LLAMA70, Knobs(8, 1, 8, 1, "1f1b", 1, "full", True, zero))
        peaks.append(p.peak_memory_gib)
        dp.append(p.breakdown.dp_comm_s)
    assert peaks[0] > peaks[1] > peaks[2] > peaks[3]
    # 70.6B parameters over tp 8: 8.8B a rank; ZeRO-3 over 8 ranks keeps 16/8 bytes of each (and two gathered blocks).
    assert peaks[3] < peaks[0] / 4


def test_context_parallelism_divides_activations_and_adds_the_key_value_gathers():
    long = dataclasses.replace(LLAMA8, seq_len=32768)
    cm = CostModel(long, load_cluster("dgx-h100-80gb", nodes=2), H100)
    one, two = cm.terms(Knobs(8, 1, 2, 1, cp=1)), cm.terms(Knobs(8, 1, 1, 1, cp=2))
    assert one.cp_all_gather_s == 0 and two.cp_all_gather_s > 0
    # Half the tokens per rank; the gathered keys and values (1/4 of the width with 8 of 32 heads) stay whole.
    assert 0.5 < two.layer_activation_bytes / one.layer_activation_bytes < 0.6
    assert two.layer_forward_s < one.layer_forward_s


def test_fp8_runs_the_linears_at_the_fp8_peak_and_is_refused_without_fp8_tensor_cores():
    # Large GEMMs (tp 1, 16k tokens a microbatch): FP8's twice-the-peak wins over the casts.
    bf16 = price(LLAMA8, Knobs(1, 1, 64, 2, "1f1b", 1, "none", False, 3), batch=128)
    fp8 = price(LLAMA8, Knobs(1, 1, 64, 2, "1f1b", 1, "none", False, 3, precision="fp8"), batch=128)
    assert fp8.iteration_s < bf16.iteration_s
    # Transformer Engine's one fused cast pass (weights cast once a step) costs less than torchao's dynamic scaling.
    from planner.cost import FRAMEWORKS

    knobs = Knobs(8, 1, 8, 1, "1f1b", 1, "full", True, 1, precision="fp8")
    cluster = load_cluster("dgx-h100-80gb", nodes=8)
    te = predict(LLAMA70, cluster, H100, knobs, 64, framework=FRAMEWORKS["megatron-core"])[0].prediction
    torchao = predict(LLAMA70, cluster, H100, knobs, 64)[0].prediction
    assert te.breakdown.compute_s < torchao.breakdown.compute_s
    with pytest.raises(SpecError, match="precision: fp8 needs FP8 tensor cores"):
        predict(LLAMA70, load_cluster("dgx-a100-80gb", nodes=8), A100, Knobs(8, 1, 8, 1, precision="fp8"), 64)


def test_fp8_casts_one_shared_input_per_sub_block_under_tp_and_only_the_local_shard_with_sp():
    from planner.compute import float8_casts_per_token, float8_grad_casts_per_token

    h, f, kv = LLAMA70.hidden, LLAMA70.ffn_hidden, LLAMA70.kv_dim
    gpt = load_model("gpt3-175b")
    # tp 1, torchao: q, k, v, gate and up are five Float8Linears, each casting the same h-wide input; GELU's MLP has
    # one first matrix.
    assert float8_casts_per_token(LLAMA70, 1) == pytest.approx(2.5 * (5 * h + h + f))
    assert float8_casts_per_token(gpt, 1) == pytest.approx(2.5 * (4 * gpt.hidden + gpt.hidden + gpt.ffn_hidden))
    # Under TP torchao's PrepareFloat8ModuleInput casts the attention's and the MLP's input once each; with SP it
    # casts the local s/tp rows before the all-gather (Float8ColwiseParallel), so every input is an h/tp or f/tp
    # slice per token.
    assert float8_casts_per_token(LLAMA70, 8) == pytest.approx(2.5 * (2 * h + h / 8 + f / 8))
    assert float8_casts_per_token(LLAMA70, 8, sequence_parallel=True) == pytest.approx(2.5 * (3 * h + f) / 8)
    # The backward casts each linear's output gradient, which none share: q's h and k's and v's kv_dim, gate's and
    # up's f, over tp; the row-parallel linears' h, or its local shard with SP.
    assert float8_grad_casts_per_token(LLAMA70, 8) == pytest.approx(2.5 * ((h + 2 * kv + 2 * f) / 8 + 2 * h))
    assert float8_grad_casts_per_token(LLAMA70, 8, True) == pytest.approx(2.5 * (h + 2 * kv + 2 * f + 2 * h) / 8)


def test_transformer_engine_casts_in_the_norm_and_transposes_the_gathered_tensors_whole():
    from planner.compute import transformer_engine_fp8_moves_per_token

    h, f, kv = LLAMA70.hidden, LLAMA70.ffn_hidden, LLAMA70.kv_dim
    fwd, bwd = transformer_engine_fp8_moves_per_token(LLAMA70, 8, True)
    # Forward: only the row-parallel inputs are cast (with their transposes); q/k/v's and gate/up's inputs come
    # out of the norm in FP8.
    assert fwd == pytest.approx(2 * (h + f) / 8)
    # Backward: the column-parallel output gradients cast with their transposes, the row-parallel ones cast on the
    # local shard and transposed whole after the gather, and the two gathered norm outputs transposed whole.
    assert bwd == pytest.approx(2 * (h + 2 * kv + 2 * f) / 8 + 2 * (1.5 * h / 8 + h) + 2 * h)
    # Without SP the row-parallel gradients' cast fuses its transpose (2 per element of h); the norm outputs'
    # transposes stay: whole at any tp.
    assert transformer_engine_fp8_moves_per_token(LLAMA70, 8, False)[1] == pytest.approx(2 * (h + 2 * kv + 2 * f) / 8 + 4 * h + 2 * h)
    wide, narrow = (transformer_engine_fp8_moves_per_token(LLAMA70, t, True)[1] for t in (2, 8))
    assert narrow > 2 * h + 2 * h and wide > narrow  # the whole-h transposes do not shrink with tp


def test_fp8_pinned_on_a_device_without_fp8_tensor_cores_is_refused_by_the_search_as_by_predict(capsys):
    # The search priced fp8 GEMMs at the device's fp8 peak of 0 TFLOP/s: a ZeroDivisionError in plan, compare and
    # the dashboard, where predict already refused.
    with pytest.raises(SpecError, match="precision: fp8 needs FP8 tensor cores"):
        search(LLAMA8, load_cluster("dgx-a100-80gb", nodes=1), A100, 64, {"precision": "fp8"})
    assert "fp8 needs FP8 tensor cores" in refused(capsys, "plan", "--model", "llama3-8b", "--cluster", "dgx-a100-80gb",
                                                   "--global-batch", "64", "--precision", "fp8")


def test_compile_prices_the_elementwise_work_as_fused():
    eager = price(LLAMA8, Knobs(1, 1, 64, 1, "1f1b", 1, "none", False, 3))
    compiled = price(LLAMA8, Knobs(1, 1, 64, 1, "1f1b", 1, "none", False, 3, compile=True))
    assert compiled.iteration_s < eager.iteration_s


def test_overlap_of_the_gradient_reduction_comes_from_the_zero_table():
    assert MESHPLAN.overlaps_dp(Knobs(1, 1, 8, 1))              # DDP reduces under the backward
    assert not MESHPLAN.overlaps_dp(Knobs(2, 1, 4, 1))          # by hand, after it, under tp
    assert MESHPLAN.overlaps_dp(Knobs(1, 1, 4, 1, cp=2))        # cp alone keeps DDP
    assert MESHPLAN.overlaps_dp(Knobs(2, 2, 2, 1, zero=3))      # FSDP2's hooks overlap under tp and pp too


def test_selective_recomputation_under_cp_gathers_the_keys_again():
    cm = CostModel(dataclasses.replace(LLAMA8, seq_len=32768), load_cluster("dgx-h100-80gb", nodes=1), H100)
    plain, cp = cm.terms(Knobs(1, 1, 8, 1, recompute="selective")), cm.terms(Knobs(1, 1, 4, 1, recompute="selective", cp=2))
    assert plain.cp_all_gather_s == 0 and cp.cp_all_gather_s > 0
    assert cp.layer_recompute_s == pytest.approx(cm.layer(1, 0.5, False, cp=2).selective_recompute_s + cp.cp_all_gather_s)


def test_only_without_recomputation_does_cp_attention_keep_the_gathered_keys_for_the_backward():
    # The runtime checkpoints the cp attention core whole under selective: the gathered keys are made again in
    # the backward, held only while one block recomputes.
    cm = CostModel(dataclasses.replace(LLAMA8, seq_len=32768), load_cluster("dgx-h100-80gb", nodes=1), H100)
    gathered = cp_gathered_kv_bytes(cm.model, 1, 2, 2)
    none_cp, none = cm.terms(Knobs(1, 1, 4, 2, cp=2)), cm.terms(Knobs(1, 1, 8, 1))
    sel_cp, sel = cm.terms(Knobs(1, 1, 4, 2, recompute="selective", cp=2)), cm.terms(Knobs(1, 1, 8, 1, recompute="selective"))
    assert gathered > 0
    assert none_cp.layer_activation_bytes == pytest.approx(none.layer_activation_bytes + gathered)
    assert sel_cp.layer_activation_bytes == pytest.approx(sel.layer_activation_bytes)
    assert sel_cp.recompute_working_bytes == pytest.approx(sel.recompute_working_bytes + gathered)


def test_cp_alone_keeps_ddp_and_tp_or_pp_reduce_by_hand():
    # The replicas are dp * cp ranks; context parallelism's all-gather runs inside autograd, so DDP still holds.
    assert gradient_reducer(zero=0, replicas=2 * 2, tp=1, pipelined=False) == "ddp"
    assert gradient_reducer(zero=1, replicas=2, tp=2, pipelined=False) == "by hand"
    assert gradient_reducer(zero=1, replicas=2, tp=1, pipelined=True) == "by hand"
    assert gradient_reducer(zero=2, replicas=2, tp=2, pipelined=True) == "fsdp2"
    assert gradient_reducer(zero=0, replicas=1, tp=2, pipelined=True) == "none"
    # DDP's buckets hold the gradients at every peak; by hand, autograd makes them in the backward.
    cm = CostModel(LLAMA8, load_cluster("dgx-h100-80gb", nodes=1), H100)
    assert not cm.terms(Knobs(1, 1, 2, 1, cp=2)).grads_from_backward
    assert cm.terms(Knobs(2, 1, 2, 1)).grads_from_backward


def test_the_search_cuts_a_long_sequence_over_context_parallel_ranks():
    long = dataclasses.replace(LLAMA8, name="llama3-8b-128k", seq_len=131072)
    r = search(long, load_cluster("dgx-h100-80gb", nodes=4), H100, 16, top=1)
    best = r.plans[0]
    assert best.prediction.fits and best.cp > 1
    assert search(long, load_cluster("dgx-h100-80gb", nodes=4), H100, 16, {"cp": 1}, top=1).plans[0].prediction.iteration_s \
        >= best.prediction.iteration_s


def test_compile_with_tp_and_no_sequence_parallelism_is_refused_and_never_searched_as_the_runtime_refuses_it():
    # runtime.launch refuses these plans (planner.cost.compile_problem, the one rule): the planner must not write one.
    with pytest.raises(SpecError, match="compile: compile with tp > 1 needs sequence_parallel"):
        price(LLAMA8, Knobs(2, 1, 32, 1, "1f1b", 1, "none", False, 3, compile=True))
    price(LLAMA8, Knobs(2, 1, 32, 1, "1f1b", 1, "none", True, 3, compile=True))  # with SP it compiles
    cluster = load_cluster("local-cpu", gpus_per_node=2)
    r = search(load_model("gpt-tiny"), cluster, load_device("cpu"), 32, {"compile": True, "tp": 2}, top=50)
    assert r.plans and all(p.sequence_parallel for p in r.plans)
    assert all(c.knobs.sequence_parallel for c in r.candidates)


@pytest.mark.parametrize("knobs, field", [(Knobs(1, 8, 8, 1, sequence_parallel=True), "sequence_parallel"),
                                          (Knobs(8, 1, 8, 1, "interleaved", 2), "virtual_stages")])
def test_a_knob_that_means_nothing_at_its_degree_is_refused_not_shown(knobs, field):
    # sequence parallelism shards over tp, interleaving deals chunks over pp: at 1 they would be shown as 'yes' and
    # 'interleaved v=2' while nothing is sharded or interleaved.
    with pytest.raises(SpecError, match=f"{field}: .* needs (tp|pp) > 1"):
        price(LLAMA8, knobs)


def test_sequence_parallelism_pinned_on_is_searched_only_where_tp_is_above_1():
    r = search(LLAMA8, load_cluster("dgx-h100-80gb", nodes=1), H100, 64, {"sequence_parallel": True}, top=3)
    assert r.candidates and all(c.knobs.tp > 1 and c.knobs.sequence_parallel for c in r.candidates)


def test_fsdp2_traffic_at_a_microbatchs_edges_is_exposed_even_where_compute_hides_the_rest():
    # KempnerForge's run 12 layout: llama3-8b, tp 4 x dp 8 over 8 nodes of 4 H200s, ZeRO-3, 2 microbatches of 4.
    from planner import comm
    from planner.cost import fsdp_edges_s

    model, device = load_model("llama3-8b", 4096), load_device("h200-sxm-141gb")
    cluster = load_cluster("dgx-h200-141gb", nodes=8, gpus_per_node=4)
    knobs = Knobs(4, 1, 8, 4, "1f1b", 1, "full", True, 3, 1, "bf16", True)
    cm = CostModel(model, cluster, device, MESHPLAN)
    tm = cm.terms(knobs)
    edge = tm.end_params(model, 4, True, True) + tm.layer_params  # the root unit and the first block
    n, link = cm._dp_group(knobs)
    forward, backward = fsdp_edges_s(cm, knobs, edge)
    assert forward == pytest.approx(comm.all_gather_s(2 * edge, n, link))  # bf16 weights gathered before the forward
    assert backward == pytest.approx(comm.reduce_scatter_s(4 * edge, n, link))  # fp32 gradients after the backward
    with_edges, _ = predict(model, cluster, device, knobs, 64, framework=MESHPLAN)
    without, _ = predict(model, cluster, device, knobs, 64, framework=dataclasses.replace(MESHPLAN, fsdp_serial_edges=False))
    assert without.prediction.breakdown.dp_comm_s == 0  # the rest of the traffic hides under the compute
    assert with_edges.prediction.iteration_s - without.prediction.iteration_s == pytest.approx(2 * (forward + backward), rel=1e-6)
    # Pipelined, a stage's edges sit among other stages' work: not priced here.
    piped = dataclasses.replace(knobs, pp=2, dp=4)
    assert fsdp_edges_s(cm, piped, edge) == (0.0, 0.0)


@pytest.mark.parametrize("cp", [2, 8])
def test_meshplans_masked_cp_chunks_run_whole_rectangles_of_attention(cp):
    # runtime/parallel/context.py gives each chunk's call a mask: every tile of a rank's two rectangles runs,
    # (2cp+1) c^2 where causal skipping would run 2cp c^2; torch's ring attention does not waste them.
    model, cluster = load_model("llama3-8b", 32768), load_cluster("dgx-h100-80gb", nodes=2)
    device = load_device("h100-sxm5-80gb")
    masked = CostModel(model, cluster, device, MESHPLAN).layer(1, 1, False, cp=cp)
    ring = CostModel(model, cluster, device, dataclasses.replace(MESHPLAN, cp_masked_chunks=False)).layer(1, 1, False, cp=cp)
    assert masked.selective_recompute_s == pytest.approx(ring.selective_recompute_s * (2 * cp + 1) / (2 * cp), rel=1e-12)
    assert masked.backward_s - ring.backward_s == pytest.approx(2.5 * (masked.selective_recompute_s - ring.selective_recompute_s))
    no_cp = CostModel(model, cluster, device, MESHPLAN).layer(1, 1, False)
    assert no_cp == CostModel(model, cluster, device, dataclasses.replace(MESHPLAN, cp_masked_chunks=False)).layer(1, 1, False)


@pytest.mark.parametrize("name, ways", [("llama3-8b", 3.5), ("gpt3-1.3b", 3.0)])
def test_per_linear_tp_gathers_price_one_gather_per_column_parallel_linear_under_sp(name, ways):
    # KempnerForge's plan (tests/runtime/test_tp_comm.py counts it): q, k, v and gate, up (or fc) each all-gather
    # their input, so a block moves (gathers + 2 scatters) / 2 all-reduces each way where once per sub-block is 2.
    model, cluster, device = load_model(name), load_cluster("dgx-h100-80gb", nodes=1), load_device("h100-sxm5-80gb")
    per_linear = dataclasses.replace(MESHPLAN, tp_gathers_per_linear=True)
    for sp in (True, False):
        knobs = Knobs(tp=4, pp=1, dp=2, micro_batch=1, sequence_parallel=sp)
        once, each = CostModel(model, cluster, device, MESHPLAN).terms(knobs), CostModel(model, cluster, device, per_linear).terms(knobs)
        assert once.layer_tp_comm_s == pytest.approx(4 * once.tp_all_reduce_s)
        # Without SP the inputs are replicated: no gathers to multiply.
        assert each.layer_tp_comm_s == pytest.approx(once.layer_tp_comm_s * (ways / 2 if sp else 1))
        assert each.layer_forward_s - once.layer_forward_s == pytest.approx((each.layer_tp_comm_s - once.layer_tp_comm_s) / 2)


def test_a_loss_over_gathered_logits_prices_the_gather_the_whole_vocabularys_cross_entropy_and_its_logits_memory():
    from planner import comm
    from planner.compute import cross_entropy_s
    from planner.terms import tp_link

    model, cluster, device = load_model("llama3-8b", 4096), load_cluster("dgx-h100-80gb", nodes=1), load_device("h100-sxm5-80gb")
    gathered = dataclasses.replace(MESHPLAN, loss_parallel=False, logit_bytes=2)
    for tp in (1, 4):
        knobs = Knobs(tp=tp, pp=1, dp=8 // tp, micro_batch=2)
        vp, whole = CostModel(model, cluster, device, MESHPLAN).terms(knobs), CostModel(model, cluster, device, gathered).terms(knobs)
        if tp == 1:
            assert (whole.head_forward_s, whole.head_backward_s) == (vp.head_forward_s, vp.head_backward_s)
            continue
        logits = 2 * 4096 * model.padded_vocab(tp)
        extra = cross_entropy_s(device, logits, 2) - cross_entropy_s(device, logits / tp)
        assert extra > 0 and whole.head_backward_s - vp.head_backward_s == pytest.approx(extra)
        gather = comm.all_gather_s(logits * 2, tp, tp_link(cluster, tp))
        assert whole.head_forward_s - vp.head_forward_s == pytest.approx(extra + gather)
        # The gather is booked as tensor-parallel traffic, and each rank holds the whole vocabulary's logits.
        assert whole.head_tp_comm_s - vp.head_tp_comm_s == pytest.approx(gather)
        assert (vp.logit_bytes, whole.logit_bytes) == (4 * logits / tp, 2 * logits)
        assert whole.head_transient_bytes == pytest.approx(vp.head_transient_bytes * tp / 2)
        # In the plan's breakdown too: 4 microbatches a step (global batch 16 over dp 2, micro-batch 2).
        tpc = [predict(model, cluster, device, knobs, 16, framework=f)[0].prediction.breakdown.tp_comm_s for f in (MESHPLAN, gathered)]
        assert tpc[1] - tpc[0] == pytest.approx(4 * gather)


def test_a_framework_with_an_fp8_recipe_the_model_does_not_price_is_refused():
    # A misspelt recipe would otherwise fall through to torchao's casts.
    from planner.frameworks import FRAMEWORKS

    with pytest.raises(ValueError, match="fp8_casts must be one of torchao, transformer-engine"):
        dataclasses.replace(FRAMEWORKS["megatron-core"], fp8_casts="transformer_engine")
