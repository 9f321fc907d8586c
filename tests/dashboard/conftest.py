"""Fixtures for the dashboard tests."""

from __future__ import annotations

import pytest

from tests.dashboard.runs import write_results


@pytest.fixture
def results_dir(tmp_path):
    """A results folder with two measured gpt-tiny plans and a torn last line."""
    return write_results(tmp_path)


@pytest.fixture(autouse=True)
def datasheet_profiles_only(tmp_path_factory, monkeypatch):
    """The project's profiles without this machine's measured one (make run caches it in
    profiles/devices/), so the tests see the same devices here as in a fresh clone."""
    import shutil

    from planner import specs

    copy = tmp_path_factory.getbasetemp() / "profiles-datasheets"
    if not copy.exists():
        shutil.copytree(specs.PROFILES_DIR, copy, ignore=shutil.ignore_patterns("*.measured.json"))
    monkeypatch.setattr(specs, "PROFILES_DIR", copy)  # dashboard.inputs reads it at call time
