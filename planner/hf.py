"""A Hugging Face `config.json` read offline into a ModelSpec: LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM and GPT2LMHeadModel. Pure Python, no transformers import.

What decides parameters, FLOPs or memory is read exactly, or the config is refused with a SpecError naming
the Hugging Face key: another architecture, mixture-of-experts keys, a sliding window shorter than the
sequence, biases meshplan cannot place (Llama's attention_bias without mlp_bias), an activation other
than SiLU (SwiGLU) or GELU, a head_dim other than hidden_size / num_attention_heads.

Read but not kept, because they change neither parameters nor FLOPs: rope_scaling (long-context RoPE
frequencies; meshplan's runtime uses plain RoPE with rope_theta), the norm epsilon, dropout, initializer
range, dtype, quantization and token ids. GPT-2's tanh-approximated GELU (gelu_new) is read as `gelu`: the
runtime computes the exact erf GELU, with the same parameters and FLOPs.

seq_len is max_position_embeddings (n_positions for GPT-2): the longest sequence the model was built for;
for learned positions (GPT-2) it is also the size of the position table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from planner.errors import SpecError
from planner.parsing import read_mapping
from planner.specs import ModelSpec, model_from_dict, with_seq_len

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "GPT2LMHeadModel": "gpt2"}
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
            "moe_intermediate_size", "decoder_sparse_step", "first_k_dense_replace")
GELUS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")

# The Hugging Face key behind each ModelSpec field, so a refusal names what the user sees in config.json.
LLAMA_KEYS = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
              "kv_heads": "num_key_value_heads", "ffn_hidden": "intermediate_size", "seq_len": "max_position_embeddings",
              "vocab": "vocab_size", "rope_theta": "rope_theta", "tie_embeddings": "tie_word_embeddings"}
GPT2_KEYS = {"layers": "n_layer", "hidden": "n_embd", "heads": "n_head", "ffn_hidden": "n_inner", "seq_len": "n_positions",
             "vocab": "vocab_size", "tie_embeddings": "tie_word_embeddings"}
_MISSING = object()


def is_hf_config(data: dict) -> bool:
    """A mapping that is a Hugging Face model config rather than a meshplan model file."""
    return "architectures" in data or "model_type" in data


_MESHPLAN_SIZES = ("layers", "hidden", "heads", "ffn_hidden", "seq_len", "vocab")
_ARCHITECTURE_KEYS = (f'"architectures" (meshplan reads {", ".join(ARCHITECTURES)}) or "model_type" '
                      f'({", ".join(ARCHITECTURES.values())})')


def check_meshplan_model(data: dict, source: str) -> None:
    """For a mapping that is no Hugging Face config (is_hf_config): one with keys that are no ModelSpec field and none of
    a meshplan model file's sizes is neither format, and is refused saying so (not as its first unknown key)."""
    if set(_MESHPLAN_SIZES) & set(data) or not set(data) - set(ModelSpec.__dataclass_fields__):
        return  # a meshplan model file: ModelSpec's own checks name a wrong or missing key
    hf_keys = sorted(set(data) & {*LLAMA_KEYS.values(), *GPT2_KEYS.values()})
    what = (f"it has Hugging Face keys ({', '.join(hf_keys[:3])}, ...) but neither architectures nor model_type; add its "
            if hf_keys else "it has none of these keys; give a meshplan model file's sizes, or a config.json's ")
    raise SpecError(source, "architectures" if hf_keys else "(top level)",
                    f"neither a meshplan model file (keys {', '.join(_MESHPLAN_SIZES)}, ...) nor a Hugging Face config "
                    f"(keys architectures or model_type): {what}{_ARCHITECTURE_KEYS}")


def model_from_mapping(data: dict, source: str, name: str, seq_len: int | None = None) -> ModelSpec:
    """A model file's contents, a Hugging Face config.json (is_hf_config) or a meshplan model, named `name` unless
    a meshplan model names itself (planner.specs.load_model reads files with it, the dashboard its text box), on
    seq_len-token sequences where given (--seq-len: specs.with_seq_len)."""
    if is_hf_config(data):
        return model_from_hf(data, source, name, seq_len)
    check_meshplan_model(data, source)
    data.setdefault("name", name)
    model = model_from_dict(data, source)
    return model if seq_len is None else with_seq_len(model, seq_len, "--seq-len")


