"""`planner export`: a plan as Megatron-LM arguments or a torchtitan TOML job config.

Names are those of the pinned versions below (read from their source at those commits; tests/data/ holds the
lists extracted from their parsers, and tests/planner/test_export.py holds every export against them, so a
rename upstream fails a test). What the other framework cannot express is said in a comment line, never
approximated without a word. Megatron-LM's and torchtitan's names map to meshplan's once, in planner/plan.py."""

from __future__ import annotations

import dataclasses
import shlex
import textwrap

from planner.errors import MeshplanError
from planner.plan import MEGATRON_NAMES, TORCHTITAN_NAMES, Plan, degrees_text

# The newest Megatron-LM release whose code runs on Python 3.10/3.11 as meshplan does (core_v0.17+ need 3.12).
MEGATRON_LM_RELEASE = "core_v0.16.1"
MEGATRON_LM_COMMIT = "55ac7082517c3878ae653c07c09c534b8aed49f6"
# torchtitan's last tree with TOML job configs (torchtitan/config/job_config.py); later trees configure in Python.
TORCHTITAN_COMMIT = "e347b1e5e6b6941d789d16d340145294d82dc71e"

# Model fields each export maps (the Llama-family ones with their defaults, as design.md names them); any other
# field with a non-default value is refused rather than dropped.
MODEL_DEFAULTS = {"kv_heads": None, "mlp": "gelu", "norm": "layernorm", "position": "learned", "bias": True,
                  "tie_embeddings": False, "qkv_bias": None, "rope_theta": 10000.0}
MODEL_FIELDS = {"name", "layers", "hidden", "heads", "ffn_hidden", "seq_len", "vocab", *MODEL_DEFAULTS}
PLAN_FIELDS = {"model", "cluster", "global_batch", "micro_batch", "num_microbatches", "tp", "pp", "dp", "schedule",
               "virtual_stages", "sequence_parallel", "zero", "cp", "precision", "compile", "stages", "prediction", "profile",
               "id", "version", "created_by", "framework"}  # framework: what the prediction was priced for, no knob


def _unmapped(obj, known: set[str], what: str, target: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name not in known and value != f.default:
            raise MeshplanError(f"{what}.{f.name}: {value!r} has no {target} mapping in this meshplan; export it by hand")


def _model(plan: Plan, name: str) -> object:
    return getattr(plan.model, name, MODEL_DEFAULTS[name])


def _meg(ours: str) -> str:
    """meshplan name -> Megatron-LM flag."""
    return "--" + next(k for k, v in MEGATRON_NAMES.items() if v == ours).replace("_", "-")


def stage_blocks(plan: Plan) -> list[int]:
    return [s.layers[1] - s.layers[0] for s in plan.stages]


def _megatron_split(plan: Plan) -> tuple[list[str], list[str]]:
    """(arguments, comments) for the layer split over pipeline stages."""
    counts, p, v = stage_blocks(plan), plan.pp, plan.virtual_stages
    if len(set(counts)) == 1:
        return ([_meg("virtual_stages"), str(v)] if v > 1 else []), []
    if v == 1 and len(set(counts[1:-1])) <= 1 and min(counts) > 0:
        middle = counts[1] if p > 2 else None
        args = []
        if counts[0] != middle:
            args += ["--decoder-first-pipeline-num-layers", str(counts[0])]
        if counts[-1] != middle:
            args += ["--decoder-last-pipeline-num-layers", str(counts[-1])]
        return args, []
    # Any other split: the layout string, one '|'-separated entry per (virtual) stage in model order, as ours.
    stages = ["E" * s.embedding + (f"t*{n}" if n else "") + "L" * s.head for s, n in zip(plan.stages, counts)]
    return ["--pipeline-model-parallel-layout", "|".join(stages)], []


def _megatron_recompute(plan: Plan) -> tuple[list[str], list[str]]:
    kinds = {s.recompute for s in plan.stages}
    if kinds == {"none"}:
        return [], []
    if kinds == {"selective"}:  # both recompute the attention core (Korthikanti et al. 2022)
        return ["--recompute-granularity", "selective"], []
    if "selective" in kinds:
        return ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"], [
            f"recompute: the plan mixes {'/'.join(sorted(kinds))} by stage; Megatron-LM has one granularity for all "
            "stages: full recomputation of every block here, which needs the least memory (and is slower than planned)"]
    per_stage = [n if s.recompute == "full" and s.recompute_layers is None else (s.recompute_layers or 0)
                 for s, n in zip(plan.stages, stage_blocks(plan))]
    if all(r == n for r, n in zip(per_stage, stage_blocks(plan))):
        return ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"], []
    most = max(per_stage)
    comments = [] if len(set(per_stage)) == 1 else [
        f"recompute: the plan recomputes {'/'.join(map(str, per_stage))} blocks of its stages; Megatron-LM recomputes "
        f"the first --recompute-num-layers blocks of every stage: {most} here, the most of any stage (more time, less memory)"]
    return ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", str(most)], comments


