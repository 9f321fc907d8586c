"""The checks a device file passes at load (specs.device_from_dict), each naming the field it refuses.

Everything that reads a DeviceProfile trusts these: compute divides by the efficiencies, interpolates along
the curves, and reads `measured` only where source is 'measured'."""

from __future__ import annotations

from typing import Any

from planner.errors import SpecError
from planner.parsing import check_positive

DTYPES = ("bf16", "fp32")
"""Training dtypes a device profile may describe."""


def check_curve(source: str, name: str, points: tuple, at: str, values: tuple[str, ...]) -> None:
    """Refuse a curve that compute would misread: its `at` field positive and increasing (kernels.log_linear
    interpolates between neighbours, so an unsorted curve would be misread, not refused), each of `values` a
    fraction of peak in (0, 1]."""
    for i, p in enumerate(points):
        if getattr(p, at) <= 0 or not all(0 < getattr(p, v) <= 1 for v in values):
            raise SpecError(source, f"{name}[{i}]", f"expected {at} > 0 and 0 < {', '.join(values)} <= 1, got {p}")
        if i and getattr(p, at) <= getattr(points[i - 1], at):
            here, before = (f"{v:g}" if isinstance(v, float) else str(v) for v in (getattr(p, at), getattr(points[i - 1], at)))
            raise SpecError(source, f"{name}[{i}].{at}", f"{here} comes after {before}; list the points by increasing {at}, "
                                                         "each once")


def check_device(source: str, d: Any) -> None:
    """Refuse a DeviceProfile (already typed by parsing.from_dict) with a value the cost model cannot represent."""
    check_positive(source, d, ["peak_tflops", "memory_gib", "memory_bandwidth_GBps"])
    if d.source not in ("datasheet", "measured"):
        raise SpecError(source, "source", f"expected 'datasheet' or 'measured', got {d.source!r}")
    if d.source == "datasheet" and d.measured is not None:
        # compute reads measured timings (optimizer_s_per_param, layer times) wherever they are present: a
        # datasheet carrying them would be priced half from the datasheet, half from a profile.
        raise SpecError(source, "measured", "a datasheet carries no measured timings; remove the `measured` section, or set "
                                            "source: measured if this file is `planner profile` output")
    if d.dtype not in DTYPES:
        raise SpecError(source, "dtype", f"expected one of {', '.join(DTYPES)} (meshplan trains in bf16 on GPUs, fp32 on CPU), got {d.dtype!r}")
    if not 0 < d.memory_efficiency <= 1:
        raise SpecError(source, "memory_efficiency", f"expected the share of memory_bandwidth_GBps reached, 0 < it <= 1, got "
                                                     f"{d.memory_efficiency:g}; give a fraction (0.7 when left out)")
    if not 0 <= d.framework_overhead_gib < d.memory_gib:
        raise SpecError(source, "framework_overhead_gib", f"expected GiB from 0 up to below memory_gib {d.memory_gib:g}, got "
                                                          f"{d.framework_overhead_gib:g}; give what the framework takes besides tensors")
    if not d.gemm_efficiency:
        raise SpecError(source, "gemm_efficiency", "needs at least one point")
    for name in ("gemm_efficiency", "fp8_gemm_efficiency"):
        check_curve(source, name, getattr(d, name), "gflop", ("efficiency",))
    if d.fp8_peak_tflops < 0:
        raise SpecError(source, "fp8_peak_tflops", f"must be 0 (no FP8) or positive, got {d.fp8_peak_tflops}")
    if d.fp8_gemm_efficiency and not d.fp8_peak_tflops:
        # The curve is a fraction of fp8_peak_tflops; with no peak, --precision fp8 is refused and the curve unread.
        raise SpecError(source, "fp8_gemm_efficiency", "is a fraction of fp8_peak_tflops, which is 0 (no FP8) here; give "
                                                       "fp8_peak_tflops, or remove the curve")
    check_curve(source, "flash_attention_efficiency", d.flash_attention_efficiency, "tokens", ("forward", "backward"))
