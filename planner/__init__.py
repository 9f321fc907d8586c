"""meshplan's planner: pure Python (no torch) cost model, memory model, schedule simulator and search."""

__version__ = "0.1.0"
