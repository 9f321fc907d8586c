"""bench/fit_calibration.py: the committed H100 datasheet is where the fit converges (from itself and from far
away), and its FP8 curve is never slower than its bf16 curve, the bound the fit keeps."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from planner.compute import gemm_efficiency
from planner.specs import load_device

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "fit_calibration.py"
# The datasheet stores each curve point to 3 decimals; the constants read back from it move by about that much.
TOLERANCE = (0.003, 0.03, 0.003, 0.03, 0.003, 0.005)


@pytest.fixture(scope="module")
def fitting():
    spec = importlib.util.spec_from_file_location("fit_calibration", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _close(a, b):
    return all(abs(x - y) <= t for x, y, t in zip(a, b, TOLERANCE))


def test_committed_h100_constants_are_where_the_fit_converges_from_them_and_from_far_away(fitting):
    model = fitting.Model("h100-sxm5-80gb")
    committed = list(model.x0)
    from_committed, _ = fitting.fit(model, model.cases, committed)
    from_far, _ = fitting.fit(model, model.cases, [0.7, 0.5, 0.5, -2.0, 0.5, 0.7])
    assert _close(from_committed, committed), (from_committed, committed)
    assert _close(from_far, committed), (from_far, committed)


@pytest.mark.parametrize("name", ["h100-sxm5-80gb", "h200-sxm-141gb", "b200-sxm-180gb", "l40s-pcie-48gb", "rtx4090-pcie-24gb"])
def test_an_fp8_gemm_is_never_slower_than_the_bf16_gemm_of_the_same_size(name):
    dev = load_device(name)
    for i in range(-20, 41):
        g = 10 ** (i / 10)  # 0.01 to 10,000 GFLOP
        # 2% for the datasheet's 3-decimal points at the small end, where the bound binds.
        assert dev.fp8_peak_tflops * gemm_efficiency(dev, g, fp8=True) >= 0.98 * dev.peak_tflops * gemm_efficiency(dev, g), g


def test_the_unbounded_fp8_fit_is_never_written():
    out = subprocess.run([sys.executable, str(BENCH), "--fp8-unbounded", "--write"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "not written" in out.stderr
