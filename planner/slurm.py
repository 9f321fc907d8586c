"""`planner launch`: how to start a plan on its nodes, as a Slurm batch script or as plain torchrun commands.

Every node runs one torchrun (torch.distributed.run of the Python that has meshplan and torch), which starts
that node's ranks and meets the other nodes at a c10d rendezvous on the first node. Pure text: nothing here
imports torch or starts anything."""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
import textwrap
from pathlib import Path

from planner.errors import SpecError
from planner.frameworks import priced_elsewhere
from planner.plan import Plan, degrees_text
from planner.specs import nodes_x

DEFAULT_PORT = 29500
NO_TORCH = "torch is not installed for this Python: pip install 'meshplan[runtime]'"


def torchrun_prefix(python: str | None = None) -> str:
    """torchrun of `python` (default: this interpreter), runnable without the venv on PATH: its bin/torchrun
    when that exists, else `python -m torch.distributed.run`. Paths under the current directory stay relative."""
    exe = Path(python or sys.executable)
    torchrun = exe.parent / "torchrun"
    cmd = [str(torchrun)] if python is None and os.access(torchrun, os.X_OK) else [str(exe), "-m", "torch.distributed.run"]
    cwd = Path.cwd()
    if Path(cmd[0]).is_absolute() and Path(cmd[0]).is_relative_to(cwd):
        cmd[0] = str(Path(cmd[0]).relative_to(cwd))
        cmd[0] = cmd[0] if "/" in cmd[0] else f"./{cmd[0]}"
    return shlex.join(cmd)


def torch_missing(python: str | None) -> bool:
    """This interpreter cannot import torch (meshplan installed without its [runtime] extra)."""
    return python is None and importlib.util.find_spec("torch") is None


def check_nodes(plan: Plan, nodes: int, gpus_per_node: int) -> None:
    if nodes * gpus_per_node != plan.world_size:
        raise SpecError("--nodes", "nodes", f"{nodes_x(nodes, gpus_per_node)} GPUs = {nodes * gpus_per_node}, but the plan "
                        f"needs {degrees_text(plan)} = {plan.world_size} devices; give --nodes "
                        f"{plan.world_size // gpus_per_node if plan.world_size % gpus_per_node == 0 else '...'} "
                        f"(and --gpus-per-node) so that the product is {plan.world_size}")


