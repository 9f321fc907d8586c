"""What the software that runs a plan does, where that changes its cost or memory: meshplan's own runtime,
Megatron-LM as Narayanan et al. 2021 ran it, DeepSpeed as MT-NLG ran it, Megatron-Core as NVIDIA benchmarks it.
planner/terms.py reads a Framework when it builds the cost terms."""

from __future__ import annotations

from dataclasses import dataclass

from planner.memory import MEGATRON_CORE_SAVED, MEGATRON_SAVED, RUNTIME_SAVED, SavedTensors
from planner.plan import Knobs
from planner.zero import ZERO_MODES, gradient_reducer


FP8_CASTS = ("torchao", "transformer-engine")
"""The FP8 recipes compute.datasheet_layer_times prices (Framework.fp8_casts)."""


@dataclass(frozen=True)
class Framework:
    """What the software that runs the plan does, where that changes the cost."""

    name: str
    grad_reduce_bytes: int
    """Bytes per gradient element in the data-parallel reduction."""
    dp_overlap: bool
    """Gradient reduction overlaps the last microbatch's backward (DDP/FSDP2 buckets)."""
    p2p_scatter_gather: bool
    """Narayanan et al. 2021, section 4.1: cross-node pipeline sends split over the t NICs of a node."""
    p2p_blocking: bool
    """Sends and receives wait for their peer and occupy the device (Megatron-LM 2021's
    send_forward_recv_backward, DeepSpeed's pipeline engine); otherwise they run beside compute."""
    saved: SavedTensors = MEGATRON_SAVED
    """What a block keeps for its backward (dropout masks, copies, fused ops)."""
    fp32_params: bool = False
    """Parameters and gradients in fp32 (meshplan's runtime), or bf16 weights with fp32 master copies in the
    optimizer (Megatron-LM, DeepSpeed): memory.state_bytes_per_param."""
    grad_bytes: int = 4
    """Bytes a gradient takes in memory (without fp32_params): fp32 main gradients (Megatron-LM 2021, DeepSpeed),
    or bf16 (Megatron-Core's default gradient buffer)."""
    tp_overlap: float = 0.0
    """Share of the tensor-parallel collectives hidden under the GEMMs they feed (Megatron-Core's
    --tp-comm-overlap, userbuffers: Wang et al. 2023 'Overlap communication with dependent computation'); a
    calibrated constant (bench/calibration.py fits and prints it)."""
    param_gather_overlap: bool = False
    """The distributed optimizer's all-gather of updated weights runs under the next step's forward
    (Megatron-Core's --overlap-param-gather)."""
    fp8_casts: str = "torchao"
    """How FP8 linears scale, cast and transpose what they multiply: "torchao" (dynamic tensorwise scaling,
    compute.float8_casts_per_token and float8_grad_casts_per_token) or "transformer-engine" (1.x, delayed scaling,
    norm-fused casts and the weight-gradient transposes: compute.transformer_engine_fp8_moves_per_token)."""
    fp8_weight_casts: bool = True
    """FP8 weights cast every microbatch (torchao); False: once per step and kept (Transformer Engine)."""
    fp8_primary_weights: bool = False
    """With fp8, the blocks' matrices are kept as FP8 (with the transpose Transformer Engine caches) and no
    bf16 copy exists (NeMo's model.fp8_params, Megatron-Core's --fp8-param-gather); False: bf16 weights beside
    the FP8 copies that fp8_weight_casts False keeps (memory.fp8_weight_cache_bytes)."""
    fused_elementwise: bool = False
    """Norms, residual adds, SwiGLU and RoPE run as fused kernels (Megatron-Core's and Transformer Engine's),
    priced as compute.elementwise_per_token(compiled=True) prices torch.compile's fusion."""
    grad_accumulate_bytes: float = 0.0
    """Bytes moved per parameter per microbatch to accumulate gradients beyond the 16-bit in-place accumulate
    the device curve was fitted with (planner/deepspeed.py: accumulate_s)."""
    deepspeed_pipe: bool = False
    """DeepSpeed's pipeline engine and ZeRO-1: metadata per send and re-gathers of partitioned messages over tp,
    an all-reduce where dp_s prices a reduce-scatter, the tied-embedding reduction (planner/deepspeed.py)."""
    fused_attention: bool | None = None
    """Attention runs as one fused kernel (no s x s scores in memory, the causal half of the tiles run): True for
    meshplan's runtime, whose scaled_dot_product_attention picks a fused kernel on every GPU (cuDNN's on H100, H200
    and B200, FlashAttention-2 or the memory-efficient kernel elsewhere: planner/kernels.py) and on CPU, and for
    Megatron-Core (Transformer Engine); None: as the device profile says, which is how its curves were fitted (the
    A100's to Megatron-LM 2021, which had no FlashAttention)."""
    flash_attention: bool = False
    """Fused attention runs as FlashAttention-2 (torch SDPA's flash backend), priced at the device's
    flash_attention_efficiency where its file has one (planner/kernels.py). None of FRAMEWORKS sets it: torch from
    2.11 on runs cuDNN's attention on H100, H200 and B200, as Megatron-Core does, which the GEMM curve prices
    (planner/kernels.py says why); bench/held_out.py sets it for torchtitan's Dec 2024 runs, whose torch ran flash."""
    cp_masked_chunks: bool = False
    """Under context parallelism each of a rank's two chunks attends to the keys before it in one call with a mask
    (runtime/parallel/context.py), so the kernel runs every tile of the chunk's rectangle, the causal triangle's
    other half too: (2cp+1)/(2cp) of the causal FLOPs (compute._attention_core_s). True for meshplan's runtime;
    ring attention with a causal kernel on the diagonal step (torch's context_parallel, Transformer Engine's) skips
    them."""
    fsdp_serial_edges: bool = False
    """FSDP2's weight gathers and gradient reduce-scatters share one process group, so NCCL runs them in issue order:
    each microbatch's last reduce-scatters (the first block's, then the root unit's: embedding, head and final
    norm, whose gradients are complete only after the embedding's backward) and the next microbatch's first
    gathers (the root's, then the first block's) follow one another with no compute beside them (torch 2.13
    _fsdp_param_group.py: the reduce-scatter 'falls back to the shard PG (shared with all-gather)'; the root is
    never prefetched). Priced without pipelining (cost.fsdp_edges_s); True for meshplan's runtime."""
    tp_gathers_per_linear: bool = False
    """With sequence parallelism each column-parallel linear all-gathers its own input, and reduce-scatters its own
    input gradient in the backward (KempnerForge's TP plan: ColwiseParallel(input_layouts=Shard(1)) on each of q, k,
    v, gate and up), where meshplan's runtime and Megatron-LM gather once per sub-block (tp_all_reduces_each_way).
    Counted with CommDebugMode on gloo ranks: tests/runtime/test_tp_comm.py. None of FRAMEWORKS sets it;
    bench/held_out.py's KempnerForge does."""
    loss_parallel: bool = True
    """Under tp the logits stay sharded over the vocabulary into a vocab-parallel cross-entropy (meshplan's
    loss_parallel, Megatron-LM's); False: they are all-gathered to every tp rank, in logit_bytes, and each rank
    runs the whole vocabulary's cross-entropy (KempnerForge: the head's ColwiseParallel(output_layouts=Replicate())
    and F.cross_entropy on its bf16 output). Priced in planner/terms.py (compute.gathered_loss_extra_s)."""
    logit_bytes: int = 4
    """Bytes per logit element in that gathered loss (where loss_parallel is False)."""
    grad_buffers: bool = True
    """Gradients live in buffers made once (Megatron-LM's main_grad, DeepSpeed's, DDP's buckets) and so exist at
    every peak; False: autograd makes them in the backward (meshplan's runtime sets them to None after each step)
    except where DDP wraps the model (Terms.grads_at_peak)."""

    def __post_init__(self):
        if self.fp8_casts not in FP8_CASTS:  # a misspelt recipe would otherwise be priced as torchao's
            raise ValueError(f"Framework {self.name}: fp8_casts must be one of {', '.join(FP8_CASTS)}, got {self.fp8_casts!r}")

    def tp_all_reduces_each_way(self, mlp: str, sequence_parallel: bool) -> float:
        """A block's tensor-parallel traffic each way (forward, backward), in all-reduces of its activations: 2
        (Shoeybi et al. 2019, section 3), with SP an all-gather and a reduce-scatter, each half an all-reduce, in
        place of each (Korthikanti et al. 2022, section 4.2.2). With tp_gathers_per_linear and SP: one gather per
        column-parallel linear (q, k, v and the MLP's first matrices, two for SwiGLU) beside the two scatters."""
        if not (self.tp_gathers_per_linear and sequence_parallel):
            return 2.0
        return (3 + (2 if mlp == "swiglu" else 1) + 2) / 2

    def fuses_attention(self, device) -> bool:
        """Whether attention runs fused on `device` under this framework (fused_attention, else the profile's)."""
        return self.fused_attention if self.fused_attention is not None else device.fused_attention

    def overlaps_dp(self, knobs: Knobs) -> bool:
        """Whether the gradient reduction runs under the backward. meshplan's runtime: as planner/zero.py's table
        says (DDP and FSDP2 overlap; where DDP falls short, under tp or pp, the runtime reduces by hand after the
        last backward: runtime/parallel/data.py says why; cp alone keeps DDP). The others: their dp_overlap."""
        if self.name == "meshplan":
            reducer = gradient_reducer(zero=knobs.zero, replicas=knobs.dp * knobs.cp, tp=knobs.tp, pipelined=knobs.pp > 1)
            return ZERO_MODES[knobs.zero].overlaps_backward and reducer != "by hand"
        return self.dp_overlap


