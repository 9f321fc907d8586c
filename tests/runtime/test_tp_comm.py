"""Tensor parallelism runs the collectives the cost model prices for a block (planner/terms.py,
Framework.tp_all_reduces_each_way: two all-reduces of the block's activations in the forward and two in the
backward; with sequence parallelism an all-gather and a reduce-scatter in place of each; with KempnerForge's plan a
gather per column-parallel linear), counted on 2 gloo ranks with DTensor's CommDebugMode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_tp_block_runs_the_collectives_its_framework_is_priced_with():
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
        # KempnerForge's plan: one gather per column-parallel linear (3 in attention, 2 for SwiGLU's MLP, else 1),
        # and in the backward one scatter of each one's input gradient: Framework.tp_gathers_per_linear's count.
        linears = 3 + (2 if name == "llama-tiny" else 1)
        assert counts[f"{name} sp=per linear"] == {
            "forward": {"all_gather_into_tensor": linears, "reduce_scatter_tensor": 2},
            "backward": {"all_gather_into_tensor": 2, "reduce_scatter_tensor": linears}}, (name, counts)
