"""plan.json (version 1): the Plan, its Stages and its Prediction; versioned read, atomic write.

One spelling per concept: tp, pp, dp, micro_batch, num_microbatches, virtual_stages, recompute.
Megatron-LM's names map to ours once, here (MEGATRON_NAMES)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from planner import __version__
from planner.errors import FILE, PlanError, SpecError
from planner.io import atomic_write_json
from planner.parsing import from_dict, parse_mapping_text, read_text
from planner.specs import ClusterSpec, ModelSpec, cluster_from_dict, model_from_dict

PLAN_VERSION = 1
SCHEDULES = ("1f1b", "gpipe", "interleaved")
RECOMPUTE = ("none", "selective", "full")
PRECISIONS = ("bf16", "fp8")
MESH_DIMS = ("pp", "dp", "cp", "tp")
"""The device mesh's dims, outermost first: tp innermost (consecutive ranks), then cp, dp, pp."""

# Megatron-LM argument (its argparse dest; the flag is --dest-with-dashes) -> meshplan name, at planner.export's
# pinned release. data_parallel_size is no flag: Megatron-LM derives it from the world size.
MEGATRON_NAMES = {
    "tensor_model_parallel_size": "tp",
    "pipeline_model_parallel_size": "pp",
    "data_parallel_size": "dp",
    "micro_batch_size": "micro_batch",
    "global_batch_size": "global_batch",
    "num_virtual_stages_per_pipeline_rank": "virtual_stages",
    "recompute_granularity": "recompute",
    "sequence_parallel": "sequence_parallel",
    "use_distributed_optimizer": "distributed_optimizer",
    "context_parallel_size": "cp",
    "num_layers": "layers",
    "hidden_size": "hidden",
    "num_attention_heads": "heads",
    "ffn_hidden_size": "ffn_hidden",
    "seq_length": "seq_len",
    "num_query_groups": "kv_heads",
}

# torchtitan TOML key (section.key, at planner.export's pinned commit) -> meshplan name. dp maps to the replicate
# degree (DDP) or the shard degree (FSDP2, with distributed_optimizer), the other one being 1.
TORCHTITAN_NAMES = {
    "parallelism.tensor_parallel_degree": "tp",
    "parallelism.pipeline_parallel_degree": "pp",
    "parallelism.data_parallel_replicate_degree": "dp",
    "parallelism.data_parallel_shard_degree": "dp",
    "parallelism.context_parallel_degree": "cp",
    "parallelism.pipeline_parallel_schedule": "schedule",
    "parallelism.pipeline_parallel_microbatch_size": "micro_batch",
    "training.global_batch_size": "global_batch",
    "training.seq_len": "seq_len",
    "activation_checkpoint.mode": "recompute",
}


# The schedule simulator walks every microbatch of every stage, so pricing a pipeline plan takes time in
# proportion to num_microbatches = global_batch / (micro_batch * dp): up to global_batch of them. At this bound
# a gpt3-175b search on 512 GPUs takes ~13 s on a 2-core machine (a billion would take hours, with no output).
MAX_GLOBAL_BATCH = 65_536


def check_global_batch(global_batch: int, source: str = "global_batch") -> None:
    if global_batch > MAX_GLOBAL_BATCH:
        raise SpecError(source, "global_batch", f"{global_batch:,} sequences is above {MAX_GLOBAL_BATCH:,}, the most meshplan "
                        "prices (the pipeline simulator walks every microbatch, up to one per sequence); plan a smaller batch")


@dataclass(frozen=True)
class Knobs:
    """Everything the search chooses except the layer split."""

    tp: int
    """Tensor-parallel degree (inside a node first)."""
    pp: int
    """Pipeline stages (devices along the pipeline)."""
    dp: int
    """Data-parallel replicas."""
    micro_batch: int
    """Sequences per microbatch per replica."""
    schedule: str = "1f1b"
    """'1f1b', 'gpipe' or 'interleaved'."""
    virtual_stages: int = 1
    """Model chunks per pipeline device (interleaved only; 1 otherwise)."""
    recompute: str = "none"
    """Default recomputation: 'none', 'selective' (attention core) or 'full' (whole block)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: norms/dropout sharded over tp, all-gather/reduce-scatter instead of all-reduce."""
    zero: int = 0
    """ZeRO stage over dp (planner/zero.py): 0 none, 1 optimizer state sharded (the distributed optimizer),
    2 also gradients, 3 also weights. True/False (the distributed_optimizer flag of old) read as 1/0."""
    cp: int = 1
    """Context-parallel degree: each sequence cut into 2*cp chunks, rank r of cp holding chunks r and 2cp-1-r."""
    precision: str = "bf16"
    """'bf16' (mixed precision) or 'fp8' (Float8 linears, bf16 elsewhere; compute capability >= 8.9)."""
    compile: bool = False
    """torch.compile of each block (as torchtitan applies it)."""

    def __post_init__(self):
        object.__setattr__(self, "zero", int(self.zero))

    @property
    def distributed_optimizer(self) -> bool:
        return self.zero >= 1


