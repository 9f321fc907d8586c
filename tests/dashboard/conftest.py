"""Fixtures for the dashboard tests."""

from __future__ import annotations

import pytest

from tests.dashboard.runs import write_results


@pytest.fixture
def results_dir(tmp_path):
    """A results folder with two measured gpt-tiny plans and a torn last line."""
    return write_results(tmp_path)
