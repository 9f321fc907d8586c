"""Derive a datasheet's GEMM efficiency curve from the H100 datasheet's, as the B200, L40S and RTX 4090 curves were:

    .venv/bin/python bench/scale_datasheet.py [--write]

For a device with peak P against the H100's 989 TFLOP/s, each point is
    efficiency(g) = k x h100_efficiency(g x 989 / P)
The shift: a device P/989 times faster needs a GEMM that much larger to amortise the same launch and tail
costs. The factor k: the device's measured large-GEMM efficiency over the H100's, both from the same
benchmark (bf16 torch.mm of square matrices up to 10240, best size: zzc0721/torch-performance-test-data,
database.md), so the curve keeps the H100 curve's relation to a bare GEMM. Only the large-GEMM end is anchored
in a measurement; the small sizes are the H100 curve's shape, unchecked. The FP8 curve is scaled the same way
(shifted by the ratio of FP8 peaks, times the same k: no FP8 GEMM measurement of these devices is at hand). The
memory-bandwidth share is the H100's fitted one (it is what elementwise kernels reach in the frameworks as
calibrated, not a hardware figure, and nothing measured these devices'). When the H100 datasheet is
recalibrated, rerun this with --write. The H200 keeps the H100's curves and share themselves (the same GH100
die at the same clocks; its torch.mm, 790.29 TFLOP/s, is within the H100 runs' 783.66-789.24).

Prints each device's curve; --write stores it in profiles/devices/<device>.json."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

from planner.compute import gemm_efficiency
from planner.io import atomic_write_datasheet
from planner.specs import PROFILES_DIR, GemmPoint, load_device

REFERENCE = "h100-sxm5-80gb"
# bf16 torch.mm TFLOP/s, zzc0721/torch-performance-test-data database.md (every row of the device's 24 GB/180 GB card).
MEASURED_TFLOPS = {
    REFERENCE: (789.24, 783.66),                  # "NVIDIA H100 80GB HBM3", two machines
    "b200-sxm-180gb": (1696.03,),                 # "NVIDIA B200 180GB", GCP a4-highgpu-8g
    "l40s-pcie-48gb": (269.15,),                  # "NVIDIA L40S"
    "rtx4090-pcie-24gb": (170.06, 173.31, 162.39, 163.09),  # "NVIDIA (GeForce) RTX 4090 24GB", four machines
}
SIZES_GFLOP = (0.1, 1.0, 10.0, 100.0, 1000.0)


def measured_efficiency(name: str) -> float:
    return statistics.median(MEASURED_TFLOPS[name]) / load_device(name).peak_tflops


SAME_DIE = ("h200-sxm-141gb",)


def scaled_curve(name: str, fp8: bool = False) -> tuple[tuple[GemmPoint, ...], float]:
    """The device's curve (bf16, or FP8 where it has an FP8 peak) and its factor k."""
    ref, dev = load_device(REFERENCE), load_device(name)
    if name in SAME_DIE:
        return (ref.fp8_gemm_efficiency if fp8 else ref.gemm_efficiency), 1.0
    k = measured_efficiency(name) / measured_efficiency(REFERENCE)
    shift = (ref.fp8_peak_tflops / dev.fp8_peak_tflops) if fp8 else ref.peak_tflops / dev.peak_tflops
    points = tuple(GemmPoint(g, round(min(1.0, k * gemm_efficiency(ref, g * shift, fp8)), 3)) for g in SIZES_GFLOP)
    return points, k


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="store each curve in its profiles/devices/ file (default: print only)")
    args = ap.parse_args()
    print(f"reference {REFERENCE}: measured large-GEMM efficiency {measured_efficiency(REFERENCE):.3f}")
    ref = load_device(REFERENCE)
    for name in (*SAME_DIE, *MEASURED_TFLOPS):
        if name == REFERENCE:
            continue
        dev = load_device(name)
        points, k = scaled_curve(name)
        fp8 = scaled_curve(name, fp8=True)[0] if dev.fp8_peak_tflops else ()
        print(f"{name}: k = {k:.3f}, shift x{ref.peak_tflops / dev.peak_tflops:.3f}: "
              + ", ".join(f"{p.gflop:g} GFLOP {p.efficiency:.3f}" for p in points)
              + (f"; fp8 " + ", ".join(f"{p.efficiency:.3f}" for p in fp8) if fp8 else "")
              + f"; memory efficiency {ref.memory_efficiency:.3f}")
        if args.write:
            path = PROFILES_DIR / "devices" / f"{name}.json"
            data = json.loads(path.read_text())
            data["gemm_efficiency"] = [dataclasses.asdict(p) for p in points]
            if fp8:
                data["fp8_gemm_efficiency"] = [dataclasses.asdict(p) for p in fp8]
            data["memory_efficiency"] = ref.memory_efficiency
            atomic_write_datasheet(path, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