def megatron_argv(plan: Plan) -> list[str]:
    return _megatron(plan)[0]


def megatron_environment(plan: Plan) -> tuple[dict[str, str | None], list[str]]:
    """(environment, comments): what Megatron-LM's validate_args asks of the environment for this plan on GPUs before
    Blackwell (None: must not be set to 1), and the comment saying so. tp or cp > 1 needs CUDA_DEVICE_MAX_CONNECTIONS=1
    (one hardware queue, so that a GEMM cannot overtake the collective it waits for), except under Megatron-FSDP
    (ZeRO 2 and 3 here), which refuses 1 and warns that tp or cp beside it overlap less well."""
    if plan.zero >= 2:
        mixed = (" With tp or cp > 1 beside it, Megatron-LM warns that their communication then overlaps less well "
                 "(they want 1)" if plan.tp > 1 or plan.cp > 1 else "")
        return ({"CUDA_DEVICE_MAX_CONNECTIONS": None},
                [f"zero {plan.zero} (Megatron-FSDP): leave CUDA_DEVICE_MAX_CONNECTIONS unset or above 1 (Megatron-LM "
                 f"refuses 1 with FSDP).{mixed}"])
    if plan.tp > 1 or plan.cp > 1:
        return ({"CUDA_DEVICE_MAX_CONNECTIONS": "1"},
                ["tp or cp > 1: export CUDA_DEVICE_MAX_CONNECTIONS=1 before starting it (Megatron-LM requires it before Blackwell)"])
    return {}, []


def _megatron(plan: Plan) -> tuple[list[str], list[str]]:
    _unmapped(plan, PLAN_FIELDS, "plan", "Megatron-LM")
    _unmapped(plan.model, MODEL_FIELDS, "model", "Megatron-LM")
    m = plan.model
    argv = [_meg("tp"), str(plan.tp), _meg("pp"), str(plan.pp)]
    comments = [f"dp {plan.dp}: Megatron-LM takes it from the world size; start it on tp x cp x pp x dp = {plan.world_size} GPUs"]
    comments += megatron_environment(plan)[1]
    split, notes = _megatron_split(plan)
    argv += split
    comments += notes
    if plan.schedule == "gpipe" and plan.pp > 1:
        comments.append("schedule gpipe: Megatron-LM has no GPipe schedule and runs 1F1B (same bubble, less activation memory)")
    argv += [_meg("sequence_parallel")] * plan.sequence_parallel + [_meg("distributed_optimizer")] * plan.distributed_optimizer
    if plan.zero >= 2:  # Megatron-FSDP's strategies are ZeRO's stages: gradients too (2), and weights (3)
        argv += ["--use-megatron-fsdp", "--data-parallel-sharding-strategy", "optim_grads" if plan.zero == 2 else "optim_grads_params",
                 "--ckpt-format", "fsdp_dtensor"]  # the one checkpoint format validate_args allows Megatron-FSDP
    if plan.cp > 1:
        argv += [_meg("cp"), str(plan.cp)]
    if plan.precision == "fp8":
        argv += ["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"]
        comments.append("fp8: Megatron-LM runs FP8 through Transformer Engine (e4m3 forward, e5m2 gradients: 'hybrid'); meshplan "
                        "runs torchao's tensorwise float8")
    if plan.compile:
        comments.append("compile: Megatron-LM has no torch.compile flag; its fused kernels play that part")
    rc, notes = _megatron_recompute(plan)
    argv += rc
    comments += notes
    argv += [_meg("micro_batch"), str(plan.micro_batch), _meg("global_batch"), str(plan.global_batch), "--bf16"]
    argv += [_meg("layers"), str(m.layers), _meg("hidden"), str(m.hidden), _meg("heads"), str(m.heads),
             _meg("ffn_hidden"), str(m.ffn_hidden), _meg("seq_len"), str(m.seq_len),
             "--max-position-embeddings", str(m.seq_len), "--make-vocab-size-divisible-by", "128"]
    if _model(plan, "kv_heads") not in (None, m.heads):
        argv += ["--group-query-attention", _meg("kv_heads"), str(_model(plan, "kv_heads"))]
    argv += ["--swiglu"] * (_model(plan, "mlp") == "swiglu") + ["--disable-bias-linear"] * (not _model(plan, "bias"))
    if m.qkv_bias and not m.bias:  # Qwen2: biases on q, k and v only
        argv += ["--add-qkv-bias"]
    elif m.bias and not m.qkv_bias:
        raise MeshplanError("model.qkv_bias: false with bias: true (biases everywhere but q/k/v) has no Megatron-LM flag; "
                            "export it by hand")
    if m.position == "rope":
        # Megatron-LM parses --rotary-base as an int: 1e+06 (Mistral, Qwen2) is refused by its parser.
        if m.rope_theta != int(m.rope_theta):
            raise MeshplanError(f"model.rope_theta: {m.rope_theta:g} is not a whole number, and Megatron-LM's "
                                "--rotary-base takes an int; export it by hand")
        argv += ["--rotary-base", str(int(m.rope_theta))]
    argv += ["--normalization", {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}[_model(plan, "norm")]]
    argv += ["--position-embedding-type", {"learned": "learned_absolute", "rope": "rope"}[_model(plan, "position")]]
    argv += ["--untie-embeddings-and-output-weights"] * (not _model(plan, "tie_embeddings"))
    comments.append(f"vocab {m.vocab}: Megatron-LM takes it from the tokenizer (--tokenizer-type ...; NullTokenizer with "
                    f"--vocab-size {m.vocab} for synthetic data) and pads it to a multiple of 128 x tp, as meshplan prices it")
    return argv, comments