def torchrun_argv(plan: Plan, plan_path: str, nodes: int, gpus_per_node: int, endpoint: str, run_id: str,
                  extra: list[str]) -> list[str]:
    """The torchrun flags and the runtime's arguments (after the torchrun executable)."""
    if nodes == 1:
        rdzv = ["--standalone"]
    else:
        rdzv = ["--rdzv-id", run_id, "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint]
    return ["--nnodes", str(nodes), "--nproc-per-node", str(gpus_per_node), *rdzv, "-m", "runtime.launch", plan_path, *extra]


def priced_elsewhere_comment(plan: Plan, plan_path: str) -> list[str]:
    """planner.frameworks.priced_elsewhere as comment lines (none for a plan priced for meshplan's runtime)."""
    return _comment(priced_elsewhere(plan.framework, plan_path))


def on_cpu(plan: Plan) -> bool:
    """A CPU cluster's plan (local-cpu): its ranks are gloo processes, not GPUs to reserve."""
    return plan.cluster.device == "cpu"


def devices_word(plan: Plan) -> str:
    return "CPU ranks" if on_cpu(plan) else "GPUs"


def does_not_fit(plan: Plan) -> str | None:
    """What a plan whose recorded prediction says it does not fit (planner predict --out writes those too) is warned
    with; launching is not refused: the prediction may be stale or the user may know better."""
    pr = plan.prediction
    if pr is None or pr.fits:
        return None
    return (f"the plan's prediction says it does not fit: {pr.reason or 'no reason recorded'}; run as it is, it will likely "
            "run out of memory (planner plan finds plans that fit)")


def other_topology(plan: Plan, nodes: int, gpus_per_node: int) -> str | None:
    """What launching a plan on as many devices as it needs, but laid out on other nodes than those it was priced for
    (2 x 8 priced, 1 x 16 launched), is warned with; None on the plan's own layout. Its tensor-, context- and
    data-parallel groups and its pipeline then meet node boundaries elsewhere, so its predicted time no longer holds."""
    c = plan.cluster
    if (nodes, gpus_per_node) == (c.nodes, c.gpus_per_node):
        return None
    return (f"the plan was priced for {nodes_x(c.nodes, c.gpus_per_node)} {devices_word(plan)}, not {nodes} x {gpus_per_node}: "
            "its parallel groups would run over other links (inside a node or across the network) than it was priced "
            "with, so its predicted time no longer holds; plan again for this layout "
            f"(planner plan ... --nodes {nodes} --gpus-per-node {gpus_per_node}) or launch it on the layout it was priced for")


def launch_warnings(plan: Plan, nodes: int, gpus_per_node: int) -> list[str]:
    """What planner launch warns of (on stderr, and as comments above the commands and in the script); launching
    goes on: the user may know better."""
    return [w for w in (does_not_fit(plan), other_topology(plan, nodes, gpus_per_node)) if w]


def _warning_comments(plan: Plan, nodes: int, gpus_per_node: int) -> list[str]:
    return [line for w in launch_warnings(plan, nodes, gpus_per_node) for line in _comment(f"warning: {w}")]


def _comment(text: str | None) -> list[str]:
    return [f"# {line}" for line in textwrap.wrap(text, 110, break_long_words=False, break_on_hyphens=False)] if text else []


def node_commands(plan: Plan, plan_path: str, nodes: int, gpus_per_node: int, python: str | None = None,
                  port: int = DEFAULT_PORT, extra: tuple[str, ...] = ()) -> str:
    """The plain torchrun command to type on each node, with what MASTER_ADDR stands for."""
    check_nodes(plan, nodes, gpus_per_node)
    argv = torchrun_argv(plan, plan_path, nodes, gpus_per_node, f"MASTER_ADDR:{port}", plan.id or "meshplan", list(extra))
    lines = [f"# plan {plan.id}: {degrees_text(plan)} on {nodes_x(nodes, gpus_per_node)} devices",
             *priced_elsewhere_comment(plan, plan_path), *_warning_comments(plan, nodes, gpus_per_node)]
    if nodes > 1:
        lines += [f"# Run this same command on each of the {nodes} nodes (torchrun's c10d rendezvous gives each its node rank).",
                  "# MASTER_ADDR: the host name or IP address of one of these nodes that all of them can reach, the same on",
                  f"# every node (e.g. the first node's); the rendezvous listens there on port {port}. The plan file and this",
                  "# Python must be at these paths on every node (a shared file system)."]
    if torch_missing(python):
        lines.append(f"# {NO_TORCH} (or pass --python)")
    lines.append(f"{torchrun_prefix(python)} {shlex.join(argv)}")
    return "\n".join(lines) + "\n"


def sbatch_script(plan: Plan, plan_path: str, nodes: int, gpus_per_node: int, python: str | None = None,
                  port: int = DEFAULT_PORT, extra: tuple[str, ...] = (), workdir: str | None = None) -> str:
    """A Slurm batch script: one task per node, each a torchrun of the node's ranks, meeting on the first node."""
    check_nodes(plan, nodes, gpus_per_node)
    exe = python or sys.executable
    argv = torchrun_argv(plan, str(Path(plan_path).resolve()), nodes, gpus_per_node, '"$MASTER_ADDR:$MASTER_PORT"',
                         '"$SLURM_JOB_ID"', list(extra))
    # shlex.join would quote the $-expansions; they must stay expansions, so quote every other word only
    words = " ".join(a if a.startswith('"$') else shlex.quote(a) for a in argv)
    lines = [
        "#!/bin/bash",
        f"# meshplan plan {plan.id}: {plan.model.name}, {degrees_text(plan)} on {nodes_x(nodes, gpus_per_node)} "
        f"{devices_word(plan)}. Submit it with sbatch.",
        *priced_elsewhere_comment(plan, plan_path),
        *_warning_comments(plan, nodes, gpus_per_node),
        f"#SBATCH --job-name=meshplan-{plan.id or 'plan'}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        # a CPU cluster's ranks are processes, not GPUs to reserve (torchrun's gloo backend)
        *([f"#SBATCH --cpus-per-task={gpus_per_node}"] if on_cpu(plan) else [f"#SBATCH --gpus-per-node={gpus_per_node}"]),
        f"#SBATCH --chdir={workdir or os.getcwd()}",
        "#SBATCH --output=meshplan-%j.out",
        "set -euo pipefail",
        "# The c10d rendezvous runs on the allocation's first node; each node's torchrun starts its ranks there.",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"MASTER_PORT={port}",
        f"# {exe} must have meshplan and torch installed and exist on every node (a shared file system).",
        f"srun --kill-on-bad-exit=1 {shlex.quote(exe)} -m torch.distributed.run {words}",
    ]
    return "\n".join(lines) + "\n"
