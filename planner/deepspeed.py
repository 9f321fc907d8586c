"""What DeepSpeed's pipeline engine and its ZeRO-1 optimizer do, per microbatch and per step, beyond the terms every
framework shares (planner/terms.py): `deepspeed_extras`, called once from cost.predict for a framework with
deepspeed_pipe set.

Read from DeepSpeed v0.5.4 (6 Oct 2021), the first release with PR #1407 ("Big science related changes",
co-authored by Smith, Rajbhandari, Zhang and Yazdani Aminabadi of the MT-NLG paper), whose pipeline code is the
one MT-NLG's Megatron-DeepSpeed GPTModelPipe (one activation tensor per message) needs; and, for bf16, from the
DeepSpeed team's bf16 + pipeline + ZeRO-1 path (PR #1801, v0.6.x, deepspeed/runtime/bf16_optimizer.py):

- deepspeed/runtime/pipe/engine.py, PipelineEngine.__init__: is_pipe_partitioned = is_grad_partitioned =
  (tp > 1). _exec_send_activations / _exec_send_grads send a small LongTensor of metadata (PartitionedTensor.to_meta)
  and then the rank's 1/tp slice; the volume is what Framework.p2p_scatter_gather already prices. Not priced
  there: the metadata message per send, and the re-assembly (runtime/utils.py PartitionedTensor.full: zero-fill a
  flat buffer, all-gather over tp, copy the gathered list out, clone): _exec_forward_pass gathers its input,
  _exec_backward_pass gathers its own output (freed after it was partitioned) and the received gradient.
- Mixed precision in bf16 (Smith et al. 2022, section 2.3) with fp32 gradient accumulation: BF16_Optimizer
  clears the bf16 gradients before each backward and, after it, adds them into fp32 buffers
  (update_hp_grads: hp_grad.add_(lp.grad.to(fp32))), 18 bytes per parameter per microbatch.
- ZeRO-1 reduces the whole gradient buffer with an all-reduce (runtime/zero/stage2.py reduce_gradients ->
  buffered_reduce_fallback -> allreduce_bucket; the bf16 path: PipelineEngine._bf16_reduce_grads ->
  buffered_allreduce_fallback), not a reduce-scatter; each rank then updates its shard and all-gathers the
  16-bit weights (already in CostModel.dp_s).
- ReduceTiedGrads (PipelineEngine._exec_reduce_tied_grads -> PipelineModule.allreduce_tied_weight_gradients):
  the word embedding, tied between the first and the last stage (Megatron-DeepSpeed GPTModelPipe's TiedLayerSpec
  'embed'), has its gradient all-reduced between the two before the step.

Every term here is non-negative, so the search's bounds (planner/bounds.py), which do not see them, stay lower
bounds of predict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from planner import comm
from planner.compute import memory_s
from planner.plan import Knobs
from planner.terms import CostModel
from planner.topology import dp_link, pp_links, tp_link

# PartitionedTensor.full (runtime/utils.py, v0.5.4): torch.zeros of the full message (1 write), the all-gather
# into a list of views, which ProcessGroupNCCL flattens and copies back (1 read + 1 write), and the final
# .clone() (1 read + 1 write): five passes over the message besides the collective.
REGATHER_PASSES = 5
# to_meta(): [ndims, *shape, num_parts, rank, *partition offsets] as int64; its send is latency-bound.
META_BYTES = 8 * 16


@dataclass(frozen=True)
class DeepSpeedExtras:
    """DeepSpeed's seconds beyond the shared terms, for one configuration and split."""

    stage_costs: list
    """The stages' costs with the per-microbatch terms added (forward_s, backward_s and io_s)."""
    tail_s: tuple[float, ...]
    """Per pipeline device, seconds after its last backward besides CostModel.device_tail_s."""
    regather_s: tuple[float, ...]
    """Per stage and microbatch, metadata sends and PartitionedTensor re-assembly (forward + backward)."""
    accumulate_s: tuple[float, ...]
    """Per stage and microbatch, the gradient accumulation beyond the device curve's."""


