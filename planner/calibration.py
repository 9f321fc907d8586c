"""Published Megatron-LM runs (../shared/calibration/ or profiles/calibration/) predicted by the planner.

Narayanan et al. 2021 (Table 1) publish tp, pp, dp and the batch but not the micro-batch or the
schedule: those are searched with the published knobs pinned (the planner's best for them, which
assumes Megatron-LM was tuned as well as we tune). Smith et al. 2022 (MT-NLG 530B) publish every
knob, so those runs are predicted as given."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from planner.cost import FRAMEWORKS, MEGATRON, CostModel, predict
from planner.plan import Knobs, Plan
from planner.search import search
from planner.specs import PROFILES_DIR, load_cluster, load_device, model_from_dict

CALIBRATION_DIRS = (PROFILES_DIR / "calibration", PROFILES_DIR.parent.parent / "shared" / "calibration")


@dataclass(frozen=True)
class CalibrationRow:
    source: str
    name: str
    gpus: int
    published_tflops: float
    predicted_tflops: float
    assumed: str
    """Knobs the publication leaves open and the planner chose."""
    plan: Plan

    @property
    def error_pct(self) -> float:
        return 100 * (self.predicted_tflops - self.published_tflops) / self.published_tflops


def calibration_files() -> list[Path]:
    for d in CALIBRATION_DIRS:
        files = sorted(d.glob("*.json"))
        if files:
            return files
    return []


def _model(run: dict):
    return model_from_dict({k: run[k] for k in ("layers", "hidden", "heads", "ffn_hidden", "seq_len", "vocab")} | {"name": run["name"]}, run["name"])


def predict_run(run: dict, software: str = "", device_name: str = "a100-sxm4-80gb") -> tuple[Plan, str]:
    model = _model(run)
    cluster = load_cluster("dgx-a100-80gb", nodes=run["gpus"] // 8)
    device = load_device(device_name)
    recompute = run.get("recompute") or "full"
    if run.get("micro_batch") is not None:
        knobs = Knobs(run["tp"], run["pp"], run["dp"], run["micro_batch"], run.get("schedule") or "1f1b", run.get("virtual_stages") or 1,
                      recompute, bool(run.get("sequence_parallel")), bool(run.get("distributed_optimizer")))
        framework = FRAMEWORKS["deepspeed" if "DeepSpeed" in software else "megatron"]
        plan, _ = predict(model, cluster, device, knobs, run["global_batch"], framework=framework)
        return plan, f"as published ({framework.name})"
    # Megatron-LM in 2021 had neither sequence parallelism nor a distributed optimizer.
    pins = {"tp": run["tp"], "pp": run["pp"], "dp": run["dp"], "recompute": recompute, "sequence_parallel": False, "distributed_optimizer": False}
    result = search(model, cluster, device, run["global_batch"], pins, top=1, framework=MEGATRON)
    plan = result.plans[0]
    sched = f"interleaved v={plan.virtual_stages}" if plan.schedule == "interleaved" else plan.schedule
    return plan, f"micro-batch {plan.micro_batch}, {sched}" if plan.pp > 1 else f"micro-batch {plan.micro_batch}"


def calibrate(device_name: str = "a100-sxm4-80gb") -> list[CalibrationRow]:
    rows = []
    for path in calibration_files():
        data = json.loads(path.read_text())
        for run in data["runs"]:
            plan, assumed = predict_run(run, data.get("software", ""), device_name)
            rows.append(CalibrationRow(path.stem, run["name"], run["gpus"], run["published_tflops_per_gpu"],
                                       plan.prediction.tflops_per_gpu, assumed, plan))
    return rows


@dataclass(frozen=True)
class QualityRow:
    name: str
    published_plan: Plan
    """The published configuration as the planner prices it (the calibration prediction)."""
    best_plan: Plan
    """The planner's own best plan for the same model, GPUs and global batch, same framework."""
    knob_gains: dict
    """For each knob where they differ: % of the best plan's tokens/s lost by setting only that knob
    back to the published value, or why that cannot be priced ('needed to fit', 'invalid')."""

    @property
    def speedup(self) -> float:
        """Tokens/s ratio (TFLOP/s would count recomputation as work and flatter full recompute)."""
        return self.best_plan.prediction.tokens_per_s / self.published_plan.prediction.tokens_per_s


# Knobs reverted one at a time (schedule and its virtual stages together).
QUALITY_KNOBS = {"micro_batch": ("micro_batch",), "schedule": ("schedule", "virtual_stages"), "recompute": ("recompute",),
                 "sequence_parallel": ("sequence_parallel",), "distributed_optimizer": ("distributed_optimizer",)}


def plan_quality(rows: list[CalibrationRow]) -> list[QualityRow]:
    """The planner's best plan next to each published (hand-tuned) configuration."""
    import dataclasses

    from planner.errors import MeshplanError
    from planner.search import price

    out = []
    for r in rows:
        pub = r.plan
        framework = FRAMEWORKS["deepspeed" if r.source.startswith("smith") else "megatron"]
        device = load_device("a100-sxm4-80gb")
        best = search(pub.model, pub.cluster, device, pub.global_batch, {}, top=1, framework=framework).plans[0]
        gains = {}
        bk, pk = best.knobs, pub.knobs
        for name, fields in QUALITY_KNOBS.items():
            if all(getattr(bk, f) == getattr(pk, f) for f in fields):
                continue
            trial = dataclasses.replace(bk, **{f: getattr(pk, f) for f in fields})
            try:
                alt = price(CostModel(pub.model, pub.cluster, device, framework), trial, pub.global_batch)
            except (MeshplanError, ValueError):
                gains[name] = "invalid with the other knobs"
                continue
            gains[name] = 100 * (1 - alt.prediction.tokens_per_s / best.prediction.tokens_per_s) if alt.prediction.fits else "needed to fit"
        if (bk.tp, bk.pp, bk.dp) != (pk.tp, pk.pp, pk.dp):
            gains["tp x pp x dp"] = f"{pk.tp}x{pk.pp}x{pk.dp} -> {bk.tp}x{bk.pp}x{bk.dp}"
        out.append(QualityRow(r.name, pub, best, gains))
    return out
