"""planner launch: the sbatch script and the per-node torchrun commands start exactly the plan, with flags that
torch's own torchrun parser accepts, through this environment's Python; written atomically; bad node counts refused."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from planner.cli import main
from planner.plan import write_plan
from tests.planner.export_plans import priced
from planner.plan import Knobs
from tests.planner.refusals import refused


@pytest.fixture
def plan_file(tmp_path):
    """tp 2 x pp 4 x dp 2 of gpt3-1.3b: 16 GPUs, two DGX nodes."""
    path = tmp_path / "plan.json"
    write_plan(path, priced("gpt3-1.3b", "dgx-a100-80gb", 2, Knobs(2, 4, 2, 1), 64))
    return path


def torchrun_args(argv: list[str]):
    from torch.distributed.run import get_args_parser

    return get_args_parser().parse_args(argv)


def test_sbatch_script_runs_one_torchrun_per_node_meeting_on_the_first(plan_file, tmp_path, capsys):
    assert main(["launch", str(plan_file), "--slurm", "--", "--steps", "5"]) == 0
    script = plan_file.with_suffix(".sbatch")
    assert f"sbatch {script}" in capsys.readouterr().out
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --gpus-per-node=8" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # Run it with stand-ins for Slurm's srun and scontrol that record what they were given.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node-7\\ngpu-node-8\\n'\n")
    (fake / "srun").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path / 'srun.args'}\n")
    for f in ("scontrol", "srun"):
        os.chmod(fake / f, 0o755)
    env = os.environ | {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[7-8]", "SLURM_JOB_ID": "4242"}
    subprocess.run(["bash", str(script)], env=env, check=True, cwd=tmp_path)
    srun = (tmp_path / "srun.args").read_text().splitlines()
    assert srun[:4] == ["--kill-on-bad-exit=1", sys.executable, "-m", "torch.distributed.run"]
    args = torchrun_args(srun[4:])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("2", "8", "c10d")
    assert args.rdzv_endpoint == "gpu-node-7:29500" and args.rdzv_id == "4242"
    assert args.module and args.training_script == "runtime.launch"
    assert args.training_script_args == [str(plan_file.resolve()), "--steps", "5"]


def test_print_gives_the_same_torchrun_command_for_every_node_and_explains_master_addr(plan_file, capsys):
    assert main(["launch", str(plan_file), "--print"]) == 0
    out = capsys.readouterr().out
    assert "each of the 2 nodes" in out and "MASTER_ADDR: the host name or IP address" in out
    command = shlex.split(out.splitlines()[-1])
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    assert os.path.abspath(command[0]) == torchrun  # this environment's torchrun, not whatever is on PATH
    args = torchrun_args(command[1:])
    assert args.rdzv_endpoint == "MASTER_ADDR:29500" and args.nnodes == "2" and args.nproc_per_node == "8"
    assert not plan_file.with_suffix(".sbatch").exists()  # --print alone writes nothing


def test_a_one_node_plan_runs_standalone(tmp_path, capsys):
    path = tmp_path / "p.json"
    write_plan(path, priced("gpt3-1.3b", "dgx-a100-80gb", 1, Knobs(2, 2, 2, 1), 64))
    assert main(["launch", str(path)]) == 0
    args = torchrun_args(shlex.split(capsys.readouterr().out.splitlines()[-1])[1:])
    assert args.standalone and args.nproc_per_node == "8" and args.nnodes == "1"


def test_other_nodes_or_a_bad_out_are_refused_and_nothing_is_written(plan_file, capsys):
    err = refused(capsys, "launch", str(plan_file), "--slurm", "--nodes", "3")
    assert "--nodes: 3 nodes x 8 GPUs = 24, but the plan needs tp 2 x pp 4 x dp 2 = 16" in err
    assert "--out: /dev/null is not a regular file" in refused(capsys, "launch", str(plan_file), "--slurm", "--out", "/dev/null")
    assert "needs --slurm" in refused(capsys, "launch", str(plan_file), "--out", "x.sbatch")
    assert not plan_file.with_suffix(".sbatch").exists()


def test_arguments_after_the_separator_are_only_for_launch(capsys):
    assert "only planner launch passes arguments on" in refused(capsys, "validate", "r.jsonl", "--", "--steps", "3")


def test_a_plan_priced_for_another_framework_says_so_in_its_commands_and_script(tmp_path, capsys):
    import dataclasses

    from planner.frameworks import priced_elsewhere
    from planner.plan import load_plan

    path = tmp_path / "p.json"
    plan = priced("gpt3-1.3b", "dgx-a100-80gb", 2, Knobs(2, 4, 2, 1), 64)
    write_plan(path, dataclasses.replace(plan, framework="megatron-core"))
    assert load_plan(str(path)).framework == "megatron-core"
    assert main(["launch", str(path), "--slurm", "--print"]) == 0
    printed = capsys.readouterr().out
    script = path.with_suffix(".sbatch").read_text()
    for text in (printed, script):  # the one sentence (planner.frameworks.priced_elsewhere), as wrapped comment lines
        comments = " ".join(line[2:] for line in text.splitlines() if line.startswith("# "))
        assert priced_elsewhere("megatron-core", str(path)) in comments and f"planner export {path} --to megatron" in comments
    write_plan(path, plan)  # priced for meshplan's runtime: nothing to say
    assert main(["launch", str(path), "--print"]) == 0 and "Its prediction is for" not in capsys.readouterr().out


def test_plan_out_of_a_plan_priced_for_another_framework_says_so_under_its_torchrun_command(tmp_path, capsys):
    from planner.frameworks import priced_elsewhere

    out = str(tmp_path / "p.json")
    tiny = ["plan", "--model", "gpt-tiny", "--cluster", "local-cpu", "--gpus-per-node", "2", "--global-batch", "16", "--out", out]
    assert main([*tiny, "--framework", "megatron-core"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "-m runtime.launch" in said and " ".join(priced_elsewhere("megatron-core", out).split()) in said
    assert main(tiny) == 0 and "Its prediction is for" not in capsys.readouterr().out


def test_a_plan_predicted_not_to_fit_is_written_and_launched_with_a_warning_giving_its_reason(tmp_path, capsys):
    from planner.plan import load_plan

    path = tmp_path / "nofit.json"
    predict = ["predict", "--model", "gpt3-175b", "--cluster", "dgx-a100-80gb", "--nodes", "64", "--global-batch", "1536",
               "--tp", "1", "--pp", "1", "--dp", "512", "--micro-batch", "3", "--out", str(path)]
    assert main(predict) == 0
    reason = load_plan(str(path)).prediction.reason
    assert reason and f"warning: wrote {path}, but the plan's prediction says it does not fit: {reason}" in capsys.readouterr().err
    assert main(["launch", str(path), "--slurm", "--print"]) == 0  # warned, not refused
    printed = capsys.readouterr()
    assert f"does not fit: {reason}" in printed.err
    for text in (printed.out, path.with_suffix(".sbatch").read_text()):  # as wrapped comment lines, before the commands
        comments = " ".join(line[2:] for line in text.splitlines() if line.startswith("# "))
        assert f"warning: the plan's prediction says it does not fit: {reason}" in comments
    assert main([*predict[:-10], "--tp", "8", "--pp", "8", "--dp", "8", "--micro-batch", "1", "--recompute", "full",
                 "--out", str(path)]) == 0  # one that fits: the usual line saying where it went and how to start it
    written = capsys.readouterr()
    assert "does not fit" not in written.err and f"Wrote {path}" in written.out
    assert main(["launch", str(path), "--print"]) == 0
    assert "does not fit" not in capsys.readouterr().out


def test_launch_refuses_runtime_arguments_runtime_launch_would_refuse_before_it_writes_anything(tmp_path, capsys):
    path = tmp_path / "p.json"
    write_plan(path, priced("gpt3-1.3b", "dgx-a100-80gb", 2, Knobs(2, 4, 2, 1), 64))
    for extra, said in ((["--stepz", "3"], "unrecognized arguments: --stepz 3"), (["--steps", "x"], "invalid int value: 'x'"),
                        (["--help"], "--help prints runtime.launch's flags"), (["--hel"], "--help prints runtime.launch's flags"),
                        (["--results", "-h"], "argument --results: expected one argument")):
        err = refused(capsys, "launch", str(path), "--slurm", "--", *extra)
        assert "runtime.launch arguments" in err and said in err
    assert not path.with_suffix(".sbatch").exists()
    assert main(["launch", str(path), "--print", "--", "--steps", "3", "--results", "r.jsonl"]) == 0
    assert "-m runtime.launch " + str(path) + " --steps 3 --results r.jsonl" in capsys.readouterr().out


def test_a_cpu_plans_sbatch_script_reserves_cpus_for_its_ranks_not_gpus(tmp_path, capsys):
    path = tmp_path / "tiny.json"
    assert main(["plan", "--model", "gpt-tiny", "--cluster", "local-cpu", "--gpus-per-node", "2", "--global-batch", "16",
                 "--out", str(path)]) == 0
    assert main(["launch", str(path), "--slurm"]) == 0 and "2 CPU ranks" in capsys.readouterr().out
    script = path.with_suffix(".sbatch").read_text()
    assert "#SBATCH --cpus-per-task=2" in script and "--gpus-per-node" not in script.split("set -euo")[0]


def test_one_node_given_for_a_two_node_plan_is_refused_as_1_node_not_1_nodes(plan_file, capsys):
    err = refused(capsys, "launch", str(plan_file), "--slurm", "--nodes", "1")
    assert "--nodes: 1 node x 8 GPUs = 8, but the plan needs" in err


def test_a_cp_plans_device_count_names_cp_in_the_refusal_and_both_headers(tmp_path, capsys):
    path = tmp_path / "cp.json"
    write_plan(path, priced("gpt3-1.3b", "dgx-a100-80gb", 2, Knobs(2, 1, 4, 1, cp=2), 64))
    degrees = "tp 2 x cp 2 x pp 1 x dp 4"
    assert f"the plan needs {degrees} = 16 devices" in refused(capsys, "launch", str(path), "--slurm", "--nodes", "3")
    assert main(["launch", str(path), "--slurm", "--print"]) == 0
    assert f"{degrees} on 2 nodes x 8" in capsys.readouterr().out.splitlines()[0]
    assert f"{degrees} on 2 nodes x 8" in path.with_suffix(".sbatch").read_text().splitlines()[1]


def test_launching_on_another_node_layout_than_the_plan_was_priced_for_is_warned_not_refused(plan_file, capsys):
    assert main(["launch", str(plan_file), "--print", "--nodes", "1", "--gpus-per-node", "16"]) == 0
    printed = capsys.readouterr()
    said = "the plan was priced for 2 nodes x 8 GPUs, not 1 x 16"
    assert f"warning: {said}" in printed.err and "--nodes 1 --gpus-per-node 16" in printed.err
    assert f"warning: {said}" in " ".join(line[2:] for line in printed.out.splitlines() if line.startswith("# "))
    assert main(["launch", str(plan_file), "--slurm", "--nodes", "1", "--gpus-per-node", "16"]) == 0
    assert said in capsys.readouterr().err and said in " ".join(plan_file.with_suffix(".sbatch").read_text().split())
    assert main(["launch", str(plan_file), "--print", "--nodes", "2", "--gpus-per-node", "8"]) == 0
    assert "warning" not in capsys.readouterr().err  # its own layout: nothing to say
