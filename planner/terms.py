"""The one cost model: what a transformer block, the embedding and the head cost per microbatch (seconds, their
tensor-parallel collectives included) and hold (bytes), for one configuration.

Every caller reads these and nothing else: exact pricing (planner/cost.py: predict), the layer-split program
(planner/ilp.py) and the search's lower bounds (planner/bounds.py). A formula that changes the cost or the
memory is changed here (or in compute.py / comm.py / memory.py, which hold the formulas and are read only from
here), once. The record it builds per configuration, Terms, is in planner/per_microbatch.py."""

from __future__ import annotations

from planner import comm, schedule
from planner.compute import end_times, gathered_loss_extra_s, layer_times, memory_s, optimizer_step_s
from planner.measured import overlap_cost
from planner.memory import (DEFAULT_MEMORY_HEADROOM_GIB, GIB,
                            activation_bytes_per_layer, cp_gathered_kv_bytes, embedding_activation_bytes, end_param_count,
                            fp8_weight_cache_bytes, fsdp_root_bytes, fsdp_transient_bytes, full_layer_activation_bytes, head_kept_bytes, head_transient_bytes, layer_param_count, logit_bytes,
                            state_bytes_per_param, step_grad_bytes_per_param)
from planner.per_microbatch import Terms
from planner.plan import Knobs
from planner.specs import ClusterSpec, DeviceProfile, ModelSpec
from planner.topology import cp_link, dp_link, pp_links, tp_link
from planner.zero import ZERO_MODES, gradient_reducer
# The frameworks live in planner/frameworks.py; callers import them from here too.
from planner.frameworks import (DEEPSPEED, FRAMEWORKS, MEGATRON, MEGATRON_CORE, MEGATRON_CORE_TP_OVERLAP,  # noqa: F401
                                MESHPLAN, Framework)


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
        self._links: dict = {}
        self._tails: dict = {}
        self._bases: dict = {}
        self._sims: dict = {}
        self._sharding: dict = {}
        self._stage_overhead = None
        self._world_link = cluster.inter_node if cluster.nodes > 1 else cluster.intra_node

    @property
    def capacity_gib(self) -> float:
        return self.device.memory_gib - self.memory_headroom_gib

    def layer(self, t: int, b: float, sp: bool, precision: str = "bf16", compiled: bool = False, cp: int = 1):
        key = (t, b, sp, precision, compiled, cp)
        if key not in self._layer:
            fw = self.framework
            self._layer[key] = layer_times(self.model, self.device, t, b, sp, precision, compiled, fw.fp8_casts,
                                           fw.fp8_weight_casts, cp, fw.fuses_attention(self.device), fw.flash_attention, fw.cp_masked_chunks)
        return self._layer[key]

    def ends(self, t: int, b: float):
        if (t, b) not in self._end:
            self._end[(t, b)] = end_times(self.model, self.device, t, b)
        return self._end[(t, b)]

    def tp_all_reduce_s(self, t: int, b: float) -> float:
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
        key = (k.tp, k.micro_batch, k.sequence_parallel, k.recompute, k.pp > 1, k.zero, k.dp, k.cp, k.precision, k.compile)
        got = self._terms.get(key)
        if got is None:
            got = self._terms[key] = self._build(k)
        return got

    def _build(self, k: Knobs) -> Terms:
        # What does not depend on dp or the ZeRO stage is built once per block shape and shared.
        key = (k.tp, k.micro_batch, k.sequence_parallel, k.recompute, k.pp > 1, k.cp, k.precision, k.compile)
        base = self._bases.get(key)
        if base is None:
            base = self._bases[key] = self._block_terms(k)
        dev, fp32 = self.device, self.framework.fp32_params
        w, g, o = state_bytes_per_param(dev.dtype_bytes, k.zero, k.dp * k.cp, fp32, self.framework.grad_bytes)
        return Terms(**base, weight_bytes=w, grad_bytes=g, optimizer_bytes=o,
                     step_bytes=step_grad_bytes_per_param(k.zero, k.dp * k.cp, fp32, self.framework.grad_bytes),
                     sharding_transient_bytes=fsdp_transient_bytes(dev.dtype_bytes, k.zero, base["layer_params"], fp32),
                     end_gathered_bytes=fsdp_root_bytes(dev.dtype_bytes, k.zero, fp32),
                     grads_from_backward=not self.framework.grad_buffers and gradient_reducer(  # DDP's buckets hold them
                         zero=k.zero, replicas=k.dp * k.cp, tp=k.tp, pipelined=k.pp > 1) != "ddp")

    def _block_terms(self, k: Knobs) -> dict:
        model, dev = self.model, self.device
        t, sp = k.tp, k.sequence_parallel
        # A cp rank holds s/cp tokens of each of its micro_batch sequences and attends to all s keys: the GEMM,
        # elementwise and attention work, the activations and the messages of micro_batch / cp sequences.
        b = k.micro_batch / k.cp
        lt, et, ar = (self.layer(t, b, sp, k.precision, k.compile or self.framework.fused_elementwise, k.cp), self.ends(t, b),
                      self.tp_all_reduce_s(t, b))
        # Dubey et al. 2024 (Llama 3), section 3.3.2: keys and values all-gathered over cp before attention,
        # their gradients reduce-scattered in the backward.
        kv = comm.all_gather_s(2 * k.micro_batch * model.seq_len * model.kv_dim / t * dev.dtype_bytes, k.cp, cp_link(self.cluster, t, k.cp))
        # The block's all-reduces each way (Framework.tp_all_reduces_each_way: 2, or per-linear gathers). With
        # tp_overlap, that share of them runs under the GEMMs (the exposed rest is what layer_tp_comm_s counts).
        ar_exposed, ways = ar * (1 - self.framework.tp_overlap), self.framework.tp_all_reduces_each_way(model.mlp, sp)
        cp_comm = 0.0 if lt.cp_comm_included else kv  # a measured cp block holds its own
        f, bw = lt.forward_s + ways * ar_exposed + cp_comm, lt.backward_s + ways * ar_exposed + cp_comm
        # Selective recomputation re-runs the attention core, under cp the keys' gather with it (runtime.parallel.context).
        rc = f if k.recompute == "full" else lt.selective_recompute_s + kv if k.recompute == "selective" else 0.0
        whole_loss, lb = t > 1 and not self.framework.loss_parallel, self.framework.logit_bytes  # logits gathered to each tp rank
        loss_b = gathered_loss_extra_s(dev, model, t, b, lb) if whole_loss else 0.0
        logit_gather = comm.all_gather_s(b * model.seq_len * model.padded_vocab(t) * lb, t, tp_link(self.cluster, t)) if whole_loss else 0.0
        gl = lb if whole_loss else 0  # memory: each tp rank then holds the whole vocabulary's logits, lb bytes each
        so_f, so_b = self.stage_overhead_s() if k.pp > 1 else (0.0, 0.0)
        # The activation formulas (memory.py) are Korthikanti et al.'s bytes for a 2-byte dtype: scaled to the
        # device's training dtype here, and only here.
        scale = dev.dtype_bytes / 2
        fused, saved, fp8 = self.framework.fuses_attention(dev), self.framework.saved, k.precision == "fp8"
        gathered = cp_gathered_kv_bytes(model, t, k.micro_batch, k.cp) * scale
        return dict(
            layer_forward_s=f, layer_backward_s=bw, layer_recompute_s=rc, full_recompute_s=f, layer_tp_comm_s=2 * ways * ar_exposed,
            tp_all_reduce_s=ar_exposed,
            # Vocab-parallel embedding: one all-reduce of its output; column-parallel head: its input gradient
            # is all-reduced in the backward (Shoeybi et al. 2019, section 3).
            embedding_forward_s=et.embedding_forward_s + ar_exposed, embedding_backward_s=et.embedding_backward_s,
            head_forward_s=et.head_forward_s + loss_b + logit_gather, head_backward_s=et.head_backward_s + ar_exposed + loss_b,
            head_tp_comm_s=ar_exposed + logit_gather,
            stage_forward_s=so_f, stage_backward_s=so_b,
            layer_activation_bytes=activation_bytes_per_layer(model, t, b, sp, k.recompute, fused, saved, fp8) * scale
            + (gathered if k.recompute == "none" else 0.0),  # selective checkpoints cp attention with its gather
            full_activation_bytes=activation_bytes_per_layer(model, t, b, sp, "full", fused, saved, fp8) * scale,
            embedding_activation_bytes=embedding_activation_bytes(model, t, b, sp, saved) * scale,
            head_transient_bytes=head_transient_bytes(model, t, b, saved, pipelined=k.pp > 1, gathered=gl), logit_bytes=logit_bytes(model, t, b, gl),
            head_kept_bytes=head_kept_bytes(model, t, b, saved, pipelined=k.pp > 1, gathered=gl),
            recompute_working_bytes=full_layer_activation_bytes(model, t, b, sp, fused, saved, fp8) * scale + gathered,
            layer_params=layer_param_count(model, t), cp_all_gather_s=kv,
            layer_cache_bytes=fp8_weight_cache_bytes(model, t, self.framework.fp8_primary_weights) if fp8 and not self.framework.fp8_weight_casts else 0.0, overhead_bytes=dev.framework_overhead_gib * GIB,
            capacity_bytes=self.capacity_gib * GIB,
            end_param_table=tuple(end_param_count(model, t, e, h) for e in (False, True) for h in (False, True)))

    def p2p_s(self, k: Knobs) -> tuple[float, ...]:
        """Send/recv time of one microbatch's activation across each of the pp*v - 1 stage boundaries."""
        key = (k.tp, k.cp, k.pp, k.dp, k.virtual_stages, k.micro_batch, k.sequence_parallel)
        got = self._p2p.get(key)
        if got is None:
            nbytes = k.micro_batch / k.cp * self.model.seq_len * self.model.hidden * self.device.dtype_bytes
            links = pp_links(self.cluster, k.tp, k.dp * k.cp, k.pp)
            intra = self.cluster.intra_node.bandwidth_GBps
            out = []
            for s in range(k.pp * k.virtual_stages - 1):
                link = links[s % k.pp]
                split = k.tp if (k.sequence_parallel or (self.framework.p2p_scatter_gather and link.bandwidth_GBps < intra)) else 1
                out.append(comm.send_recv_s(nbytes / split, link))
            got = self._p2p[key] = tuple(out)
        return got

    def simulate(self, sched: str, p: int, m: int, v: int, fwd, bwd, p2p, rc, with_timeline: bool = False) -> schedule.SimResult:
        """schedule.simulate, memoised without a timeline (the search simulates each plan it shows twice)."""
        key = (sched, p, m, v, tuple(fwd), tuple(bwd), p2p if isinstance(p2p, (int, float)) else tuple(p2p), tuple(rc))
        got = None if with_timeline else self._sims.get(key)
        if got is None:
            got = schedule.simulate(sched, p, m, v, fwd, bwd, p2p_s=p2p, recompute_s=rc, with_timeline=with_timeline)
            if not with_timeline:
                self._sims = self._sims if len(self._sims) < 4096 else {}  # bounded: an exhaustive search prices thousands
                self._sims[key] = got
        return got

    def _dp_group(self, k: Knobs):
        """The ranks that hold the same weights (dp x cp, stride tp) and the link their rings run at."""
        n = k.dp * k.cp
        key = (k.tp, n)
        link = self._links.get(key)
        if link is None:
            link = self._links[key] = dp_link(self.cluster, k.tp, n)
        return n, link

    def dp_s(self, k: Knobs, params: float) -> float:
        """Gradient reduction of one pipeline device's parameters over the ranks that share its weights, once per
        step (ZeRO stages 0 and 1; stages 2 and 3 reduce-scatter per microbatch: sharding_s)."""
        if k.dp * k.cp == 1 or k.zero >= 2:
            return 0.0
        n, link = self._dp_group(k)
        g = params * self.framework.grad_reduce_bytes
        if k.zero == 1 and not self.framework.fp32_params:
            # Megatron's distributed optimizer: reduce-scatter the gradients, all-gather the updated bf16 weights
            # (Rajbhandari et al. 2020, section 5.1: the same volume as all-reduce); the gather under the next
            # forward where the framework overlaps it (_device_tail_s prices what that overlap leaves exposed).
            gather = 0.0 if self.framework.param_gather_overlap else comm.all_gather_s(params * self.device.dtype_bytes, n, link)
            return comm.reduce_scatter_s(g, n, link) + gather
        return comm.all_reduce_s(g, n, link)

    def sharding_s(self, k: Knobs, params: float) -> tuple[float, float, float]:
        """ZeRO's weight and gradient traffic for `params`, from planner/zero.py's table: (per microbatch in the
        forward, per microbatch in the backward, per step). Stage 3 all-gathers the weights (compute dtype) before
        each forward and backward; stages 2 and 3 reduce-scatter the gradients after each microbatch's backward;
        stage 2 gathers once per step; stage 1 in meshplan's runtime (ShardedOptimizer) broadcasts the
        updated fp32 weights after the step (Megatron's distributed optimizer: inside dp_s)."""
        if k.zero == 0 or k.dp * k.cp == 1:
            return 0.0, 0.0, 0.0
        key = (k.tp, k.dp * k.cp, k.zero, params)
        got = self._sharding.get(key)
        if got is None:
            got = self._sharding[key] = self._sharding_s(k, params)
        return got

    def _sharding_s(self, k: Knobs, params: float) -> tuple[float, float, float]:
        n, link = self._dp_group(k)
        mode = ZERO_MODES[k.zero]
        compute_bytes = 2 if self.device.dtype_bytes == 2 or not self.framework.fp32_params else 4
        gather = comm.all_gather_s(params * compute_bytes, n, link)
        scatter = comm.reduce_scatter_s(params * self.framework.grad_reduce_bytes, n, link) if mode.reduce_per_microbatch else 0.0
        forward = gather if mode.param_gathers_per_microbatch >= 1 else 0.0
        backward = (gather if mode.param_gathers_per_microbatch >= 2 else 0.0) + scatter
        if k.zero == 1:
            step = comm.all_gather_s(params * 4, n, link) if self.framework.fp32_params else 0.0
        else:
            step = gather * mode.param_gathers_per_step
        return forward, backward, step

    def device_tail_s(self, k: Knobs, params: float, m: int, backward_window_s: float,
                      chunk_forward_s: tuple[float, ...] = ()) -> tuple[float, float]:
        """(exposed data-parallel seconds, optimizer seconds) after a pipeline device's last backward, for a
        device holding `params` whose shortest stage backward is backward_window_s and whose stages' forwards
        are chunk_forward_s (the window of an overlapped weight gather; () for the search's bounds: none
        exposed). Both grow with params. (ZeRO 2 and 3's per-microbatch traffic sits in the stages' times.)"""
        key = (k.tp, k.dp, k.cp, k.pp, k.zero, params, m, backward_window_s, chunk_forward_s)
        got = self._tails.get(key)
        if got is None:
            got = self._tails[key] = self._device_tail_s(k, params, m, backward_window_s, chunk_forward_s)
        return got

    def _device_tail_s(self, k: Knobs, params: float, m: int, backward_window_s: float,
                       chunk_forward_s: tuple[float, ...]) -> tuple[float, float]:
        fsdp = (self.device.measured or {}).get("fsdp") if self.framework is MESHPLAN and k.zero >= 2 and k.dp * k.cp > 1 else None
        if fsdp:
            # Measured FSDP2 cost on this machine (profiled as stage 3 without pipelining: two gathers and a
            # reduce-scatter per microbatch); exposed, not overlapped. Stage 2 moves a third of it per microbatch.
            per_mb = (m if k.pp == 1 else 1) * (1.0 if k.zero == 3 else 1 / 3)
            dp = params * (fsdp["per_step_s_per_param"] + per_mb * fsdp["per_microbatch_s_per_param"])
        elif self.framework.overlaps_dp(k) and backward_window_s == float("inf"):
            dp = 0.0  # the search's bound: an overlap window as long as any backward
        else:
            window = backward_window_s if self.framework.overlaps_dp(k) else 0.0
            reduce = self.dp_s(k, params)
            # What runs under the backward is hidden, less the compute it takes from the device: measured for
            # meshplan's DDP by the profile (on CPU ranks the collective runs on the compute's cores: planner/fit.py
            # _ddp_overlap); 0 on a datasheet and for the other frameworks, which the profile did not run.
            hidden = min(reduce, window)
            dp = reduce - hidden + hidden * (overlap_cost(self.device) if self.framework is MESHPLAN else 0.0)
            if k.zero == 1 and self.framework.param_gather_overlap and not self.framework.fp32_params and k.dp * k.cp > 1:
                n, link = self._dp_group(k)
                gather = comm.all_gather_s(params * self.device.dtype_bytes, n, link)
                dp += comm.overlapped_param_gather_exposed_s(gather, chunk_forward_s, k.pp, m)
        if not fsdp:
            dp += self.sharding_s(k, params)[2]  # after the step (stage 1) or before the first forward (stage 2)
        shards = k.dp * k.cp if ZERO_MODES[k.zero].shards_optimizer else 1
        return dp, optimizer_step_s(self.device, params / shards) + self.grad_norm_s(k, params)

    def grad_norm_s(self, k: Knobs, params: float) -> float:
        """Gradient-norm clipping before the step (meshplan's runtime and Megatron-LM clip at 1.0): one read of
        the gradient bytes the device holds (its shard, where they are sharded) and a scalar all-reduce over
        every rank."""
        grad_bytes = self.terms(k).grad_bytes
        return memory_s(self.device, params * grad_bytes / self.device.dtype_bytes) + comm.scalar_all_reduce_s(self.cluster.gpus, self._world_link)


def fits_bytes(nbytes: float, capacity_bytes: float) -> bool:
    """The one test of 'fits' (predict, the split solver and the bounds use it alike)."""
    return nbytes <= capacity_bytes * (1 + 1e-9)
