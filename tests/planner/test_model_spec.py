"""planner/specs.py's ModelSpec: the Llama-family fields, their defaults (a GPT spec is what it was), exact
parameter counts against the published ones, and bad fields refused with the field named."""

from __future__ import annotations

import dataclasses

import pytest

from planner.errors import SpecError
from planner.plan import plan_from_dict, plan_id
from planner.specs import load_model, model_from_dict
from tests.runtime.planfiles import plan_dict

GPT_FIELDS = {"layers": 8, "hidden": 256, "heads": 8, "ffn_hidden": 1024, "seq_len": 128, "vocab": 8192}


def test_llama3_8b_preset_has_8030261248_params():
    assert load_model("llama3-8b").params() == 8_030_261_248


def test_llama3_70b_preset_has_70553706496_params():
    assert load_model("llama3-70b").params() == 70_553_706_496


def test_llama3_405b_preset_has_405853388800_params():
    assert load_model("llama3-405b").params() == 405_853_388_800


@pytest.mark.parametrize("name,params", [("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320),
                                         ("llama2-70b", 68_976_648_192), ("mistral-7b", 7_248_023_552)])
def test_llama2_and_mistral_presets_have_their_published_param_counts(name, params):
    # Hugging Face's safetensors metadata of meta-llama/Llama-2-*-hf and mistralai/Mistral-7B-v0.3.
    assert load_model(name).params() == params


def test_llama_tiny_is_gpt_tinys_llama_twin():
    tiny = load_model("llama-tiny")
    assert (tiny.layers, tiny.hidden, tiny.heads, tiny.kv_heads, tiny.ffn_hidden, tiny.seq_len, tiny.vocab) == (8, 256, 8, 2, 688, 128, 8192)
    assert (tiny.mlp, tiny.norm, tiny.position, tiny.bias, tiny.tie_embeddings) == ("swiglu", "rmsnorm", "rope", False, False)


def test_gpt_defaults_keep_a_gpt_spec_and_its_counts_as_before():
    m = model_from_dict({"name": "g", **GPT_FIELDS}, "test")
    assert (m.kv_heads, m.mlp, m.norm, m.position, m.bias, m.tie_embeddings, m.qkv_bias) == (8, "gelu", "layernorm", "learned", True, False, True)
    h, f = 256, 1024
    # The formula layer_params had before the Llama fields (memory.py relies on it).
    assert m.layer_params() == 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h
    # The count params() gave before: untied head, padded vocab (8192 is a multiple of 128), final LayerNorm.
    assert m.params() == m.padded_params(1) == 8 * m.layer_params() + 8192 * h + 128 * h + 8192 * h + 2 * h


def test_params_use_the_exact_vocab_and_padded_params_the_runtimes_padded_one():
    mt = load_model("mt-nlg-530b")  # vocab 50257, padded to 50304 at tp 1 and 51200 at tp 8
    assert mt.params() - mt.padded_params(1) == -(50304 - 50257) * mt.hidden * 2
    assert mt.embedding_params(8) - mt.embedding_params() == (51200 - 50257) * mt.hidden


def test_tied_embeddings_count_the_vocab_matrix_once():
    untied = load_model("llama-tiny")
    tied = dataclasses.replace(untied, tie_embeddings=True)
    assert untied.params() - tied.params() == 8192 * 256 and tied.head_params() == 0


def test_qkv_bias_alone_adds_q_k_and_v_biases_only():
    base = load_model("llama-tiny")
    qwen_like = dataclasses.replace(base, qkv_bias=True)
    assert qwen_like.layer_params() - base.layer_params() == 256 + 2 * 2 * 32  # q: h, k and v: kv_heads * head_dim each


def test_adding_the_family_fields_left_gpt_plan_ids_unchanged():
    # The id this plan had before ModelSpec gained kv_heads, mlp, norm, position, bias, tie_embeddings, qkv_bias, rope_theta.
    assert plan_id(plan_from_dict(plan_dict(tp=2, pp=2), "test")) == "3913b55dbb"


@pytest.mark.parametrize("fields,field", [
    ({"kv_heads": 3}, "kv_heads"),        # 8 heads are not divisible by 3
    ({"kv_heads": 0}, "kv_heads"),
    ({"mlp": "geglu"}, "mlp"),
    ({"norm": "batchnorm"}, "norm"),
    ({"position": "alibi"}, "position"),
    ({"bias": "no"}, "bias"),
    ({"tie_embeddings": 1}, "tie_embeddings"),
    ({"position": "rope", "hidden": 264, "heads": 24}, "heads"),  # head dim 11 is odd: RoPE rotates pairs
])
def test_bad_family_fields_are_refused_naming_the_field(fields, field):
    with pytest.raises(SpecError) as e:
        model_from_dict({"name": "bad", **GPT_FIELDS, **fields}, "test.yaml")
    assert e.value.field == field


def test_tp_must_divide_kv_heads_and_a_plan_that_does_not_is_refused_naming_tp():
    tiny = load_model("llama-tiny")  # 8 heads, 2 kv heads
    assert tiny.tp_problem(2) is None
    assert tiny.tp_problem(4) == "kv_heads 2 are not divisible by tp 4; pick a tp that divides kv_heads"
    model = {**dataclasses.asdict(tiny), "ffn_hidden": 704}  # 704 divides by 4, so only kv_heads stands in the way
    with pytest.raises(SpecError) as e:
        plan_from_dict(plan_dict(tp=4, model=model), "plan.json")
    assert e.value.field == "tp" and "kv_heads 2" in e.value.message


def test_tied_embeddings_across_pipeline_stages_are_refused_naming_tie_embeddings():
    model = {**dataclasses.asdict(load_model("llama-tiny")), "tie_embeddings": True}
    assert plan_from_dict(plan_dict(tp=2, model=model), "plan.json").model.tie_embeddings
    with pytest.raises(SpecError) as e:
        plan_from_dict(plan_dict(pp=2, model=model), "plan.json")
    assert e.value.field == "tie_embeddings" and "different pipeline stages" in e.value.message
