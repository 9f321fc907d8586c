"""planner export: Megatron-LM arguments and torchtitan TOML that name only what those projects accept at the
pinned commits (tests/data/*_<commit>.txt, extracted from their parsers by tests/data/upstream.py), that say
the plan's split, schedule and recomputation exactly, and that say in a comment what they cannot."""

from __future__ import annotations

import dataclasses
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from planner import export
from planner.cli import main
from planner.errors import MeshplanError
from planner.plan import MEGATRON_NAMES, TORCHTITAN_NAMES, write_plan
from planner.specs import ModelSpec
from tests.planner.export_plans import example_plans, without
from tests.planner.refusals import refused

DATA = Path(__file__).resolve().parents[1] / "data"


def accepted(path: Path) -> dict[str, set[str]]:
    """name -> the values it takes (empty: any)."""
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, *choices = line.split()
            out[name] = set(choices)
    return out


MEGATRON = accepted(DATA / f"megatron_args_{export.MEGATRON_LM_COMMIT[:7]}.txt")
TORCHTITAN = accepted(DATA / f"torchtitan_keys_{export.TORCHTITAN_COMMIT[:7]}.txt")
PLANS = example_plans()


def flags(plan) -> dict[str, str | None]:
    argv = export.megatron_argv(plan)
    out, i = {}, 0
    while i < len(argv):
        value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
        out[argv[i]] = value
        i += 2 if value is not None else 1
    return out


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


def test_the_name_lists_are_those_of_the_pinned_commits():
    assert f"Megatron-LM {export.MEGATRON_LM_COMMIT}" in (DATA / f"megatron_args_{export.MEGATRON_LM_COMMIT[:7]}.txt").read_text()
    assert len(MEGATRON) > 600 and "--tensor-model-parallel-size" in MEGATRON
    assert len(TORCHTITAN) > 100 and "parallelism.tensor_parallel_degree" in TORCHTITAN


@pytest.mark.parametrize("name", PLANS)
def test_every_megatron_flag_and_value_is_one_the_pinned_parser_accepts(name):
    for flag, value in flags(PLANS[name]).items():
        assert flag in MEGATRON, f"{flag} is not a Megatron-LM {export.MEGATRON_LM_RELEASE} argument"
        assert not MEGATRON[flag] or value in MEGATRON[flag], f"{flag} {value}: expected one of {MEGATRON[flag]}"


def test_the_name_mappings_name_real_arguments_and_keys():
    assert {f"--{k.replace('_', '-')}" for k in MEGATRON_NAMES} - set(MEGATRON) == {"--data-parallel-size"}  # derived, no flag
    assert set(TORCHTITAN_NAMES) <= set(TORCHTITAN)


@pytest.mark.parametrize("name", PLANS)
def test_every_torchtitan_key_and_value_is_one_the_pinned_config_accepts(name):
    from torch.distributed.pipelining.schedules import get_schedule_class

    keys = flat(tomllib.loads(export.torchtitan_toml(PLANS[name])))
    for key, value in keys.items():
        assert key in TORCHTITAN, f"{key} is not a torchtitan @{export.TORCHTITAN_COMMIT[:7]} key"
        assert not TORCHTITAN[key] or str(value) in TORCHTITAN[key], f"{key} = {value}: expected one of {TORCHTITAN[key]}"
    if "parallelism.pipeline_parallel_schedule" in keys:  # torchtitan hands this name to torch's pipelining
        assert get_schedule_class(keys["parallelism.pipeline_parallel_schedule"]) is not None


def test_megatron_gets_parallel_sizes_batch_and_shape_of_the_plan():
    plan = PLANS["tp2-pp2-interleaved"]
    f = flags(plan)
    assert f["--tensor-model-parallel-size"] == "2" and f["--pipeline-model-parallel-size"] == "2"
    assert f["--num-virtual-stages-per-pipeline-rank"] == "2"
    assert f["--micro-batch-size"] == "2" and f["--global-batch-size"] == "64"
    assert "--sequence-parallel" in f and "--use-distributed-optimizer" in f and f["--recompute-granularity"] == "selective"
    m = plan.model
    assert (f["--num-layers"], f["--hidden-size"], f["--num-attention-heads"], f["--ffn-hidden-size"], f["--seq-length"]) == \
        tuple(map(str, (m.layers, m.hidden, m.heads, m.ffn_hidden, m.seq_len)))
    assert "# dp 2: Megatron-LM takes it from the world size" in export.megatron_text(plan)