def deepspeed_extras(cm: CostModel, knobs: Knobs, costs: list) -> DeepSpeedExtras:
    """The per-microbatch terms added to each stage's cost (metadata and re-gathers to its forward and backward,
    as the engine's order puts them; accumulation to its backward), and the per-device tail terms."""
    fw, model, dev, cluster = cm.framework, cm.model, cm.device, cm.cluster
    S, p, t = len(costs), knobs.pp, knobs.tp
    acc = [accumulate_s(cm, c.params) for c in costs]
    regather_f, regather_b = [0.0] * S, [0.0] * S
    if fw.deepspeed_pipe and p > 1 and t > 1:
        # (b, s, h) activations of micro_batch / cp sequences on a cp rank (CostModel.p2p_s).
        nbytes = knobs.micro_batch / knobs.cp * model.seq_len * model.hidden * dev.dtype_bytes
        links = pp_links(cluster, t, knobs.dp * knobs.cp, p)
        # PartitionedTensor.full: the all-gather over tp and its memory passes.
        gather = comm.all_gather_s(nbytes, t, tp_link(cluster, t)) + memory_s(dev, REGATHER_PASSES * nbytes / dev.dtype_bytes)
        for k in range(S):
            # A metadata message precedes each partitioned send: to k - 1 and k + 1 in the forward and the
            # backward each (cost.blocking_io_s's messages).
            meta = ((comm.send_recv_s(META_BYTES, links[(k - 1) % p]) if k > 0 else 0.0)
                    + (comm.send_recv_s(META_BYTES, links[k % p]) if k < S - 1 else 0.0))
            # _exec_forward_pass gathers the received input (not on the first stage); _exec_backward_pass gathers
            # the stage's own output and the received gradient (not on the last stage, whose backward starts
            # from the loss).
            regather_f[k] = meta + (gather if k > 0 else 0.0)
            regather_b[k] = meta + (2 * gather if k < S - 1 else 0.0)
    # io_s is counted once per forward and once per backward (cost.predict): it carries the mean of the two.
    out = [dataclasses.replace(c, forward_s=c.forward_s + regather_f[k], backward_s=c.backward_s + regather_b[k] + acc[k],
                               io_s=c.io_s + (regather_f[k] + regather_b[k]) / 2)
           for k, c in enumerate(costs)]
    regather = tuple(f + b for f, b in zip(regather_f, regather_b))
    return DeepSpeedExtras(out, tuple(tail_s(cm, knobs, costs)), regather, tuple(acc))


def accumulate_s(cm: CostModel, params: float) -> float:
    """Seconds per microbatch to accumulate the gradients of `params` beyond what the device curve contains.
    BF16_Optimizer.update_hp_grads (bf16_optimizer.py, DeepSpeed v0.6.x) converts each bf16 gradient to fp32 and
    adds it to the fp32 buffer: read 2 + write 4, then read 4 + 4 and write 4, 18 bytes per parameter. The A100
    curve was fitted to Megatron-LM's fp16 runs (Narayanan et al. 2021 Table 1; examples/sc21/run_table_1.sh:
    --fp16, local DDP), whose in-place fp16 accumulate (read 2 + 2, write 2) it already contains: the framework's
    grad_accumulate_bytes is the difference, 12."""
    # Memory-bound: the framework's bytes per parameter at the device's HBM rate (compute.memory_s).
    return memory_s(cm.device, cm.framework.grad_accumulate_bytes * params / cm.device.dtype_bytes)


def tail_s(cm: CostModel, knobs: Knobs, costs: list) -> list[float]:
    """Per pipeline device: ZeRO-1's all-reduce where CostModel.dp_s prices a reduce-scatter, and the tied
    embedding's gradient all-reduce on the first and last device."""
    p, v, fw = knobs.pp, knobs.virtual_stages, cm.framework
    out = [0.0] * p
    if not fw.deepspeed_pipe:
        return out
    n = knobs.dp * knobs.cp
    link = dp_link(cm.cluster, knobs.tp, n)
    for i in range(p):
        params = sum(costs[c * p + i].params for c in range(v))
        if knobs.zero == 1 and n > 1:
            # Thakur et al. 2005: all-reduce sends 2(n-1)/n of the buffer, reduce-scatter (n-1)/n.
            g = params * fw.grad_reduce_bytes
            out[i] += comm.all_reduce_s(g, n, link) - comm.reduce_scatter_s(g, n, link)
    if p > 1:
        # The word embedding's tp shard (padded vocab / tp x h), its gradient in the reduction's precision,
        # all-reduced over the two ranks that hold it, across the pipeline's wrap-around link.
        t = knobs.tp
        table = cm.model.padded_vocab(t) * cm.model.hidden / t * fw.grad_reduce_bytes
        tied = comm.all_reduce_s(table, 2, pp_links(cm.cluster, t, knobs.dp * knobs.cp, p)[p - 1])
        out[0] += tied
        out[p - 1] += tied
    return out
