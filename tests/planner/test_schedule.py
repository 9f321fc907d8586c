"""planner/schedule.py: the op order is torch's, and the simulator's timing obeys the known closed forms."""

from __future__ import annotations

import itertools

import pytest

from planner import plan, schedule
from planner.schedule import Op, bubble_fraction, schedule_constraint, simulate, stage_order

T_F, T_B = 1.0, 2.0  # integer-valued seconds keep the float arithmetic exact


def _uniform(schedule_name, pp, m, v=1, t_f=T_F, t_b=T_B, **kwargs):
    n = pp * v
    return simulate(schedule_name, pp, m, v, [t_f] * n, [t_b] * n, **kwargs)


# ---- closed forms --------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule_name", ["1f1b", "gpipe"])
def test_1f1b_bubble_fraction_is_p_minus_1_over_m_plus_p_minus_1(schedule_name):
    for pp, m in itertools.product([1, 2, 3, 4, 8], [8, 9, 16, 32]):
        result = _uniform(schedule_name, pp, m)
        # Equal stages, free communication: iteration = (m + p - 1)(t_f + t_b), bubble = (p - 1)(t_f + t_b).
        assert result.iteration_s == (m + pp - 1) * (T_F + T_B)
        assert result.bubble_s == (pp - 1) * (T_F + T_B)
        assert result.bubble_s / result.iteration_s == pytest.approx((pp - 1) / (m + pp - 1), rel=1e-12)
        assert bubble_fraction(schedule_name, pp, m) == pytest.approx((pp - 1) / (m + pp - 1), rel=1e-12)
        assert result.busy_s == tuple([m * (T_F + T_B)] * pp)


def test_gpipe_bubble_fraction_holds_with_fewer_microbatches_than_stages():
    for pp, m in [(4, 1), (4, 3), (8, 5)]:
        assert _uniform("gpipe", pp, m).bubble_s == (pp - 1) * (T_F + T_B)


def test_interleaving_divides_bubble_by_v():
    checked = 0
    for pp, v in itertools.product([2, 3, 4, 8], [1, 2, 3, 4]):
        for m in range(pp, 4 * pp + 1):
            if schedule_constraint("interleaved", pp, m, v) is not None:
                continue
            # Each of a device's v chunks costs 1/v of that device's work, so one device's stage work is
            # v*(T_F + T_B) and the plain 1F1B bubble for the same model is (p - 1) * v * (T_F + T_B).
            interleaved = _uniform("interleaved", pp, m, v)
            plain = _uniform("1f1b", pp, m, 1, t_f=v * T_F, t_b=v * T_B)
            assert interleaved.bubble_s == plain.bubble_s / v, (pp, m, v)
            assert interleaved.bubble_s / interleaved.iteration_s == pytest.approx(
                bubble_fraction("interleaved", pp, m, v), rel=1e-12)
            checked += 1
    assert checked > 100


def test_interleaving_with_fewer_microbatches_than_pp_keeps_more_than_bubble_over_v():
    # torch allows m < pp for interleaved (one round), but the chunks then wait for the microbatches to come
    # round, so the closed form is only a lower bound there.
    pp, m, v = 4, 2, 2
    result = _uniform("interleaved", pp, m, v)
    assert result.bubble_s > (pp - 1) * (T_F + T_B)


# ---- dependencies and timeline -------------------------------------------------------------------------


def _check_timeline(result, pp, m, n, p2p_s):
    by_key = {(e.op, e.stage, e.microbatch): e for e in result.timeline}
    compute = [e for e in result.timeline if e.op != "send"]
    assert len([e for e in compute if e.op == "forward"]) == n * m
    assert len([e for e in compute if e.op == "backward"]) == n * m
    for e in compute:
        if e.op == "forward" and e.stage > 0:
            assert e.start_s >= by_key[("forward", e.stage - 1, e.microbatch)].end_s + p2p_s
        if e.op in ("backward", "recompute"):
            assert e.start_s >= by_key[("forward", e.stage, e.microbatch)].end_s
            if e.stage < n - 1:
                assert e.start_s >= by_key[("backward", e.stage + 1, e.microbatch)].end_s + p2p_s
        assert e.device == e.stage % pp
    for device in range(pp):
        mine = sorted((e for e in compute if e.device == device), key=lambda e: e.start_s)
        for earlier, later in zip(mine, mine[1:]):
            assert later.start_s >= earlier.end_s, (device, earlier, later)
        assert sum(e.end_s - e.start_s for e in mine) == pytest.approx(result.busy_s[device])
    assert max(e.end_s for e in compute) == result.iteration_s
    for device in range(pp):
        assert max(e.end_s for e in compute if e.device == device) == result.finish_s[device]


