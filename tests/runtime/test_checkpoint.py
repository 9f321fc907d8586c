"""Checkpoints: a run resumed from its checkpoint directory computes exactly the losses of the uninterrupted
run, and a rank killed mid-run makes torchrun fail naming the rank, after which a restart resumes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_on_ranks
from tests.runtime.planfiles import last_result, launch, write_plan
from runtime.checkpoint import latest_step

REPO = Path(__file__).resolve().parents[2]
SCHEDULE = ("--lr-warmup-steps", "2", "--lr-decay-steps", "100")
"""The learning-rate schedule pinned: by default it follows --steps, which these runs vary to stop early."""


def test_resume_from_checkpoint_continues_the_uninterrupted_losses_exactly(tmp_path):
    # zero 3 (FSDP2: sharded weights and optimizer state) is the layout where a resume has the most to get right.
    plan = write_plan(tmp_path / "plan.json", dp=2, num_microbatches=2, zero=3)
    full, first, rest = (tmp_path / f"{n}.jsonl" for n in ("full", "first", "rest"))
    ckpt = tmp_path / "ckpt"
    run_on_ranks(launch, 2, plan, "--steps", 6, "--results", full, *SCHEDULE)
    run_on_ranks(launch, 2, plan, "--steps", 3, "--checkpoint-dir", ckpt, "--checkpoint-every", 3, "--results", first, *SCHEDULE)
    assert latest_step(ckpt) == 3
    (ckpt / "step_000005").mkdir()  # a save cut off before its .metadata: not a checkpoint to resume from
    run_on_ranks(launch, 2, plan, "--steps", 6, "--checkpoint-dir", ckpt, "--results", rest, *SCHEDULE)
    assert last_result(rest)["steps"] == 3
    assert last_result(first)["losses"] + last_result(rest)["losses"] == last_result(full)["losses"]
    assert latest_step(ckpt) == 6


def torchrun(*args: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "runtime.launch", *args]
    return subprocess.Popen(cmd, cwd=REPO, text=True, **popen)


def worker_pid(agent_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (workers are the agent's children)."""
    for task in Path(f"/proc/{agent_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(child)
    return None


def test_killed_rank_fails_torchrun_naming_the_rank_and_a_restart_resumes(tmp_path):
    plan = write_plan(tmp_path / "plan.json", pp=2)
    ckpt = tmp_path / "ckpt"
    with open(tmp_path / "out.txt", "w") as out:
        proc = torchrun(str(plan), "--steps", "100000", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2", *SCHEDULE,
                        stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 90
            while latest_step(ckpt) is None or latest_step(ckpt) < 4:
                assert proc.poll() is None and time.time() < deadline, "torchrun ended or made no checkpoint"
                time.sleep(0.05)
            os.kill(worker_pid(proc.pid, 1), signal.SIGKILL)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = (tmp_path / "out.txt").read_text()
    assert rc != 0
    root_cause = output[output.index("Root Cause"):]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root_cause), output[-2000:]
    assert re.search(r"exitcode\s*:\s*-9", root_cause), root_cause

    resumed_from = latest_step(ckpt)
    assert resumed_from >= 4
    steps = resumed_from + 2
    restarted = tmp_path / "restarted.jsonl"
    proc = torchrun(str(plan), "--steps", str(steps), "--checkpoint-dir", str(ckpt), "--results", str(restarted), *SCHEDULE,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.wait(timeout=120) == 0, proc.stdout.read()[-3000:]
    uninterrupted = tmp_path / "uninterrupted.jsonl"
    run_on_ranks(launch, 2, plan, "--steps", steps, "--results", uninterrupted, *SCHEDULE)
    assert last_result(restarted)["steps"] == 2
    assert last_result(restarted)["losses"] == last_result(uninterrupted)["losses"][resumed_from:]



@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process, as meant here
def test_a_checkpoint_of_the_default_adamw_resumes_into_fused_adamw_and_stays_fused(tmp_path):
    # Loading sets a param group's settings to the saved ones: a checkpoint made before the runtime stepped fused
    # AdamW would have turned fused off. The run keeps its own kernel, and its state steps on as saved.
    import torch
    import torch.nn as nn

    from runtime import checkpoint
    from runtime.parallel.optimizer import build_optimizer, param_groups

    def stepped(model, opt, steps):
        for i in range(steps):
            model.weight.grad = torch.full_like(model.weight, 0.1 * (i + 1))
            opt.step()

    torch.manual_seed(0)
    old, ref = nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False)
    ref.load_state_dict(old.state_dict())
    old_opt = torch.optim.AdamW(param_groups(old), lr=1e-2)  # torch's default kernel
    ref_opt = torch.optim.AdamW(param_groups(ref), lr=1e-2)
    stepped(old, old_opt, 2), stepped(ref, ref_opt, 2)
    checkpoint.save(tmp_path, 2, {0: old}, {0: old_opt})
    new = nn.Linear(4, 3, bias=False)
    new_opt = build_optimizer(new, 1e-2)
    assert checkpoint.load(tmp_path, 2, {0: new}, {0: new_opt}) == 2
    assert [g.get("fused") for g in new_opt.param_groups] == [True]
    stepped(new, new_opt, 2), stepped(ref, ref_opt, 2)
    torch.testing.assert_close(new.weight, ref.weight, rtol=1e-6, atol=1e-8)
