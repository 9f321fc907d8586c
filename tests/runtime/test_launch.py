"""The front door: bad plans are refused with one line naming the field (exit 2, no traceback, before any
process group exists), and a real torchrun run appends a results line in design.md's schema."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.runtime.planfiles import plan_dict, write_plan
from planner.errors import SpecError
from planner.plan import plan_from_dict
from runtime.launch import cli
from planner.results import median_tokens_per_s, result_from_dict, timed_steps

REPO = Path(__file__).resolve().parents[2]
SCHEMA_KEYS = {"plan_id", "plan", "device", "world_size", "steps", "step_s", "tokens_per_s", "losses", "peak_memory_gib",
               "stage_timings", "predicted", "started_at", "meshplan_version", "grad_norms", "peak_allocated_gib",
               "memory_counter", "memory_breakdown_bytes", "memory_transient_by_op", "memory_step", "machine"}


def refusal(capsys, monkeypatch, plan: dict, tmp_path, world_size: int = 1, flags: tuple = ()) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    assert cli([str(path), *flags]) == 2
    assert not dist.is_initialized()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_unknown_plan_version_is_refused_naming_version(capsys, monkeypatch, tmp_path):
    err = refusal(capsys, monkeypatch, {**plan_dict(), "version": 7}, tmp_path)
    assert ": version: plan version 7 is not supported" in err


def test_world_size_other_than_tp_pp_dp_is_refused_naming_world_size(capsys, monkeypatch, tmp_path):
    err = refusal(capsys, monkeypatch, plan_dict(tp=2, pp=2), tmp_path, world_size=2)
    assert "world_size: tp 2 x pp 2 x dp 1 = 4 ranks, but 2 were started" in err and "--nproc-per-node 4" in err


def test_heads_not_divisible_by_tp_is_refused_naming_tp(capsys, monkeypatch, tmp_path):
    err = refusal(capsys, monkeypatch, plan_dict(tp=3), tmp_path, world_size=3)
    assert ": tp: heads 4 are not divisible by tp 3" in err


def test_stage_with_no_layers_is_refused_naming_the_stage(capsys, monkeypatch, tmp_path):
    err = refusal(capsys, monkeypatch, plan_dict(pp=3, layers=[[0, 2], [2, 2], [2, 4]]), tmp_path, world_size=3)
    assert "stages[1].layers: a stage with no layers" in err


def test_fewer_microbatches_than_stages_under_1f1b_is_refused_naming_num_microbatches(capsys, monkeypatch, tmp_path):
    err = refusal(capsys, monkeypatch, plan_dict(pp=4, num_microbatches=2), tmp_path, world_size=4)
    assert "num_microbatches: 1F1B needs at least pp = 4 microbatches, got 2" in err


def test_checkpoint_every_without_a_directory_is_refused(capsys, monkeypatch, tmp_path):
    err = refusal(capsys, monkeypatch, plan_dict(), tmp_path, flags=("--checkpoint-every", "2"))
    assert err.startswith("error: --checkpoint-every: needs --checkpoint-dir") and "checkpoint_every" not in err


@pytest.mark.parametrize("flag,where,message", [("--results", "adir", "--results: {p} is a directory"),
                                                ("--results", "keep.json/r.jsonl", "is a file, not a folder"),
                                                ("--results", "", "--results: an empty path"),
                                                ("--checkpoint-dir", "keep.json", "--checkpoint-dir: {p} is a file"),
                                                ("--checkpoint-dir", "keep.json/ckpt", "is a file, not a folder")])
def test_a_results_or_checkpoint_path_that_cannot_be_written_is_refused_before_training(capsys, monkeypatch, tmp_path,
                                                                                        flag, where, message):
    # Found only after training, these lost the run's results (a traceback from rank 0's write, or every rank's first save).
    (tmp_path / "adir").mkdir()
    (tmp_path / "keep.json").write_text("{}")
    p = str(tmp_path / where) if where else ""
    err = refusal(capsys, monkeypatch, plan_dict(), tmp_path, flags=(flag, p))
    assert message.format(p=p) in err
    assert (tmp_path / "keep.json").read_text() == "{}" and not any((tmp_path / "adir").iterdir())


def test_a_flag_runtime_launch_does_not_know_is_refused_in_one_line_not_argparses_usage(capsys, monkeypatch, tmp_path):
    err = refusal(capsys, monkeypatch, plan_dict(), tmp_path, flags=("--stpes", "3"))
    assert "unrecognized arguments: --stpes 3 (`python -m runtime.launch --help` lists the flags)" in err


def test_missing_plan_file_is_refused_without_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "runtime.launch", str(tmp_path / "nope.json")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert "no such plan file" in out.stderr


def test_torchrun_runs_a_hand_written_plan_and_appends_a_results_line_in_the_schema(tmp_path):
    plan = write_plan(tmp_path / "plan.json", pp=2, layers=[[0, 1], [1, 4]])
    results = tmp_path / "results.jsonl"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "runtime.launch", str(plan), "--steps", "3", "--results", str(results)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tokens/s" in out.stdout
    lines = results.read_text().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert set(line) == SCHEMA_KEYS
    result = result_from_dict(line, str(results))
    assert result.world_size == 2 and result.steps == 3 and len(result.losses) == 3 and len(result.peak_memory_gib) == 2
    assert all(s > 0 for s in result.step_s) and result.tokens_per_s > 0
    assert len(result.grad_norms) == 3 and all(g > 0 for g in result.grad_norms)
    # CPU memory: the last step counted live tensors; its peak is the sum of what it holds, of which the weights
    # are exactly this stage's parameters (fp32), and that slower step stays out of tokens/s.
    assert result.memory_step == 2 and result.tokens_per_s == pytest.approx(8 * 32 / result.step_s[1])  # 8 sequences of 32
    stage_bytes = [4 * sum(p.numel() for p in chunk.parameters()) for chunk in stage_chunks(plan)]
    for peak, breakdown, params in zip(result.peak_memory_gib, result.memory_breakdown_bytes, stage_bytes):
        assert sum(breakdown.values()) == pytest.approx(peak * 2**30, abs=1)
        assert breakdown["parameters"] == params and breakdown["gradients"] == params  # fp32 grads of every weight
        assert breakdown["optimizer_state"] >= 2 * params  # AdamW's exp_avg and exp_avg_sq (and its step counters)
        assert breakdown["activations_and_transient"] > 0 and breakdown["gathered_weights"] == 0
    assert set(result.stage_timings) == {"stage0", "stage1"}
    # The machine's load: the profile's reference block timed on both ranks, and what other processes ran.
    assert result.machine["reference_s"] > 0 and 0 < result.machine["cpu_share"] <= 1.05
    assert result.machine["background_cores"] >= 0 and result.machine["cpu_count"] >= 1
    # Per step, each rank's wait for a core; tokens/s counts the step after warm-up (pipelining's shape inference)
    # and before the last (which counted memory).
    waits = result.machine["step_wait_s"]
    assert len(waits) == 3 and all(len(w) == 2 and all(0 <= x < s for x in w) for w, s in zip(waits, result.step_s))
    # Pipeline stages meet once a microbatch, not at every block: what the waits cost is the largest rank's.
    assert result.machine["step_synced_wait_s"] == pytest.approx([max(w) for w in waits], abs=1e-5)
    assert result.machine["timed_steps"] == [1] and result.tokens_per_s == pytest.approx(
        result.plan["global_batch"] * result.plan["model"]["seq_len"] / result.step_s[1])
    assert all(t["forward_s"] > 0 and t["backward_s"] > 0 for t in result.stage_timings.values())
    # The plan inside is the whole plan: a validator can load and predict it again.
    assert plan_from_dict(result.plan, "results plan") == plan_from_dict(json.loads(plan.read_text()), "plan")
    # The id recorded is the plan's contents' hash (load_plan recomputes it), whatever the file wrote down.
    assert result.plan_id == plan_from_dict(json.loads(plan.read_text()), "plan").id != "" and result.predicted is None


def stage_chunks(plan_path: Path) -> list:
    """The meta model chunks of a plan's stages, as runtime.launch splits them."""
    import torch

    from runtime.model import GPT, GPTConfig
    from runtime.parallel.pipeline import split_model

    plan = plan_from_dict(json.loads(plan_path.read_text()), "plan")
    with torch.device("meta"):
        model = GPT(GPTConfig.from_spec(plan.model, plan.tp))
    return [c for r in range(plan.pp) for c in split_model(model, plan.stages, plan.pp, r).values()]