def degrees_text(k, times: str = "x") -> str:
    """A plan's or Knobs' parallel degrees in words, e.g. 'tp 2 x cp 2 x pp 1 x dp 4' (cp only when above 1)."""
    cp = f" {times} cp {k.cp}" if k.cp > 1 else ""
    return f"tp {k.tp}{cp} {times} pp {k.pp} {times} dp {k.dp}"


@dataclass(frozen=True)
class Stage:
    layers: tuple[int, int]
    """Half-open range [first, last) of transformer blocks this stage holds."""
    embedding: bool
    """Holds the token/position embedding (the first stage)."""
    head: bool
    """Holds the final norm and LM head with the loss (the last stage)."""
    recompute: str = "none"
    """'none', 'selective' or 'full' for the blocks of this stage."""
    recompute_layers: int | None = None
    """With 'full': how many of the blocks recompute (None = all); the ILP may recompute only some."""
    memory_gib: float = 0.0
    """Predicted peak memory of the device holding this stage (all its chunks), GiB."""


@dataclass(frozen=True)
class Breakdown:
    compute_s: float = 0.0
    """Forward, backward and recomputation on the critical path."""
    tp_comm_s: float = 0.0
    """Tensor-parallel collectives not hidden."""
    pp_comm_s: float = 0.0
    """Pipeline send/recv on the critical path."""
    dp_comm_s: float = 0.0
    """Data-parallel gradient reduction (and parameter all-gather) not overlapped with backward."""
    bubble_s: float = 0.0
    """Pipeline idle time of the slowest device."""
    optimizer_s: float = 0.0
    """Optimizer step."""


@dataclass(frozen=True)
class Prediction:
    iteration_s: float
    tokens_per_s: float
    tflops_per_gpu: float
    """Model FLOPs (Narayanan et al. 2021, counting recomputation as the run does) per second per GPU."""
    mfu: float
    """Model FLOPs utilisation: model FLOPs without recomputation per second per GPU / device peak."""
    peak_memory_gib: float
    """The largest stage's memory."""
    fits: bool
    breakdown: Breakdown
    reason: str = ""
    """Why it does not fit (which stage, how many GiB over), empty when it fits."""
    params: int = 0
    """The model's exact parameter count (ModelSpec.params(): the published figure, unpadded vocabulary)."""


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    cluster: ClusterSpec
    global_batch: int
    micro_batch: int
    num_microbatches: int
    tp: int
    pp: int
    dp: int
    schedule: str
    virtual_stages: int
    sequence_parallel: bool
    zero: int
    """ZeRO stage (Knobs.zero)."""
    stages: tuple[Stage, ...]
    """pp * virtual_stages entries in model order (chunk c of device i is entry c*pp + i)."""
    prediction: Prediction | None = None
    profile: str = ""
    """Device profile used: its name and whether measured or datasheet."""
    id: str = ""
    version: int = PLAN_VERSION
    created_by: str = f"meshplan {__version__}"
    cp: int = 1
    """Context-parallel degree (Knobs.cp)."""
    precision: str = "bf16"
    """'bf16' or 'fp8' (Knobs.precision)."""
    compile: bool = False
    """torch.compile of each block (Knobs.compile)."""
    framework: str = "meshplan"
    """The software the prediction and the stages' memory_gib were priced for (planner.frameworks.FRAMEWORKS:
    `--framework` of search and predict). It changes no knob: meshplan's runtime runs every plan as itself. Only
    the name is kept: a variant made with dataclasses.replace (calibration fits) is recorded as the one it varies."""

    @property
    def distributed_optimizer(self) -> bool:
        return self.zero >= 1

    @property
    def knobs(self) -> Knobs:
        return Knobs(self.tp, self.pp, self.dp, self.micro_batch, self.schedule, self.virtual_stages,
                     self.stages[0].recompute if self.stages else "none", self.sequence_parallel, self.zero,
                     self.cp, self.precision, self.compile)

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp


def plan_id(plan: Plan) -> str:
    """Short hash of everything that changes what runs: model, batch, knobs and the layer split."""
    d = plan_to_dict(plan)
    for k in ("id", "prediction", "profile", "created_by", "cluster", "framework"):
        d.pop(k, None)
    d["model"] = _without_defaults(plan.model, d["model"])
    # Knobs added after version 1 was published stay out at their defaults (zero 0 or 1 is distributed_optimizer),
    # so every plan written before them keeps its id.
    for key, default in (("cp", 1), ("precision", "bf16"), ("compile", False)):
        if d[key] == default:
            del d[key]
    if d["zero"] in (0, 1):
        del d["zero"]
    for s in d["stages"]:
        s.pop("memory_gib", None)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def _without_defaults(model: ModelSpec, d: dict) -> dict:
    """The model's fields less those at their defaults (kv_heads = heads, qkv_bias = bias), so that a field
    added with a default leaves the id of every plan written before it unchanged."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelSpec) if f.default is not dataclasses.MISSING}
    defaults.update(kv_heads=model.heads, qkv_bias=model.bias)
    return {k: v for k, v in d.items() if k not in defaults or v != defaults[k]}


def with_id(plan: Plan) -> Plan:
    return dataclasses.replace(plan, id=plan_id(plan))


def plan_to_dict(plan: Plan) -> dict:
    d = dataclasses.asdict(plan)
    d["distributed_optimizer"] = plan.distributed_optimizer  # zero >= 1, for readers of plan.json version 1
    order = ["version", "id", "created_by", "model", "cluster", "global_batch", "micro_batch", "num_microbatches",
             "tp", "cp", "pp", "dp", "schedule", "virtual_stages", "sequence_parallel", "zero", "distributed_optimizer",
             "precision", "compile", "framework", "stages", "prediction", "profile"]
    for s in d["stages"]:
        s["layers"] = list(s["layers"])
    return {k: d[k] for k in order}


def check_plan(plan: Plan, source: str) -> Plan:
    """Consistency of a plan's knobs and stages; raises SpecError naming the field."""
    for name in ("global_batch", "micro_batch", "num_microbatches", "tp", "cp", "pp", "dp", "virtual_stages"):
        if getattr(plan, name) <= 0:
            raise SpecError(source, name, f"must be positive, got {getattr(plan, name)}")
    if plan.zero not in (0, 1, 2, 3):
        raise SpecError(source, "zero", f"expected a ZeRO stage 0, 1, 2 or 3, got {plan.zero!r}")
    if plan.precision not in PRECISIONS:
        raise SpecError(source, "precision", f"expected one of {', '.join(PRECISIONS)}, got {plan.precision!r}")
    from planner.frameworks import FRAMEWORKS  # here: planner.frameworks imports this module's Knobs

    if plan.framework not in FRAMEWORKS:
        raise SpecError(source, "framework", f"expected one of {', '.join(FRAMEWORKS)}, got {plan.framework!r}")
    if plan.cp > 1 and plan.model.seq_len % (2 * plan.cp):
        raise SpecError(source, "cp", f"seq_len {plan.model.seq_len} does not split into 2 x cp = {2 * plan.cp} equal chunks; "
                                      "pick a cp for which it does")
    if plan.schedule not in SCHEDULES:
        raise SpecError(source, "schedule", f"expected one of {', '.join(SCHEDULES)}, got {plan.schedule!r}")
    if plan.schedule != "interleaved" and plan.virtual_stages != 1:
        raise SpecError(source, "virtual_stages", f"must be 1 unless schedule is 'interleaved', got {plan.virtual_stages}")
    if (why := plan.model.tp_problem(plan.tp)) is not None:
        raise SpecError(source, "tp", why)
    if plan.model.tie_embeddings and len(plan.stages) > 1:
        raise SpecError(source, "tie_embeddings", f"the embedding and the head are tied but sit on different pipeline stages "
                        f"(stages[0] and stages[{len(plan.stages) - 1}]); use one stage (pp 1) or a model with tie_embeddings: false")
    if plan.global_batch != plan.micro_batch * plan.num_microbatches * plan.dp:
        raise SpecError(source, "num_microbatches", f"global_batch {plan.global_batch} != micro_batch {plan.micro_batch} x num_microbatches {plan.num_microbatches} x dp {plan.dp}")
    n = plan.pp * plan.virtual_stages
    if len(plan.stages) != n:
        raise SpecError(source, "stages", f"expected pp x virtual_stages = {n} entries, got {len(plan.stages)}")
    nxt = 0
    for i, s in enumerate(plan.stages):
        a, b = s.layers
        if a != nxt or b < a:
            raise SpecError(source, f"stages[{i}].layers", f"expected a range starting at {nxt}, got [{a}, {b}]")
        if b == a and not (s.embedding or s.head):
            raise SpecError(source, f"stages[{i}].layers", "a stage with no layers (and no embedding or head); give every stage at least one layer")
        if s.recompute not in RECOMPUTE:
            raise SpecError(source, f"stages[{i}].recompute", f"expected one of {', '.join(RECOMPUTE)}, got {s.recompute!r}")
        if s.recompute_layers is not None and (s.recompute != "full" or not 0 <= s.recompute_layers <= b - a):
            raise SpecError(source, f"stages[{i}].recompute_layers", f"expected 0 to {b - a} (the stage's blocks) with recompute "
                                                                    f"'full', got {s.recompute_layers} with {s.recompute!r}")
        if s.embedding != (i == 0) or s.head != (i == n - 1):
            raise SpecError(source, f"stages[{i}]", "the embedding belongs on the first stage and the head on the last")
        nxt = b
    if nxt != plan.model.layers:
        raise SpecError(source, "stages", f"stages cover {nxt} layers, the model has {plan.model.layers}")
    return plan


