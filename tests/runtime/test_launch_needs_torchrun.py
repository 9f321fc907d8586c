"""`python -m runtime.launch plan.json` without torchrun says to use torchrun (this environment's own), instead
of a traceback about RANK from init_process_group; under torchrun, a refusal is what torchrun's summary names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.runtime.planfiles import write_plan

REPO = Path(__file__).resolve().parents[2]


def test_launch_without_torchrun_says_how_to_start_it(tmp_path):
    plan = write_plan(tmp_path / "plan.json", pp=2, layers=[[0, 1], [1, 4]])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-m", "runtime.launch", str(plan)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    torchrun = Path(sys.executable).parent / "torchrun"
    torchrun = torchrun.relative_to(REPO) if torchrun.is_relative_to(REPO) else torchrun  # as typed from the repo
    assert "not started by torchrun (WORLD_SIZE is not set)" in out.stderr
    assert f"{torchrun} --nproc-per-node 2 -m runtime.launch {plan}" in out.stderr


def test_a_plan_refused_under_torchrun_is_named_in_torchruns_summary_in_our_words(tmp_path):
    # torchrun prints its own traceback and a summary for any rank that exits nonzero, however it exits; the
    # summary said "To enable traceback see: https://..." for ranks that have no traceback. Now it says why.
    plan = write_plan(tmp_path / "plan.json", dp=4)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "runtime.launch", str(plan)], cwd=REPO, capture_output=True, text=True, timeout=120)
    said = f"error: {plan}: world_size: tp 1 x pp 1 x dp 4 = 4 ranks, but 2 were started"
    assert out.returncode != 0 and said in out.stderr, out.stderr
    # The rank that refused first is in the summary with its line. A slower rank may have been stopped (SIGTERM)
    # by torchrun before it read the plan: then it is there as a signal, so the line may stand only once.
    summary = out.stderr.split("ChildFailedError")[-1]
    assert f"traceback : {said}" in summary and "To enable traceback see" not in out.stderr, out.stderr
