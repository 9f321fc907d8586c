"""`planner`: plan | predict | compare | profile | validate | export | launch. One small function per subcommand:
load the specs, call one library function, print a table (or --json) or write a file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from planner import __version__
from planner.errors import MeshplanError, SpecError
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
    p.add_argument("--cluster", required=True, help="preset name (dgx-h100-80gb, ...: profiles/clusters/) or a cluster YAML file")
    p.add_argument("--global-batch", type=_positive_int, required=True, help="sequences per iteration (at most 65,536)")
    p.add_argument("--nodes", type=_positive_int, help="override the cluster's node count (default: the cluster file's)")
    p.add_argument("--gpus-per-node", type=_positive_int, help="override the cluster's devices per node (default: the cluster file's)")
    p.add_argument("--device", help="override the cluster's device profile, a name in profiles/devices/ or a JSON file "
                                    "(default: the cluster file's device)")
    _add_framework(p)
    _add_memory_headroom(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (default: a table)")


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


def _headroom(args) -> float:
    return DEFAULT_MEMORY_HEADROOM_GIB if args.memory_headroom is None else args.memory_headroom


TOKENS_HELP = "total training tokens, e.g. 15e12, 15T or 300B: adds days, GPU-hours and (with a price) cost to train"


def _add_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", metavar="N", help=TOKENS_HELP + " (default: not shown)")
    p.add_argument("--gpu-hour-price", metavar="USD", help="US dollars per GPU per hour, with --tokens (default: no cost shown)")


def _training(args, model) -> tuple[int, float | None] | None:
    """(tokens, price) from --tokens and --gpu-hour-price, checked against the model and batch; None without --tokens."""
    from planner.compare import check_tokens, parse_price, parse_tokens

    if args.tokens is None:
        if args.gpu_hour_price is not None:
            raise SpecError("--gpu-hour-price", "gpu_hour_price", "prices GPU-hours, which need --tokens (the run's length); give both")
        return None
    tokens = parse_tokens(args.tokens)
    check_tokens(tokens, model, args.global_batch)
    return tokens, None if args.gpu_hour_price is None else parse_price(args.gpu_hour_price)


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
                        "(default: 1)")
    p.add_argument("--precision", choices=("bf16", "fp8"),
                   help="bf16 mixed precision, or fp8 linears (GPUs of compute capability 8.9 and up) (default: bf16)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each block (default: off)")


class _PerCluster(argparse.Action):
    """Keeps --cluster and the flags that follow it in command-line order, for planner.compare.targets_from_flags."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.per_cluster = (getattr(namespace, "per_cluster", None) or []) + [(option_string, values)]


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="plan one job on several clusters: best plan, days, GPU-hours and cost of each",
                       usage="planner compare --model M --global-batch B --tokens N [--gpu-hour-price USD] "
                             "--cluster C [--nodes K] [--gpu-hour-price USD] [--cluster C2 ...] [options]")
    p.add_argument("--model", required=True, help="preset name (e.g. llama3-70b) or a model YAML file")
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="planner", description="Plan, predict, profile and validate parallel GPT training.")
    ap.add_argument("--version", action="version", version=f"meshplan {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="search every tp/pp/dp split and knob; rank the plans; write the best")
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
    p = sub.add_parser("predict", help="price one configuration")
    _add_common(p)
    _add_knobs(p, required=True)
    _add_training(p)
    p.add_argument("--out", default=None, help="also write the priced plan here, plan.json format (default: write nothing)")
    _add_compare(sub)
    p = sub.add_parser("profile", help="measure this machine's layers and collectives into a device profile")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="default: profiles/devices/<name>.measured.json in a checkout, "
                                               "~/.local/share/meshplan/devices/ for an installed meshplan")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats, for tests (default: off)")
    p = sub.add_parser("export", help="print a plan as Megatron-LM arguments or a torchtitan TOML job config")
    p.add_argument("plan", help="plan.json, as planner plan --out writes it")
    p.add_argument("--to", required=True, choices=("megatron", "torchtitan"),
                   help="Megatron-LM core_v0.16.1 arguments, or a torchtitan (@e347b1e) TOML job config")
    p = sub.add_parser("launch", help="start a plan on its nodes: a Slurm batch script, or the torchrun command per node",
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
    p = sub.add_parser("validate", help="predicted vs measured for results files")
    p.add_argument("results", nargs="+", help="results/*.jsonl files written by runtime.launch --results")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (default: a table)")
    return ap


def _specs(args):
    from planner.specs import load_cluster, load_device, load_model

    model = load_model(args.model)
    cluster = load_cluster(args.cluster, args.nodes, args.gpus_per_node, args.device)
    device = load_device(cluster.device)
    return model, cluster, device


def _check_inputs(args) -> None:
    """What can be refused before a search: a --global-batch too large to price, an --out that cannot be written."""
    from planner.io import check_target
    from planner.plan import check_global_batch

    check_global_batch(args.global_batch, "--global-batch")
    if args.out is not None:
        check_target(args.out, "--out")


def _pins(args) -> dict:
    return {k: getattr(args, k) for k in KNOB_FLAGS if getattr(args, k, None) is not None}


def cmd_plan(args) -> int:
    from planner.compare import cost_to_dict, plan_training_cost
    from planner.cost import FRAMEWORKS
    from planner.plan import plan_to_dict, write_plan
    from planner.report import print_plans, print_written
    from planner.search import search

    _check_inputs(args)
    model, cluster, device = _specs(args)
    training = _training(args, model)
    result = search(model, cluster, device, args.global_batch, _pins(args), top=args.top, framework=FRAMEWORKS[args.framework],
                    memory_headroom_gib=_headroom(args), time_limit_s=args.time_limit)
    best = result.plans[0] if result.plans else None
    fits = best is not None and best.prediction.fits
    if args.json:
        out = {"plans": [plan_to_dict(p) for p in result.plans], "searched": result.searched,
               "bounded": result.bounded, "split": result.split, "priced": result.priced,
               "complete": result.complete, "gap_pct": round(result.gap_pct, 3),
               "memory_headroom_gib": _headroom(args), "search_s": round(result.search_s, 3)}
        if training:  # per plan that fits, by id; the plan objects stay plan.json's
            out["training"] = [{"id": p.id, **cost_to_dict(plan_training_cost(p, *training))} for p in result.plans if p.prediction.fits]
        print(json.dumps(out, indent=1))
    else:
        print_plans(result, out=args.out if fits else None, training=training)
    if not fits:
        print(f"error: no plan fits: {best.prediction.reason if best else 'no candidate'}", file=sys.stderr)
        return 1
    if args.out is not None:  # after printing, so a failed write loses no results
        write_plan(args.out, best)
        if not args.json:
            print_written(best, args.out)
    return 0


def cmd_predict(args) -> int:
    from planner.compare import cost_to_dict, plan_training_cost
    from planner.cost import FRAMEWORKS, predict
    from planner.plan import Knobs, write_plan
    from planner.search import zero_pins
    from planner.report import print_prediction

    _check_inputs(args)
    model, cluster, device = _specs(args)
    training = _training(args, model)
    zero = zero_pins({k: getattr(args, k) for k in ("zero", "distributed_optimizer") if getattr(args, k) is not None}).get("zero", 0)
    knobs = Knobs(args.tp, args.pp, args.dp, args.micro_batch, args.schedule or ("interleaved" if (args.virtual_stages or 1) > 1 else "1f1b"),
                  args.virtual_stages or 1, args.recompute or "none", bool(args.sequence_parallel), zero, args.cp or 1,
                  args.precision or "bf16", bool(args.compile))
    plan, _ = predict(model, cluster, device, knobs, args.global_batch, framework=FRAMEWORKS[args.framework],
                      memory_headroom_gib=_headroom(args))
    cost = plan_training_cost(plan, *training) if training else None
    if args.json:
        print(json.dumps(dataclasses.asdict(plan.prediction) | ({"training": cost_to_dict(cost)} if cost else {}), indent=1))
    else:
        print_prediction(plan, cost)
    if args.out is not None:  # after printing, so a failed write loses no results
        write_plan(args.out, plan)
    return 0


def cmd_compare(args) -> int:
    from planner.compare import check_tokens, compare, parse_tokens, row_to_dict, targets_from_flags
    from planner.cost import FRAMEWORKS
    from planner.plan import check_global_batch
    from planner.report import compare_markdown, print_compare
    from planner.specs import load_model

    check_global_batch(args.global_batch, "--global-batch")
    model = load_model(args.model)
    tokens = parse_tokens(args.tokens)
    check_tokens(tokens, model, args.global_batch)
    targets = targets_from_flags(args.per_cluster)
    rows = compare(model, args.global_batch, tokens, targets, _pins(args), framework=FRAMEWORKS[args.framework],
                   memory_headroom_gib=_headroom(args), time_limit_s=args.time_limit)
    if args.json:
        print(json.dumps({"model": model.name, "global_batch": args.global_batch, "tokens": tokens,
                          "memory_headroom_gib": _headroom(args), "rows": [row_to_dict(r) for r in rows]}, indent=1))
    elif args.markdown:
        print(compare_markdown(rows), end="")
    else:
        print_compare(model, args.global_batch, tokens, rows)
    return 0 if any(r.fits for r in rows) else 1


def cmd_profile(args) -> int:
    from runtime.profile import main as profile_main  # torch is imported only here

    return profile_main(device=args.device, out=args.out, quick=args.quick)


def cmd_validate(args) -> int:
    from planner.report import print_validation
    from planner.validate import validate

    report = validate(args.results)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_validation(report)
    return 0 if report["runs"] else 1


def cmd_export(args) -> int:
    from planner.export import EXPORTERS
    from planner.plan import load_plan

    print(EXPORTERS[args.to](load_plan(args.plan)), end="")
    return 0


def cmd_launch(args) -> int:
    from pathlib import Path

    from planner.io import atomic_write_text, check_target
    from planner.plan import load_plan
    from planner.slurm import node_commands, sbatch_script

    if args.out is not None and not args.slurm:
        raise SpecError("--out", "out", "names the sbatch script, so it needs --slurm")
    plan = load_plan(args.plan)
    nodes, gpus = args.nodes or plan.cluster.nodes, args.gpus_per_node or plan.cluster.gpus_per_node
    common = dict(python=args.python, port=args.port, extra=tuple(args.runtime_args))
    if args.slurm:
        out = check_target(args.out if args.out is not None else Path(args.plan).with_suffix(".sbatch"), "--out")
        script = sbatch_script(plan, args.plan, nodes, gpus, **common)
    if args.print_commands or not args.slurm:
        print(node_commands(plan, args.plan, nodes, gpus, **common), end="")
    if args.slurm:
        atomic_write_text(out, script)
        print(f"Wrote {out}: {nodes} node(s) x {gpus} GPUs, one torchrun per node. Submit it with: sbatch {out}")
    return 0


COMMANDS = {"plan": cmd_plan, "predict": cmd_predict, "compare": cmd_compare, "profile": cmd_profile, "validate": cmd_validate,
            "export": cmd_export, "launch": cmd_launch}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `planner launch plan.json ... -- --steps 100`: what follows -- is for runtime.launch, not for us.
    cut = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:cut])
    args.runtime_args = argv[cut + 1:]
    if args.runtime_args and args.command != "launch":
        print(f"error: --: only planner launch passes arguments on (to runtime.launch), got {' '.join(args.runtime_args)}",
              file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args)
    except MeshplanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