# meshplan's runtime: fp32 parameters (bf16 autocast on GPU), DDP/FSDP2 overlap the reduction,
# torch.distributed.pipelining posts its sends and receives asynchronously, SDPA fuses attention (cuDNN's kernel on
# Hopper and Blackwell from torch 2.11, FlashAttention-2 elsewhere: planner/kernels.py).
MESHPLAN = Framework("meshplan", grad_reduce_bytes=4, dp_overlap=True, p2p_scatter_gather=False, p2p_blocking=False,
                     saved=RUNTIME_SAVED, fp32_params=True, grad_buffers=False, fused_attention=True, fsdp_serial_edges=True,
                     cp_masked_chunks=True)
# Megatron-LM as in Narayanan et al. 2021: fp16 gradients all-reduced after the flush, no overlap;
# blocking pipeline sends split over the node's NICs.
MEGATRON = Framework("megatron", grad_reduce_bytes=2, dp_overlap=False, p2p_scatter_gather=True, p2p_blocking=True)
# DeepSpeed's pipeline engine with ZeRO-1 as in Smith et al. 2022 (bf16, section 2.3), read from DeepSpeed v0.5.4
# and its bf16 path (planner/deepspeed.py): blocking sends, each tp rank sending its 1/tp of the message
# (pipe/engine.py: is_pipe_partitioned = is_grad_partitioned = tp > 1); bf16 gradients accumulated into fp32
# buffers every microbatch (18 bytes per parameter, 12 more than the fp16 accumulate the A100 curve contains) and
# all-reduced in fp32 after the flush.
DEEPSPEED = Framework("deepspeed", grad_reduce_bytes=4, dp_overlap=False, p2p_scatter_gather=True, p2p_blocking=True,
                      grad_accumulate_bytes=12, deepspeed_pipe=True)