def model_name(path: Path) -> str:
    """A model's name from its file: the folder's name for .../NAME/config.json, else the file's stem."""
    return path.resolve().parent.name if path.name == "config.json" else path.stem


def load_hf_folder(folder: Path, seq_len: int | None = None) -> ModelSpec:
    """A Hugging Face model folder (as `huggingface-cli download` leaves it): its config.json."""
    config = folder / "config.json"
    if not config.is_file():
        raise SpecError(str(folder), "config.json", "this folder holds no config.json; give a Hugging Face model folder, "
                        "a config.json, a meshplan model YAML or a preset name")
    data = read_mapping(config)
    if not is_hf_config(data):
        raise SpecError(str(config), "architectures", f"not a Hugging Face model config (it has neither architectures nor model_type); add its {_ARCHITECTURE_KEYS}")
    return model_from_hf(data, str(config), folder.resolve().name, seq_len)


def _get(data: dict, source: str, key: str, kind: type, default: Any = _MISSING) -> Any:
    """data[key] checked for type (an int where an int is due, ...); default when absent or null."""
    value = data.get(key)
    if value is None:
        if default is _MISSING:
            raise SpecError(source, key, "missing; a Hugging Face config of this architecture needs it")
        return default
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise SpecError(source, key, f"expected {kind.__name__}, got {value!r}")
    return value


def _family(data: dict, source: str) -> str:
    archs = data.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
            raise SpecError(source, "architectures", f"got {archs!r}; meshplan reads exactly one of {', '.join(ARCHITECTURES)}")
        return ARCHITECTURES[archs[0]]
    model_type = data.get("model_type")
    if model_type not in ARCHITECTURES.values():
        raise SpecError(source, "model_type", f"got {model_type!r}; meshplan reads {', '.join(ARCHITECTURES.values())}")
    return model_type


def _refuse_sparse_attention_and_experts(data: dict, source: str, family: str, seq_len: int, flag: bool) -> None:
    """flag: seq_len is --seq-len's, not the config's own."""
    for key in MOE_KEYS:
        if data.get(key) not in (None, 0):
            raise SpecError(source, key, f"mixture-of-experts models are not modelled (got {data[key]!r}); meshplan plans dense models")
    layer_types = data.get("layer_types")
    if isinstance(layer_types, list) and any(t != "full_attention" for t in layer_types):
        raise SpecError(source, "layer_types", "some layers do not use full attention (sliding windows); meshplan models full causal attention only")
    # Mistral's and Qwen2's default window is 4096 (MistralConfig, Qwen2Config); Qwen2 uses its window only with use_sliding_window.
    window = data.get("sliding_window", 4096 if family in ("mistral", "qwen2") else None)
    if family == "qwen2" and (not _get(data, source, "use_sliding_window", bool, False)
                              or _get(data, source, "max_window_layers", int, 28) >= _get(data, source, "num_hidden_layers", int)):
        window = None  # Qwen2's window is on only with use_sliding_window, and only for layers from max_window_layers on
    if window is not None and _get(data, source, "sliding_window", int, window) < seq_len:
        # The fix is the architecture's own switch: Qwen2 turns its window off with use_sliding_window (as its released configs do).
        fix = ("set use_sliding_window false, as Qwen2's released configs have it" if family == "qwen2"
               else "use a config with sliding_window null (Mistral 7B v0.3, say)")
        shorter = f"plan {window:,}-token sequences (--seq-len {window}), which the window covers whole"
        raise SpecError(source, "sliding_window", f"attention over a {window}-token window shorter than the {seq_len}-token sequence"
                        f"{' (--seq-len)' if flag else ''} is not modelled; {fix}, or {shorter}")