def _comment_lines(comments: list[str]) -> list[str]:
    return [line for c in comments for line in textwrap.wrap(c, 100, initial_indent="# ", subsequent_indent="#   ")]


def megatron_text(plan: Plan) -> str:
    """The arguments one per line (continued with backslashes, to paste after pretrain_gpt.py), comments first."""
    argv, comments = _megatron(plan)
    lines, i = [], 0
    while i < len(argv):
        j = i + 1 if i + 1 < len(argv) and not argv[i + 1].startswith("--") else i
        lines.append(shlex.join(argv[i:j + 1]))  # a layout string holds | and *: quoted for the shell
        i = j + 1
    head = [f"# Megatron-LM {MEGATRON_LM_RELEASE} ({MEGATRON_LM_COMMIT[:7]}) arguments for meshplan plan {plan.id}: "
            f"{plan.model.name}, {degrees_text(plan)}"] + _comment_lines(comments)
    return "\n".join(head + [line + " \\" for line in lines[:-1]] + lines[-1:]) + "\n"


# ---------------------------------------------------------------- torchtitan

TORCHTITAN_SCHEDULES = {"1f1b": "1F1B", "gpipe": "GPipe", "interleaved": "Interleaved1F1B"}


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list) and value and isinstance(value[0], list):  # one inner list a line
        return "[\n" + "".join(f"  {_toml(v)},\n" for v in value) + "]"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


# torchtitan's own Llama 3 flavors (torchtitan/models/llama3/__init__.py @e347b1e: llama3_args), with the SwiGLU
# width its FeedForward derives (8/3 dim, times ffn_dim_multiplier, rounded up to multiple_of) and its defaults
# (vocab_size 128256, rope_theta 500000, no biases, untied output, RMSNorm).
TORCHTITAN_LLAMA3 = {"8B": (32, 4096, 32, 8, 14336), "70B": (80, 8192, 64, 8, 28672), "405B": (126, 16384, 128, 8, 53248)}


def torchtitan_flavor(model) -> str | None:
    """torchtitan's llama3 flavor that is exactly this model, or None."""
    if (model.mlp, model.norm, model.position, model.bias, model.tie_embeddings, bool(model.qkv_bias), model.vocab,
            model.rope_theta) != ("swiglu", "rmsnorm", "rope", False, False, False, 128256, 500000.0):
        return None
    shape = (model.layers, model.hidden, model.heads, model.kv_heads, model.ffn_hidden)
    return next((name for name, s in TORCHTITAN_LLAMA3.items() if s == shape), None)


def _titan_parts(plan: Plan) -> list[list[str]]:
    """torchtitan's module FQNs per model part (its llama-style names: tok_embeddings, layers.N, norm, output)."""
    parts = []
    for s in plan.stages:
        names = ["tok_embeddings"] * s.embedding + [f"layers.{i}" for i in range(*s.layers)] + ["norm", "output"] * s.head
        parts.append(names)
    return parts


def _tt(ours: str) -> str:
    """meshplan name -> torchtitan section.key (dp has two keys, written out where it is used)."""
    return next(k for k, v in TORCHTITAN_NAMES.items() if v == ours)


