"""`planner`: plan | predict | compare | profile | validate | export | launch. One small function per subcommand:
load the specs, call one library function, print a table (or --json) or write a file."""

from __future__ import annotations

import dataclasses
import json
import sys

from planner.errors import MeshplanError, SpecError
from planner.flags import KNOB_FLAGS, build_parser  # noqa: F401 (build_parser: planner.cli's parser, for its callers)
from planner.io import stdout_reader_may_go
from planner.memory import DEFAULT_MEMORY_HEADROOM_GIB, check_headroom


def _headroom(args) -> float:
    return DEFAULT_MEMORY_HEADROOM_GIB if args.memory_headroom is None else args.memory_headroom


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


def _check_headroom(args, *devices) -> None:
    """The headroom in force, given or the default, must leave some of each device's memory."""
    source = "--memory-headroom" if args.memory_headroom is not None else "--memory-headroom (default)"
    for d in devices:
        check_headroom(_headroom(args), d, source)


def _specs(args):
    from planner.specs import load_cluster, load_device

    model = _model(args)
    cluster = load_cluster(args.cluster, args.nodes, args.gpus_per_node, args.device)
    device = load_device(cluster.device)
    return model, cluster, device


def _model(args):
    from planner.specs import load_model

    return load_model(args.model, args.seq_len)


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
    _check_headroom(args, device)
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
        with stdout_reader_may_go():
            print(json.dumps(out, indent=1))
    else:
        with stdout_reader_may_go():
            print_plans(result, out=args.out if fits else None, training=training, device_name=device.name)
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
    from planner.pins import zero_pins
    from planner.report import print_prediction, print_written
    from planner.slurm import does_not_fit

    _check_inputs(args)
    model, cluster, device = _specs(args)
    _check_headroom(args, device)
    training = _training(args, model)
    zero = zero_pins({k: getattr(args, k) for k in ("zero", "distributed_optimizer") if getattr(args, k) is not None}).get("zero", 0)
    knobs = Knobs(args.tp, args.pp, args.dp, args.micro_batch, args.schedule or ("interleaved" if (args.virtual_stages or 1) > 1 else "1f1b"),
                  args.virtual_stages or 1, args.recompute or "none", bool(args.sequence_parallel), zero, args.cp or 1,
                  args.precision or "bf16", bool(args.compile))
    plan, _ = predict(model, cluster, device, knobs, args.global_batch, framework=FRAMEWORKS[args.framework],
                      memory_headroom_gib=_headroom(args))
    cost = plan_training_cost(plan, *training) if training else None
    with stdout_reader_may_go():
        if args.json:
            print(json.dumps(dataclasses.asdict(plan.prediction) | ({"training": cost_to_dict(cost)} if cost else {}), indent=1))
        else:
            print_prediction(plan, cost)
    if args.out is not None:  # after printing, so a failed write loses no results
        write_plan(args.out, plan)
        if not plan.prediction.fits:  # written all the same (to launch anyway, or to edit): say so, and why it is a risk
            print(f"warning: wrote {args.out}, but {does_not_fit(plan)}", file=sys.stderr)
        elif not args.json:
            print_written(plan, args.out)
    return 0


def cmd_compare(args) -> int:
    from planner.compare import check_tokens, compare, parse_tokens, row_to_dict, targets_from_flags
    from planner.cost import FRAMEWORKS
    from planner.plan import check_global_batch
    from planner.report import compare_markdown, print_compare
    check_global_batch(args.global_batch, "--global-batch")
    model = _model(args)
    tokens = parse_tokens(args.tokens)
    check_tokens(tokens, model, args.global_batch)
    targets = targets_from_flags(args.per_cluster)
    _check_headroom(args, *(t.device for t in targets))
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
    try:
        from runtime.profile import main as profile_main  # torch is imported only here
    except ModuleNotFoundError as e:
        if e.name != "torch":  # torch itself missing: meshplan installed without its [runtime] extra
            raise
        from planner.slurm import NO_TORCH

        raise MeshplanError(f"planner profile needs torch to time the runtime's layers; {NO_TORCH}") from None
    return profile_main(device=args.device, out=args.out, quick=args.quick, models=tuple(args.model) if args.model else None)


def cmd_validate(args) -> int:
    from planner.report_validation import print_validation
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
    from planner.slurm import devices_word, launch_warnings, node_commands, sbatch_script
    from planner.specs import nodes_x

    if args.out is not None and not args.slurm:
        raise SpecError("--out", "out", "names the sbatch script, so it needs --slurm")
    from planner.runtime_args import problem  # runtime.launch's flags, without torch

    if args.runtime_args and (why := problem(args.runtime_args)):  # refused here, not on every node at start
        raise SpecError("--", "runtime.launch arguments", f"{why} (`python -m planner.runtime_args` lists runtime.launch's flags)")
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
        print(f"Wrote {out}: {nodes_x(nodes, gpus)} {devices_word(plan)}, one torchrun "
              f"per node. Submit it with: sbatch {out}")
    for warning in launch_warnings(plan, nodes, gpus):  # comments above the commands too, where they are easily missed
        print(f"warning: {warning}", file=sys.stderr)
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
    except BrokenPipeError:  # stdout's reader went away (`planner validate ... | head`): nothing more to say
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
