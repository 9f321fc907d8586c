"""planner.cost.model_flops for the Llama family: k and v projections narrowed by kv_heads/heads, three SwiGLU
matrices, and the GPT formula unchanged (test_cost.py checks Narayanan et al.'s closed form)."""

from __future__ import annotations

import dataclasses

from planner.cost import model_flops
from planner.specs import load_model


def test_model_flops_count_narrow_k_v_projections_and_three_swiglu_matrices():
    m = load_model("llama3-8b")
    B, s, h, f, l, V, kv = 16, m.seq_len, m.hidden, m.ffn_hidden, m.layers, m.vocab, 8 * 128
    per_token_block = 2 * (h * h + h * kv + h * kv + h * h) + 2 * 3 * h * f + 2 * 2 * s * h  # q, k, v, o; gate, up, down; QK^T, AV
    assert model_flops(m, B, 0.0) == 3 * B * s * (l * per_token_block + 2 * h * V)


def test_model_flops_of_a_gpt_do_not_depend_on_the_family_defaults():
    gpt = load_model("gpt3-175b")
    assert model_flops(gpt, 1536, 1.0) == model_flops(dataclasses.replace(gpt, kv_heads=gpt.heads, mlp="gelu"), 1536, 1.0)
    # GQA and SwiGLU move it the way their matrices do.
    assert model_flops(dataclasses.replace(gpt, kv_heads=8), 1536, 0.0) < model_flops(gpt, 1536, 0.0)
    assert model_flops(dataclasses.replace(gpt, mlp="swiglu"), 1536, 0.0) > model_flops(gpt, 1536, 0.0)
