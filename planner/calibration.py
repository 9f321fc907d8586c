"""Published training runs (profiles/calibration/, copied from ../shared/calibration/) predicted by the planner.

Every file becomes Cases: the model (its architecture where the publication leaves it out is stated as assumed),
the cluster and framework it ran on, the knobs that were published (pinned) and the metric it measured. Knobs a
publication leaves open are searched with the published ones pinned: the planner's best for them, which assumes
the authors tuned as well as we tune. Fully published runs (MT-NLG) are predicted as given.

- Narayanan et al. 2021, Table 1 (Megatron-LM, A100): TFLOP/s per GPU with full recomputation counted.
- Smith et al. 2022 (MT-NLG 530B, DeepSpeed pipeline, A100): the same metric.
- Megatron-LM README (Megatron-Core r0.8, H100, bf16): model TFLOP/s per GPU (no recomputation counted, as
  Megatron-LM's num_floating_point_operations counts them); FFN width, activation, positions unpublished:
  GPT-3's (4h, GELU, LayerNorm, learned positions, MHA) assumed.
- NeMo 24.07 (Megatron-Core, H100, FP8): tokens/s per GPU, every knob but recomputation published."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from planner.cost import FRAMEWORKS, MEGATRON, CostModel, Framework, predict
from planner.plan import Knobs, Plan
from planner.search import search
from planner.specs import PROFILES_DIR, ClusterSpec, DeviceProfile, ModelSpec, load_cluster, load_device, model_from_dict

CALIBRATION_DIRS = (PROFILES_DIR / "calibration", PROFILES_DIR.parent.parent / "shared" / "calibration")
METRICS = {"tflops_per_gpu": "TFLOP/s per GPU (recomputation counted)", "model_tflops_per_gpu": "model TFLOP/s per GPU",
           "tokens_per_s_per_gpu": "tokens/s per GPU"}


@dataclass(frozen=True)
class Case:
    """One published run, ready to predict."""

    source: str
    """The calibration file's stem."""
    name: str
    model: ModelSpec
    cluster: ClusterSpec
    device: str
    """The device profile's name."""
    framework: Framework
    global_batch: int
    pins: dict
    """Published knobs; the rest are searched (all of them published: predicted as given)."""
    metric: str
    """One of METRICS."""
    published: float
    assumed: str = ""
    """What the publication does not say and the case assumes (architecture)."""
    knobs: Knobs | None = field(default=None)
    """Every knob, where the publication gives them all."""

    @property
    def gpus(self) -> int:
        return self.cluster.gpus


@dataclass(frozen=True)
class CalibrationRow:
    source: str
    name: str
    gpus: int
    metric: str
    published: float
    predicted: float
    assumed: str
    """Knobs (and architecture) the publication leaves open and the planner chose or assumed."""
    plan: Plan

    @property
    def error_pct(self) -> float:
        return 100 * (self.predicted - self.published) / self.published


def calibration_files() -> list[Path]:
    for d in CALIBRATION_DIRS:
        files = sorted(d.glob("*.json"))
        if files:
            return files
    return []


def _model(run: dict):
    return model_from_dict({k: run[k] for k in ("layers", "hidden", "heads", "ffn_hidden", "seq_len", "vocab")} | {"name": run["name"]}, run["name"])