def test_results_line_with_unknown_key_or_wrong_list_is_refused_naming_the_field():
    with pytest.raises(SpecError, match="unknown key") as e:
        result_from_dict({"plan_idd": "x"}, "r.jsonl")
    assert e.value.field == "plan_idd"
    good = {"plan_id": "p", "plan": {}, "device": "cpu (gloo)", "world_size": 1, "steps": 1, "step_s": [0.1],
            "tokens_per_s": 10.0, "losses": [5.0], "peak_memory_gib": [0.3], "predicted": None,
            "started_at": "2026-01-01T00:00:00+00:00", "meshplan_version": "0.1.0", "stage_timings": None}
    assert result_from_dict(good, "r.jsonl").tokens_per_s == 10.0
    with pytest.raises(SpecError) as e:
        result_from_dict({**good, "losses": ["nan?"]}, "r.jsonl")
    assert e.value.field == "losses"
    with pytest.raises(SpecError) as e:
        result_from_dict({**good, "peak_memory_gib": [0.3, 0.3]}, "r.jsonl")
    assert e.value.field == "peak_memory_gib"


def test_tokens_per_s_is_taken_from_the_median_step_after_warm_up():
    # The slow first step (pipelining's shape inference) and an outlier do not move it.
    assert median_tokens_per_s([9.0, 1.0, 2.0, 50.0], warmup=1, tokens_per_step=100) == 50.0
    assert median_tokens_per_s([4.0], warmup=1, tokens_per_step=100) == 25.0  # nothing after warm-up: all steps
    assert median_tokens_per_s([9.0, 1.0, 2.0, 50.0], warmup=1, tokens_per_step=100, left_out=3) == 100 / 1.5
    assert timed_steps(4, 1, left_out=3) == [1, 2] and timed_steps(2, 1, left_out=1) == [0]


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    from runtime.train import lr_at

    lrs = [lr_at(k, peak=1e-3, warmup_steps=2, decay_steps=6, min_ratio=0.1) for k in range(8)]
    assert lrs[:2] == [pytest.approx(5e-4), pytest.approx(1e-3)]
    assert lrs[3] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way through the decay: the mean of peak and floor
    assert lrs[5] == lrs[6] == lrs[7] == pytest.approx(1e-4)
    assert all(b < a for a, b in zip(lrs[1:6], lrs[2:6]))