@pytest.mark.parametrize("schedule_name,pp,m,v", [
    ("gpipe", 4, 6, 1), ("1f1b", 4, 6, 1), ("1f1b", 3, 7, 1), ("interleaved", 4, 8, 2),
    ("interleaved", 3, 6, 3), ("interleaved", 4, 3, 2), ("interleaved", 1, 4, 3),
])
def test_every_event_starts_after_its_inputs_and_no_device_runs_two_ops_at_once(schedule_name, pp, m, v):
    n = pp * v
    p2p = 0.25 if pp > 1 else 0.0
    # Uneven stages so that the order, not symmetry, decides the timing.
    forward_s = [1.0 + 0.3 * k for k in range(n)]
    backward_s = [2.0 + 0.1 * (k % 3) for k in range(n)]
    result = simulate(schedule_name, pp, m, v, forward_s, backward_s, p2p_s=p2p, recompute_s=[0.5] * n)
    _check_timeline(result, pp, m, n, p2p)
    assert len([e for e in result.timeline if e.op == "recompute"]) == n * m


def test_timeline_has_send_events_only_when_p2p_costs_time():
    with_p2p = _uniform("1f1b", 4, 8, p2p_s=0.5)
    sends = [e for e in with_p2p.timeline if e.op == "send"]
    # Every forward except the last stage's sends an activation; every backward except stage 0's a gradient.
    assert len(sends) == 2 * 3 * 8
    assert all(e.end_s - e.start_s == 0.5 for e in sends)
    assert not [e for e in _uniform("1f1b", 4, 8).timeline if e.op == "send"]


def test_p2p_on_the_critical_path_adds_one_send_each_way():
    f, b, c = [1.0, 3.0], [2.0, 5.0], 0.5
    # One microbatch (GPipe; 1F1B needs m >= pp): F0, send, F1, B1, send back, B0.
    result = simulate("gpipe", 2, 1, 1, f, b, p2p_s=c)
    assert result.iteration_s == f[0] + c + f[1] + b[1] + c + b[0]
    # 1F1B, m = 2: the last stage's F0 B0 F1 B1 is the critical path; its first input and stage 0's last
    # backward input each wait one send.
    assert simulate("1f1b", 2, 2, 1, f, b).iteration_s == 19.0
    assert simulate("1f1b", 2, 2, 1, f, b, p2p_s=c).iteration_s == 19.0 + 2 * c
    per_link = simulate("gpipe", 3, 1, 1, [1.0] * 3, [1.0] * 3, p2p_s=[0.5, 2.0])
    assert per_link.iteration_s == 6 * 1.0 + 2 * (0.5 + 2.0)


def test_recompute_runs_before_backward_and_counts_as_busy():
    result = simulate("1f1b", 2, 2, 1, [1.0, 1.0], [2.0, 2.0], recompute_s=[1.0, 1.0])
    assert result.busy_s == (8.0, 8.0)
    for e in result.timeline:
        if e.op == "recompute":
            backward = next(x for x in result.timeline
                            if (x.op, x.stage, x.microbatch) == ("backward", e.stage, e.microbatch))
            assert backward.start_s == e.end_s


def test_without_timeline_the_times_are_the_same():
    args = ("interleaved", 4, 8, 2, [1.0 + k for k in range(8)], [2.0] * 8, 0.3)
    full, bare = simulate(*args), simulate(*args, with_timeline=False)
    assert bare.timeline == ()
    assert (bare.iteration_s, bare.busy_s, bare.bubble_s, bare.finish_s) == (
        full.iteration_s, full.busy_s, full.bubble_s, full.finish_s)


# ---- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (("1f1b", 4, 3, 1), "num_microbatches >= pp"),
    (("gpipe", 4, 8, 2), "virtual_stages must be 1"),
    (("interleaved", 4, 9, 2), "multiple of its number of rounds"),
    (("zb", 4, 8, 1), "schedule must be one of"),
    (("1f1b", 0, 8, 1), "pp must be a positive integer"),
])
def test_combinations_torch_rejects_are_named_and_raise(args, needle):
    assert needle in schedule_constraint(*args)
    with pytest.raises(ValueError, match=needle):
        stage_order(*args)


def test_simulate_rejects_cost_lists_of_the_wrong_length():
    with pytest.raises(ValueError, match="forward_s needs 8"):
        simulate("interleaved", 4, 8, 2, [1.0] * 4, [1.0] * 8)
    with pytest.raises(ValueError, match="p2p_s needs 3"):
        simulate("1f1b", 4, 8, 1, [1.0] * 4, [1.0] * 4, p2p_s=[0.1] * 4)


