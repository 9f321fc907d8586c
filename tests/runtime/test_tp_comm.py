"""Tensor parallelism runs the collectives the cost model prices for a block (planner/terms.py: two all-reduces of
the block's activations in the forward and two in the backward; with sequence parallelism an all-gather and a
reduce-scatter in place of each), counted on 2 gloo ranks with DTensor's CommDebugMode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_tp_block_runs_two_all_reduces_each_way_or_a_gather_and_scatter_pair_each_with_sp():
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "tests.runtime.tp_comm_counts"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    plain = {"all_reduce": 2}
    sp = {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2}
    for name in ("gpt-tiny", "llama-tiny"):
        # Without SP the input gradients of q, k and v (and of SwiGLU's gate and up) are summed before one
        # all-reduce per sub-block, as Megatron-LM's f operator does: not one all-reduce per linear.
        assert counts[f"{name} sp=False"] == {"forward": plain, "backward": plain}, (name, counts)
        assert counts[f"{name} sp=True"] == {"forward": sp, "backward": sp}, (name, counts)