@pytest.mark.parametrize("flags,field", [(("--max-grad-norm", "-1"), "max_grad_norm"), (("--lr-warmup-steps", "0"), "lr_warmup_steps"),
                                         (("--lr-min-ratio", "1.5"), "lr_min_ratio")])
def test_bad_training_flags_are_refused_naming_the_flag(capsys, monkeypatch, tmp_path, flags, field):
    err = refusal(capsys, monkeypatch, plan_dict(), tmp_path, flags=flags)
    assert err.startswith(f"error: {flags[0]}: ") and f": {field}: " not in err, err  # the flag once, not again as its field


def test_each_step_logs_loss_grad_norm_lr_tokens_per_s_mfu_and_memory(tmp_path):
    plan = write_plan(tmp_path / "plan.json", tp=2)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "runtime.launch", str(plan), "--steps", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 1/2", "step 2/2"]  # rank 0 alone prints them
    fields = lines[0].split(" | ")
    assert fields[1].startswith("loss 5.5") and fields[2].startswith("grad norm ") and fields[3] == "lr 1.00e-03"
    assert fields[4].endswith(" tokens/s") and fields[5].startswith("MFU ") and fields[5].endswith("%")
    # On CPU memory is counted in the last step (runtime.memory), so the first line has none yet.
    assert fields[6] == "memory not counted yet"
    last = lines[-1].split(" | ")[6]
    assert last.startswith("memory ") and last.endswith(" MiB") and float(last.split()[1]) > 0  # test-tiny: under 1 GiB
    # The summary's per-rank peaks in the same unit (they printed "0.00, 0.00 GiB").
    summary = re.search(r"peak memory per rank ([\d., ]+) MiB of tensors", " ".join(out.stdout.split()))
    assert summary and all(float(m) > 0 for m in summary.group(1).split(", ")), out.stdout[-800:]