@pytest.mark.parametrize("bad_rank", [0, 1])
def test_an_inconsistent_order_raises_instead_of_hanging(monkeypatch, bad_rank):
    # Rank 0 first: its B(0) waits for stage 1's backward, which waits for stage 0's forward (a cycle).
    # Rank 1 first: the last stage's B(0) waits for its own F(0), which comes after it.
    def swapped(rank, pp, m):
        return [("B", 0, rank), ("F", 0, rank)] if rank == bad_rank else [("F", 0, rank), ("B", 0, rank)]
    monkeypatch.setattr(schedule, "_1f1b_ops", swapped)
    clear = lambda: (schedule._order.cache_clear(), schedule._slots.cache_clear())  # noqa: E731
    clear()  # orders and their slot numbers are cached; drop the good ones (and the bad ones afterwards)
    try:
        with pytest.raises(ValueError, match="inconsistent order"):
            simulate("1f1b", 2, 2, 1, [1.0, 1.0], [1.0, 1.0])
    finally:
        clear()


def test_schedule_names_are_the_plan_file_spelling():
    assert set(schedule.SCHEDULES) == set(plan.SCHEDULES)


# ---- same order as torch.distributed.pipelining --------------------------------------------------------


class _RecordingStage:
    """Stands in for a torch `PipelineStage` on one rank: torch's schedule code drives it unchanged.

    Compute calls (`forward_one_chunk`, `backward_one_chunk`) append ("F"|"B", microbatch, stage) to a shared
    log; every p2p op list is empty, so `_batch_p2p` never touches a process group. The order in the log is
    therefore exactly the order in which the schedule, as torch 2.13 executes it, calls compute on that rank.
    """

    def __init__(self, stage_index, num_stages, pp, rank, log):
        self.stage_index, self.num_stages = stage_index, num_stages
        self.group_size, self.group_rank = pp, rank
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.device, self.submod, self.has_backward = "cpu", None, True
        self.args_recv_info, self.act_send_info, self.output_chunks = {0: ()}, {}, []
        self.stage_index_to_group_rank: dict[int, int] = {}
        self.log = log

    def forward_one_chunk(self, mb, *args, **kwargs):
        self.log.append(("F", mb, self.stage_index))

    def backward_one_chunk(self, mb, **kwargs):
        self.log.append(("B", mb, self.stage_index))

    def _no_p2p(self, *args, **kwargs):
        return []

    get_fwd_recv_ops = get_fwd_send_ops = get_bwd_recv_ops = get_bwd_send_ops = _no_p2p
    _get_init_p2p_neighbors_ops = _no_p2p

    def _nothing(self, *args, **kwargs):
        return None

    _prepare_forward_infra = _prepare_backward_infra = clear_runtime_states = perform_reduce_grad = _nothing
    set_local_fwd_input = set_local_bwd_input = get_local_bwd_output = _nothing


def _torch_order(schedule_name, pp, m, v):
    """Run torch's own `_step_microbatches` once per rank with recording stages; return each rank's compute log.

    GPipe and 1F1B run `PipelineScheduleSingle` subclasses' warm-up / 1B1F / cooldown loops; interleaved runs
    `_PipelineScheduleRuntime._step_microbatches`, which walks `pipeline_order_with_comms` (the compute order
    from `_calculate_single_rank_operations` with torch's send/recv lowered into it). A rank's sequence of
    compute calls is a static program: it does not depend on when its peers' messages arrive, only on
    (pp, m, v, rank). With empty p2p lists every wait returns at once, so running the ranks one after the
    other in one process, without a process group, yields the same per-rank order as a real gloo run.
    """
    from torch.distributed.pipelining import ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B

    orders = []
    for rank in range(pp):
        log: list[tuple[str, int, int]] = []
        stages = [_RecordingStage(rank + c * pp, pp * v, pp, rank, log) for c in range(v)]
        loss_fn = lambda output, target: None  # noqa: E731  (any loss_fn switches the backward on)
        if schedule_name == "interleaved":
            sched = ScheduleInterleaved1F1B(stages, m, loss_fn=loss_fn)
        else:
            cls = ScheduleGPipe if schedule_name == "gpipe" else Schedule1F1B
            sched = cls(stages[0], m, loss_fn=loss_fn)
        sched._step_microbatches(target_mbs=[None] * m)
        orders.append([Op(*entry) for entry in log])
    return orders


