"""planner/hf.py: a Hugging Face config.json (or a folder holding one) read offline gives the exact model, and
what meshplan cannot represent exactly is refused naming the config key; `--model` routes to it."""

from __future__ import annotations

import json

import pytest

from planner.cli import main
from planner.errors import SpecError
from planner.specs import load_model

# meta-llama/Meta-Llama-3-8B config.json as published (transformers 4.40).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0",
    "use_cache": True, "vocab_size": 128256,
}
# mistralai/Mistral-7B-v0.1 config.json (sliding_window 4096); v0.3 sets it null and vocab_size 32768.
MISTRAL_V01 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000,
}
# Qwen/Qwen2.5-0.5B config.json: q/k/v biases, tied embeddings, the window unused (use_sliding_window false).
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
# openai-community/gpt2 config.json (GPT-2 small; tie_word_embeddings is GPT2Config's default, true).
GPT2 = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "bos_token_id": 50256,
    "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
    "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1,
    "summary_activation": None, "vocab_size": 50257,
}


def write(tmp_path, config: dict, folder: str = "model"):
    d = tmp_path / folder
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_llama3_8b_config_json_gives_the_presets_params_and_shape(tmp_path):
    folder = write(tmp_path, LLAMA3_8B, "Meta-Llama-3-8B")
    preset = load_model("llama3-8b")
    for arg in (str(folder), str(folder / "config.json")):
        m = load_model(arg)
        assert m.params() == preset.params() == 8_030_261_248
        assert m.name == "Meta-Llama-3-8B"
        for field in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "seq_len", "vocab", "mlp", "norm", "position",
                      "bias", "tie_embeddings", "qkv_bias", "rope_theta"):
            assert getattr(m, field) == getattr(preset, field), field


def test_qwen2_config_is_read_exactly_with_q_k_v_biases_and_tied_embeddings(tmp_path):
    m = load_model(str(write(tmp_path, QWEN25_05B) / "config.json"))
    assert (m.bias, m.qkv_bias, m.tie_embeddings, m.kv_heads) == (False, True, True, 2)
    # Qwen2.5-0.5B's published count (its safetensors metadata): 494,032,768.
    assert m.params() == 494_032_768


def test_gpt2_config_gives_gpt2_smalls_124439808_params(tmp_path):
    m = load_model(str(write(tmp_path, GPT2)))
    assert (m.mlp, m.norm, m.position, m.bias, m.tie_embeddings) == ("gelu", "layernorm", "learned", True, True)
    assert m.params() == 124_439_808


def test_mistral_v03_with_sliding_window_null_is_read(tmp_path):
    v03 = {**MISTRAL_V01, "sliding_window": None, "vocab_size": 32768, "rope_theta": 1000000.0}
    m = load_model(str(write(tmp_path, v03)))
    assert m.params() == load_model("mistral-7b").params() == 7_248_023_552


