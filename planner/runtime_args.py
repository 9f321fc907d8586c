"""runtime.launch's flags, in the planner (no torch here; the runtime imports them, never the reverse), so that
`planner launch plan.json -- FLAGS` can check the flags it passes on before it writes commands or a script that would
fail on every node."""

from __future__ import annotations

import argparse

from planner.errors import MeshplanError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m runtime.launch",
                                description="Train a GPT exactly as plan.json says and measure it.")
    p.add_argument("plan", help="plan.json (version 1), as `planner plan --out` writes it")
    p.add_argument("--steps", type=int, default=10, help="train until this many steps are done (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the data (default 0)")
    p.add_argument("--results", help="append one JSON line with the measurements to this file")
    p.add_argument("--checkpoint-dir", help="save checkpoints here; a run started again with it resumes")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save every K steps (default: only at the end)")
    p.add_argument("--data", help="flat uint16 token file (nanoGPT's train.bin); default: a seeded synthetic stream")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of tokens/s and stage timings (default 1; at least 1 under "
                   "pipelining; on CPU the last step, which counts memory, is left out too)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (default 1e-3)")
    p.add_argument("--lr-warmup-steps", type=int, default=None,
                   help="steps of linear warm-up to --lr (default: a tenth of --steps, at least 1)")
    p.add_argument("--lr-decay-steps", type=int, default=None,
                   help="cosine decay from the end of warm-up to --lr-min-ratio * --lr at this step (default: --steps; give it, "
                        "and --lr-warmup-steps, when a run is stopped early by a smaller --steps and resumed)")
    p.add_argument("--lr-min-ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr (default 0.1)")
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="clip the whole model's gradient to this 2-norm (default 1.0; 0 turns clipping off)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per CPU rank (default 1)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """runtime.launch's arguments; a bad one is a MeshplanError, so it is one line (argparse's usage block is some
    15), on every rank, and torchrun's summary reads it as the others (runtime.machine.tell_torchrun)."""
    p = parser()

    def refuse(message: str):
        raise MeshplanError(f"{message} (`python -m runtime.launch --help` lists the flags)")

    p.error = refuse
    return p.parse_args(argv)


def problem(argv: list[str]) -> str | None:
    """What argparse would refuse in runtime.launch's arguments (after the plan), or None. --help (or any prefix of
    it argparse takes) is refused too: it would print the flags and exit instead of training."""
    p = parser()

    def refuse(message: str):
        raise ValueError(message)

    def help_instead_of_training(*_):
        raise ValueError("--help prints runtime.launch's flags and exits instead of training")

    p.error, p.print_help = refuse, help_instead_of_training
    try:
        p.parse_args(["plan.json", *argv])
    except ValueError as e:
        return str(e)
    return None


if __name__ == "__main__":
    parser().print_help()
