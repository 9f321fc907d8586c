"""The one cost model: what a transformer block, the embedding and the head cost per microbatch (seconds, their
tensor-parallel collectives included) and hold (bytes), for one configuration.

Every caller reads these and nothing else: exact pricing (planner/cost.py: predict), the layer-split program
(planner/ilp.py) and the search's lower bounds (planner/bounds.py). A formula that changes the cost or the
memory is changed here (or in compute.py / comm.py / memory.py, which hold the formulas and are read only from
here), once."""

from __future__ import annotations

from dataclasses import dataclass

from planner import comm
from planner.compute import end_times, layer_times, memory_s, optimizer_step_s
from planner.memory import (DEFAULT_MEMORY_HEADROOM_GIB, GIB, MEGATRON_SAVED, RUNTIME_SAVED, SavedTensors, activation_bytes_per_layer,
                            embedding_activation_bytes, end_param_count, full_layer_activation_bytes, head_transient_bytes,
                            layer_param_count, state_bytes_per_param)
from planner.plan import Knobs
from planner.specs import ClusterSpec, DeviceProfile, ModelSpec
from planner.topology import dp_link, pp_links, tp_link

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

    def overlaps_dp(self, knobs: Knobs) -> bool:
        """meshplan's runtime overlaps only where DDP (pure data parallelism) or FSDP2 reduce; with
        TP or pipelining and no sharded optimizer it all-reduces by hand after the last backward
        (runtime/parallel/data.py says why)."""
        if self.name == "meshplan":
            return knobs.distributed_optimizer or (knobs.tp == 1 and knobs.pp == 1)
        return self.dp_overlap


# meshplan's runtime: fp32 parameters (bf16 autocast on GPU), DDP/FSDP2 overlap the reduction,
# torch.distributed.pipelining posts its sends and receives asynchronously.
MESHPLAN = Framework("meshplan", grad_reduce_bytes=4, dp_overlap=True, p2p_scatter_gather=False, p2p_blocking=False,
                     saved=RUNTIME_SAVED)
# Megatron-LM as in Narayanan et al. 2021: fp16 gradients all-reduced after the flush, no overlap;
# blocking pipeline sends split over the node's NICs.
MEGATRON = Framework("megatron", grad_reduce_bytes=2, dp_overlap=False, p2p_scatter_gather=True, p2p_blocking=True)
# DeepSpeed's pipeline engine with ZeRO-1 as in Smith et al. 2022: blocking sends of whole
# activations, fp32 gradients reduce-scattered after the flush.
DEEPSPEED = Framework("deepspeed", grad_reduce_bytes=4, dp_overlap=False, p2p_scatter_gather=False, p2p_blocking=True)
FRAMEWORKS = {f.name: f for f in (MESHPLAN, MEGATRON, DEEPSPEED)}


@dataclass(frozen=True)
class Terms:
    """One configuration's per-microbatch seconds and bytes on one device (a tp shard)."""

    layer_forward_s: float
    """One block's forward, with its two tensor-parallel all-reduces."""
    layer_backward_s: float
    """Its backward, with its two all-reduces."""
    layer_recompute_s: float
    """What the knob's policy re-runs per block before its backward: the attention core (selective), the
    whole forward (full), nothing (none)."""
    full_recompute_s: float
    """One block switched to full recomputation: its forward again, collectives included."""
    layer_tp_comm_s: float
    """Of the block's forward + backward, its tensor-parallel collectives."""
    tp_all_reduce_s: float
    """One all-reduce of a microbatch's activations over tp (the unit of the counts above)."""
    embedding_forward_s: float
    embedding_backward_s: float
    head_forward_s: float
    head_backward_s: float
    """The embedding (first stage) and final norm + head + loss (last stage), with their all-reduces."""
    stage_forward_s: float
    stage_backward_s: float
    """torch.distributed.pipelining's own work per microbatch and stage (a measured profile's; 0 otherwise)."""
    layer_activation_bytes: float
    """What one block keeps per in-flight microbatch under the knob's policy."""
    full_activation_bytes: float
    """The same for a fully recomputed block (its input)."""
    embedding_activation_bytes: float
    """What the embedding keeps per in-flight microbatch (first stage)."""
    head_transient_bytes: float
    """Logits and their gradient while the loss runs (last stage)."""
    recompute_working_bytes: float
    """What a fully recomputed block holds while it is re-run for its backward."""
    layer_params: float
    """Parameters of one block on this tp rank."""
    weight_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    """Bytes per parameter of weights, gradients and optimizer state (sharding over dp included)."""
    overhead_bytes: float
    """The framework's memory besides tensors."""
    capacity_bytes: float
    """Device memory minus the headroom: what a device's peak must stay within."""

    @property
    def state_bytes_per_param(self) -> float:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes

    def fixed_forward_s(self, embedding: bool, head: bool) -> float:
        """A stage's forward seconds that do not depend on its blocks (sends aside)."""
        return self.stage_forward_s + (self.embedding_forward_s if embedding else 0.0) + (self.head_forward_s if head else 0.0)

    def fixed_backward_s(self, embedding: bool, head: bool) -> float:
        return self.stage_backward_s + (self.embedding_backward_s if embedding else 0.0) + (self.head_backward_s if head else 0.0)

    def end_params(self, model: ModelSpec, tp: int, embedding: bool, head: bool) -> float:
        return end_param_count(model, tp, embedding, head)