@pytest.mark.parametrize("config,field", [
    (MISTRAL_V01, "sliding_window"),                                   # 4096 < 32768 tokens
    ({**MISTRAL_V01, "sliding_window": 4096, "max_position_embeddings": 4096, "hidden_act": "gelu"}, "hidden_act"),
    ({**QWEN25_05B, "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 12}, "sliding_window"),
    ({**LLAMA3_8B, "architectures": ["MixtralForCausalLM"]}, "architectures"),
    ({**LLAMA3_8B, "num_local_experts": 8, "num_experts_per_tok": 2}, "num_local_experts"),
    ({**LLAMA3_8B, "head_dim": 256}, "head_dim"),
    ({**LLAMA3_8B, "attention_bias": True}, "attention_bias"),        # q/k/v/o biases but none in the MLP
    ({**LLAMA3_8B, "num_key_value_heads": 5}, "num_key_value_heads"),  # 32 heads not divisible by 5
    ({**LLAMA3_8B, "hidden_size": "4096"}, "hidden_size"),
    ({k: v for k, v in LLAMA3_8B.items() if k != "intermediate_size"}, "intermediate_size"),
    ({**LLAMA3_8B, "layer_types": ["full_attention", "sliding_attention"] * 16}, "layer_types"),
])
def test_config_that_cannot_be_represented_exactly_is_refused_naming_the_key(tmp_path, config, field):
    with pytest.raises(SpecError) as e:
        load_model(str(write(tmp_path, config)))
    assert e.value.field == field


def test_a_qwen2_sliding_window_refusal_says_set_use_sliding_window_false_not_sliding_window_null(tmp_path):
    with pytest.raises(SpecError) as e:
        load_model(str(write(tmp_path, {**QWEN25_05B, "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 12})))
    assert e.value.field == "sliding_window" and "set use_sliding_window false" in e.value.message, e.value
    assert "sliding_window null" not in e.value.message  # Mistral's switch; Qwen2's own is use_sliding_window


def test_a_qwen2_config_with_use_sliding_window_and_no_window_key_is_refused_at_qwen2s_default_4096_window(tmp_path):
    config = {k: v for k, v in QWEN25_05B.items() if k != "sliding_window"}
    with pytest.raises(SpecError) as e:  # was read as full attention
        load_model(str(write(tmp_path, {**config, "use_sliding_window": True, "max_window_layers": 12})))
    assert e.value.field == "sliding_window" and "a 4096-token window" in e.value.message, e.value


def test_a_qwen2_window_from_max_window_layers_on_is_no_window_when_that_is_past_the_last_layer(tmp_path):
    # Qwen2 slides only layers max_window_layers and up (Qwen2Config.layer_types): 24 of 24 is full attention.
    m = load_model(str(write(tmp_path, {**QWEN25_05B, "use_sliding_window": True, "sliding_window": 4096})))
    assert m.seq_len == 32768


def test_seq_len_applies_before_the_window_check_so_a_window_as_long_as_the_sequence_is_full_attention(tmp_path):
    # Mistral v0.1: a 4096-token window on 32,768-token positions; at --seq-len 4096 it attends to the whole sequence.
    path = str(write(tmp_path, MISTRAL_V01) / "config.json")
    assert load_model(path, seq_len=4096).seq_len == 4096
    with pytest.raises(SpecError) as e:
        load_model(path, seq_len=8192)
    assert e.value.field == "sliding_window" and "8192-token sequence (--seq-len)" in e.value.message
    assert "--seq-len 4096" in e.value.message
    with pytest.raises(SpecError, match="has learned positions"):
        load_model(str(write(tmp_path, GPT2) / "config.json"), seq_len=512)


def test_llama_with_both_attention_and_mlp_biases_is_every_linear_biased(tmp_path):
    m = load_model(str(write(tmp_path, {**LLAMA3_8B, "attention_bias": True, "mlp_bias": True})))
    assert m.bias and m.qkv_bias
    assert m.params() - 8_030_261_248 == 32 * (4096 + 2 * 1024 + 4096 + 2 * 14336 + 4096)


def test_a_meshplan_model_json_is_still_a_meshplan_model(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"layers": 2, "hidden": 64, "heads": 4, "ffn_hidden": 256, "seq_len": 32, "vocab": 256, "mlp": "swiglu"}))
    m = load_model(str(path))
    assert (m.name, m.mlp, m.layers) == ("mine", "swiglu", 2)


def test_a_config_json_without_architectures_or_model_type_is_refused_as_neither_format_not_as_an_unknown_key(tmp_path):
    config = {k: v for k, v in LLAMA3_8B.items() if k not in ("architectures", "model_type")}
    path = tmp_path / "llama.json"
    path.write_text(json.dumps(config))
    with pytest.raises(SpecError) as e:
        load_model(str(path))
    assert e.value.field == "architectures", e.value  # was "attention_bias: unknown key"
    assert "neither a meshplan model file (keys layers, hidden" in e.value.message
    assert '"architectures" (meshplan reads LlamaForCausalLM' in e.value.message and "model_type" in e.value.message


def test_a_json_file_of_neither_format_is_refused_naming_what_each_format_has(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"learning_rate": 3e-4}))
    with pytest.raises(SpecError) as e:
        load_model(str(path))
    assert e.value.field == "(top level)" and "meshplan model file (keys layers" in e.value.message, e.value
    assert "Hugging Face config (keys architectures or model_type)" in e.value.message


def test_folder_without_config_json_is_refused_naming_it(tmp_path):
    with pytest.raises(SpecError) as e:
        load_model(str(tmp_path))
    assert e.value.field == "config.json"


def test_cli_refuses_a_sliding_window_config_in_one_line_exit_2(tmp_path, capsys):
    folder = write(tmp_path, MISTRAL_V01)
    code = main(["predict", "--model", str(folder), "--cluster", "dgx-a100-80gb", "--nodes", "1", "--global-batch", "8",
                 "--tp", "8", "--pp", "1", "--dp", "1", "--micro-batch", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and ": sliding_window: " in err, err