def torchtitan_keys(plan: Plan) -> tuple[dict[str, object], list[str]]:
    """({"section.key": value}, comments)."""
    _unmapped(plan, PLAN_FIELDS, "plan", "torchtitan")
    _unmapped(plan.model, MODEL_FIELDS, "model", "torchtitan")
    m = plan.model
    flavor = torchtitan_flavor(m)
    comments = [f"start it on tp x cp x pp x dp = {plan.world_size} GPUs",
                f"[model]: torchtitan's llama3 {flavor} is this model's shape (it also applies Llama 3.1's RoPE scaling, "
                f"which changes no cost)" if flavor else
                f"[model]: torchtitan @{TORCHTITAN_COMMIT[:7]} has no model of meshplan's {m.name} (layers {m.layers}, hidden "
                f"{m.hidden}, heads {m.heads}, ffn_hidden {m.ffn_hidden}, vocab {m.vocab}, {_model(plan, 'mlp')} MLP, "
                f"{_model(plan, 'norm')}, {_model(plan, 'position')} positions"
                + (f", rope_theta {m.rope_theta:g}" if m.position == "rope" else "") + (", q/k/v biases" if m.qkv_bias else "")
                + "): register one of these shapes under this name",
                f"float8 {'on' if plan.precision == 'fp8' else 'off'}, compile {'on' if plan.compile else 'off'}: as meshplan priced this plan"]
    keys: dict[str, object] = {"model.name": "llama3" if flavor else m.name, "model.flavor": flavor or m.name, "model.converters": ["float8"] if plan.precision == "fp8" else [],
                               # torchtitan runs global / (local x dp) accumulation steps of local sequences per dp
                               # rank, each split into local / micro_batch pipeline microbatches where pp > 1: so
                               # one step of global / dp with pp, and micro_batch-sized steps without
                               "training.local_batch_size": plan.global_batch // plan.dp if plan.pp > 1 else plan.micro_batch,
                               _tt("global_batch"): plan.global_batch,
                               _tt("seq_len"): m.seq_len, "training.mixed_precision_param": "bfloat16",
                               _tt("tp"): plan.tp, _tt("pp"): plan.pp,
                               "parallelism.data_parallel_replicate_degree": 1 if plan.distributed_optimizer else plan.dp,
                               "parallelism.data_parallel_shard_degree": plan.dp if plan.distributed_optimizer else 1,
                               _tt("cp"): plan.cp}
    if plan.zero >= 1:
        keys["parallelism.fsdp_reshard_after_forward"] = "always" if plan.zero == 3 else "never"
    if plan.zero == 1:
        comments.append("zero 1: torchtitan has no sharded optimizer alone; FSDP2 without resharding (ZeRO-2) comes closest "
                        "and also shards the gradients (less memory than planned)")
    if plan.precision == "fp8":
        keys["quantize.linear.float8.recipe_name"] = "tensorwise"
    if plan.tp > 1 and not plan.sequence_parallel:
        comments.append("sequence_parallel off: torchtitan's tensor parallelism always shards the norms over the sequence")
    if plan.pp > 1:
        keys |= {_tt("schedule"): TORCHTITAN_SCHEDULES[plan.schedule], _tt("micro_batch"): plan.micro_batch,
                 "parallelism.module_fqns_per_model_part": _titan_parts(plan)}
    kinds = {s.recompute for s in plan.stages}
    partial = any(s.recompute_layers is not None for s in plan.stages)
    keys[_tt("recompute")] = mode = kinds.pop() if len(kinds) == 1 and not partial else "full"
    if mode == "selective":
        keys["activation_checkpoint.selective_ac_option"] = "op"
        comments.append("selective: meshplan recomputes the attention core (Korthikanti et al. 2022); torchtitan's op-level "
                        "selective checkpointing keeps a different set of activations: check the memory on a first run")
    elif mode == "full" and (partial or len({s.recompute for s in plan.stages}) > 1):
        comments.append("recompute: the plan recomputes some blocks per stage; torchtitan has one mode for all blocks: full, "
                        "which needs the least memory (and is slower than planned)")
    keys["compile.enable"] = plan.compile
    if plan.compile:
        keys["compile.components"] = ["model"]
    return keys, comments


def torchtitan_toml(plan: Plan) -> str:
    keys, comments = torchtitan_keys(plan)
    lines = [f"# torchtitan (@{TORCHTITAN_COMMIT[:7]}) job config for meshplan plan {plan.id}: {plan.model.name}, "
             f"{degrees_text(plan)}"] + _comment_lines(comments)
    sections: dict[str, list[str]] = {}
    for key, value in keys.items():
        head, name = key.rsplit(".", 1)
        sections.setdefault(head, []).append(f"{name} = {_toml(value)}")
    for head, entries in sections.items():
        lines += ["", f"[{head}]", *entries]
    return "\n".join(lines) + "\n"


EXPORTERS = {"megatron": megatron_text, "torchtitan": torchtitan_toml}
