"""The `planner` command line's flags: one parser (build_parser) for every subcommand, each flag's help stating its
default. planner/cli.py runs the subcommands."""

from __future__ import annotations

import argparse

from planner import __version__
from planner.frameworks import LABELS
from planner.memory import DEFAULT_MEMORY_HEADROOM_GIB

KNOB_FLAGS = ("tp", "cp", "pp", "dp", "micro_batch", "schedule", "virtual_stages", "recompute", "sequence_parallel", "zero",
              "distributed_optimizer", "precision", "compile")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset name (e.g. gpt3-175b) or a model YAML file")
    _add_seq_len(p)
    p.add_argument("--cluster", required=True, help="preset name (dgx-h100-80gb, ...: profiles/clusters/) or a cluster YAML file")
    p.add_argument("--global-batch", type=_positive_int, required=True, help="sequences per iteration (at most 65,536)")
    p.add_argument("--nodes", type=_positive_int, help="override the cluster's node count (default: the cluster file's)")
    p.add_argument("--gpus-per-node", type=_positive_int, help="override the cluster's devices per node (default: the cluster file's)")
    p.add_argument("--device", help="override the cluster's device profile, a name in profiles/devices/ or a JSON file "
                                    "(default: the cluster file's device)")
    _add_framework(p)
    _add_memory_headroom(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (default: a table)")


def _add_seq_len(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-len", type=_positive_int, metavar="TOKENS",
                   help="train on sequences of this many tokens (default: the model's seq_len; a Hugging Face config's is "
                        "its max_position_embeddings, the longest it was built for); RoPE models only")


def _add_framework(p: argparse.ArgumentParser) -> None:
    names = [f"{LABELS[n]}{' (default)' if n == 'meshplan' else ''}" for n in LABELS]
    p.add_argument("--framework", choices=tuple(LABELS), default="meshplan",
                   help=f"software that runs the plan: {', '.join(names[:-1])}, or {names[-1]} (for comparing with "
                        "published runs, or planning for the trainer you run)")


def _add_memory_headroom(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-headroom", type=_non_negative_float, default=None, metavar="GIB",
                   help=f"memory every device keeps free beyond the predicted peak (default {DEFAULT_MEMORY_HEADROOM_GIB:g} GiB: "
                        "allocator fragmentation and communication buffers the model does not count)")


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return v


TOKENS_HELP = "total training tokens, e.g. 15e12, 15T or 300B: adds days, GPU-hours and (with a price) cost to train"


def _add_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", metavar="N", help=TOKENS_HELP + " (default: not shown)")
    p.add_argument("--gpu-hour-price", metavar="USD", help="US dollars per GPU per hour, with --tokens (default: no cost shown)")


def _add_knobs(p: argparse.ArgumentParser, required: bool) -> None:
    # plan searches every knob not given; predict prices exactly the given ones, with these defaults.
    def default(value: str) -> str:
        return "default: searched" if not required else f"default: {value}"

    for name in ("tp", "pp", "dp"):
        p.add_argument(f"--{name}", type=_positive_int, required=required,
                       help=f"{name} degree" + ("" if required else " (default: searched)"))
    p.add_argument("--micro-batch", type=_positive_int, required=required,
                   help="sequences per microbatch" + ("" if required else " (default: searched)"))
    p.add_argument("--schedule", choices=("1f1b", "gpipe", "interleaved"),
                   help=f"pipeline schedule ({default('1f1b, or interleaved with --virtual-stages above 1')})")
    p.add_argument("--virtual-stages", type=_positive_int, help=f"model chunks per pipeline device, interleaved only ({default('1')})")
    p.add_argument("--recompute", choices=("none", "selective", "full"),
                   help=f"activation recomputation: selective = attention core, full = whole blocks ({default('none')})")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help=f"Megatron sequence parallelism over tp ({default('off')})")
    p.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help=f"shard optimizer state over dp: the same as --zero 1 (off: --zero 0) ({default('off')})")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3),
                   help="ZeRO stage over dp: 0 plain data parallel, 1 optimizer state sharded, 2 also gradients (FSDP2 "
                        f"without resharding), 3 also weights (FSDP2) ({default('0')})")
    p.add_argument("--cp", type=_positive_int,
                   help="context-parallel degree: the sequence cut into 2 x cp chunks, keys and values all-gathered "
                        f"({default('1') if required else 'default: searched, 1 and the powers of 2 that leave each rank a long enough slice of the sequence'})")
    p.add_argument("--precision", choices=("bf16", "fp8"),
                   help="bf16 mixed precision, or fp8 linears (GPUs of compute capability 8.9 and up) (default: bf16)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each block (default: off)")


