"""The model file in both families (GPT and Llama), its TP plan, its pipeline split and its recomputation, checked in
one process (no ranks)."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from planner.plan import Stage
from planner.specs import load_model
from runtime.model import GPT, GPTConfig, init_full_tensor, rotate
from runtime.parallel.pipeline import split_model, stage_indices
from runtime.parallel.recompute import apply_recompute, clean_fqn
from runtime.parallel.tensor import matching_modules, tp_plan

REPO = Path(__file__).resolve().parents[2]
CFG = GPTConfig(layers=4, hidden=64, heads=4, ffn_hidden=256, seq_len=32, vocab=256)
LLAMA = GPTConfig(layers=4, hidden=64, heads=4, ffn_hidden=172, seq_len=32, vocab=256, kv_heads=2, mlp="swiglu",
                  norm="rmsnorm", position="rope", bias=False)
FAMILIES = pytest.mark.parametrize("cfg", [CFG, LLAMA], ids=["gpt", "llama"])


def seeded_model(cfg: GPTConfig = CFG, seed: int = 0) -> GPT:
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_full_tensor(clean_fqn(name), tuple(p.shape), cfg, seed))
    return model


@FAMILIES
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_every_fqn_in_the_tp_plan_exists_in_the_model(cfg, sequence_parallel):
    with torch.device("meta"):
        model = GPT(cfg)
    plan = tp_plan(sequence_parallel=sequence_parallel, mlp=cfg.mlp)
    missing = [fqn for fqn in plan if not matching_modules(model, fqn)]
    assert not missing, f"TP plan keys naming no module of GPT: {missing}"
    # Every Linear of every block is sharded by some key, once per block: none is left replicated by mistake.
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    covered = {name for fqn in plan for name in matching_modules(model, fqn)}
    assert linears <= covered, linears - covered
    assert len(matching_modules(model, "layers.*.attn.wk")) == cfg.layers


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_model_holds_exactly_the_specs_padded_params(name):
    spec = load_model(name)
    for tied in (False, True):
        s = dataclasses.replace(spec, tie_embeddings=tied)
        with torch.device("meta"):
            model = GPT(GPTConfig.from_spec(s, 2))
        assert sum(p.numel() for p in model.parameters()) == s.padded_params(2)


def test_grouped_query_attention_equals_attention_with_each_kv_head_repeated_for_its_group():
    model = seeded_model(LLAMA)
    attn = model.layers["0"].attn
    x = torch.randn(2, 16, 64)
    q = attn.wq(x).view(2, 16, 4, 16).transpose(1, 2)  # (B, nh, T, hs)
    k = attn.wk(x).view(2, 16, 2, 16).transpose(1, 2)  # (B, nkv, T, hs)
    v = attn.wv(x).view(2, 16, 2, 16).transpose(1, 2)
    pos = torch.arange(16)
    q, k = rotate(q, pos, 10000.0), rotate(k, pos, 10000.0)
    y = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert torch.allclose(attn(x), attn.wo(y.transpose(1, 2).reshape(2, 16, 64)), atol=1e-6)


def test_rope_makes_attention_scores_depend_only_on_relative_position():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    score = [(rotate(q, torch.tensor([m]), 10000.0) * rotate(k, torch.tensor([n]), 10000.0)).sum() for m, n in ((3, 1), (10, 8), (5, 5))]
    assert torch.allclose(score[0], score[1], atol=1e-5)
    assert torch.allclose(score[2], (q * k).sum(), atol=1e-5)  # no rotation between equal positions


def test_forward_uses_the_positions_it_is_given_and_rope_sees_only_their_differences():
    # What a context-parallel chunk relies on: it passes its tokens' own positions.
    model = seeded_model(LLAMA)
    x = torch.randint(0, 256, (2, 32))
    base = model(x)
    assert torch.allclose(model(x, positions=torch.arange(32) + 7), base, atol=1e-5)  # every position shifted by 7
    assert not torch.allclose(model(x, positions=torch.arange(32) * 2), base, atol=1e-3)  # other gaps, other output
    assert torch.allclose(model(x, positions=torch.arange(32).expand(2, 32)), base, atol=1e-6)  # (B, T) positions


def test_tied_embeddings_share_one_parameter_after_to_empty_and_init():
    from runtime.checkpoint import init_weights

    cfg = dataclasses.replace(LLAMA, tie_embeddings=True)
    with torch.device("meta"):
        model = GPT(cfg)
    init_weights(model, cfg, seed=0, device=torch.device("cpu"))
    assert model.head.weight is model.embed.tok.weight
    assert torch.equal(model.head.weight, init_full_tensor("embed.tok.weight", (256, 64), cfg, 0))


def test_model_file_imports_no_torch_distributed():
    out = subprocess.run(["grep", "distributed", str(REPO / "runtime" / "model.py")], capture_output=True, text=True)
    assert out.stdout == "", out.stdout


def test_process_groups_are_made_only_in_runtime_mesh():
    out = subprocess.run(["grep", "-rlE", "init_device_mesh|new_group", str(REPO / "runtime"), "--include=*.py"],
                         capture_output=True, text=True)
    assert out.stdout.split() == [str(REPO / "runtime" / "mesh.py")]


def test_model_file_is_at_most_250_lines():
    assert len((REPO / "runtime" / "model.py").read_text().splitlines()) <= 250


def test_vocab_is_padded_to_a_multiple_of_128_times_tp():
    spec = load_model("gpt-tiny")
    assert GPTConfig.from_spec(spec, 1).vocab == 8192
    assert GPTConfig.from_spec(spec, 3).vocab == 8448  # 22 * 384
    assert GPT(GPTConfig.from_spec(spec, 3)).head.out_features == 8448


def test_initial_weights_are_the_same_whatever_the_padding():
    # The first `vocab` rows of the embedding agree across paddings, so tp layouts that pad differently share them.
    small = init_full_tensor("embed.tok.weight", (256, 64), CFG, seed=3)
    padded = init_full_tensor("embed.tok.weight", (512, 64), CFG, seed=3)
    assert torch.equal(small, padded[:256])
    assert not torch.equal(small, init_full_tensor("embed.tok.weight", (256, 64), CFG, seed=4))


def stages(ranges):
    n = len(ranges)
    return [Stage(layers=tuple(r), embedding=i == 0, head=i == n - 1) for i, r in enumerate(ranges)]


@FAMILIES
@pytest.mark.parametrize("ranges,pp", [([[0, 1], [1, 4]], 2), ([[0, 1], [1, 2], [2, 2], [2, 4]], 2), ([[0, 2], [2, 3], [3, 4]], 3)])
def test_pipeline_stages_chained_compute_the_whole_model(cfg, ranges, pp):
    model = seeded_model(cfg)
    x = torch.randint(0, CFG.vocab, (2, CFG.seq_len))
    chunks = {}
    for rank in range(pp):
        chunks.update(split_model(model, stages(ranges), pp, rank))
    assert sorted(chunks) == list(range(len(ranges)))
    h = x
    for idx in range(len(ranges)):
        chunk = chunks[idx]
        assert [int(k) for k in chunk.layers] == list(range(*ranges[idx]))
        assert (chunk.embed is not None) == (idx == 0) and (chunk.head is not None) == (idx == len(ranges) - 1)
        h = chunk(h)
    assert torch.allclose(h, model(x), rtol=0, atol=1e-6)


def test_looped_placement_gives_rank_i_entries_c_times_pp_plus_i():
    assert stage_indices(8, 4, 1) == [1, 5]
    assert stage_indices(4, 2, 0) == [0, 2]


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_selective_recompute_reruns_only_the_attention_core():
    model = seeded_model()
    cores = [count_calls(b.attn.core) for b in model.layers.values()]
    mlps = [count_calls(b.mlp) for b in model.layers.values()]
    apply_recompute(model.layers, "selective")
    model(torch.randint(0, CFG.vocab, (2, CFG.seq_len))).sum().backward()
    assert [c[0] for c in cores] == [2] * CFG.layers  # forward, then again in backward
    assert [c[0] for c in mlps] == [1] * CFG.layers


def test_full_recompute_with_recompute_layers_reruns_only_the_first_k_blocks():
    model = seeded_model()
    blocks = [count_calls(b) for b in model.layers.values()]
    apply_recompute(model.layers, "full", recompute_layers=3)
    model(torch.randint(0, CFG.vocab, (2, CFG.seq_len))).sum().backward()
    assert [c[0] for c in blocks] == [2, 2, 2, 1]


@FAMILIES
def test_recompute_leaves_the_outputs_and_gradients_unchanged(cfg):
    x = torch.randint(0, cfg.vocab, (2, cfg.seq_len))
    grads = []
    for policy in ("none", "selective", "full"):
        model = seeded_model(cfg)
        apply_recompute(model.layers, policy)
        model(x).square().mean().backward()
        grads.append({clean_fqn(n): p.grad for n, p in model.named_parameters()})
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for k in grads[0]:
            assert torch.allclose(other[k], grads[0][k], rtol=1e-5, atol=1e-7), k