def test_uneven_first_and_last_stages_use_megatrons_own_flags():
    f = flags(PLANS["pp4-uneven-first-last"])
    assert f["--decoder-first-pipeline-num-layers"] == "5" and f["--decoder-last-pipeline-num-layers"] == "5"
    assert "--pipeline-model-parallel-layout" not in f and "--num-virtual-stages-per-pipeline-rank" not in f


def test_the_printed_arguments_are_one_shell_command_with_the_layout_quoted(tmp_path):
    text = export.megatron_text(PLANS["pp2-v2-uneven-layout"])
    script = tmp_path / "args.sh"
    script.write_text("printf '%s\\n' \\\n" + "\n".join(line for line in text.splitlines() if not line.startswith("#")) + "\n")
    import subprocess

    out = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == export.megatron_argv(PLANS["pp2-v2-uneven-layout"])


def test_any_other_split_is_a_layout_string_with_the_plans_blocks_per_stage():
    plan = PLANS["pp2-v2-uneven-layout"]
    layout = flags(plan)["--pipeline-model-parallel-layout"]
    stages = layout.split("|")
    counts = [int(m.group(1)) if (m := re.search(r"t\*(\d+)", s)) else 0 for s in stages]
    assert counts == export.stage_blocks(plan) == [5, 7, 6, 6]
    assert stages[0].startswith("E") and stages[-1].endswith("L") and all("E" not in s and "L" not in s for s in stages[1:-1])


def test_per_stage_recompute_counts_become_the_most_with_a_comment():
    plan = PLANS["pp4-uneven-first-last"]  # recomputes 2, 3, 0, 0 blocks
    f = flags(plan)
    assert (f["--recompute-granularity"], f["--recompute-method"], f["--recompute-num-layers"]) == ("full", "block", "3")
    assert "# recompute: the plan recomputes 2/3/0/0 blocks" in export.megatron_text(plan)
    titan = export.torchtitan_toml(plan)
    assert 'mode = "full"' in titan and "# recompute: the plan recomputes some blocks per stage" in titan


def test_cuda_device_max_connections_is_1_for_tp_or_cp_and_left_above_1_for_megatron_fsdp():
    # Megatron-LM core_v0.16.1 validate_args before Blackwell: tp or cp > 1 asserts CUDA_DEVICE_MAX_CONNECTIONS == "1"
    # unless FSDP is on; Megatron-FSDP asserts != "1" and a checkpoint format of fsdp_dtensor
    # (tests/data/upstream.py check runs the real validate_args on these plans).
    tp = PLANS["tp2-pp2-interleaved"]
    cp_only = without(PLANS["llama3-8b-tp2-cp2-fp8"], tp=1, dp=4, sequence_parallel=False)
    fsdp = PLANS["gpt3-175b-best"]
    assert fsdp.zero == 3 and fsdp.tp > 1
    for plan in (tp, cp_only):
        assert export.megatron_environment(plan)[0] == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
        assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in export.megatron_text(plan)
    assert export.megatron_environment(fsdp)[0] == {"CUDA_DEVICE_MAX_CONNECTIONS": None}
    text = " ".join(line.lstrip("# ") for line in export.megatron_text(fsdp).splitlines())
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" not in text and "leave CUDA_DEVICE_MAX_CONNECTIONS unset or above 1" in text
    assert flags(fsdp)["--ckpt-format"] == "fsdp_dtensor" and "--ckpt-format" not in flags(tp)
    assert export.megatron_environment(PLANS["pp2-v2-uneven-layout"]) == ({}, [])  # tp 1, cp 1: nothing asked


def test_gpipe_has_no_megatron_schedule_and_says_so():
    plan = without(PLANS["pp4-uneven-first-last"], schedule="gpipe")
    assert "# schedule gpipe: Megatron-LM has no GPipe schedule" in export.megatron_text(plan)
    assert 'pipeline_parallel_schedule = "GPipe"' in export.torchtitan_toml(plan)