class _PerCluster(argparse.Action):
    """Keeps --cluster and the flags that follow it in command-line order, for planner.compare.targets_from_flags."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.per_cluster = (getattr(namespace, "per_cluster", None) or []) + [(option_string, values)]


def _add_compare(sub) -> None:
    p = _command(sub, "compare", help="plan one job on several clusters: best plan, days, GPU-hours and cost of each",
                      usage="planner compare --model M --global-batch B --tokens N [--gpu-hour-price USD] "
                            "--cluster C [--nodes K] [--gpu-hour-price USD] [--cluster C2 ...] [options]")
    p.add_argument("--model", required=True, help="preset name (e.g. llama3-70b) or a model YAML file")
    _add_seq_len(p)
    p.add_argument("--global-batch", type=_positive_int, required=True, help="sequences per iteration on every cluster (at most 65,536)")
    p.add_argument("--tokens", required=True, metavar="N", help=TOKENS_HELP)
    p.add_argument("--cluster", action=_PerCluster, required=True,
                   help="a cluster to plan on: preset name or YAML file; repeat it for each cluster to compare (required)")
    p.add_argument("--nodes", type=_positive_int, action=_PerCluster, help="nodes of the --cluster before it (default: its file's)")
    p.add_argument("--gpus-per-node", type=_positive_int, action=_PerCluster,
                   help="devices per node of the --cluster before it (default: its file's)")
    p.add_argument("--device", action=_PerCluster, help="device profile of the --cluster before it (default: its file's)")
    p.add_argument("--gpu-hour-price", metavar="USD", action=_PerCluster,
                   help="US dollars per GPU-hour of the --cluster before it; before the first --cluster, of every cluster "
                        "that names none; give every cluster one or none (default: no cost shown)")
    _add_framework(p)
    _add_memory_headroom(p)
    _add_knobs(p, required=False)
    p.add_argument("--time-limit", type=_non_negative_float, default=None, metavar="SECONDS",
                   help="stop each cluster's search after this long, once every configuration is bounded (default: none)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON instead of a table (default: a table)")
    out.add_argument("--markdown", action="store_true", help="print a Markdown table, as in the README (default: a table)")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line, as every other refusal does (argparse prints its whole usage
    block, some 15 lines for `planner plan`, before the error), with where to find the flags."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the flags)\n")


def _command(sub, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose one line of help is both its entry in `planner --help` and the line under the usage of
    its own --help."""
    return sub.add_parser(name, help=help, description=help, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="planner", description="Plan, predict, profile and validate parallel GPT training.")
    ap.add_argument("--version", action="version", version=f"meshplan {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    p = _command(sub, "plan", help="search every tp/pp/dp split and knob; rank the plans; write the best")
    _add_common(p)
    _add_knobs(p, required=False)
    _add_training(p)
    p.add_argument("--top", type=_positive_int, default=5, help="plans to show (default 5)")
    p.add_argument("--time-limit", type=_non_negative_float, default=None, metavar="SECONDS",
                   help="stop the search after this long and say how far from proven the answer is; every "
                        "configuration is bounded first whatever the limit, and the limit cuts the layer splits and "
                        "simulations after that (default: none; the search runs until its best plans are proven the "
                        "fastest under the model)")
    p.add_argument("--out", default=None, help="write the best plan here, plan.json format (default: write nothing)")
    p = _command(sub, "predict", help="price one configuration")
    _add_common(p)
    _add_knobs(p, required=True)
    _add_training(p)
    p.add_argument("--out", default=None, help="also write the priced plan here, plan.json format (default: write nothing)")
    _add_compare(sub)
    p = _command(sub, "profile", help="measure this machine's layers and collectives into a device profile, which plan and predict then price with")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="default: profiles/devices/<name>.measured.json in a checkout, "
                                               "~/.local/share/meshplan/devices/ for an installed meshplan")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats, for tests (default: off)")
    p.add_argument("--model", action="append", metavar="MODEL",
                   help="a model whose blocks to time (preset or model file); repeat for several (default: gpt-tiny and "
                        "llama-tiny on CPU, gpt3-125m, gpt3-350m and gpt3-1.3b on a GPU)")
    p = _command(sub, "export", help="print a plan as Megatron-LM arguments or a torchtitan TOML job config")
    p.add_argument("plan", help="plan.json, as planner plan --out writes it")
    p.add_argument("--to", required=True, choices=("megatron", "torchtitan"),
                   help="Megatron-LM core_v0.16.1 arguments, or a torchtitan (@e347b1e) TOML job config")
    p = _command(sub, "launch", help="start a plan on its nodes: a Slurm batch script, or the torchrun command per node",
                      usage="planner launch plan.json [options] [-- runtime.launch arguments, e.g. --steps 100 --results r.jsonl]")
    p.add_argument("plan", help="plan.json, as planner plan --out writes it")
    p.add_argument("--nodes", type=_positive_int, help="nodes to run on (default: the plan's cluster's)")
    p.add_argument("--gpus-per-node", type=_positive_int, help="devices per node (default: the plan's cluster's)")
    p.add_argument("--slurm", action="store_true", help="write an sbatch script (to --out) that runs torchrun on every node (default: off)")
    p.add_argument("--out", default=None, help="with --slurm: the script to write (default: the plan's path with .sbatch)")
    p.add_argument("--print", dest="print_commands", action="store_true",
                   help="print the torchrun command to run on each node (the default without --slurm)")
    p.add_argument("--python", default=None, help="the Python with meshplan and torch on the nodes (default: this planner's)")
    p.add_argument("--port", type=_positive_int, default=29500, help="rendezvous port on the first node (default 29500)")
    p = _command(sub, "validate", help="predicted vs measured for results files")
    p.add_argument("results", nargs="+", help="results/*.jsonl files written by runtime.launch --results")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (default: a table)")
    return ap
