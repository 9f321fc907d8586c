"""--out and --global-batch: refused before the search when they cannot work, and a write that fails after the
search still leaves the ranked plans printed, with one line saying what failed and nothing half-written."""

from __future__ import annotations

import json
import os
import stat

import pytest

from planner.plan import MAX_GLOBAL_BATCH
from tests.planner.refusals import refused

TINY = ("--model", "gpt-tiny", "--cluster", "local-cpu", "--gpus-per-node", "2", "--global-batch", "16")
PREDICT = ("predict", *TINY, "--tp", "1", "--pp", "1", "--dp", "2", "--micro-batch", "4")


@pytest.mark.parametrize("command", [("plan", *TINY), PREDICT])
def test_out_naming_a_directory_is_refused(tmp_path, capsys, command):
    err = refused(capsys, *command, "--out", str(tmp_path))
    assert f"--out: {tmp_path} is a directory" in err


@pytest.mark.parametrize("command", [("plan", *TINY), PREDICT])
def test_an_empty_out_is_refused_not_ignored(capsys, command):
    assert "--out: an empty path" in refused(capsys, *command, "--out", "")


def test_out_onto_a_character_device_is_refused_and_the_device_stays(capsys):
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert "--out: /dev/null is not a regular file" in refused(capsys, "plan", *TINY, "--out", "/dev/null")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_out_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert "is a file, not a folder" in refused(capsys, "plan", *TINY, "--out", str(tmp_path / "f" / "plan.json"))


def test_a_write_that_fails_after_the_search_prints_the_plans_first_and_one_line(tmp_path, capsys, monkeypatch):
    import planner.io

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(planner.io.os, "fsync", fail)
    out = tmp_path / "plan.json"
    from planner.cli import main

    code = main(["plan", *TINY, "--json", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and json.loads(captured.out)["plans"]  # the ranked plans were printed before the write
    assert captured.err == f"error: {out}: cannot write it: No space left on device\n"
    assert list(tmp_path.iterdir()) == []  # no plan.json and no temp file left


def test_a_global_batch_above_the_limit_is_refused_at_once_naming_the_flag(capsys):
    import time

    t0 = time.perf_counter()
    err = refused(capsys, "plan", "--model", "gpt3-175b", "--cluster", "dgx-a100-80gb", "--global-batch", "1000000000")
    assert time.perf_counter() - t0 < 1.0
    assert f"--global-batch: 1,000,000,000 sequences is above {MAX_GLOBAL_BATCH:,}" in err
    assert "above" in refused(capsys, *PREDICT[:-8], "--global-batch", str(MAX_GLOBAL_BATCH + 1), *PREDICT[-8:])


@pytest.mark.parametrize("command", [("plan", *TINY), ("plan", *TINY, "--json"), PREDICT])
def test_a_reader_of_stdout_that_goes_away_still_leaves_the_plan_written(tmp_path, command):
    # `planner plan ... --out plan.json | head -1`: printing stops, the write that follows it does not.
    import subprocess
    import sys

    out = tmp_path / "plan.json"
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    r = subprocess.run([sys.executable, "-m", "planner.cli", *command, "--out", str(out)], stdout=write,
                       stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert json.loads(out.read_text())["id"]


def test_a_reader_of_stdout_that_goes_away_ends_validate_quietly():
    # `planner validate results/*.jsonl | head -1`: no traceback from the rest of its tables.
    import subprocess
    import sys
    from pathlib import Path

    results = Path(__file__).resolve().parents[2] / "docs/measurements/2026-12-01/make-run-quiet.jsonl"
    read, write = os.pipe()
    os.close(read)
    r = subprocess.run([sys.executable, "-m", "planner.cli", "validate", str(results)], stdout=write, stderr=subprocess.PIPE,
                       text=True, timeout=120)
    os.close(write)
    assert r.returncode == 1 and r.stderr == "", r.stderr