def test_torchtitan_gets_degrees_schedule_stage_modules_batch_and_checkpointing():
    plan = PLANS["pp2-v2-uneven-layout"]
    c = tomllib.loads(export.torchtitan_toml(plan))
    p = c["parallelism"]
    assert (p["tensor_parallel_degree"], p["pipeline_parallel_degree"]) == (1, 2)
    assert (p["data_parallel_replicate_degree"], p["data_parallel_shard_degree"]) == (4, 1)  # DDP: no distributed optimizer
    assert p["pipeline_parallel_schedule"] == "Interleaved1F1B" and p["pipeline_parallel_microbatch_size"] == 1
    parts = p["module_fqns_per_model_part"]
    assert [sum(n.startswith("layers.") for n in part) for part in parts] == [5, 7, 6, 6]
    assert parts[0][0] == "tok_embeddings" and parts[-1][-2:] == ["norm", "output"]
    assert c["training"] == {"local_batch_size": 16, "global_batch_size": 64, "seq_len": 2048, "mixed_precision_param": "bfloat16"}
    assert c["activation_checkpoint"] == {"mode": "full"} and c["compile"] == {"enable": False} and c["model"]["converters"] == []


def test_torchtitan_runs_the_plans_micro_batch_per_forward_with_and_without_pipelining():
    # torchtitan accumulates global / (local_batch_size x dp) steps of local_batch_size sequences per dp rank, and
    # with pp splits each into local / pipeline_parallel_microbatch_size microbatches (train.py, pipeline_parallel.py
    # @e347b1e). Without pp, local_batch_size is what one forward runs: global / dp ran 8-16x the planned micro-batch.
    for plan in PLANS.values():
        t = tomllib.loads(export.torchtitan_toml(plan))
        local, dp = t["training"]["local_batch_size"], plan.dp
        steps = t["training"]["global_batch_size"] // (local * dp)
        per_forward = t["parallelism"]["pipeline_parallel_microbatch_size"] if plan.pp > 1 else local
        assert per_forward == plan.micro_batch, plan.id
        assert steps * (local // per_forward) == plan.num_microbatches, plan.id


def test_rope_theta_exports_as_the_int_megatron_parses_and_a_fraction_is_refused():
    plan = PLANS["llama3-8b-tp2-cp2-fp8"]
    mistral = dataclasses.replace(plan, model=dataclasses.replace(plan.model, rope_theta=1e6))
    argv = export.megatron_argv(mistral)
    assert argv[argv.index("--rotary-base") + 1] == "1000000"  # was 1e+06: Megatron-LM's type=int refuses it
    with pytest.raises(MeshplanError, match="model.rope_theta: 10000.5 is not a whole number"):
        export.megatron_argv(dataclasses.replace(plan, model=dataclasses.replace(plan.model, rope_theta=10000.5)))


def test_llama_family_fields_map_to_megatron_flags():
    plan = PLANS["tp2-pp2-interleaved"]
    llama = dataclasses.replace(plan.model, kv_heads=4, mlp="swiglu", norm="rmsnorm", position="rope", bias=False, qkv_bias=False)
    f = flags(dataclasses.replace(plan, model=llama))
    assert "--group-query-attention" in f and f["--num-query-groups"] == "4" and "--swiglu" in f and "--disable-bias-linear" in f
    assert f["--normalization"] == "RMSNorm" and f["--position-embedding-type"] == "rope"
    assert "--untie-embeddings-and-output-weights" not in flags(dataclasses.replace(plan, model=dataclasses.replace(llama, tie_embeddings=True)))
    for flag, value in f.items():
        assert flag in MEGATRON and (not MEGATRON[flag] or value in MEGATRON[flag])


def _torchtitan_ffn(dim: int, multiplier: float, multiple_of: int) -> int:
    """torchtitan's FeedForward width (torchtitan/models/llama3/model/model.py @e347b1e), from its flavor's arguments."""
    hidden = int(multiplier * int(2 * 4 * dim / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def test_the_llama3_presets_export_as_torchtitans_own_llama3_flavors_and_other_models_say_to_register_one():
    from planner.specs import load_model
    from tests.planner.export_plans import priced
    from planner.plan import Knobs

    # torchtitan's llama3_args: (dim, ffn_dim_multiplier, multiple_of) per flavor
    assert [_torchtitan_ffn(*a) for a in ((4096, 1.3, 1024), (8192, 1.3, 4096), (16384, 1.2, 4096))] == [
        s[4] for s in export.TORCHTITAN_LLAMA3.values()]
    assert [export.torchtitan_flavor(load_model(m)) for m in ("llama3-8b", "llama3-70b", "llama3-405b")] == ["8B", "70B", "405B"]
    assert [export.torchtitan_flavor(load_model(m)) for m in ("llama2-70b", "mistral-7b", "llama-tiny", "gpt3-175b")] == [None] * 4
    plan = priced("llama3-70b", "dgx-h100-80gb", 8, Knobs(2, 1, 16, 1, "1f1b", 1, "none", True, zero=3, cp=2), 512)
    text = export.torchtitan_toml(plan)
    c = tomllib.loads(text)
    assert (c["model"]["name"], c["model"]["flavor"]) == ("llama3", "70B") and "register" not in text
    assert c["parallelism"]["context_parallel_degree"] == 2 and c["parallelism"]["fsdp_reshard_after_forward"] == "always"
    assert "tp 2 x cp 2 x pp 1 x dp 16" in text.splitlines()[0] and "tp 2 x cp 2 x pp 1 x dp 16" in export.megatron_text(plan)
    for key, value in flat(c).items():
        assert key in TORCHTITAN and (not TORCHTITAN[key] or str(value) in TORCHTITAN[key])
    other = tomllib.loads(export.torchtitan_toml(PLANS["tp2-pp2-interleaved"]))
    assert other["model"]["name"] == "gpt3-1.3b" and "register one of these shapes" in export.torchtitan_toml(PLANS["tp2-pp2-interleaved"])


def test_a_plan_priced_for_megatron_core_exports_as_the_same_plan_priced_for_meshplan():
    # `planner plan --framework megatron-core --out p.json` then `planner export p.json`: the framework is what the
    # prediction was priced for, not a knob, so both exports are the meshplan plan's, line for line.
    plan = PLANS["tp2-pp2-interleaved"]
    theirs = dataclasses.replace(plan, framework="megatron-core")
    for exporter in export.EXPORTERS.values():
        assert exporter(theirs) == exporter(plan)


def test_a_field_neither_export_knows_is_refused_not_dropped():
    @dataclasses.dataclass(frozen=True)
    class MoeSpec(ModelSpec):
        experts: int = 1

    plan = PLANS["tp2-pp2-interleaved"]
    moe = dataclasses.replace(plan, model=MoeSpec(**dataclasses.asdict(plan.model), experts=8))
    for exporter in export.EXPORTERS.values():
        with pytest.raises(MeshplanError, match="model.experts: 8 has no .* mapping"):
            exporter(moe)
    assert export.megatron_text(dataclasses.replace(plan, model=MoeSpec(**dataclasses.asdict(plan.model))))  # default: fine


def test_planner_export_prints_both_and_refuses_a_bad_plan_in_one_line(tmp_path, capsys):
    path = tmp_path / "plan.json"
    write_plan(path, PLANS["pp4-uneven-first-last"])
    assert main(["export", str(path), "--to", "megatron"]) == 0
    text = capsys.readouterr().out
    argv = shlex.split(" ".join(line.removesuffix(" \\") for line in text.splitlines() if not line.startswith("#")))
    assert argv == export.megatron_argv(PLANS["pp4-uneven-first-last"])  # the printed lines are the arguments, shell-quoted
    assert main(["export", str(path), "--to", "torchtitan"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["parallelism"]["pipeline_parallel_degree"] == 4
    path.write_text(path.read_text().replace('"tp": 2', '"tp": "two"'))
    assert "tp: expected an integer" in refused(capsys, "export", str(path), "--to", "megatron")