def _a100_cases(stem: str, data: dict) -> list[Case]:
    out = []
    deepspeed = "DeepSpeed" in data.get("software", "")
    for run in data["runs"]:
        cluster = load_cluster("dgx-a100-80gb", nodes=run["gpus"] // 8)
        recompute = run.get("recompute") or "full"
        if run.get("micro_batch") is not None:
            knobs = Knobs(run["tp"], run["pp"], run["dp"], run["micro_batch"], run.get("schedule") or "1f1b", run.get("virtual_stages") or 1,
                          recompute, bool(run.get("sequence_parallel")), bool(run.get("distributed_optimizer")))
            out.append(Case(stem, run["name"], _model(run), cluster, "a100-sxm4-80gb", FRAMEWORKS["deepspeed" if deepspeed else "megatron"],
                            run["global_batch"], {}, "tflops_per_gpu", run["published_tflops_per_gpu"], knobs=knobs))
        else:
            # Megatron-LM in 2021 had neither sequence parallelism nor a distributed optimizer.
            pins = {"tp": run["tp"], "pp": run["pp"], "dp": run["dp"], "recompute": recompute, "sequence_parallel": False, "zero": 0}
            out.append(Case(stem, run["name"], _model(run), cluster, "a100-sxm4-80gb", MEGATRON, run["global_batch"], pins,
                            "tflops_per_gpu", run["published_tflops_per_gpu"]))
    return out


def _h100_model(label: str, m: dict, run: dict) -> tuple[ModelSpec, str]:
    """A model of the H100 files; what they leave out filled with the family's published values, and said."""
    name = label.lower()
    llama, nemotron = "llama" in name, "nemotron" in name
    assumed = []
    spec = {"name": label, "layers": m["layers"], "hidden": m["hidden"], "heads": m["heads"], "seq_len": run["seq_len"]}
    spec["kv_heads"] = m.get("kv_heads") or m["heads"]
    if m.get("ffn_hidden") is None:
        spec["ffn_hidden"] = 4 * m["hidden"]
        assumed.append("GPT-3's FFN 4h, GELU, LayerNorm, learned positions, MHA")
    else:
        spec["ffn_hidden"] = m["ffn_hidden"]
    vocab = m.get("vocab") or (32000 if "llama2" in name else 256000 if nemotron else 50257)
    if not m.get("vocab"):
        assumed.append(f"vocab {vocab}")
    spec["vocab"] = vocab
    if llama or nemotron:
        spec |= {"mlp": "swiglu" if llama else "gelu", "norm": "rmsnorm" if llama else "layernorm", "position": "rope", "bias": False}
        if nemotron:
            assumed.append("squared-ReLU MLP priced as GELU's two matrices")
        if "500000" in str(m.get("position")):
            spec["rope_theta"] = 500000.0
    return model_from_dict(spec, label), "; ".join(assumed)


# Recomputation that the NeMo 24.07 table leaves out but NVIDIA's own recipe for the same run publishes: every knob
# of the table's row (GPUs, tp, pp, vp, micro-batch, global batch, FP8) and its throughput (324 vs 326 tokens/s per
# GPU) match. github.com/NVIDIA/dgxc-benchmarking at 35a9aec (v24.11.1), nemotron/nemotron4-340b-synth.yaml
# (activations_checkpoint_granularity: selective, i.e. Megatron-Core's checkpointed attention core) with
# nemotron/configure.sh (TP 8, PP 8, VP 12, MBS 1, GBS 2 per node, fp8, sequence parallel) and README_340b.md
# (FP8 on 128 H100: 3.16 s per step at GBS 32).
RECIPE_RECOMPUTE = {("nemo_2407_h100_fp8", "Nemotron-340B", 128): "selective"}


def _h100_cases(stem: str, data: dict) -> list[Case]:
    out = []
    fp8 = "nemo" in stem
    for i, run in enumerate(data["runs"]):
        model, assumed = _h100_model(run["model"], data["models"][run["model"]], run)
        cluster = load_cluster("dgx-h100-80gb", nodes=run["gpus"] // 8)
        cp = run.get("cp") or 1
        dp = run.get("dp") or run["gpus"] // (run["tp"] * run["pp"] * cp)
        # Megatron-Core's benchmarks run the distributed optimizer (their --overlap-param-gather needs it).
        pins = {"tp": run["tp"], "pp": run["pp"], "dp": dp, "cp": cp, "zero": 1, "precision": "fp8" if fp8 else "bf16"}
        if run.get("micro_batch"):
            pins["micro_batch"] = run["micro_batch"]
        if (stem, run["model"], run["gpus"]) in RECIPE_RECOMPUTE:
            pins["recompute"] = RECIPE_RECOMPUTE[(stem, run["model"], run["gpus"])]
            assumed = "; ".join(x for x in (assumed, f"recompute {pins['recompute']} from NVIDIA's recipe (dgxc-benchmarking)") if x)
        if run.get("vp"):
            pins |= {"schedule": "interleaved", "virtual_stages": run["vp"]} if run["vp"] > 1 else ({"schedule": "1f1b"} if run["pp"] > 1 else {})
        metric, published = ("tokens_per_s_per_gpu", run["published"]["tokens_per_s_per_gpu"]) if fp8 else \
            ("model_tflops_per_gpu", run["published"]["tflops_per_gpu"])
        out.append(Case(stem, f"{run['model']}/{run['gpus']}", model, cluster, "h100-sxm5-80gb", FRAMEWORKS["megatron-core"],
                        run["global_batch"], pins, metric, published, assumed))
    return out


def load_cases() -> list[Case]:
    cases = []
    for path in calibration_files():
        data = json.loads(path.read_text())
        cases += (_h100_cases if "h100" in path.stem else _a100_cases)(path.stem, data)
    return cases


def metric_of(plan: Plan, metric: str, device: DeviceProfile) -> float:
    pr = plan.prediction
    if metric == "tflops_per_gpu":
        return pr.tflops_per_gpu
    if metric == "model_tflops_per_gpu":
        return pr.mfu * device.peak_tflops
    return pr.tokens_per_s / plan.cluster.gpus


def predict_case(case: Case, device: DeviceProfile | None = None, framework: Framework | None = None) -> tuple[Plan, str]:
    """The case's plan under `device` and `framework` (default: the case's own), and the knobs it chose."""
    device = device or load_device(case.device)
    framework = framework or case.framework
    if case.knobs is not None:
        plan, _ = predict(case.model, case.cluster, device, case.knobs, case.global_batch, framework=framework)
        return plan, f"as published ({framework.name})"
    plan = search(case.model, case.cluster, device, case.global_batch, case.pins, top=1, framework=framework).plans[0]
    chosen = []
    if "micro_batch" not in case.pins:
        chosen.append(f"micro-batch {plan.micro_batch}")
    if "schedule" not in case.pins and plan.pp > 1:
        chosen.append(f"interleaved v={plan.virtual_stages}" if plan.schedule == "interleaved" else plan.schedule)
    if "recompute" not in case.pins:
        chosen.append(f"recompute {plan.stages[0].recompute}")
    if "sequence_parallel" not in case.pins and plan.tp > 1:
        chosen.append("SP" if plan.sequence_parallel else "no SP")
    return plan, ", ".join(chosen)


def calibrate(devices: dict[str, DeviceProfile] | None = None, frameworks: dict[str, Framework] | None = None,
              cases: list[Case] | None = None) -> list[CalibrationRow]:
    """Every case predicted, with device profiles and frameworks by name overriding the shipped ones."""
    devices, frameworks = devices or {}, frameworks or {}
    rows = []
    for case in cases or load_cases():
        device = devices.get(case.device) or load_device(case.device)
        plan, assumed = predict_case(case, device, frameworks.get(case.framework.name))
        rows.append(CalibrationRow(case.source, case.name, case.gpus, case.metric, case.published, metric_of(plan, case.metric, device),
                                   "; ".join(x for x in (assumed, case.assumed) if x), plan))
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
                 "sequence_parallel": ("sequence_parallel",), "zero": ("zero",)}


def plan_quality(rows: list[CalibrationRow]) -> list[QualityRow]:
    """The planner's best plan next to each published (hand-tuned) configuration."""
    import dataclasses

    from planner.errors import MeshplanError
    from planner.search import price

    out = []
    for r in rows:
        pub = r.plan
        framework = FRAMEWORKS["deepspeed" if r.source.startswith("smith") else "megatron-core" if "h100" in r.source else "megatron"]
        device = load_device(pub.cluster.device)
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
        if (bk.tp, bk.cp, bk.pp, bk.dp) != (pk.tp, pk.cp, pk.pp, pk.dp):
            gains["tp x cp x pp x dp"] = f"{pk.tp}x{pk.cp}x{pk.pp}x{pk.dp} -> {bk.tp}x{bk.cp}x{bk.pp}x{bk.dp}"
        out.append(QualityRow(r.name, pub, best, gains))
    return out