class CostModel:
    """The specs of one planning problem with the per-(tp, micro-batch) work memoised: the search asks for
    thousands of configurations that share a handful of block shapes."""

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, device: DeviceProfile, framework: Framework = MESHPLAN,
                 memory_headroom_gib: float = DEFAULT_MEMORY_HEADROOM_GIB):
        self.model, self.cluster, self.device, self.framework = model, cluster, device, framework
        self.memory_headroom_gib = memory_headroom_gib
        self._layer: dict = {}
        self._end: dict = {}
        self._ar: dict = {}
        self._terms: dict = {}
        self._p2p: dict = {}
        self._stage_overhead = None

    @property
    def capacity_gib(self) -> float:
        return self.device.memory_gib - self.memory_headroom_gib

    def layer(self, t: int, b: int, sp: bool):
        key = (t, b, sp)
        if key not in self._layer:
            self._layer[key] = layer_times(self.model, self.device, t, b, sp)
        return self._layer[key]

    def ends(self, t: int, b: int):
        if (t, b) not in self._end:
            self._end[(t, b)] = end_times(self.model, self.device, t, b)
        return self._end[(t, b)]

    def tp_all_reduce_s(self, t: int, b: int) -> float:
        if (t, b) not in self._ar:
            act = b * self.model.seq_len * self.model.hidden * self.device.dtype_bytes
            self._ar[(t, b)] = comm.all_reduce_s(act, t, tp_link(self.cluster, t))
        return self._ar[(t, b)]

    def stage_overhead_s(self) -> tuple[float, float]:
        if self._stage_overhead is None:
            self._stage_overhead = (0.0, 0.0)
            if self.device.measured:
                from planner.measured import stage_overhead_s

                self._stage_overhead = stage_overhead_s(self.device)
        return self._stage_overhead

    def terms(self, k: Knobs) -> Terms:
        key = (k.tp, k.micro_batch, k.sequence_parallel, k.recompute, k.pp > 1, k.distributed_optimizer, k.dp)
        got = self._terms.get(key)
        if got is None:
            got = self._terms[key] = self._build(k)
        return got

    def _build(self, k: Knobs) -> Terms:
        model, dev = self.model, self.device
        t, b, sp = k.tp, k.micro_batch, k.sequence_parallel
        lt, et, ar = self.layer(t, b, sp), self.ends(t, b), self.tp_all_reduce_s(t, b)
        # Shoeybi et al. 2019, section 3: two all-reduces of the block's activations in the forward and two in
        # the backward (with sequence parallelism, all-gather + reduce-scatter of the same volume; Korthikanti
        # et al. 2022, section 4.2.2).
        f, bw = lt.forward_s + 2 * ar, lt.backward_s + 2 * ar
        rc = f if k.recompute == "full" else lt.selective_recompute_s if k.recompute == "selective" else 0.0
        so_f, so_b = self.stage_overhead_s() if k.pp > 1 else (0.0, 0.0)
        # The activation formulas (memory.py) are Korthikanti et al.'s bytes for a 2-byte dtype: scaled to the
        # device's training dtype here, and only here.
        scale = dev.dtype_bytes / 2
        fused, saved = dev.fused_attention, self.framework.saved
        w, g, o = state_bytes_per_param(dev.dtype_bytes, k.distributed_optimizer, k.dp)
        return Terms(
            layer_forward_s=f, layer_backward_s=bw, layer_recompute_s=rc, full_recompute_s=f, layer_tp_comm_s=4 * ar,
            tp_all_reduce_s=ar,
            # Vocab-parallel embedding: one all-reduce of its output; column-parallel head: its input gradient
            # is all-reduced in the backward (Shoeybi et al. 2019, section 3).
            embedding_forward_s=et.embedding_forward_s + ar, embedding_backward_s=et.embedding_backward_s,
            head_forward_s=et.head_forward_s, head_backward_s=et.head_backward_s + ar,
            stage_forward_s=so_f, stage_backward_s=so_b,
            layer_activation_bytes=activation_bytes_per_layer(model, t, b, sp, k.recompute, fused, saved) * scale,
            full_activation_bytes=activation_bytes_per_layer(model, t, b, sp, "full", fused, saved) * scale,
            embedding_activation_bytes=embedding_activation_bytes(model, t, b, sp, saved) * scale,
            head_transient_bytes=head_transient_bytes(model, t, b),
            recompute_working_bytes=full_layer_activation_bytes(model, t, b, sp, fused, saved) * scale,
            layer_params=layer_param_count(model, t), weight_bytes=w, grad_bytes=g, optimizer_bytes=o,
            overhead_bytes=dev.framework_overhead_gib * GIB, capacity_bytes=self.capacity_gib * GIB)

    def p2p_s(self, k: Knobs) -> tuple[float, ...]:
        """Send/recv time of one microbatch's activation across each of the pp*v - 1 stage boundaries."""
        key = (k.tp, k.pp, k.dp, k.virtual_stages, k.micro_batch, k.sequence_parallel)
        got = self._p2p.get(key)
        if got is None:
            nbytes = k.micro_batch * self.model.seq_len * self.model.hidden * self.device.dtype_bytes
            links = pp_links(self.cluster, k.tp, k.dp, k.pp)
            intra = self.cluster.intra_node.bandwidth_GBps
            out = []
            for s in range(k.pp * k.virtual_stages - 1):
                link = links[s % k.pp]
                split = k.tp if (k.sequence_parallel or (self.framework.p2p_scatter_gather and link.bandwidth_GBps < intra)) else 1
                out.append(comm.send_recv_s(nbytes / split, link))
            got = self._p2p[key] = tuple(out)
        return got

    def dp_s(self, k: Knobs, params: float) -> float:
        """Gradient reduction of one pipeline device's parameters over its data-parallel group."""
        if k.dp == 1:
            return 0.0
        link = dp_link(self.cluster, k.tp, k.dp)
        g = params * self.framework.grad_reduce_bytes
        if k.distributed_optimizer:
            # ZeRO-1 / Megatron distributed optimizer: reduce-scatter the gradients, all-gather the updated
            # parameters (Rajbhandari et al. 2020, section 5.1: the same volume as all-reduce).
            return comm.reduce_scatter_s(g, k.dp, link) + comm.all_gather_s(params * self.device.dtype_bytes, k.dp, link)
        return comm.all_reduce_s(g, k.dp, link)

    def device_tail_s(self, k: Knobs, params: float, m: int, backward_window_s: float) -> tuple[float, float]:
        """(exposed data-parallel seconds, optimizer seconds) after a pipeline device's last backward, for a
        device holding `params` whose shortest stage backward is backward_window_s. Both grow with params."""
        fsdp = (self.device.measured or {}).get("fsdp") if self.framework is MESHPLAN and k.distributed_optimizer and k.dp > 1 else None
        if fsdp:
            # Measured FSDP2 cost on this machine: per step, plus a re-gather per microbatch where the runtime
            # reshards after forward (pp == 1); exposed, not overlapped.
            per_mb = m if k.pp == 1 else 1
            dp = params * (fsdp["per_step_s_per_param"] + per_mb * fsdp["per_microbatch_s_per_param"])
        elif self.framework.overlaps_dp(k) and backward_window_s == float("inf"):
            dp = 0.0  # the search's bound: an overlap window as long as any backward
        else:
            window = backward_window_s if self.framework.overlaps_dp(k) else 0.0
            dp = max(0.0, self.dp_s(k, params) - window)
        return dp, optimizer_step_s(self.device, params / (k.dp if k.distributed_optimizer else 1)) + self.grad_norm_s(k, params)

    def grad_norm_s(self, k: Knobs, params: float) -> float:
        """Gradient-norm clipping before the step (meshplan's runtime and Megatron-LM clip at 1.0): one read of
        the device's fp32 gradients (its shard, where the optimizer is sharded) and a scalar all-reduce over
        every rank."""
        grads = params / (k.dp if k.distributed_optimizer else 1)
        world = self.cluster.gpus
        link = self.cluster.inter_node if self.cluster.nodes > 1 else self.cluster.intra_node
        return memory_s(self.device, grads * 4 / self.device.dtype_bytes) + comm.scalar_all_reduce_s(world, link)


def fits_bytes(nbytes: float, capacity_bytes: float) -> bool:
    """The one test of 'fits' (predict, the split solver and the bounds use it alike)."""
    return nbytes <= capacity_bytes * (1 + 1e-9)
