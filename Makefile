# The two front doors: `make run` (the main job on this machine) and `make test`.
# Both build .venv first. torch is pinned: torch==2.13.0 is the CPU build that this machine
# installs from a local wheel; an unpinned torch pulls gigabytes of CUDA packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup run test plan dashboard clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[runtime,dashboard,test]"
	touch $@

run: setup
	$(PY) -m planner.closed_loop

test: setup
	$(PY) -m pytest -q

dashboard: setup
	$(VENV)/bin/streamlit run dashboard/app.py

clean:
	rm -rf $(VENV) build *.egg-info
