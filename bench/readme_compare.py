"""Regenerate the README's compare table: run the planner compare command it shows and put its output under it.

    .venv/bin/python bench/readme_compare.py           # print the command and the table
    .venv/bin/python bench/readme_compare.py --write   # also replace them in README.md (between the markers)

The command is defined here once, so the README's command and table cannot drift apart; rerun this after a change
to the cost model or the datasheets."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from planner.io import atomic_write_text

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- compare-table: begin (written by bench/readme_compare.py) -->"
END = "<!-- compare-table: end -->"
# Llama 3 70B on 1,024 GPUs of each kind (128 DGX nodes), Llama 3's 16M-token batch (2,048 sequences of 8,192) and
# 15T tokens; prices: the middle of May 2026's specialty-cloud on-demand range (see the README).
ARGV = ["compare", "--model", "llama3-70b", "--global-batch", "2048", "--tokens", "15e12",
        "--cluster", "dgx-a100-80gb", "--nodes", "128", "--gpu-hour-price", "1.30",
        "--cluster", "dgx-h100-80gb", "--nodes", "128", "--gpu-hour-price", "3.00",
        "--cluster", "dgx-h200-141gb", "--nodes", "128", "--gpu-hour-price", "4.00", "--markdown"]


def command_text() -> str:
    """The command as the README shows it: one flag group a line."""
    words = [".venv/bin/planner"] + [shlex.quote(a) for a in ARGV]
    lines, current = [], []
    for w in words:
        if w.startswith("--") and w not in ("--nodes", "--gpu-hour-price", "--global-batch", "--tokens") and current:
            lines.append(" ".join(current))
            current = []
        current.append(w)
    lines.append(" ".join(current))
    return " \\\n    ".join(lines)


def block() -> str:
    r = subprocess.run([sys.executable, "-m", "planner.cli", *ARGV], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"planner compare failed ({r.returncode}): {r.stderr.strip()}")
    return f"{BEGIN}\n```\n$ {command_text()}\n```\n\n{r.stdout}{END}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace the block in README.md (default: print it only)")
    args = ap.parse_args()
    text = block()
    print(text)
    if args.write:
        readme = README.read_text()
        if BEGIN not in readme or END not in readme:
            raise SystemExit(f"{README}: no {BEGIN!r} ... {END!r} block to replace; add the two markers where the table goes")
        head, rest = readme.split(BEGIN, 1)
        atomic_write_text(README, head + text + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