# Megatron-Core (Megatron-LM r0.8, NeMo 24.07) as NVIDIA benchmarks it on H100: distributed optimizer with its bf16
# gradient buffer (grad_reduce_in_fp32 off, the default) reduce-scattered under the backward
# (--overlap-grad-reduce) and the weight all-gather under the next
# forward (--overlap-param-gather), tensor-parallel communication overlapped with GEMMs (--tp-comm-overlap),
# asynchronous pipeline sends split over tp, FlashAttention (Transformer Engine's, on every GPU), FP8 through
# Transformer Engine with FP8 primary weights (every FP8 recipe of NVIDIA's dgxc-benchmarking v24.11.1 sets
# model.fp8_params: nemotron/configure.sh, llama3.1/configure.sh, nemo_megatron/gpt3_175b_hydra.yaml), its casts and
# transposes as Transformer Engine 1.x makes them (compute.transformer_engine_fp8_moves_per_token).
# The TP overlap share is fitted by bench/fit_calibration.py on the H100 runs in profiles/calibration/.
MEGATRON_CORE_TP_OVERLAP = 0.414
MEGATRON_CORE = Framework("megatron-core", grad_reduce_bytes=2, grad_bytes=2, dp_overlap=True, p2p_scatter_gather=True, p2p_blocking=False,
                          tp_overlap=MEGATRON_CORE_TP_OVERLAP, param_gather_overlap=True, fp8_casts="transformer-engine",
                          fp8_weight_casts=False, fp8_primary_weights=True, fused_elementwise=True, saved=MEGATRON_CORE_SAVED,
                          fused_attention=True)
FRAMEWORKS = {f.name: f for f in (MESHPLAN, MEGATRON, DEEPSPEED, MEGATRON_CORE)}
LABELS = {"meshplan": "meshplan's runtime", "megatron": "Megatron-LM as in Narayanan et al. 2021",
          "deepspeed": "DeepSpeed's pipeline engine with ZeRO-1 as in Smith et al. 2022",
          "megatron-core": "Megatron-Core as NVIDIA benchmarks it on H100"}
"""Each framework as `--framework`'s help and the dashboard's picker describe it."""
EXPORT_TARGETS = {"megatron": "megatron", "megatron-core": "megatron"}
"""The `planner export --to` target that writes a plan's arguments for each framework that has one (DeepSpeed and
meshplan's runtime have none)."""


def priced_elsewhere(framework: str, plan_file: str = "PLAN") -> str:
    """What a plan priced for another framework than meshplan's runtime says wherever it is started (planner
    launch's commands and script, runtime.launch's summary, the dashboard's 'Run it'), one sentence for all three;
    empty for a plan priced for meshplan's runtime."""
    if framework == "meshplan":
        return ""
    export = (f" `planner export {plan_file} --to {EXPORT_TARGETS[framework]}` gives its Megatron-LM arguments."
              if framework in EXPORT_TARGETS else " meshplan exports no configuration for it.")
    return (f"Its prediction is for {LABELS[framework]} (--framework {framework}); meshplan's runtime runs it at the "
            f"speed `planner predict` gives without --framework, and `planner validate` compares a run with that.{export}")
