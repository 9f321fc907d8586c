"""One helper for bad-input tests: the CLI refuses with one line on stderr naming the field, exit code 2."""

from __future__ import annotations

from planner.cli import main


def refused(capsys, *argv: str) -> str:
    """Run `planner ARGV`; assert it was refused as house style says; return the line."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err