# GPipe and 1F1B: one stage per rank. Interleaved: v chunks per rank, m both a multiple of pp and not
# (torch's flexible rounds), m < pp, v = 1 (which torch does NOT run as Schedule1F1B) and pp = 1.
CASES = {
    "gpipe": [(1, 3, 1), (2, 1, 1), (2, 4, 1), (4, 3, 1), (4, 8, 1), (8, 16, 1)],
    "1f1b": [(1, 3, 1), (2, 2, 1), (2, 5, 1), (4, 4, 1), (4, 9, 1), (8, 8, 1), (8, 20, 1)],
    "interleaved": [(2, 4, 2), (4, 8, 2), (4, 3, 2), (4, 10, 2), (4, 12, 3), (3, 6, 4), (4, 8, 1), (8, 16, 2),
                    (8, 24, 4), (1, 4, 2), (2, 2, 3)],
}


def _assert_matches_torch(schedule_name):
    torch = pytest.importorskip("torch")
    assert torch.__version__.startswith("2.13"), "the order is pinned to torch 2.13's schedules"
    for pp, m, v in CASES[schedule_name]:
        assert stage_order(schedule_name, pp, m, v) == _torch_order(schedule_name, pp, m, v), (pp, m, v)


def test_stage_order_matches_torch_pipelining_gpipe():
    """ScheduleGPipe's order, as run by its `_step_microbatches` on each rank (see _RecordingStage)."""
    _assert_matches_torch("gpipe")


def test_stage_order_matches_torch_pipelining_1f1b():
    """Schedule1F1B's order, as run by its `_step_microbatches` on each rank (see _RecordingStage)."""
    _assert_matches_torch("1f1b")


def test_stage_order_matches_torch_pipelining_interleaved():
    """ScheduleInterleaved1F1B's order: its runtime walks `pipeline_order_with_comms` (compute ops plus the
    send/recv torch inserts) in `_step_microbatches`; the recording stages log the compute calls it makes."""
    _assert_matches_torch("interleaved")


def test_interleaved_with_one_virtual_stage_is_not_torch_1f1b():
    # torch's interleaved warm-up is 2*(pp-1-rank) forwards even for v = 1; Schedule1F1B's is pp-rank.
    # Same time for equal stages, different order (and more activations in flight).
    assert stage_order("interleaved", 4, 8, 1) != stage_order("1f1b", 4, 8, 1)
    assert _uniform("interleaved", 4, 8, 1).iteration_s == _uniform("1f1b", 4, 8, 1).iteration_s


def test_torch_rejects_what_schedule_constraint_rejects():
    pytest.importorskip("torch")
    for schedule_name, pp, m, v in [("1f1b", 4, 3, 1), ("interleaved", 4, 9, 2), ("interleaved", 3, 7, 2)]:
        assert schedule_constraint(schedule_name, pp, m, v) is not None
        with pytest.raises(ValueError):
            _torch_order(schedule_name, pp, m, v)


def _alive_walk(sched, p, m, v):
    """Per device, every per-chunk alive vector right after a forward, by walking stage_order."""
    out = []
    for ops in schedule.stage_order(sched, p, m, v):
        cur, seen = [0] * v, set()
        for op in ops:
            cur[op.stage // p] += 1 if op.kind == "F" else -1
            if op.kind == "F":
                seen.add(tuple(cur))
        out.append(seen)
    return out


@pytest.mark.parametrize("sched", ["1f1b", "gpipe", "interleaved"])
def test_inflight_vectors_give_the_same_peak_as_walking_the_op_order(sched):
    import random

    rng = random.Random(3)
    for p in (1, 2, 3, 4, 8):
        for m in (1, 2, 3, 4, 6, 8, 12, 16, 24):
            for v in ((1,) if sched != "interleaved" else (1, 2, 3, 4)):
                if schedule.schedule_constraint(sched, p, m, v):
                    continue
                fast = schedule.inflight_vectors(sched, p, m, v)
                for i, seen in enumerate(_alive_walk(sched, p, m, v)):
                    for _ in range(5):
                        x = [rng.uniform(0, 3) for _ in range(v)]
                        assert schedule.peak_inflight(fast[i], x) == pytest.approx(max(sum(a * b for a, b in zip(vec, x)) for vec in seen))
                    assert schedule.alive_at_peak(sched, p, m, v, i) == max(sum(vec) for vec in seen)


@pytest.mark.parametrize("sched", ["1f1b", "gpipe", "interleaved"])
def test_each_device_starts_with_a_forward_and_ends_with_a_backward_of_its_first_chunk(sched):
    # planner/bounds.py's chain bound rests on this.
    for p in (1, 2, 3, 4, 8):
        for m in (1, 2, 4, 8, 16):
            for v in ((1,) if sched != "interleaved" else (1, 2, 3, 4)):
                if schedule.schedule_constraint(sched, p, m, v):
                    continue
                for i, ops in enumerate(schedule.stage_order(sched, p, m, v)):
                    assert (ops[0].kind, ops[0].stage) == ("F", i)
                    assert (ops[-1].kind, ops[-1].stage) == ("B", i)