def _biases(data: dict, source: str, family: str) -> tuple[bool, bool | None]:
    """(bias, qkv_bias) as ModelSpec takes them."""
    if family == "qwen2":
        return False, True  # Qwen2 hard-codes biases on q, k and v only (no o, MLP or norm biases)
    attention, mlp = _get(data, source, "attention_bias", bool, False), _get(data, source, "mlp_bias", bool, False)
    if family == "mistral" and (attention or mlp):
        raise SpecError(source, "attention_bias" if attention else "mlp_bias", "MistralForCausalLM has no biases; remove the key or set it false")
    if attention != mlp:
        # Llama's attention_bias covers q, k, v and o: o without the MLP's biases (or the reverse) has no ModelSpec spelling.
        raise SpecError(source, "attention_bias", f"attention_bias {attention} with mlp_bias {mlp} is not modelled; "
                        "meshplan biases every linear layer or none (or q/k/v alone, as Qwen2)")
    return attention, None


def _llama_like(data: dict, source: str, family: str) -> dict:
    act = _get(data, source, "hidden_act", str, "silu")
    if act != "silu":
        raise SpecError(source, "hidden_act", f"got {act!r}; {family} MLPs with SiLU (SwiGLU) are modelled, not other gates")
    heads = _get(data, source, "num_attention_heads", int)
    hidden = _get(data, source, "hidden_size", int)
    head_dim = _get(data, source, "head_dim", int, None)
    if head_dim is not None and heads > 0 and head_dim * heads != hidden:
        raise SpecError(source, "head_dim", f"{head_dim} x {heads} heads != hidden_size {hidden}; meshplan models head_dim = hidden_size / heads")
    rope = data.get("rope_parameters") if isinstance(data.get("rope_parameters"), dict) else data  # newer configs nest it
    bias, qkv_bias = _biases(data, source, family)
    spec = {"layers": _get(data, source, "num_hidden_layers", int), "hidden": hidden, "heads": heads,
            "kv_heads": _get(data, source, "num_key_value_heads", int, heads),
            "ffn_hidden": _get(data, source, "intermediate_size", int),
            "seq_len": _get(data, source, "max_position_embeddings", int), "vocab": _get(data, source, "vocab_size", int),
            "mlp": "swiglu", "norm": "rmsnorm", "position": "rope", "bias": bias,
            "rope_theta": float(_get(rope, source, "rope_theta", float, 10000.0)),
            "tie_embeddings": _get(data, source, "tie_word_embeddings", bool, False)}
    if qkv_bias is not None:
        spec["qkv_bias"] = qkv_bias
    return spec


def _gpt2(data: dict, source: str) -> dict:
    act = _get(data, source, "activation_function", str, "gelu_new")
    if act not in GELUS:
        raise SpecError(source, "activation_function", f"got {act!r}; expected one of {', '.join(GELUS)}")
    if _get(data, source, "add_cross_attention", bool, False):
        raise SpecError(source, "add_cross_attention", "cross-attention (an encoder-decoder GPT-2) is not modelled")
    hidden = _get(data, source, "n_embd", int)
    return {"layers": _get(data, source, "n_layer", int), "hidden": hidden, "heads": _get(data, source, "n_head", int),
            "ffn_hidden": _get(data, source, "n_inner", int, 4 * hidden),
            "seq_len": _get(data, source, "n_positions", int, _get(data, source, "n_ctx", int, 1024)),
            "vocab": _get(data, source, "vocab_size", int), "mlp": "gelu", "norm": "layernorm", "position": "learned",
            "bias": True, "tie_embeddings": _get(data, source, "tie_word_embeddings", bool, True)}


def model_from_hf(data: dict, source: str, name: str, seq_len: int | None = None) -> ModelSpec:
    """The ModelSpec of a Hugging Face config mapping, on seq_len-token sequences where given (--seq-len; the
    config's own is max_position_embeddings); SpecError naming the config key where it cannot be exact."""
    family = _family(data, source)
    spec = _gpt2(data, source) if family == "gpt2" else _llama_like(data, source, family)
    _refuse_sparse_attention_and_experts(data, source, family, seq_len or spec["seq_len"], seq_len is not None)
    keys = GPT2_KEYS if family == "gpt2" else LLAMA_KEYS
    try:
        model = model_from_dict({"name": name, **spec}, source)
    except SpecError as e:  # name the config.json key, not meshplan's field
        raise SpecError(source, keys.get(e.field, e.field), e.message) from None
    return model if seq_len is None else with_seq_len(model, seq_len, "--seq-len")
