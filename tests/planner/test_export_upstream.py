"""Megatron-LM's own parse_args + validate_args + TransformerConfig, and torchtitan's own ConfigManager, on the
exports of tests/planner/export_plans.py. Needs their source trees and a Python with their imports (see
tests/data/upstream.py), so it runs only where MESHPLAN_UPSTREAM says where they are."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.planner.export_plans import example_plans

REPO = Path(__file__).resolve().parents[2]
UPSTREAM = os.environ.get("MESHPLAN_UPSTREAM", "")


@pytest.mark.skipif(not UPSTREAM, reason="set MESHPLAN_UPSTREAM='PYTHON MEGATRON_DIR TORCHTITAN_DIR' (tests/data/upstream.py "
                                         "says how to make them) to run Megatron-LM's and torchtitan's own parsers")
def test_megatron_and_torchtitan_accept_the_exports_with_their_own_parsers():
    python, megatron, torchtitan = UPSTREAM.split()
    r = subprocess.run([python, "tests/data/upstream.py", "check", megatron, torchtitan], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    for name in example_plans():
        assert any(line.startswith(f"megatron {name}: parsed") and "validate_args and TransformerConfig passed" in line for line in lines)
        assert any(line.startswith(f"torchtitan {name}: ConfigManager loaded it") for line in lines)
