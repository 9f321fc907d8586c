"""The inputs: ModelSpec, ClusterSpec, DeviceProfile. Each is a frozen dataclass loaded once, at the
edge, by one load_* function that validates everything (unknown keys, types, ranges, divisibility).
Inside the planner, code trusts them."""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.device_checks import check_device
from planner.kernels import AttentionPoint, GemmPoint
from planner.errors import FILE, SpecError
from planner.parsing import check_positive, from_dict, read_mapping

# An installed wheel carries profiles/ as planner/profiles (pyproject's package-dir); a source checkout keeps it beside planner/.
_PACKAGED_PROFILES = Path(__file__).resolve().parent / "profiles"
PROFILES_DIR = _PACKAGED_PROFILES if _PACKAGED_PROFILES.is_dir() else _PACKAGED_PROFILES.parent.parent / "profiles"
DEVICE_SCHEMA_VERSION = 1


MLPS = ("gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")


@dataclass(frozen=True)
class ModelSpec:
    """A dense decoder-only transformer: GPT-3 style by default, Llama style with kv_heads, mlp: swiglu,
    norm: rmsnorm, position: rope and bias: false. Every family field defaults to GPT's value, so a
    GPT-3-style spec (and its plan ids) is exactly what it was before these fields existed."""

    name: str
    """Preset or file name, for tables and plan ids."""
    layers: int
    """Transformer blocks."""
    hidden: int
    """Model width h."""
    heads: int
    """Attention (query) heads a; hidden must divide by it."""
    ffn_hidden: int
    """MLP inner width f (4h for GPT; each of gate, up and down is h x f with SwiGLU)."""
    seq_len: int
    """Sequence length s in tokens."""
    vocab: int
    """Vocabulary size V before padding (padded to a multiple of 128*tp, as Megatron-LM does)."""
    kv_heads: int | None = None
    """Key/value heads (grouped-query attention, Ainslie et al. 2023); None (the default) means heads.
    Must divide heads; tensor parallelism needs tp to divide it (each rank holds whole K/V heads)."""
    mlp: str = "gelu"
    """'gelu' (fc, proj: 2 matrices) or 'swiglu' (gate, up, down: 3 matrices, Shazeer 2020)."""
    norm: str = "layernorm"
    """'layernorm' (weight, and a bias when bias is true) or 'rmsnorm' (weight only, Zhang & Sennrich 2019)."""
    position: str = "learned"
    """'learned' (a seq_len x h table added to the token embedding) or 'rope' (rotary, no parameters, Su et al. 2021)."""
    bias: bool = True
    """Biases in every linear layer, and in LayerNorms (an RMSNorm has none either way)."""
    tie_embeddings: bool = False
    """The LM head reuses the token embedding matrix (one V x h matrix instead of two)."""
    qkv_bias: bool | None = None
    """Biases on the q, k and v projections only (Qwen2); None (the default) means the same as bias."""
    rope_theta: float = 10000.0
    """RoPE base (Llama 2: 10,000, Llama 3: 500,000); unused with learned positions."""

    def __post_init__(self):
        # Resolve the "same as" defaults once, so that code reads plain values.
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.qkv_bias is None:
            object.__setattr__(self, "qkv_bias", self.bias)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        """Width of the k (and of the v) projection: kv_heads * head_dim."""
        return self.kv_heads * self.head_dim

    def padded_vocab(self, tp: int) -> int:
        # Megatron-LM pads the vocabulary to a multiple of make_vocab_size_divisible_by (128) * tp.
        m = 128 * tp
        return -(-self.vocab // m) * m

    def tp_problem(self, tp: int) -> str | None:
        """Why tensor parallelism of degree tp cannot shard this model (None when it can): every rank
        holds whole query heads, whole K/V heads (no K/V replication) and an equal slice of the MLP."""
        for name, n in (("heads", self.heads), ("kv_heads", self.kv_heads), ("ffn_hidden", self.ffn_hidden)):
            if n % tp:
                return f"{name} {n} {'are' if name.endswith('heads') else 'is'} not divisible by tp {tp}; pick a tp that divides {name}"
        return None

    def norm_params(self) -> int:
        """One norm: LayerNorm weight (and bias when bias is true), or RMSNorm weight."""
        return self.hidden * (2 if self.norm == "layernorm" and self.bias else 1)

    def block_matrix_params(self) -> int:
        """The weight matrices of one block, the GEMMs' weights: q and o (h x h each), k and v (h x kv_dim each,
        Ainslie et al. 2023, GQA), and the MLP's 2 matrices of h x f (3 for SwiGLU's gate, up and down: Shazeer
        2020, eq. 6)."""
        h, f, kv = self.hidden, self.ffn_hidden, self.kv_dim
        return 2 * h * h + 2 * h * kv + (3 if self.mlp == "swiglu" else 2) * h * f

    def layer_params(self) -> int:
        """Parameters in one block, exactly: its matrices (block_matrix_params), their biases where the model has
        them, and two norms. For GPT: 4h^2 + 4h (attention), 2hf + f + h (MLP), 4h (two LayerNorms)."""
        f, kv = self.ffn_hidden, self.kv_dim
        attn_bias = (self.hidden + 2 * kv if self.qkv_bias else 0) + (self.hidden if self.bias else 0)
        mlp_bias = (((3 if self.mlp == "swiglu" else 2) - 1) * f + self.hidden) if self.bias else 0
        return self.block_matrix_params() + attn_bias + mlp_bias + 2 * self.norm_params()

    def embedding_params(self, tp: int | None = None) -> int:
        """Token embedding and learned positions (none with RoPE). Without tp: the exact model's
        (V x h); with tp: the table as meshplan's runtime holds it over tp ranks (vocab padded to 128*tp)."""
        v = self.vocab if tp is None else self.padded_vocab(tp)
        return v * self.hidden + (self.seq_len * self.hidden if self.position == "learned" else 0)

    def head_params(self, tp: int | None = None) -> int:
        """The LM head's matrix: 0 when tied to the embedding; without tp V x h, with tp the padded one."""
        if self.tie_embeddings:
            return 0
        return (self.vocab if tp is None else self.padded_vocab(tp)) * self.hidden

    def params(self) -> int:
        """The exact parameter count (the published one): blocks, embedding, head (unless tied) and the
        final norm, with the unpadded vocabulary. Llama 3 8B: 8,030,261,248."""
        return self.layers * self.layer_params() + self.embedding_params() + self.head_params() + self.norm_params()

    def padded_params(self, tp: int = 1) -> int:
        """All parameters as meshplan's runtime holds them over tp ranks: the exact model with the
        embedding and head padded to padded_vocab(tp) rows."""
        return self.layers * self.layer_params() + self.embedding_params(tp) + self.head_params(tp) + self.norm_params()


@dataclass(frozen=True)
class LinkSpec:
    bandwidth_GBps: float
    """Per GPU, per direction, in GB/s (1e9 bytes)."""
    latency_us: float
    """One-way latency of a message, microseconds."""


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    """Preset or file name."""
    nodes: int
    """Nodes in the cluster."""
    gpus_per_node: int
    """Devices per node (CPU ranks for local-cpu)."""
    device: str
    """Device profile name (a file in profiles/devices/; a measured profile beside it wins) or a JSON profile's path
    (in a cluster file, relative to that file's folder)."""
    intra_node: LinkSpec
    """Link between two devices of one node (NVLink/NVSwitch; shared memory for CPU ranks)."""
    inter_node: LinkSpec
    """Link between nodes, per device (the device's NIC share)."""
    intra_node_topology: str = "switch"
    """'switch': the node's devices hang off one non-blocking switch (NVSwitch, a PCIe root), any pair at
    intra_node's bandwidth. 'mesh': no switch, a direct link between every two devices of the node (a 4-GPU HGX
    board), and intra_node is one such link: a pair at its bandwidth, a group of k on a node at k - 1 times it
    (planner/topology.py)."""

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def nodes_x(nodes: int, per_node: int, times: str = "x") -> str:
    """A cluster's shape as headers and messages write it: '1 node x 8', '2 nodes x 8' (the dashboard: times '×')."""
    return f"{nodes} node{'' if nodes == 1 else 's'} {times} {per_node}"


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    """Device name (a100-sxm4-80gb, h100-sxm5-80gb, cpu, ...)."""
    source: str
    """'datasheet' (vendor numbers and a fitted efficiency curve) or 'measured' (planner profile)."""
    dtype: str
    """Training dtype the numbers are for (one of device_checks.DTYPES): bf16 on GPUs, fp32 on CPU."""
    peak_tflops: float
    """Peak dense matrix throughput in that dtype, TFLOP/s."""
    memory_gib: float
    """Device memory, GiB."""
    memory_bandwidth_GBps: float
    """Main-memory bandwidth, GB/s."""
    gemm_efficiency: tuple[GemmPoint, ...]
    """Efficiency curve by GEMM size, points by increasing gflop (log-linear interpolation between them, flat outside)."""
    fused_attention: bool = False
    """Attention runs as one fused kernel (SDPA's FlashAttention or cuDNN kernel): no s x s scores in memory
    and no separate softmax pass. False models Megatron-LM 2021 (GEMM, fused softmax, GEMM)."""
    memory_efficiency: float = 0.7
    """Fraction of memory_bandwidth_GBps that elementwise kernels reach, 0 < it <= 1."""
    framework_overhead_gib: float = 2.0
    """Memory the framework takes besides tensors (context, allocator slack), from 0 up to below memory_gib."""
    fp8_peak_tflops: float = 0.0
    """Peak dense FP8 (e4m3) matrix throughput, TFLOP/s; 0 where the device has no FP8 tensor cores (compute
    capability below 8.9), and `--precision fp8` is then refused."""
    fp8_gemm_efficiency: tuple[GemmPoint, ...] = ()
    """Efficiency curve of FP8 GEMMs by size (as gemm_efficiency, of fp8_peak_tflops); empty: gemm_efficiency's."""
    flash_attention_efficiency: tuple[AttentionPoint, ...] = ()
    """FlashAttention-2's share of peak_tflops by query length (planner/kernels.py); empty: the GEMM curve's."""
    version: int = DEVICE_SCHEMA_VERSION
    """Schema version of this file."""
    measured: dict | None = None
    """Raw measured timings (planner profile output); None for a datasheet."""
    notes: str = ""
    """Where the numbers come from."""

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    @property
    def label(self) -> str:
        return f"{self.name} ({self.source})"


# ---------------------------------------------------------------- validation at the edge

def _presets(kind: str) -> list[str]:
    d = PROFILES_DIR / kind
    names = {p.stem.removesuffix(".measured") for p in d.glob("*.yaml")} | {p.stem.removesuffix(".measured") for p in d.glob("*.json")}
    return sorted(names)


def _unknown(kind: str, noun: str, arg: str, tail: str) -> str:
    """"unknown NOUN 'arg' (did you mean ...?); expected one of ..." for a name that is no preset of profiles/KIND/:
    the presets that contain it (h100 for h100-sxm5-80gb), else the nearest (a typo: gpt3-175b for gpt3-175bb, and
    not also the gpt3-13b a little further off), then every name."""
    names = _presets(kind)
    typed = arg.lower()
    close = {n: difflib.SequenceMatcher(None, typed, n).ratio() for n in difflib.get_close_matches(typed, names, n=3)}
    near = [n for n in names if len(typed) >= 3 and typed in n] + [n for n, r in close.items() if r >= max(close.values()) - 0.05]
    near = list(dict.fromkeys(near))[:3]
    hint = f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""
    return f"unknown {noun} {arg!r}{hint}; expected one of {', '.join(names)}{tail}"


def _is_file_arg(arg: str) -> bool:
    return arg.endswith((".yaml", ".yml", ".json")) or os.sep in arg


def _resolve(kind: str, what: str, arg: str) -> tuple[str, dict]:
    if _is_file_arg(arg):
        path = Path(arg)
        if not path.is_file():
            raise SpecError(arg, FILE, f"no such {what} file")
        return str(path), read_mapping(path)
    path = PROFILES_DIR / kind / f"{arg}.yaml"
    if not path.is_file():
        raise SpecError(f"--{what}", what, _unknown(kind, "preset", arg, " or a YAML file"))
    return arg, read_mapping(path)


def model_from_dict(data: dict, source: str) -> ModelSpec:
    m = from_dict(ModelSpec, data, source)
    check_positive(source, m, ["layers", "hidden", "heads", "kv_heads", "ffn_hidden", "seq_len", "vocab", "rope_theta"])
    if m.hidden % m.heads:
        raise SpecError(source, "heads", f"hidden {m.hidden} is not divisible by heads {m.heads}")
    if m.heads % m.kv_heads:
        raise SpecError(source, "kv_heads", f"heads {m.heads} are not divisible by kv_heads {m.kv_heads}; each K/V head serves a whole group of query heads")
    for name, allowed in (("mlp", MLPS), ("norm", NORMS), ("position", POSITIONS)):
        if getattr(m, name) not in allowed:
            raise SpecError(source, name, f"expected one of {', '.join(allowed)}, got {getattr(m, name)!r}")
    if m.position == "rope" and m.head_dim % 2:
        raise SpecError(source, "heads", f"RoPE rotates pairs of channels, but the head dim hidden/heads = {m.head_dim} is odd")
    return m


def with_seq_len(model: ModelSpec, seq_len: int, source: str) -> ModelSpec:
    """The model trained on seq_len-token sequences (--seq-len). RoPE has no parameters, so any length is the same
    model; learned positions are a seq_len x hidden table, so another length is another model, refused."""
    if model.position == "learned" and seq_len != model.seq_len:
        raise SpecError(source, "seq_len", f"{model.name} has learned positions, a {model.seq_len:,} x hidden table that "
                                           f"fixes its sequence length; for {seq_len:,} write a model file with seq_len "
                                           f"{seq_len} (another model), or leave {source} out")
    return dataclasses.replace(model, seq_len=seq_len)


def load_model(arg: str, seq_len: int | None = None) -> ModelSpec:
    """A preset name (profiles/models/NAME.yaml), a YAML/JSON file, or a Hugging Face config.json (or a
    folder holding one: planner.hf reads it offline); on seq_len-token sequences where given (--seq-len)."""
    from planner import hf

    path = Path(arg)
    if path.is_dir():
        return hf.load_hf_folder(path, seq_len)
    source, data = _resolve("models", "model", arg)
    return hf.model_from_mapping(data, source, hf.model_name(path) if _is_file_arg(arg) else arg, seq_len)


def cluster_from_dict(data: dict, source: str) -> ClusterSpec:
    c = from_dict(ClusterSpec, data, source)
    check_positive(source, c, ["nodes", "gpus_per_node"])
    for link in ("intra_node", "inter_node"):
        lk = getattr(c, link)
        if lk.bandwidth_GBps <= 0:
            raise SpecError(source, f"{link}.bandwidth_GBps", f"must be positive, got {lk.bandwidth_GBps}")
        if lk.latency_us < 0:
            raise SpecError(source, f"{link}.latency_us", f"must be zero or more, got {lk.latency_us}")
    if c.intra_node_topology not in ("switch", "mesh"):
        raise SpecError(source, "intra_node_topology", f"expected 'switch' (a node switch such as NVSwitch) or 'mesh' (direct links "
                                                       f"between every pair, no switch), got {c.intra_node_topology!r}")
    return c


def load_cluster(arg: str, nodes: int | None = None, gpus_per_node: int | None = None, device: str | None = None) -> ClusterSpec:
    """A preset name (profiles/clusters/NAME.yaml) or a YAML file; --nodes/--gpus-per-node/--device override.

    local-cpu's gpus_per_node defaults to this machine's core count. A --device override is the cluster's device
    from then on (a file as its absolute path), so a plan records the device it was priced on and whoever prices
    it again (validate, runtime.launch, the dashboard) loads that one. A device file that the cluster file names
    is read from the cluster file's folder (when relative) and kept as its absolute path too."""
    source, data = _resolve("clusters", "cluster", arg)
    data.setdefault("name", Path(arg).stem if _is_file_arg(arg) else arg)
    if device is not None:
        _device_path(device, "--device")  # an unknown name is the flag's error, before the cluster's fields
        data["device"] = str(Path(device).resolve()) if _is_file_arg(device) else device
    elif isinstance(data.get("device"), str) and _is_file_arg(data["device"]):
        folder = Path(arg).parent if _is_file_arg(arg) else PROFILES_DIR / "clusters"
        path = (folder / data["device"]).resolve()  # an absolute device path stays itself
        if not path.is_file():
            raise SpecError(source, "device", f"no device profile file {path} (a relative path is read from the cluster file's folder); "
                                              f"give a device name ({', '.join(_presets('devices'))}) or the path of a JSON profile")
        data["device"] = str(path)
    if data.get("gpus_per_node") == "auto" and gpus_per_node is None:
        if data.get("device") != "cpu":
            raise SpecError(source, "gpus_per_node", f"'auto' means this machine's CPU count, which only a cluster whose device is "
                                                     f"cpu may use (device here: {data.get('device')!r}); give the devices per node")
        data["gpus_per_node"] = os.cpu_count() or 1
    for key, v in (("nodes", nodes), ("gpus_per_node", gpus_per_node)):
        if v is not None:
            if v <= 0:
                raise SpecError(f"--{key.replace('_', '-')}", key, f"must be positive, got {v}")
            if key == "gpus_per_node" and data.get("intra_node_topology") == "mesh" and v > data.get("gpus_per_node", v):
                # A mesh board's pair link is its GPUs' links split among the others: more GPUs, slower pairs.
                raise SpecError("--gpus-per-node", key, f"{v} is more than the {data['gpus_per_node']} GPUs of {source}'s mesh "
                                                         f"board, whose pair link ({data['intra_node']['bandwidth_GBps']} GB/s) "
                                                         f"is for that many; write a cluster file for the larger board")
            data[key] = v
    cluster = cluster_from_dict(data, source)
    # A measured profile of the cluster's device carries the links measured between its ranks (planner
    # profile fits them to its collectives): they replace the spec's intra-node figures.
    from planner.measured import intra_node_link

    # The measured link is already the group's (fitted to collectives over all ranks), so it is read as a switch.
    link = intra_node_link(cluster.device)
    return dataclasses.replace(cluster, intra_node=link, intra_node_topology="switch") if link else cluster


def device_from_dict(data: dict, source: str) -> DeviceProfile:
    version = data.get("version", DEVICE_SCHEMA_VERSION)
    if version != DEVICE_SCHEMA_VERSION:
        raise SpecError(source, "version", f"schema version {version!r} is not supported (this meshplan reads {DEVICE_SCHEMA_VERSION}); re-run `planner profile` to regenerate it")
    d = from_dict(DeviceProfile, data, source)
    check_device(source, d)
    return d


def measured_profile_path(name: str) -> Path:
    """Where `planner profile` writes device NAME's measured profile and where load_device looks first.

    In a source checkout that is profiles/devices/ (beside the datasheets); an installed package's files are
    not this machine's to change, so there it is $XDG_DATA_HOME/meshplan/devices (~/.local/share/...)."""
    if PROFILES_DIR != _PACKAGED_PROFILES:
        return PROFILES_DIR / "devices" / f"{name}.measured.json"
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "meshplan" / "devices" / f"{name}.measured.json"


def load_device(arg: str) -> DeviceProfile:
    """A device name (a measured profile, see measured_profile_path, wins over profiles/devices/NAME.json) or a JSON file."""
    path = _device_path(arg, "cluster")
    return device_from_dict(read_mapping(path), str(path))


def _device_path(arg: str, source: str) -> Path:
    """The file load_device reads for ARG; an unknown name is SOURCE's error (the --device flag, or the cluster's field)."""
    if _is_file_arg(arg):
        if not Path(arg).is_file():
            raise SpecError(arg, FILE, "no such device profile file")
        return Path(arg)
    for path in (measured_profile_path(arg), PROFILES_DIR / "devices" / f"{arg}.json"):
        if path.is_file():
            return path
    raise SpecError(source, "device", _unknown("devices", "device", arg, " (files in profiles/devices/)"))


def spec_to_dict(spec: Any) -> dict:
    return dataclasses.asdict(spec)
