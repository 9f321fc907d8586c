"""Every file the project writes goes through here: atomic JSON writes and JSONL appends."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from planner.errors import MeshplanError


def check_target(path: str | os.PathLike, source: str) -> Path:
    """The file a write may create or replace; a MeshplanError naming `source` (a flag, say) for an empty path, a
    directory, a device or pipe (os.replace would put a regular file where /dev/null was), or a path under a file."""
    return _check_path(path, source, folder=False)


def check_folder(path: str | os.PathLike, source: str) -> Path:
    """The folder a run may create and write into (a checkpoint directory), checked before the run starts rather
    than failing when it first saves; a MeshplanError naming `source` for an empty path, a file or a path under a file."""
    return _check_path(path, source, folder=True)


def _check_path(path: str | os.PathLike, source: str, *, folder: bool) -> Path:
    what, example = ("a folder to write into", "checkpoints") if folder else ("a file to write", "plan.json")
    text = os.fspath(path)
    if not text.strip():
        raise MeshplanError(f"{source}: an empty path; give {what}, e.g. {example}")
    p = Path(text)
    if p.exists() and not (p.is_dir() if folder else p.is_file()):
        kind = "a directory" if p.is_dir() else "a file" if p.is_file() else "not a regular file (a device, pipe or socket)"
        raise MeshplanError(f"{source}: {text} is {kind}; give the path of {what}")
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise MeshplanError(f"{source}: {text}: {parent} is a file, not a folder; give the path of {what}")
    return p


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to path via a temp file in the same directory and os.replace: never half-written.
    Bad targets (see check_target) and failed writes are a MeshplanError naming the path."""
    path = check_target(path, "results file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise MeshplanError(f"{path}: cannot write there: {e.strerror}") from None
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; these are ordinary project files
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise MeshplanError(f"{path}: cannot write it: {e.strerror}") from None
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def _one_line(m: re.Match) -> str:
    return "{" + m.group(1) + m.group(2) + " " + re.sub(r",\s+", ", ", m.group(3)) + "}"


def atomic_write_datasheet(path: str | os.PathLike, obj: Any) -> None:
    """atomic_write_json with each curve point on one line: datasheets are read and edited by hand."""
    text = re.sub(r'\{\s*("gflop|"tokens)(": [^,]+,)\s*("[^}]+?)\s*\}', _one_line, json.dumps(obj, indent=1))
    atomic_write_text(path, text + "\n")


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line. The line is built first and written with one O_APPEND write, so a
    concurrent reader sees either the whole line or nothing of it (a crash can still tear it:
    read_jsonl tolerates a torn last line). A bad target (see check_target) is a MeshplanError naming the results file."""
    path = check_target(path, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any | None, str | None]]:
    """Yield (line number, object or None, error or None) for each non-empty line.

    A line that does not parse (a torn last line, say) is reported, not raised, so callers keep the
    good lines. A missing file or a directory is a MeshplanError."""
    path = Path(path)
    if path.is_dir():
        n = len(list(path.glob("*.jsonl")))
        hint = (f"give the results files in it: {path / '*.jsonl'} ({n} here)" if n else
                f"it holds no results files (*.jsonl); run a plan with --results {path / 'NAME.jsonl'} first")
        raise MeshplanError(f"{path}: a directory, not a results file; {hint}")
    if not path.is_file():
        raise MeshplanError(f"{path}: no such results file; run a plan with --results {path} first")
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is one bad line, not the end of the file
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield n, json.loads(raw), None
            except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError
                torn = "" if raw.endswith(b"\n") else " (torn last line: the run was cut off while writing)"
                yield n, None, f"line {n} is not valid JSON{torn}: {getattr(e, 'msg', 'not UTF-8 text')}"


@contextlib.contextmanager
def stdout_reader_may_go():
    """Printing whose reader may have gone (`planner plan ... --out plan.json | head`): stop printing, but go on,
    so that --out is still written after it; stdout then leads nowhere, as its reader chose. (planner.report's
    console raises BrokenPipeError where rich would exit.)"""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