@pytest.mark.parametrize("knobs,model,message", [
    ({"pp": 2}, {"tie_embeddings": True}, ": tie_embeddings: the embedding and the head are tied but sit on different pipeline stages"),
    ({"tp": 4}, {"ffn_hidden": 704}, ": tp: kv_heads 2 are not divisible by tp 4"),
])
def test_llama_plan_the_runtime_cannot_build_is_refused_in_one_line_naming_the_field(capsys, monkeypatch, tmp_path, knobs, model, message):
    from tests.runtime.planfiles import LLAMA_TINY

    world = knobs.get("pp", 1) * knobs.get("tp", 1)
    err = refusal(capsys, monkeypatch, plan_dict(model={**LLAMA_TINY, **model}, **knobs), tmp_path, world_size=world)
    assert message in err


def test_fp8_on_cpu_ranks_is_refused_in_one_line_naming_precision(capsys, monkeypatch, tmp_path):
    # torch._scaled_mm needs FP8 tensor cores (CUDA compute capability >= 8.9); this machine has none.
    err = refusal(capsys, monkeypatch, plan_dict(precision="fp8"), tmp_path)
    assert ": precision: fp8 needs a CUDA GPU of compute capability >= 8.9" in err


def test_compile_with_tp_but_no_sequence_parallel_is_refused_in_one_line_naming_compile(capsys, monkeypatch, tmp_path):
    err = refusal(capsys, monkeypatch, plan_dict(tp=2, compile=True), tmp_path, world_size=2)
    assert ": compile: compile with tp > 1 needs sequence_parallel" in err


def test_the_summary_says_when_the_plans_prediction_was_priced_for_another_framework(capsys, monkeypatch):
    # A plan from `planner search --framework megatron-core` runs here as meshplan's runtime: its stored
    # tokens/s is Megatron-Core's, and the summary must not pass it off as this run's prediction.
    import dataclasses

    from planner.frameworks import priced_elsewhere
    from runtime.launch import print_summary
    from tests.dashboard.runs import run_line, tiny_plan

    monkeypatch.delenv("FORCE_COLOR", raising=False)  # plain text, so that the words can be matched
    plan = tiny_plan(pp=2, dp=1, micro_batch=1)
    ours = result_from_dict(run_line(plan, [3.1, 2.8, 2.7], None), "a results line")
    theirs = result_from_dict(run_line(dataclasses.replace(plan, framework="megatron-core"), [3.1, 2.8, 2.7], None), "another")
    print_summary(ours, 0)
    assert "predicted tokens/s" in (out := capsys.readouterr().out) and "Its prediction is for" not in out
    print_summary(theirs, 0)
    said = " ".join(capsys.readouterr().out.split())  # rich wraps
    assert " ".join(priced_elsewhere("megatron-core", "PLAN").split()) in said and "--to megatron" in said


def test_launch_asks_cuda_for_expandable_segments_unless_the_user_configured_the_allocator(capsys, monkeypatch, tmp_path):
    from runtime.memory import ALLOCATOR_SETTING, use_expandable_segments

    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    # Set before anything else, even for a plan that is then refused (nothing has touched a GPU yet).
    refusal(capsys, monkeypatch, plan_dict(dp=2), tmp_path, world_size=1)
    assert os.environ["PYTORCH_ALLOC_CONF"] == ALLOCATOR_SETTING == "expandable_segments:True"
    # The user's own setting, under either name, is kept and nothing is added beside it.
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        env = {name: "max_split_size_mb:512"}
        assert use_expandable_segments(env) is False and env == {name: "max_split_size_mb:512"}
    env = {}
    assert use_expandable_segments(env) is True and env == {"PYTORCH_ALLOC_CONF": ALLOCATOR_SETTING}