def plan_from_dict(d: dict, source: str) -> Plan:
    if not isinstance(d, dict):
        raise SpecError(source, "(top level)", "expected a JSON object")
    version = d.get("version")
    if version is None:
        raise SpecError(source, "version", "no version field: not a meshplan plan file; write one with `planner plan --out plan.json`")
    if version != PLAN_VERSION:
        raise SpecError(source, "version", f"plan version {version!r} is not supported (this meshplan reads version {PLAN_VERSION}); re-create it with `planner plan --out`")
    d = dict(d)
    model_d = d.pop("model", None)
    if not isinstance(model_d, dict):
        raise SpecError(source, "model", "missing or not an object")
    model = model_from_dict(model_d, source + " model")
    cluster_d = d.pop("cluster", None)
    if not isinstance(cluster_d, dict):
        raise SpecError(source, "cluster", "missing or not an object")
    cluster = cluster_from_dict(cluster_d, source + " cluster")
    rest = dict(d)
    stages = rest.pop("stages", None)
    if not isinstance(stages, list):
        raise SpecError(source, "stages", "missing or not a list")
    stage_objs = []
    for i, s in enumerate(stages):
        st = from_dict(Stage, s, source, prefix=f"stages[{i}].")
        stage_objs.append(dataclasses.replace(st, layers=tuple(st.layers)))
    pred = rest.pop("prediction", None)
    prediction = from_dict(Prediction, pred, source, prefix="prediction.") if pred is not None else None
    plan = from_dict(_PlanScalars, rest, source)
    scalars = dataclasses.asdict(plan)
    # zero is the knob; distributed_optimizer (plan.json's field before it) is zero >= 1 and must agree with it.
    dist_opt = scalars.pop("distributed_optimizer")
    if scalars["zero"] is None:
        scalars["zero"] = 1 if dist_opt else 0
    elif dist_opt is not None and dist_opt != (scalars["zero"] >= 1):
        raise SpecError(source, "distributed_optimizer", f"{dist_opt} contradicts zero {scalars['zero']} (it means zero >= 1); "
                                                         "give one of them")
    out = Plan(model=model, cluster=cluster, stages=tuple(stage_objs), prediction=prediction, **scalars)
    # The id is what results are pooled by: recompute it from the contents, never trust the one written down.
    return with_id(check_plan(out, source))


@dataclass(frozen=True)
class _PlanScalars:
    """The scalar fields of Plan, for validation by from_dict."""

    global_batch: int
    micro_batch: int
    num_microbatches: int
    tp: int
    pp: int
    dp: int
    schedule: str
    virtual_stages: int
    sequence_parallel: bool
    zero: int | None = None
    distributed_optimizer: bool | None = None
    cp: int = 1
    precision: str = "bf16"
    compile: bool = False
    framework: str = "meshplan"
    profile: str = ""
    id: str = ""
    version: int = PLAN_VERSION
    created_by: str = ""


def load_plan(path: str | Path, warn=lambda message: print(f"warning: {message}", file=sys.stderr)) -> Plan:
    """Read and check plan.json. Its id is recomputed from its contents; a file whose written id differs (a plan
    edited by hand) is still loaded, with the new id, and `warn` says so: its prediction is for the old plan.
    (Refusing would stop a legitimate hand edit; keeping the old id would pool its results with another plan's.)"""
    path = Path(path)
    if path.is_dir():
        raise SpecError(str(path), FILE, "is a directory, not a plan file; give the plan.json that `planner plan --out` wrote")
    if not path.is_file():
        raise SpecError(str(path), FILE, "no such plan file; write one with `planner plan --out plan.json`")
    try:
        d = parse_mapping_text(read_text(path), str(path), is_json=True)
    except json.JSONDecodeError as e:
        raise SpecError(str(path), FILE, f"not valid JSON at line {e.lineno}: {e.msg}") from None
    plan = plan_from_dict(d, str(path))
    written = d.get("id")
    if written and written != plan.id:  # a plan written by hand without an id just gets one
        warn(f"{path}: id: the file says {written!r} but its contents hash to {plan.id!r} (edited by hand?); "
             f"using {plan.id!r}, and its prediction may be for the plan before the edit (re-price it with planner predict)")
    return plan


def write_plan(path: str | Path, plan: Plan) -> None:
    atomic_write_json(path, plan_to_dict(plan))
